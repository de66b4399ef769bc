"""One prepared acceptance run for a rarely lent GPU: what only a GPU shows, in parts, each with its own time budget.

Parts, in order (``--parts`` picks some):
  env         GPU, driver, torch/CUDA/cuDNN/timm/ONNX Runtime versions, the TF32 policy, torch's SDPA kernels
  exactness   masked vs materialised model (fp32 IEEE and TF32, timm's fused attention on and off), the
              fp16/bf16 model against fp32 (max |diff|, top-1 agreement), and the exported ONNX graphs (fp32,
              fp16, int8 for ONNX Runtime, int8 for TensorRT): each file on ONNX Runtime CPU against torch on the
              device in the file's arithmetic precision, and on every GPU runtime this machine has (ort-cuda,
              ort-trt; TensorRT needs an engine build, which `ofbdeploy export --trt` covers) against the CPU;
              the int8 file for TensorRT with the attention products in int8 too, checked the same way and
              timed against the default one on ort-trt (whether ``export.int8_attention: all`` pays there)
  training    the quickstart pipeline with ``amp=bf16`` end to end; the OFB search step against a dense training
              step (tools/benchmarks/bench_search_cost.py, fp32-TF32 and bf16) and the projected GPU-hours of the
              paper's 100-epoch ImageNet search
  latency     per model: a latency table built here (torch, fp16 on CUDA, batch 1), then dense against a
              50%-FLOPs model, a 50%-latency model and the 50%-FLOPs model on grids aligned to 8 and 64, timed
              together (the deploy protocol's alternating blocks) with CUDA graphs and eager launches, per
              precision and batch; torch.compile when time is left

Every part records what it has when its budget runs out ("cut by budget"); a part that raises records its
one-line error and traceback and the next part runs. ``acceptance.json`` and ``acceptance.md`` in ``--out``
are rewritten (atomically) after every step, so a killed run still leaves its results; the latency tables
are saved beside them. Items that need CUDA are recorded as skipped, with the reason, where there is none; so are
the quickstart where matplotlib is missing (its report stage draws a plot) and torch.compile where Triton (CUDA)
or a C compiler is missing. What the script needs beyond the GPU image is in tools/scripts/device_wheels.txt (3 MiB).
Exit code: 0 every part done, 1 a part cut by budget, 3 a part failed (its traceback is in acceptance.json),
130 interrupted.

    python tools/gpu_acceptance.py --out $OUT --budget-s 420       # the GPU run (docs/benchmarks.md)
    python tools/gpu_acceptance.py --out /tmp/acc --smoke          # tiny models, CPU, well under a minute
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata, util
from pathlib import Path
from typing import Any

import timm
import torch
from benchmarks.bench_latency import pruned_pair
from benchmarks.bench_search_cost import IMAGENET_TRAIN, PAPER_EPOCHS

import ofbdeploy.models.zoo  # noqa: F401  (the small ofb_vit_* configs, for smoke runs)
from ofbdeploy.arch import ArchSpec
from ofbdeploy.deploy import workflow
from ofbdeploy.deploy.config import ExportCfg
from ofbdeploy.deploy.measure import measure_group
from ofbdeploy.deploy.onnx_export import ort_session
from ofbdeploy.deploy.quantize import INT8_TENSORRT
from ofbdeploy.deploy.runtimes.base import device_name
from ofbdeploy.deploy.runtimes.registry import create_runner, unavailable_reason
from ofbdeploy.families import family_of, read_shape
from ofbdeploy.families.vit.space import space_for
from ofbdeploy.families.vit.support import read_vit_shape
from ofbdeploy.io import atomic_write_text
from ofbdeploy.latency.lut import build_lut
from ofbdeploy.models.materialize import TOLERANCE, materialize
from ofbdeploy.numerics import set_tf32
from ofbdeploy.table import format_table
from ofbdeploy.verify.exactness import decide_randomly, set_fused_attention

ROOT = Path(__file__).resolve().parents[1]
PAPER_GPU_HOURS = 24.0  # the paper's search: "one GPU day"
GOAL_GPU_HOURS = 12.0  # this project's goal for the same search
SHARES = {"env": 0.02, "exactness": 0.10, "training": 0.40, "latency": 0.48}  # of the budget left when a part starts


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the smoke run."""

    exact_model: str
    models: tuple[str, ...]
    img_size: int | None  # None: each model's own
    exact_batch: int
    precision_batch: int
    train_batch: int
    train_steps: int
    batches: tuple[int, ...]
    repeats: int
    warmup: int
    lut: dict[str, int]
    quickstart_overrides: tuple[str, ...] = ()
    compile_after_s: float | None = 120.0  # torch.compile when this much of the latency budget is left; None: never


GPU = Sizes("deit_small_patch16_224", ("deit_small_patch16_224", "deit_base_patch16_224"), None, exact_batch=8,
            precision_batch=64, train_batch=128, train_steps=5, batches=(1, 64), repeats=50, warmup=10,
            lut={"embed_points": 2, "width_points": 2, "random_points": 6, "repeats": 10})
SMOKE = Sizes("ofb_vit_pico_patch4_32", ("ofb_vit_pico_patch4_32",), 32, exact_batch=2, precision_batch=8,
              train_batch=4, train_steps=2, batches=(1, 2), repeats=3, warmup=1,
              lut={"embed_points": 2, "width_points": 2, "random_points": 2, "repeats": 3},
              quickstart_overrides=("pretrain.epochs=0", "search.epochs=2",
                                    "search.warmup_epochs=1", "finetune.epochs=1", "finetune.warmup_epochs=0",
                                    "data.limit_train=64", "data.limit_val=32", "data.batch_size=32",
                                    "export.check_images=4", "profile.repeats=5", "profile.batches=[1]"),
              compile_after_s=None)


class BudgetCut(Exception):
    """A part's time is up: it keeps what it recorded."""


@dataclass
class Part:
    """What one part has recorded so far, and its clock."""

    name: str
    deadline: float
    save: Callable[[], None]
    record: dict[str, Any] = field(default_factory=dict)

    def check(self, next_item: str) -> None:
        """Stop here if the part's time is up (before starting ``next_item``)."""
        if time.perf_counter() >= self.deadline:
            raise BudgetCut(f"cut by budget before {next_item}")

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def skip(self, item: str, reason: str) -> None:
        self.record.setdefault("skipped", []).append({"item": item, "reason": reason})

    def fail(self, item: str, error: str) -> None:
        """An item that failed without stopping its part."""
        self.record.setdefault("errors", []).append({"item": item, "error": error})

    def add(self, key: str, row: dict[str, Any]) -> None:
        self.record.setdefault(key, []).append(row)
        self.save()


@dataclass(frozen=True)
class Setup:
    sizes: Sizes
    device: torch.device
    smoke: bool
    out: Path
    recipe: Path


def _one_line(err: BaseException | str) -> str:
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(err).__name__}: {first}"[:300] if isinstance(err, BaseException) else first[:300]


def _no_cuda(setup: Setup) -> str | None:
    return None if setup.device.type == "cuda" else "no CUDA"


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- env -----------------------------------------------------------------------------------------------------------
def part_env(setup: Setup, part: Part) -> None:
    """Where the numbers come from."""
    rec = part.record
    rec.update(python=platform.python_version(), torch=torch.__version__, torch_cuda=torch.version.cuda,
               cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
               **{name.replace("-", "_"): _version(name) for name in ("timm", "onnx", "onnxruntime", "onnxslim",
                                                                       "pydantic", "numpy")},
               device=device_name(setup.device), machine=platform.platform())
    if _no_cuda(setup):
        part.skip("gpu, driver, TF32, SDPA kernels", "no CUDA")
        return
    props = torch.cuda.get_device_properties(setup.device)
    rec.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
               memory_gib=round(props.total_memory / 2**30, 1))
    try:
        query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20, check=True)
        rec["driver"] = query.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError) as err:
        part.fail("driver", _one_line(err))
    rec["tf32"] = set_tf32(True)  # what training and deployment use (the project's one TF32 policy)
    rec["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    cuda = torch.backends.cuda
    rec["sdpa"] = {"flash": cuda.flash_sdp_enabled(), "mem_efficient": cuda.mem_efficient_sdp_enabled(),
                   "math": cuda.math_sdp_enabled(),
                   "cudnn": cuda.cudnn_sdp_enabled() if hasattr(cuda, "cudnn_sdp_enabled") else None}
    part.save()


# -- exactness -----------------------------------------------------------------------------------------------------
def _top1_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(dim=1) == b.argmax(dim=1)).float().mean())


@torch.no_grad()
def part_exactness(setup: Setup, part: Part) -> None:
    """Masked vs materialised on the device (the selfcheck's random uneven architecture, random multipliers),
    and the half-precision model against fp32."""
    sizes, device = setup.sizes, setup.device
    name = sizes.exact_model
    torch.manual_seed(0)
    dense = timm.create_model(name, **({"img_size": sizes.img_size} if sizes.img_size else {})).eval()
    shape = read_shape(dense, name)
    family = family_of(shape)
    searchable = family.searchable(copy.deepcopy(dense), family.space(shape, None), name)
    decide_randomly(searchable, random.Random(0))
    searchable.eval()
    model, spec = materialize(searchable)
    searchable, model = searchable.to(device), model.eval().to(device)
    part.record.update(model=name, img_size=shape.img_size, flops_ratio=spec.macs() / ArchSpec.dense(shape).macs())
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(sizes.exact_batch, shape.in_chans, shape.img_size, shape.img_size, generator=generator)
    images = images.to(device)
    modes = ["ieee", "tf32"] if device.type == "cuda" else ["ieee"]
    if _no_cuda(setup):
        part.skip("masked vs materialised under TF32", "no CUDA")
    for mode in modes:
        for fused in (True, False):
            part.check(f"masked vs materialised {mode} fused={fused}")
            set_tf32(mode == "tf32")
            set_fused_attention(searchable, fused)
            set_fused_attention(model, fused)
            masked, plain = searchable(images), model(images)
            diff, scale = float((masked - plain).abs().max()), float(masked.abs().max())
            part.add("masked_vs_materialised", {
                "fp32": mode, "fused_attn": fused, "max_abs_diff": diff, "output_max_abs": scale,
                "top1_agreement": _top1_agreement(masked, plain),
                # the selfcheck's bound, for IEEE fp32 only: TF32 rounds the two orders of products differently
                "within_selfcheck_tolerance": diff <= TOLERANCE * max(1e-2, scale) if mode == "ieee" else None})
    set_fused_attention(model, True)
    set_tf32(False)
    images = torch.randn(sizes.precision_batch, shape.in_chans, shape.img_size, shape.img_size, generator=generator)
    for label, net in (("dense", dense), ("materialised", model)):
        net = net.to(device)
        reference = net(images.to(device)).float()
        for precision, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            part.check(f"{label} {precision} vs fp32")
            half = copy.deepcopy(net).to(dtype)
            out = half(images.to(device, dtype)).float()
            part.add("half_vs_fp32", {
                "model": label, "precision": precision, "max_abs_diff": float((out - reference).abs().max()),
                "output_max_abs": float(reference.abs().max()), "top1_agreement": _top1_agreement(out, reference),
                "images": sizes.precision_batch})
            del half
    set_tf32(True)
    _onnx_graphs(setup, part, model, shape.img_size, shape.in_chans)
    _free(device)


ONNX_FILES = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.float32, INT8_TENSORRT: torch.float16}
GPU_ONNX_RUNTIMES = ("ort-cuda", "ort-trt")


@torch.no_grad()
def _onnx_graphs(setup: Setup, part: Part, model: torch.nn.Module, img: int, chans: int) -> None:
    """Export ``model`` as users do (fp32, fp16, int8 and the int8 file for TensorRT), then check each file: on
    ONNX Runtime CPU against torch on the device in the file's arithmetic precision (fp16 where the file computes
    in fp16: the GPU's half-precision arithmetic the file will meet), and on each GPU runtime here. Then the int8
    file for TensorRT with the attention products in int8 too (``export.int8_attention: all``, not yet the
    default for TensorRT), checked the same way and timed against the default one on ONNX Runtime's TensorRT
    provider."""
    part.check("ONNX export")
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(setup.sizes.exact_batch, chans, img, img, generator=generator)
    calibration = torch.randn(4 * setup.sizes.exact_batch, chans, img, img, generator=generator).numpy()
    model = model.float().cpu()
    with tempfile.TemporaryDirectory(prefix="ofb-acceptance-onnx-") as tmp:
        def export(cfg: ExportCfg, folder: str) -> workflow.DeployArtifacts:
            return workflow.export_models({"m": model}, Path(tmp) / folder, cfg, img_size=img, in_chans=chans,
                                          check_images=images, calibration=calibration)

        artifacts = export(ExportCfg(fp16=True, int8=True, check_images=len(images)), "default")
        for label, dtype in ONNX_FILES.items():
            _check_file(setup, part, model, label, dtype, Path(artifacts.onnx[workflow.onnx_key("m", label)]), images)
        part.check("ONNX int8 for TensorRT with the attention products")
        attention = export(ExportCfg(int8=True, int8_attention="all", check_images=len(images)), "attention")
        files = {label: Path(found.onnx[workflow.onnx_key("m", INT8_TENSORRT)])
                 for label, found in (("weights", artifacts), ("weights and attention", attention))}
        _check_file(setup, part, model, f"{INT8_TENSORRT} attention", torch.float16, files["weights and attention"],
                    images)
        _tensorrt_int8_products(setup, part, files)


def _check_file(setup: Setup, part: Part, model: torch.nn.Module, label: str, dtype: torch.dtype, path: Path,
                images: torch.Tensor) -> None:
    """One exported file on ONNX Runtime CPU against torch on the device in ``dtype``, and on each GPU runtime."""
    part.check(f"ONNX {label} graph")
    session = ort_session(path, ["CPUExecutionProvider"])
    cpu = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]).float()
    ours = copy.deepcopy(model).to(setup.device, dtype)(images.to(setup.device, dtype)).float().cpu()
    part.add("onnx_graphs", {"file": label, "runtime": "ort-cpu", "against": f"torch {setup.device.type} "
                             f"{str(dtype).removeprefix('torch.')}", **_agreement(cpu, ours)})
    for backend in GPU_ONNX_RUNTIMES:
        _onnx_on_gpu(part, backend, label, path, images, cpu)


def _tensorrt_int8_products(setup: Setup, part: Part, files: dict[str, Path]) -> None:
    """The int8 files for TensorRT, weight products only and with the attention products, timed alternately on
    ONNX Runtime's TensorRT provider at batch 1: what ``export.int8_attention: all`` buys there."""
    item = "int8 attention products on ort-trt"
    reason = unavailable_reason("ort-trt")
    if reason is not None:
        part.skip(item, reason)
        return
    part.check(item)
    try:
        runners = [create_runner("ort-trt", onnx_path=path, precision="int8") for path in files.values()]
        stats = measure_group(runners, 1, warmup=setup.sizes.warmup, repeats=setup.sizes.repeats)
    except Exception as err:  # a provider that refuses the file is a finding, not a reason to stop the part
        part.fail(item, _one_line(err))
        return
    for products, s in zip(files, stats, strict=True):
        part.add("tensorrt_int8_products", {"products": products, "batch": 1, "median_ms": s.median_ms,
                                            "speedup_vs_weights_only": stats[0].median_ms / s.median_ms,
                                            "device": s.device})


def _onnx_on_gpu(part: Part, backend: str, label: str, path: Path, images: torch.Tensor, cpu: torch.Tensor) -> None:
    """One file on a GPU runtime against ONNX Runtime CPU on the same file; a skip, with its reason, without one."""
    reason = unavailable_reason(backend)
    if reason is not None:
        part.skip(f"ONNX {label} on {backend}", f"{reason} (checked in torch on the device instead)")
        return
    try:
        runner = create_runner(backend, onnx_path=path, precision=label.split("-")[0])
        out = torch.from_numpy(runner.run_on(images.numpy())).float()
    except Exception as err:  # a provider that refuses the file is a finding, not a reason to stop the part
        part.fail(f"ONNX {label} on {backend}", _one_line(err))
        return
    part.add("onnx_graphs", {"file": label, "runtime": backend, "against": "ort-cpu", **_agreement(cpu, out)})


def _agreement(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    return {"max_abs_diff": float((other - reference).abs().max()), "output_max_abs": float(reference.abs().max()),
            "top1_agreement": _top1_agreement(other, reference)}


# -- training ------------------------------------------------------------------------------------------------------
def _child_env() -> dict[str, str]:
    """Children import this source tree's ofbdeploy whatever is installed (and the carried wheels' packages)."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), path) if p)}


def _last_error_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


REPORT_FIELDS = ("flops_ratio", "top1_dense", "top1_pruned_before_finetune", "top1_pruned", "amp", "fp32_matmul",
                 "search_seconds", "search_images_per_second", "finetune_seconds", "materialize_max_abs_diff")


def _quickstart(setup: Setup, part: Part, tmp: Path, timeout: float) -> None:
    """``ofbdeploy run`` on the quickstart recipe with bf16 autocast, in a child process bounded by ``timeout``."""
    run_dir = tmp / "quickstart"
    overrides = ("amp=bf16", f"output_dir={run_dir}", f"device={setup.device.type}", *setup.sizes.quickstart_overrides)
    command = [sys.executable, "-m", "ofbdeploy", "run", str(setup.recipe), "--no-progress",
               *(a for item in overrides for a in ("--set", item))]
    rec = part.record.setdefault("quickstart", {"overrides": list(overrides)})
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=max(timeout, 1.0), env=_child_env(),
                              cwd=ROOT)
    except subprocess.TimeoutExpired:
        rec.update(status="cut by budget", wall_s=time.perf_counter() - start)
        raise BudgetCut(f"cut by budget: the quickstart ran past {timeout:.0f} s") from None
    rec["wall_s"] = time.perf_counter() - start
    rec["exit_code"] = proc.returncode
    if proc.returncode != 0:
        rec["status"] = "error"
        part.fail("quickstart", _last_error_line(proc.stderr or proc.stdout))
        return
    report = json.loads((run_dir / "report.json").read_text())
    rec.update(status="ok", **{k: report.get(k) for k in REPORT_FIELDS})
    rec["latency"] = [{k: row.get(k) for k in ("backend", "precision", "batch", "speedup", "latency_ms_dense",
                                               "latency_ms_pruned")} for row in report.get("latency", [])]
    part.save()


def _search_cost(setup: Setup, part: Part, tmp: Path, amp: str) -> None:
    """tools/benchmarks/bench_search_cost.py in a child process (its own CUDA context, so an OOM leaves nothing behind);
    on running out of memory, again at half the batch."""
    sizes = setup.sizes
    batch = sizes.train_batch
    model = sizes.exact_model
    while True:
        part.check(f"search step cost, amp {amp}, batch {batch}")
        result = tmp / f"search_cost_{amp}_{batch}.json"
        script = Path(__file__).parent / "benchmarks" / "bench_search_cost.py"
        command = [sys.executable, str(script), "--model", model, "--batch",
                   str(batch), "--steps", str(sizes.train_steps), "--warmup", "2" if setup.device.type == "cuda"
                   else "1", "--amp", amp, "--device", setup.device.type, "--json", str(result)]
        if sizes.img_size:
            command += ["--img-size", str(sizes.img_size)]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=max(part.left(), 1.0),
                                  env=_child_env(), cwd=ROOT)
        except subprocess.TimeoutExpired:
            raise BudgetCut(f"cut by budget during the search step cost, amp {amp}") from None
        if proc.returncode == 0:
            break
        if "out of memory" in proc.stderr.lower() and batch > 8:
            part.skip(f"search step cost, amp {amp}, batch {batch}", "out of memory: halved")
            batch //= 2
            continue
        part.fail(f"search step cost, amp {amp}", _last_error_line(proc.stderr or proc.stdout))
        return
    data = json.loads(result.read_text())
    row = {k: data[k] for k in ("model", "img_size", "batch", "amp", "fp32_matmul", "device_name", "dense_step_s",
                                "search_step_s", "ratio", "dense_images_per_s", "search_images_per_s")}
    if setup.device.type == "cuda":
        hours = IMAGENET_TRAIN * PAPER_EPOCHS / data["search_images_per_s"] / 3600
        row.update(projected_search_gpu_hours=hours, of_paper_gpu_day=hours / PAPER_GPU_HOURS,
                   of_goal_12_gpu_hours=hours / GOAL_GPU_HOURS)
    else:
        part.skip(f"ImageNet GPU-hours from the amp {amp} step", "no CUDA")
    part.add("search_step", row)


def part_training(setup: Setup, part: Part) -> None:
    """The search step's cost in fp32 (TF32 on CUDA) and bf16 first (short, and what the GPU-hours rest on), then
    the quickstart end to end in the part's remaining time."""
    if not setup.recipe.is_file():
        raise FileNotFoundError(f"--recipe {setup.recipe}: no such recipe file")
    with tempfile.TemporaryDirectory(prefix="ofb-acceptance-") as tmp:
        for amp in ("off", "bf16"):
            _search_cost(setup, part, Path(tmp), amp)
        part.check("the quickstart")
        missing = _missing_modules("matplotlib")
        if missing:
            part.skip("the quickstart", f"{missing}: its report stage draws the report's plot")
            return
        _quickstart(setup, part, Path(tmp), timeout=part.left())


def _missing_modules(*names: str) -> str | None:
    """Which of ``names`` this Python cannot import (None: all there), found without importing them."""
    missing = [name for name in names if util.find_spec(name) is None]
    return f"no {', '.join(missing)} on this machine" if missing else None


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile cannot run here: inductor needs Triton for CUDA kernels and a C compiler for its
    launchers and CPU kernels (None: both there)."""
    missing = _missing_modules("triton") if device.type == "cuda" else None
    if missing:
        return f"{missing} (inductor's CUDA kernels)"
    if not any(shutil.which(c) for c in (os.environ.get("CC", ""), "cc", "gcc", "clang") if c):
        return "no C compiler (cc, gcc or clang) on this machine (inductor builds its kernels' wrappers with one)"
    return None


# -- latency -------------------------------------------------------------------------------------------------------
def _archs(name: str, img: int, lut_path: Path) -> dict[str, tuple[torch.nn.Module, ArchSpec, float]]:
    """Dense, 50%-FLOPs, 50%-latency and the 50%-FLOPs model on grids aligned to 8 and 64, from the budget
    enforcement of tools/benchmarks/bench_latency.py: every group from full width, narrowed one grid step at a time
    (least important units first, by the searchable model's initial random scores: latency does not depend on which
    units go) until the budget holds."""
    archs: dict[str, tuple[torch.nn.Module, ArchSpec, float]] = {}
    for label, method, align in (("flops50", "flops", None), ("latency50", "latency", None),
                                 ("flops50_align8", "flops", 8), ("flops50_align64", "flops", 64)):
        dense, pruned, spec, _ = pruned_pair(name, 0.5, align, img, method, {}, lut_path if method == "latency"
                                             else None)
        if not archs:
            archs["dense"] = (dense, ArchSpec.dense(spec.base), 1.0)
        archs[label] = (pruned, spec, spec.macs() / ArchSpec.dense(spec.base).macs())
    return archs


def _measure_models(setup: Setup, part: Part, name: str, archs: dict, lut, backend: str, graph: bool,
                    precision: str, batches: tuple[int, ...]) -> None:
    """The architectures' runners timed together at each batch; speedups are ratios within one group."""
    device = setup.device
    runners = [create_runner(backend, model=model, precision=precision, device=device.type, cuda_graph=graph)
               for model, _, _ in archs.values()]
    try:
        for batch in batches:
            part.check(f"{name} {backend} {'graph' if graph and device.type == 'cuda' else 'eager'} {precision} "
                       f"batch {batch}")
            _record_group(setup, part, name, archs, lut, runners, graph, precision, batch)
    finally:
        del runners
        _free(device)


def _record_group(setup: Setup, part: Part, name: str, archs: dict, lut, runners: list, graph: bool,
                  precision: str, batch: int) -> None:
    sizes, device = setup.sizes, setup.device
    backend = runners[0].backend
    stats = measure_group(runners, batch, warmup=sizes.warmup, repeats=sizes.repeats)
    dense = stats[0]
    lut_config = (backend == "torch" and precision == lut.key.precision and batch == lut.key.batch
                  and graph == (device.type == "cuda"))
    for (label, (_, spec, flops)), s in zip(archs.items(), stats, strict=True):
        row = {"model": name, "arch": label, "backend": backend, "cuda_graph": s.cuda_graph, "precision": precision,
               "batch": batch, "flops_ratio": flops, "median_ms": s.median_ms, "p90_ms": s.p90_ms,
               "speedup": dense.median_ms / s.median_ms, "flops_limit": 1 / flops,
               "speedup_of_limit": dense.median_ms / s.median_ms * flops,
               "lut_predicted_fraction": lut.predict(spec) / lut.predict(archs["dense"][1]),
               "device": s.device}
        if lut_config:
            row.update(lut_predicted_ms=lut.predict(spec), lut_error=lut.predict(spec) / s.median_ms - 1)
        part.add("rows", row)


def part_latency(setup: Setup, part: Part) -> None:
    """Latency tables, architectures and the timing matrix, model by model."""
    sizes, device = setup.sizes, setup.device
    cuda = device.type == "cuda"
    lut_precision = "fp16" if cuda else "fp32"  # torch refuses reduced precision on CPU
    precisions = ("fp16", "bf16") if cuda else ("fp32",)
    if not cuda:
        part.skip("fp16/bf16 latency, CUDA graphs, fp16 latency table", "no CUDA (torch runs fp32 only on CPU)")
    modes = (True, False) if cuda else (False,)  # CUDA graph replay, then eager launches
    set_tf32(True)
    first = None
    for name in sizes.models:
        part.check(f"latency table of {name}")
        size = {"img_size": sizes.img_size} if sizes.img_size else {}
        shape = read_vit_shape(timm.create_model(name, pretrained=False, **size), name)
        img = shape.img_size
        lut = build_lut(shape, space_for(shape), backend="torch", precision=lut_precision, batch=1, progress=False,
                        **sizes.lut)
        lut_path = lut.save(setup.out / f"lut_{name}.json")
        part.add("luts", {"model": name, "backend": "torch", "precision": lut_precision, "batch": 1,
                          "cuda_graph": cuda, "probes": lut.points, "build_s": lut.build_seconds,
                          "dense_ms": lut.dense_ms, "fit_error_median": lut.fit_error["median_abs"],
                          "fit_error_max": lut.fit_error["max_abs"], "file": lut_path.name, **sizes.lut})
        part.check(f"architectures of {name}")
        archs = _archs(name, img, lut_path)
        part.add("archs", {"model": name, **{label: {"flops_ratio": f, "embed_dim": s.embed_dim,
                                                     "blocks": [[b.heads, b.head_dim, b.mlp_dim] for b in s.blocks]}
                                             for label, (_, s, f) in archs.items()}})
        first = first or (name, {k: archs[k] for k in ("dense", "flops50")}, lut)
        for graph in modes:
            for precision in precisions:
                _measure_models(setup, part, name, archs, lut, "torch", graph, precision, sizes.batches)
        del archs
        _free(device)
    cannot_compile = compile_unavailable(device)
    if sizes.compile_after_s is None:
        part.skip("torch.compile", "smoke run: compiling takes minutes on CPU; measured on the GPU run only")
    elif cannot_compile:
        part.skip("torch.compile", cannot_compile)
    elif part.left() < sizes.compile_after_s:
        part.skip("torch.compile", f"{part.left():.0f} s of the part left, under {sizes.compile_after_s:.0f} s")
    else:
        name, archs, lut = first
        _measure_models(setup, part, name, archs, lut, "torch-compile", True, precisions[0], (1,))


PARTS: dict[str, Callable[[Setup, Part], None]] = {"env": part_env, "exactness": part_exactness,
                                                  "training": part_training, "latency": part_latency}


# -- output --------------------------------------------------------------------------------------------------------
def _fmt(value: Any, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec) if isinstance(value, float) else str(value)


def render_markdown(result: dict[str, Any]) -> str:
    """The tables a reader wants first; acceptance.json has every field."""
    meta, parts = result["meta"], result["parts"]
    lines = [f"# GPU acceptance run ({'smoke' if meta['smoke'] else 'full'})", "",
             f"{meta['device']}; started {meta['started']}; budget {meta['budget_s']:.0f} s; "
             f"command `{meta['command']}`", ""]
    lines.append(format_table(("part", "status", "seconds", "note"), [
        (name, p.get("status", "not run"), _fmt(p.get("seconds"), ".1f"), p.get("note", ""))
        for name, p in parts.items()], markdown=True))
    env = parts.get("env", {})
    if env.get("torch"):
        lines += ["", "Environment: " + ", ".join(f"{k} {env[k]}" for k in (
            "gpu", "driver", "torch", "torch_cuda", "cudnn", "timm", "onnxruntime", "onnxslim", "tf32", "sdpa")
            if env.get(k) is not None)]
    exact = parts.get("exactness", {})
    if exact.get("masked_vs_materialised"):
        lines += ["", f"Masked vs materialised {exact['model']} ({exact['flops_ratio']:.1%} of the FLOPs):", ""]
        lines.append(format_table(("fp32", "fused attention", "max abs diff", "output max abs", "top-1 agreement",
                                   "within selfcheck tolerance"), [
            (r["fp32"], r["fused_attn"], f"{r['max_abs_diff']:.2e}", _fmt(r["output_max_abs"]),
             f"{r['top1_agreement']:.1%}", _fmt(r["within_selfcheck_tolerance"]))
            for r in exact["masked_vs_materialised"]], markdown=True))
    if exact.get("half_vs_fp32"):
        lines += ["", "Half precision against fp32 (IEEE):", ""]
        lines.append(format_table(("model", "precision", "max abs diff", "output max abs", "top-1 agreement"), [
            (r["model"], r["precision"], f"{r['max_abs_diff']:.2e}", _fmt(r["output_max_abs"]),
             f"{r['top1_agreement']:.1%}") for r in exact["half_vs_fp32"]], markdown=True))
    if exact.get("onnx_graphs"):
        lines += ["", "Exported ONNX graphs (int8-fp16: the int8 file for TensorRT, fp16 but its weight products):",
                  ""]
        lines.append(format_table(("file", "runtime", "against", "max abs diff", "output max abs",
                                   "top-1 agreement"), [
            (r["file"], r["runtime"], r["against"], f"{r['max_abs_diff']:.2e}", _fmt(r["output_max_abs"]),
             f"{r['top1_agreement']:.1%}") for r in exact["onnx_graphs"]], markdown=True))
    if exact.get("tensorrt_int8_products"):
        lines += ["", *(f"int8 for TensorRT on ort-trt, batch 1, {r['products']}: {r['median_ms']:.3f} ms, "
                        f"{r['speedup_vs_weights_only']:.2f}x the weights-only file"
                        for r in exact["tensorrt_int8_products"])]
    train = parts.get("training", {})
    if train.get("quickstart", {}).get("status") == "ok":
        q = train["quickstart"]
        lines += ["", f"Quickstart with amp=bf16: {q['wall_s']:.0f} s wall, {q['flops_ratio']:.1%} of the FLOPs, "
                      f"top-1 dense {q['top1_dense']:.2f}, pruned {q['top1_pruned']:.2f} "
                      f"(before finetuning {q['top1_pruned_before_finetune']:.2f}); search {q['search_seconds']:.1f} s "
                      f"at {q['search_images_per_second']:.0f} images/s, finetune {q['finetune_seconds']:.1f} s"]
    if train.get("search_step"):
        lines += ["", "Search step against a dense training step (tools/benchmarks/bench_search_cost.py):", ""]
        lines.append(format_table(("model", "amp", "fp32", "batch", "dense img/s", "search img/s", "ratio",
                                   "ImageNet 100-epoch search GPU-h", "of one GPU day", "of 12 GPU-h"), [
            (r["model"], r["amp"], r["fp32_matmul"], r["batch"], f"{r['dense_images_per_s']:.1f}",
             f"{r['search_images_per_s']:.1f}", f"{r['ratio']:.2f}", _fmt(r.get("projected_search_gpu_hours"), ".1f"),
             _fmt(r.get("of_paper_gpu_day"), ".2f"), _fmt(r.get("of_goal_12_gpu_hours"), ".2f"))
            for r in train["search_step"]], markdown=True))
    lat = parts.get("latency", {})
    for t in lat.get("luts", []):
        lines += ["", f"Latency table {t['model']} ({t['backend']} {t['precision']} batch {t['batch']}): "
                      f"{t['probes']} models in {t['build_s']:.1f} s, fit error median {t['fit_error_median']:.1%}, "
                      f"max {t['fit_error_max']:.1%}"]
    if lat.get("rows"):
        lines += ["", "Latency (medians; speedups within one alternating measurement):", ""]
        lines.append(format_table(("model", "arch", "backend", "graph", "precision", "batch", "FLOPs", "ms",
                                   "speedup", "FLOPs limit", "of limit", "LUT ms", "LUT error"), [
            (r["model"], r["arch"], r["backend"], _fmt(r["cuda_graph"]), r["precision"], r["batch"],
             f"{r['flops_ratio']:.1%}", f"{r['median_ms']:.3f}", f"{r['speedup']:.2f}x", f"{r['flops_limit']:.2f}x",
             f"{r['speedup_of_limit']:.2f}", _fmt(r.get("lut_predicted_ms"), ".3f"),
             "-" if r.get("lut_error") is None else f"{r['lut_error']:+.1%}") for r in lat["rows"]], markdown=True))
    skipped = [(name, s["item"], s["reason"]) for name, p in parts.items() for s in p.get("skipped", [])]
    errors = [(name, e["item"], e["error"]) for name, p in parts.items() for e in p.get("errors", [])]
    if skipped:
        lines += ["", "Skipped:", "", format_table(("part", "item", "reason"), skipped, markdown=True)]
    if errors:
        lines += ["", "Errors:", "", format_table(("part", "item", "error"), errors, markdown=True)]
    return "\n".join(lines) + "\n"


def write_results(out: Path, result: dict[str, Any]) -> None:
    atomic_write_text(out / "acceptance.json", json.dumps(result, indent=1, default=str) + "\n")
    atomic_write_text(out / "acceptance.md", render_markdown(result))


def run_parts(setup: Setup, names: list[str], budget_s: float, result: dict[str, Any]) -> int:
    """Each part in order with its share of the time left; returns the exit code."""
    end = time.perf_counter() + budget_s
    code = 0
    for index, name in enumerate(names):
        left = end - time.perf_counter()
        share = SHARES[name] / sum(SHARES[n] for n in names[index:])
        part = Part(name, time.perf_counter() + max(left, 0.0) * share, lambda: write_results(setup.out, result))
        result["parts"][name] = part.record
        part.record.update(status="running", budget_s=max(left, 0.0) * share)
        part.save()
        start = time.perf_counter()
        try:
            if left <= 0:
                raise BudgetCut("cut by budget before it started")
            PARTS[name](setup, part)
            part.record["status"] = "error" if part.record.get("errors") else "ok"
            code = max(code, 3 if part.record.get("errors") else 0)
        except BudgetCut as cut:
            part.record.update(status="cut by budget", note=str(cut))
            code = max(code, 1)
        except Exception as err:  # a part that fails leaves the next parts their chance
            part.record.update(status="error", note=_one_line(err), traceback=traceback.format_exc()[-4000:])
            code = 3
        finally:
            part.record["seconds"] = time.perf_counter() - start
            _free(setup.device)
            part.save()
        print(f"{name}: {part.record['status']} in {part.record['seconds']:.1f} s"
              + (f" ({part.record['note']})" if part.record.get("note") else ""), flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="results folder (acceptance.json/.md, tables)")
    parser.add_argument("--smoke", action="store_true", help="tiny models and batches: the script's own test")
    parser.add_argument("--budget-s", type=float, default=420.0, help="seconds for all parts together")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "quickstart.yaml",
                        help="the recipe of the training part's end-to-end run")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.parts.split(",") if n.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown or not names:
        print(f"error: --parts: unknown part(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(PARTS)}",
              file=sys.stderr)
        return 2
    if args.budget_s <= 0:
        print("error: --budget-s: expected a positive number of seconds", file=sys.stderr)
        return 2
    names = [n for n in PARTS if n in names]  # always in the documented order
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device visible to PyTorch", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    setup = Setup(SMOKE if args.smoke else GPU, device, args.smoke, args.out, args.recipe.resolve())
    result: dict[str, Any] = {"meta": {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device_name(device),
        "smoke": args.smoke, "budget_s": args.budget_s, "parts": names,
        "command": "python tools/gpu_acceptance.py " + " ".join(sys.argv[1:] if argv is None else argv)},
        "parts": {}}
    start = time.perf_counter()
    try:
        code = run_parts(setup, names, args.budget_s, result)
    except KeyboardInterrupt:
        result["meta"]["interrupted"] = True
        code = 130
    result["meta"]["seconds"] = time.perf_counter() - start
    write_results(args.out, result)
    if code == 3:
        print(f"error: a part failed; its traceback is in {args.out / 'acceptance.json'}", file=sys.stderr)
    print(f"results: {args.out / 'acceptance.md'} ({result['meta']['seconds']:.0f} s)")
    return code


if __name__ == "__main__":
    sys.exit(main())
