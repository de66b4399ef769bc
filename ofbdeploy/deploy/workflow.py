"""Export and profile a dense/pruned pair: what the pipeline's export and profile stages and the
``ofbdeploy export`` / ``ofbdeploy profile`` commands share.

Deploy code knows nothing about the search: it takes plain timm models (dense and pruned) and writes
ONNX files (always checked in ONNX Runtime), optional TensorRT engines (always checked against ONNX
Runtime) and latency rows measured with dense and pruned alternating in one process.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ofbdeploy.arch import ArchSpec
from ofbdeploy.deploy.backends import BackendUnavailable, create_runner
from ofbdeploy.deploy.measure import measure_pair
from ofbdeploy.deploy.onnx_export import export_onnx
from ofbdeploy.io import atomic_write_text
from ofbdeploy.models.pruned import build_plain
from ofbdeploy.recipe import ExportCfg, ProfileCfg

log = logging.getLogger("ofbdeploy.deploy")

MODELS = ("dense", "pruned")
# Engine-vs-ONNX Runtime parity tolerance on logits, per engine precision (int8 is judged mainly on top-1).
ENGINE_TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2, "int8": 5e-1}
ARTIFACTS_FILE = "export.json"


@dataclass
class DeployArtifacts:
    """Files an export wrote, and the parity figures of each."""

    onnx: dict[str, str] = field(default_factory=dict)  # "dense", "pruned", "dense-fp16", "pruned-fp16"
    engines: dict[str, str] = field(default_factory=dict)  # "pruned-fp16", ...
    checks: list[dict[str, Any]] = field(default_factory=list)

    def save(self, directory: Path) -> None:
        atomic_write_text(directory / ARTIFACTS_FILE, json.dumps(self.__dict__, indent=1) + "\n")

    @classmethod
    def load(cls, directory: Path) -> DeployArtifacts:
        path = directory / ARTIFACTS_FILE
        return cls(**json.loads(path.read_text())) if path.is_file() else cls()


def with_random_weights(spec: ArchSpec) -> nn.Module:
    """A plain model of ``spec`` with seeded random weights: enough for latency and export checks."""
    torch.manual_seed(0)
    model = build_plain(spec)
    model.init_weights()  # build_plain leaves weights uninitialised (they are normally loaded)
    return model.eval()


def dense_like(spec: ArchSpec) -> nn.Module:
    """The unpruned counterpart of ``spec``, with random weights."""
    return with_random_weights(ArchSpec.dense(spec.base))


def export_models(
    models: dict[str, nn.Module],
    directory: Path,
    cfg: ExportCfg,
    *,
    img_size: int,
    in_chans: int = 3,
    check_images: Tensor | None = None,
    calibration: np.ndarray | None = None,
) -> DeployArtifacts:
    """ONNX (fp32, optionally fp16) of every model, then TensorRT engines where the recipe asks."""
    if cfg.trt:
        from ofbdeploy.deploy.tensorrt_engine import require_tensorrt

        require_tensorrt()  # say so before exporting anything
    directory.mkdir(parents=True, exist_ok=True)
    artifacts = DeployArtifacts()
    variants = [False, True] if cfg.fp16 else [False]
    for name, model in models.items():
        for fp16 in variants:
            key = f"{name}-fp16" if fp16 else name
            result = export_onnx(model, directory / f"{key}.onnx", img_size=img_size, in_chans=in_chans,
                                 opset=cfg.opset, fp16=fp16, simplify=cfg.simplify, check_inputs=check_images)
            artifacts.onnx[key] = str(result.path)
            artifacts.checks.append({"model": key, "kind": "onnx", **result.to_dict()})
            log.info("exported %s: max |ORT - torch| %.2e, top-1 agreement %.1f%%", result.path,
                     result.max_abs_diff, 100 * result.top1_agreement)
        if cfg.trt:
            _build_engines(name, Path(artifacts.onnx[name]), directory, cfg, artifacts, img_size=img_size,
                           in_chans=in_chans, check_images=check_images, calibration=calibration)
    artifacts.save(directory)
    return artifacts


def _build_engines(name: str, onnx_path: Path, directory: Path, cfg: ExportCfg, artifacts: DeployArtifacts, *,
                   img_size: int, in_chans: int, check_images: Tensor | None, calibration: np.ndarray | None) -> None:
    from ofbdeploy.deploy.tensorrt_engine import EngineSpec, build_engine, check_engine_parity

    low, opt, high = cfg.batch_range
    for precision in cfg.trt_precisions:
        spec = EngineSpec(precision=precision, min_batch=low, opt_batch=opt, max_batch=high, img_size=img_size,
                          in_chans=in_chans)
        engine = build_engine(onnx_path, spec, directory / "engines",
                              calibration_images=calibration if precision == "int8" else None, log=log)
        images = check_images if check_images is not None else torch.randn(low, in_chans, img_size, img_size)
        images = images[: max(low, min(high, len(images)))].numpy().astype(np.float32)
        parity = check_engine_parity(engine, onnx_path, images, max_abs_diff=ENGINE_TOLERANCE[precision],
                                     precision=precision)
        key = f"{name}-{precision}"
        artifacts.engines[key] = str(engine)
        artifacts.checks.append({"model": key, "kind": "tensorrt", "path": str(engine), **parity})
        log.info("TensorRT %s engine %s: max |TRT - ORT| %.2e, top-1 agreement %.1f%%", precision, engine,
                 parity["max_abs_diff"], 100 * parity["top1_agreement"])


def make_runner(backend: str, name: str, models: dict[str, nn.Module], artifacts: DeployArtifacts, cfg: ProfileCfg):
    """The runner of model ``name`` on ``backend``: the module for torch, its ONNX file or engine otherwise."""
    precision = cfg.precision
    if backend in ("torch", "torch-compile"):
        return create_runner(backend, model=models[name], precision=precision, threads=cfg.threads)
    if backend == "tensorrt":
        engine = artifacts.engines.get(f"{name}-{precision}")
        if engine is None:
            raise BackendUnavailable(f"tensorrt: no {precision} engine for {name}; set export.trt and "
                                     f"export.trt_precisions to include {precision}")
        return create_runner(backend, engine_path=Path(engine), precision=precision)
    onnx = artifacts.onnx.get(f"{name}-fp16" if precision == "fp16" and backend != "ort-trt" else name)
    if onnx is None:
        raise BackendUnavailable(f"{backend}: no {precision} ONNX export of {name}; set export.fp16 for fp16")
    return create_runner(backend, onnx_path=Path(onnx), precision=precision, threads=cfg.threads)


def profile_models(
    models: dict[str, nn.Module], artifacts: DeployArtifacts, cfg: ProfileCfg, flops_ratio: float
) -> tuple[list[dict[str, Any]], list[str]]:
    """Latency rows (per backend and batch) of dense vs pruned, and the backends that could not run here."""
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for backend in cfg.backends:
        try:
            dense, pruned = (make_runner(backend, name, models, artifacts, cfg) for name in MODELS)
        except BackendUnavailable as err:
            log.warning("profile: %s", err)
            skipped.append(str(err))
            continue
        for batch in cfg.batches:
            d, p = measure_pair(dense, pruned, batch, warmup=cfg.warmup, repeats=cfg.repeats)
            row = {
                "backend": backend, "batch": batch, "precision": cfg.precision, "device": p.device,
                "latency_ms_dense": d.median_ms, "latency_ms_pruned": p.median_ms,
                "p90_ms_dense": d.p90_ms, "p90_ms_pruned": p.p90_ms, "p99_ms_dense": d.p99_ms,
                "p99_ms_pruned": p.p99_ms, "speedup": d.median_ms / p.median_ms,
                "throughput_dense": d.throughput, "throughput_pruned": p.throughput,
                "peak_memory_mb_dense": d.peak_memory_mb, "peak_memory_mb_pruned": p.peak_memory_mb,
                "flops_speedup": 1 / flops_ratio, "repeats": p.repeats,
            }
            row["speedup_vs_flops"] = row["speedup"] / row["flops_speedup"]
            rows.append(row)
            log.info("profile %s %s batch %d: dense %.3f ms, pruned %.3f ms, speedup %.2fx (FLOPs limit %.2fx) on %s",
                     backend, cfg.precision, batch, d.median_ms, p.median_ms, row["speedup"], row["flops_speedup"],
                     p.device)
    return rows, skipped
