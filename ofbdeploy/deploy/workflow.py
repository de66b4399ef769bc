"""Export and profile a dense/pruned pair: what the pipeline's export and profile stages and the
``ofbdeploy export`` / ``ofbdeploy profile`` commands share.

Deploy code knows nothing about the search: it takes plain timm models (dense and pruned) and writes
ONNX files of each precision asked for (fp32 and fp16 checked in ONNX Runtime against torch, int8 as a Q/DQ
graph calibrated and checked the same way), optional strongly typed TensorRT engines built from those files
(always checked against ONNX Runtime on the same file) and latency rows measured with every model and
precision of a backend alternating in one process. A backend, precision or batch that cannot run here is
skipped with its reason and the rest is measured.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ofbdeploy.arch import ArchSpec
from ofbdeploy.deploy import tensorrt_engine
from ofbdeploy.deploy.config import ExportCfg, ProfileCfg
from ofbdeploy.deploy.measure import Blocks, LatencyStats, QuietHost, summarise_rounds, time_rounds, wait_for_quiet
from ofbdeploy.deploy.onnx_export import FP32_OPS_IN_FP16, check_against_torch, export_onnx
from ofbdeploy.deploy.parity import Parity
from ofbdeploy.deploy.quantize import INT8_TENSORRT, QUANTISED_OPS, quantize_int8, tensorrt_int8
from ofbdeploy.deploy.runtimes import registry
from ofbdeploy.deploy.runtimes.base import Runner
from ofbdeploy.deploy.runtimes.errors import BackendError, BackendUnavailable
from ofbdeploy.io import atomic_write_text

log = logging.getLogger("ofbdeploy.deploy")

MODELS = ("dense", "pruned")
QUIET_TRIES = 3  # measurements a profile takes at most while the host is loaded
ARTIFACTS_FILE = "export.json"
ARTIFACTS_FORMAT = "ofbdeploy.export/2"  # paths relative to the export directory


def onnx_key(name: str, precision: str) -> str:
    """The artifact name of a model's ONNX file (and engine) in ``precision``: "pruned", "pruned-int8", ..."""
    return name if precision == "fp32" else f"{name}-{precision}"


@dataclass
class DeployArtifacts:
    """Files an export wrote, the parity figures of each, and their accuracy on ONNX Runtime CPU."""

    onnx: dict[str, str] = field(default_factory=dict)  # "dense", "pruned", "pruned-fp16", "pruned-int8", ...
    engines: dict[str, str] = field(default_factory=dict)  # "pruned-fp16", ...
    engine_tf32: dict[str, bool] = field(default_factory=dict)  # the TF32 flag each engine was built with
    checks: list[dict[str, Any]] = field(default_factory=list)
    accuracy: list[dict[str, Any]] = field(default_factory=list)

    def save(self, directory: Path) -> None:
        """export.json records every file under ``directory`` relative to it, so a copied or moved run (or
        model directory) uses its own files."""
        record = {"format": ARTIFACTS_FORMAT, **self._with_paths(lambda p: _relative_to(p, directory))}
        atomic_write_text(directory / ARTIFACTS_FILE, json.dumps(record, indent=1) + "\n")

    @classmethod
    def load(cls, directory: Path) -> DeployArtifacts:
        """The record of ``directory`` with its paths as this process reaches them (``directory / name``).

        Records of older versions (no ``format``) hold paths as their writer reached them, absolute or from
        its working directory; they are read as relative to the folder they name for the fp32 ONNX files
        (the export directory they were written in), so a copied run no longer measures the original's files.
        """
        path = directory / ARTIFACTS_FILE
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        if data.pop("format", None) != ARTIFACTS_FORMAT:
            older = cls(**data)
            written_in = next((Path(p).parent for p in older.onnx.values()), None)
            if written_in is not None:
                data = older._with_paths(lambda p: _relative_to(p, written_in))
        record = cls(**data)
        return cls(**record._with_paths(lambda p: p if Path(p).is_absolute() else str(directory / p)))

    def _with_paths(self, convert: Callable[[str], str]) -> dict[str, Any]:
        """The record as a dict, every file path (ONNX, engines, and those in checks and accuracy) converted."""
        return {"onnx": {k: convert(v) for k, v in self.onnx.items()},
                "engines": {k: convert(v) for k, v in self.engines.items()},
                "engine_tf32": dict(self.engine_tf32),
                "checks": [{**c, "path": convert(c["path"])} if "path" in c else dict(c) for c in self.checks],
                "accuracy": [{**a, "path": convert(a["path"])} if "path" in a else dict(a) for a in self.accuracy]}


def _relative_to(path: str, directory: Path) -> str:
    """``path`` relative to ``directory`` when it lies in it; absolute otherwise (a file kept elsewhere)."""
    for inside, folder in ((Path(path), directory), (Path(path).absolute(), directory.absolute())):
        if inside.is_relative_to(folder):
            return inside.relative_to(folder).as_posix()
    return str(Path(path).absolute())


def export_models(
    models: dict[str, nn.Module],
    directory: Path,
    cfg: ExportCfg,
    *,
    img_size: int,
    in_chans: int = 3,
    check_images: Tensor | None = None,
    calibration: np.ndarray | None = None,
    tf32: bool = True,
) -> DeployArtifacts:
    """ONNX of every model in each precision ``cfg`` asks for, then TensorRT engines where it asks.

    ``calibration`` (N, C, H, W) calibrates the int8 graphs; ``tf32`` is the TF32 flag engines are built with.
    """
    if cfg.trt:
        tensorrt_engine.require_tensorrt()  # say so before exporting anything
    directory.mkdir(parents=True, exist_ok=True)
    artifacts = DeployArtifacts()
    for name, model in models.items():
        for precision in cfg.onnx_precisions():
            key = onnx_key(name, precision)
            path = directory / f"{key}.onnx"
            if precision == "int8":
                entry = _quantise(model, Path(artifacts.onnx[name]), path, cfg, img_size=img_size, in_chans=in_chans,
                                  check_images=check_images, calibration=calibration)
            else:
                result = export_onnx(model, path, img_size=img_size, in_chans=in_chans, opset=cfg.opset,
                                     fp16=precision == "fp16", simplify=cfg.simplify, check_inputs=check_images)
                entry = result.to_dict()
            _record(artifacts, key, precision, path, entry)
            if precision == "int8":
                key = onnx_key(name, INT8_TENSORRT)
                path = directory / f"{key}.onnx"
                entry = _tensorrt_int8(model, Path(artifacts.onnx[onnx_key(name, "int8")]), Path(artifacts.onnx[name]),
                                       path, img_size=img_size, in_chans=in_chans, check_images=check_images,
                                       attention=cfg.int8_attention == "all")
                _record(artifacts, key, INT8_TENSORRT, path, entry)
        if cfg.trt:
            _build_engines(name, directory, cfg, artifacts, img_size=img_size, in_chans=in_chans,
                           check_images=check_images, tf32=tf32)
    artifacts.save(directory)
    return artifacts


def _record(artifacts: DeployArtifacts, key: str, precision: str, path: Path, entry: dict[str, Any]) -> None:
    """One exported file and its check in the artifacts (and the log)."""
    artifacts.onnx[key] = str(path)
    artifacts.checks.append({"model": key, "kind": "onnx", "precision": precision, **entry})
    log.info("exported %s: max |ORT - torch| %.2e, top-1 agreement %.1f%%", path, entry["max_abs_diff"],
             100 * entry["top1_agreement"])


def _tensorrt_int8(model: nn.Module, int8: Path, fp32: Path, path: Path, *, img_size: int, in_chans: int,
                   check_images: Tensor | None, attention: bool) -> dict[str, Any]:
    """The int8 file for TensorRT (int8 weight products, and attention products with ``attention``; fp16
    elsewhere) from the checked int8 and fp32 files, itself checked against torch before it lands."""
    checked: list[Parity] = []

    def check(candidate: Path) -> None:
        checked.append(check_against_torch(model, candidate, "int8", img_size=img_size, in_chans=in_chans,
                                           check_inputs=check_images, name=path))

    tensorrt_int8(int8, fp32, path, check, attention=attention)
    parity = checked[0]
    return {"path": str(path), "max_abs_diff": parity.max_abs_diff, "top1_agreement": parity.top1_agreement,
            "check_images": parity.images, "tolerance": parity.tolerance,
            "min_top1_agreement": parity.min_top1_agreement, "fp32_ops": list(FP32_OPS_IN_FP16),
            "int8_ops": list(QUANTISED_OPS), "int8_attention": attention}


def _quantise(model: nn.Module, source: Path, path: Path, cfg: ExportCfg, *, img_size: int, in_chans: int,
              check_images: Tensor | None, calibration: np.ndarray | None) -> dict[str, Any]:
    """The int8 Q/DQ file of ``model`` from its checked fp32 file, itself checked against torch before it lands."""

    def check(candidate: Path) -> Parity:
        return check_against_torch(model, candidate, "int8", img_size=img_size, in_chans=in_chans,
                                   check_inputs=check_images, name=path)

    result = quantize_int8(source, path, calibration, method=cfg.calibration_method,
                           attention=cfg.int8_attention != "none", check=check)
    parity = result.parity
    return {"path": str(path), "max_abs_diff": parity.max_abs_diff, "top1_agreement": parity.top1_agreement,
            "check_images": parity.images, "tolerance": parity.tolerance,
            "min_top1_agreement": parity.min_top1_agreement, "calibration_images": result.calibration_images,
            "calibration_method": result.method, "quantised_nodes": result.quantised_nodes, "reused": result.reused}


def _build_engines(name: str, directory: Path, cfg: ExportCfg, artifacts: DeployArtifacts, *, img_size: int,
                   in_chans: int, check_images: Tensor | None, tf32: bool) -> None:
    """One strongly typed engine per precision, each from the ONNX file of that precision, each checked."""
    low, opt, high = cfg.batch_range
    images = check_images if check_images is not None else torch.randn(
        low, in_chans, img_size, img_size, generator=torch.Generator().manual_seed(0))
    tensorrt = registry.get("tensorrt")
    for precision in cfg.trt_precisions:
        onnx_path = Path(artifacts.onnx[onnx_key(name, tensorrt.file_precision(precision))])
        spec = tensorrt_engine.EngineSpec(precision=precision, min_batch=low, opt_batch=opt, max_batch=high,
                                          img_size=img_size, in_chans=in_chans, tf32=tf32)
        engine = tensorrt_engine.build_engine(onnx_path, spec, directory / "engines", log=log)
        parity = tensorrt_engine.check_engine_parity(engine, onnx_path, images.numpy().astype(np.float32),
                                                     precision=precision, batch_range=(low, high), tf32=tf32)
        engine_key = f"{name}-{precision}"
        artifacts.engines[engine_key] = str(engine)
        artifacts.engine_tf32[engine_key] = tf32
        artifacts.checks.append({"model": engine_key, "kind": "tensorrt", "precision": precision, "path": str(engine),
                                 "tf32": tf32, **parity, "check_images": parity["images"]})
        log.info("TensorRT %s engine %s: max |TRT - ORT| %.2e, top-1 agreement %.1f%%", precision, engine,
                 parity["max_abs_diff"], 100 * parity["top1_agreement"])


def with_random_weights(spec: ArchSpec, build: Callable[[ArchSpec], nn.Module]) -> nn.Module:
    """A plain model of ``spec`` made by the caller's ``build`` (which leaves weights uninitialised: they are
    normally loaded), with seeded random weights: enough for latency and export checks."""
    torch.manual_seed(0)
    model = build(spec)
    model.init_weights()
    return model.eval()


def dense_like(spec: ArchSpec, build: Callable[[ArchSpec], nn.Module]) -> nn.Module:
    """The unpruned counterpart of ``spec``, with random weights."""
    return with_random_weights(ArchSpec.dense(spec.base), build)


def make_runner(backend: str, name: str, models: dict[str, nn.Module], artifacts: DeployArtifacts, cfg: ProfileCfg,
                precision: str | None = None) -> Runner:
    """The runner of model ``name`` in ``precision`` (default: the profile's first) on ``backend``, on the artifact
    its runtime runs: the module, the ONNX file it reads for that precision, or the engine."""
    precision = precision or cfg.precisions[0]
    runtime = registry.get(backend)
    missing = runtime.missing()
    if missing is not None:  # say what the machine lacks before what the export lacks
        raise BackendUnavailable(f"{backend}: {missing}")
    if runtime.artifact == "module":
        return registry.create_runner(backend, model=models[name], precision=precision, threads=cfg.threads,
                                      tf32=cfg.tf32)
    if runtime.artifact == "engine":
        key = f"{name}-{precision}"
        engine = artifacts.engines.get(key)
        if engine is None:
            raise BackendUnavailable(f"tensorrt: no {precision} engine for {name}; set export.trt and "
                                     f"export.trt_precisions to include {precision}")
        built_with = artifacts.engine_tf32.get(key, cfg.tf32)
        if built_with != cfg.tf32:
            raise BackendUnavailable(f"tensorrt: the {precision} engine of {name} was built with TF32 "
                                     f"{'on' if built_with else 'off'}, the profile's policy is "
                                     f"{'on' if cfg.tf32 else 'off'}; export again")
        return registry.create_runner(backend, engine_path=Path(engine), precision=precision, tf32=built_with)
    graph = runtime.file_precision(precision)
    onnx = artifacts.onnx.get(onnx_key(name, graph))
    if onnx is None:
        wanted = graph.split("-")[0]  # the int8 file made for TensorRT comes with the int8 export
        raise BackendUnavailable(f"{backend}: no {graph} ONNX export of {name}; set export.{wanted} "
                                 f"(or ofbdeploy export --precision {wanted})")
    return registry.create_runner(backend, onnx_path=Path(onnx), precision=precision, threads=cfg.threads,
                                  tf32=cfg.tf32)


def skip_entry(backend: str, batch: int | None, precision: str, reason: Exception | str) -> dict[str, Any]:
    """A ``profile_skipped`` record: what was not measured (``batch`` None: no batch of it) and why."""
    return {"backend": backend, "batch": batch, "precision": precision, "reason": str(reason)}


def profile_models(
    models: dict[str, nn.Module], artifacts: DeployArtifacts, cfg: ProfileCfg, flops_ratio: float,
    quiet: dict[tuple[str, int, str], QuietHost] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Latency rows (per backend, precision and batch) of dense vs pruned, and what could not be measured.

    On each backend and batch, every precision's dense and pruned runners alternate in one measurement, so
    ``speedup_vs_dense_fp32`` (dense fp32 against this row's pruned model) is a ratio measured in one run too.
    A runner that cannot be made (missing package, GPU, file or precision) or prepared at a batch (a provider
    that fails to start, a batch outside an engine's profile) becomes a skip record; the rest is measured.
    Where ``quiet`` (by backend, batch and precision) names a backend and batch measured here, a measurement taken
    while the host was loaded is taken again and the quiet rounds of all of them pooled (:func:`_quiet_group`);
    its rows say how many were taken.
    """
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for backend in cfg.backends:
        pairs: dict[str, list[Runner]] = {}
        for precision in cfg.precisions:
            try:
                pairs[precision] = [make_runner(backend, name, models, artifacts, cfg, precision) for name in MODELS]
            except (BackendUnavailable, BackendError) as err:
                log.warning("profile: not measured: %s", err)
                skipped.append(skip_entry(backend, None, precision, err))
        for batch in cfg.batches:
            ready = _prepared(pairs, batch, backend, skipped)
            if not ready:
                continue
            keys = [(p, n) for p in ready for n in MODELS]
            runners = [r for pair in ready.values() for r in pair]
            host = next(((p, h) for (b, n, p), h in (quiet or {}).items() if (b, n) == (backend, batch) and p in ready),
                        None)
            by, taken = _quiet_group(runners, keys, batch, cfg, host)
            runtime = registry.get(backend)
            for precision in ready:
                row = _row(by[(precision, "dense")], by[(precision, "pruned")], by.get(("fp32", "dense")), backend,
                           flops_ratio)
                row["measurements"] = taken
                # which file ran: "int8-fp16" is int8 products with fp16 elsewhere (LayerNorm fp32), "int8" fp32
                row["graph"] = None if runtime.artifact == "module" else runtime.file_precision(precision)
                rows.append(row)
    return rows, skipped


def _quiet_group(runners: list[Runner], keys: list[tuple[str, str]], batch: int, cfg: ProfileCfg,
                 quiet: tuple[str, QuietHost] | None) -> tuple[dict[tuple[str, str], LatencyStats], int]:
    """One alternating measurement of ``runners``; with ``quiet`` (a precision and its quiet host), measured again
    (after waiting for a quiet spell) while that precision's dense model says the host was loaded or fewer than
    half of the rounds were quiet, up to :data:`QUIET_TRIES` measurements. The rounds of every measurement are
    pooled, and the statistics taken over the quiet ones: a measurement that a spell left with one quiet round
    rests on a handful of calls (seen: 30.9% where the loop and a plain harness read 29.3-29.6%), and keeping
    the measurement with the fastest dense model picks such noise. Also how many measurements were taken."""
    def once() -> Blocks:
        return time_rounds(runners, batch, warmup=cfg.warmup, repeats=cfg.repeats, prepared=True)

    def by_key(pooled: Blocks) -> dict[tuple[str, str], LatencyStats]:
        return dict(zip(keys, summarise_rounds(runners, batch, pooled), strict=True))

    blocks, taken = once(), 1
    stats = by_key(blocks)
    if quiet is None:
        return stats, taken
    key, host = (quiet[0], "dense"), quiet[1]

    def unsettled(dense: LatencyStats) -> bool:  # loaded, or quiet in fewer than half of its rounds
        return host.loaded(dense.median_ms) or 2 * dense.quiet_rounds < dense.rounds

    while unsettled(dense := stats[key]) and taken < QUIET_TRIES:
        waited = wait_for_quiet(runners[keys.index(key)], batch, host)
        log.info("profile: dense %.3f ms against %.3f ms when the host was quiet, %d of %d rounds quiet; waited "
                 "%.0f s for a quiet spell, measuring again", dense.median_ms, host.dense_ms, dense.quiet_rounds,
                 dense.rounds, waited)
        blocks, taken = [b + more for b, more in zip(blocks, once(), strict=True)], taken + 1
        stats = by_key(blocks)
    return stats, taken


def _prepared(pairs: dict[str, list[Runner]], batch: int, backend: str, skipped: list[dict[str, Any]]):
    """The precisions whose two runners both prepare at ``batch``; the others are recorded as skipped."""
    ready: dict[str, list[Runner]] = {}
    for precision, pair in pairs.items():
        try:
            for runner in pair:
                runner.prepare(batch)
        except (BackendUnavailable, BackendError) as err:
            log.warning("profile: not measured at batch %d: %s", batch, err)
            skipped.append(skip_entry(backend, batch, precision, err))
            continue
        ready[precision] = pair
    return ready


def _row(d: LatencyStats, p: LatencyStats, dense_fp32: LatencyStats | None, backend: str,
         flops_ratio: float) -> dict[str, Any]:
    row = {
        "backend": backend, "batch": p.batch, "precision": p.precision, "device": p.device,
        "latency_ms_dense": d.median_ms, "latency_ms_pruned": p.median_ms,
        "p90_ms_dense": d.p90_ms, "p90_ms_pruned": p.p90_ms, "p99_ms_dense": d.p99_ms,
        "p99_ms_pruned": p.p99_ms, "speedup": d.median_ms / p.median_ms,
        "throughput_dense": d.throughput, "throughput_pruned": p.throughput,
        "peak_memory_mb_dense": d.peak_memory_mb, "peak_memory_mb_pruned": p.peak_memory_mb,
        "flops_speedup": 1 / flops_ratio, "repeats": p.repeats, "rounds": p.rounds, "quiet_rounds": p.quiet_rounds,
        "tf32": p.tf32, "cuda_graph": p.cuda_graph,
        "speedup_vs_dense_fp32": None if dense_fp32 is None else dense_fp32.median_ms / p.median_ms,
    }
    row["speedup_vs_flops"] = row["speedup"] / row["flops_speedup"]
    log.info("profile %s %s batch %d: dense %.3f ms, pruned %.3f ms, speedup %.2fx (FLOPs limit %.2fx)%s on %s",
             backend, p.precision, p.batch, d.median_ms, p.median_ms, row["speedup"], row["flops_speedup"],
             "" if dense_fp32 is None or p.precision == "fp32"
             else f", {row['speedup_vs_dense_fp32']:.2f}x over dense fp32", p.device)
    return row
