"""TensorRT engines from the exported ONNX files: strongly typed, cached builds and a parity check.

Every engine is built from a graph whose precision is already decided (the fp32 export, the fp16 one with
LayerNorm in fp32, or the int8 Q/DQ one from :mod:`ofbdeploy.deploy.quantize`), as a strongly typed network:
TensorRT 11 has nothing else, and TensorRT 10 builds the same way. The TensorRT calls themselves live in
:mod:`ofbdeploy.deploy.trt_api`, imported lazily: everything here that does not build or run an engine (the
cache key, the parity arithmetic) works without TensorRT.

Engines are cached by a key over the ONNX bytes (which hold the int8 scales), the build settings, the TensorRT
version and the GPU, because an engine is only valid for exactly that combination. Every engine is compared
with ONNX Runtime on the same file before use: TensorRT has produced wrong ViT attention outputs before
(TensorRT #4333), so a fast engine is worthless until it is shown to be right.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ofbdeploy.deploy import trt_api
from ofbdeploy.deploy.onnx_export import INPUT_NAME, graph_precision
from ofbdeploy.deploy.parity import Tolerance, compare, tolerance_for
from ofbdeploy.deploy.runtimes import registry
from ofbdeploy.errors import OfbError
from ofbdeploy.io import atomic_write

PRECISIONS = registry.ONNX_PRECISIONS
TensorRTUnavailable = trt_api.TensorRTUnavailable
require_tensorrt = trt_api.load
_LOG = logging.getLogger("ofbdeploy.deploy.tensorrt")


@dataclass(frozen=True)
class EngineSpec:
    """What an engine is built for: the ONNX file's precision, its one profile's batch range, and TF32."""

    precision: str
    min_batch: int
    opt_batch: int
    max_batch: int
    img_size: int
    in_chans: int = 3
    workspace_gb: float = 4.0
    tf32: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise OfbError(f"engine precision: expected one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise OfbError(
                f"engine batch range: expected 1 <= min <= opt <= max, got "
                f"{self.min_batch} / {self.opt_batch} / {self.max_batch}"
            )
        if self.img_size < 1 or self.in_chans < 1 or self.workspace_gb <= 0:
            raise OfbError(
                f"engine input: expected positive img_size, in_chans and workspace_gb, got "
                f"{self.img_size} / {self.in_chans} / {self.workspace_gb}"
            )

    def shape(self, batch: int) -> tuple[int, int, int, int]:
        """The NCHW input shape at ``batch``."""
        return (batch, self.in_chans, self.img_size, self.img_size)


def engine_cache_key(onnx_path: Path, spec: EngineSpec, trt_version: str, gpu_name: str) -> str:
    """Hex sha256 that changes whenever the engine would: model bytes (int8 scales included), build settings,
    TensorRT, GPU."""
    digest = hashlib.sha256()
    with Path(onnx_path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    settings = {"spec": asdict(spec), "tensorrt": trt_version, "gpu": gpu_name, "typing": "strong"}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def build_engine(onnx_path: Path, spec: EngineSpec, cache_dir: Path, *, log: logging.Logger | None = None) -> Path:
    """Return ``cache_dir/<key>.engine``, building it only when no engine for this exact setup exists.

    The ONNX file must be of ``spec.precision`` (a strongly typed build computes what the graph says). A timing
    cache per TensorRT version and GPU in ``cache_dir`` makes rebuilds of similar models much faster.
    """
    log = log or _LOG
    onnx_path, cache_dir = Path(onnx_path), Path(cache_dir)
    if not onnx_path.is_file():
        raise OfbError(f"{onnx_path}: ONNX model not found")
    found = graph_precision(onnx.load(str(onnx_path), load_external_data=False).graph)
    if found != spec.precision:
        raise OfbError(f"{onnx_path}: a {found} graph cannot make a {spec.precision} engine (strongly typed builds "
                       f"take the precision from the graph: export the {spec.precision} ONNX)")
    trt = require_tensorrt()
    gpu = _gpu_name()
    version = trt_api.version(trt)
    engine_path = cache_dir / f"{engine_cache_key(onnx_path, spec, version, gpu)}.engine"
    if engine_path.is_file():
        log.info("engine cache hit: %s", engine_path)
        return engine_path
    log.info("building TensorRT %s strongly typed %s engine for %s (batch %d..%d, opt %d, TF32 %s) on %s", version,
             spec.precision, onnx_path.name, spec.min_batch, spec.max_batch, spec.opt_batch,
             "on" if spec.tf32 else "off", gpu)
    t0 = time.perf_counter()
    timing_path = cache_dir / f"timing-{_slug(version)}-{_slug(gpu)}.cache"
    serialized, timing = trt_api.build(
        trt, str(onnx_path), input_name=INPUT_NAME,
        shapes=(spec.shape(spec.min_batch), spec.shape(spec.opt_batch), spec.shape(spec.max_batch)),
        workspace_bytes=int(spec.workspace_gb * (1 << 30)), tf32=spec.tf32,
        timing_cache=timing_path.read_bytes() if timing_path.is_file() else b"",
    )
    atomic_write(engine_path, lambda tmp: tmp.write_bytes(serialized))
    atomic_write(timing_path, lambda tmp: tmp.write_bytes(timing))
    log.info("engine built in %.1f s: %s", time.perf_counter() - t0, engine_path)
    return engine_path


def _gpu_name() -> str:
    """Name of the current CUDA device; engines are built for, and only valid on, that GPU model."""
    import torch

    if not torch.cuda.is_available():
        raise OfbError("TensorRT engine: no CUDA GPU is visible (docker run --gpus all ..., check nvidia-smi)")
    return torch.cuda.get_device_name(torch.cuda.current_device())


def _slug(text: str) -> str:
    """File-name-safe form of a version or GPU name."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")


def parity_batches(images: np.ndarray, min_batch: int, max_batch: int) -> list[np.ndarray]:
    """``images`` in batches the engine's profile accepts: at most ``max_batch`` each, and at least ``min_batch``
    (a short set is repeated to fill it), so every image is checked whatever the profile."""
    if len(images) == 0:
        raise OfbError("parity check: no images")
    if len(images) < min_batch:
        images = np.concatenate([images] * -(-min_batch // len(images)))[:min_batch]
    batches = [images[i:i + max_batch] for i in range(0, len(images), max_batch)]
    if len(batches[-1]) < min_batch:  # top a short tail up from the start
        batches[-1] = np.concatenate([batches[-1], images[:min_batch - len(batches[-1])]])
    return batches


def check_engine_parity(
    engine_path: Path,
    onnx_path: Path,
    images: np.ndarray,
    *,
    precision: str,
    batch_range: tuple[int, int] = (1, 1 << 30),
    tf32: bool = False,
    tolerance: Tolerance | None = None,
    runner_factory: Callable[..., Any] | None = None,
) -> dict[str, float | int]:
    """Compare the engine's logits with ONNX Runtime (CPU) on the same file; raise when they disagree.

    The tolerance is the precision's (relative to the logit scale, with a top-1 agreement floor; TF32 fp32
    engines get the TF32 row) unless given. ``images`` are run in batches inside ``batch_range`` (the engine's
    profile), so even a profile whose minimum exceeds the check set is checked. Non-finite engine outputs always
    fail: an overflowing fp16 LayerNorm shows up as inf or NaN.
    """
    limits = tolerance or tolerance_for(precision, tf32=tf32)
    runner = (runner_factory or registry.create_runner)("tensorrt", engine_path=Path(engine_path), precision=precision)
    batches = parity_batches(np.ascontiguousarray(images, dtype=np.float32), *batch_range)
    logits = np.concatenate([np.asarray(runner.run_on(b), dtype=np.float32) for b in batches])
    reference = _onnxruntime_logits(Path(onnx_path), batches)
    if logits.shape != reference.shape:
        raise OfbError(f"{engine_path}: engine output shape {logits.shape}, ONNX Runtime gives {reference.shape}")
    parity = compare(logits, reference, limits.max_abs_diff(reference), limits.min_top1_agreement)
    if not parity.ok:
        raise OfbError(f"{engine_path}: TensorRT outputs disagree with ONNX Runtime ({precision}): "
                       f"{parity.describe()}; do not use this engine")
    return {"max_abs_diff": parity.max_abs_diff, "top1_agreement": parity.top1_agreement,
            "tolerance": parity.tolerance, "min_top1_agreement": parity.min_top1_agreement, "images": parity.images}


def _onnxruntime_logits(onnx_path: Path, batches: list[np.ndarray]) -> np.ndarray:
    """Reference outputs: ONNX Runtime's CPU provider, the most trusted implementation of the ONNX graph."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([np.asarray(session.run(None, {name: b})[0], dtype=np.float32) for b in batches])
