"""TensorRT engines from the exported ONNX model: cached builds, int8 calibration, and a parity check.

TensorRT is optional and GPU-only, so it is imported lazily: everything here that does not build or run an
engine (the cache key, the parity arithmetic) works without it. Engines are cached by a key over the ONNX
bytes, the build settings, the TensorRT version and the GPU, because an engine is only valid for exactly
that combination. Every engine is compared with ONNX Runtime before use: TensorRT has produced wrong ViT
attention outputs before (TensorRT #4333), so a fast engine is worthless until it is shown to be right.
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
from types import ModuleType
from typing import Any

import numpy as np

from ofbdeploy.errors import OfbError
from ofbdeploy.io import atomic_write

INPUT_NAME = "images"
PRECISIONS = ("fp32", "fp16", "int8")
_CALIBRATION_BATCH = 16
_LOG = logging.getLogger("ofbdeploy.deploy.tensorrt")


class TensorRTUnavailable(OfbError):
    """TensorRT's Python package cannot be imported on this machine."""

    def __init__(self) -> None:
        super().__init__(
            "TensorRT is not installed: run inside the Docker image (docker build -t ofbdeploy . ; "
            "docker run --gpus all ...) or pip install '.[trt]' with NVIDIA's index"
        )


def require_tensorrt() -> ModuleType:
    """Import TensorRT on first use, so that CPU-only installs never need it."""
    try:
        import tensorrt
    except ImportError:
        raise TensorRTUnavailable() from None
    return tensorrt


@dataclass(frozen=True)
class EngineSpec:
    """What an engine is built for: precision and the batch range of its one optimisation profile."""

    precision: str
    min_batch: int
    opt_batch: int
    max_batch: int
    img_size: int
    in_chans: int = 3
    workspace_gb: float = 4.0

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


def engine_cache_key(
    onnx_path: Path, spec: EngineSpec, trt_version: str, gpu_name: str, *, calibration: np.ndarray | None = None
) -> str:
    """Hex sha256 that changes whenever the engine would: model bytes, build settings, TensorRT, GPU, int8 data."""
    digest = hashlib.sha256()
    with Path(onnx_path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    calibration_digest = None if calibration is None else _array_digest(calibration)
    settings = {"spec": asdict(spec), "tensorrt": trt_version, "gpu": gpu_name, "calibration": calibration_digest}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def build_engine(
    onnx_path: Path,
    spec: EngineSpec,
    cache_dir: Path,
    *,
    calibration_images: np.ndarray | None = None,
    log: logging.Logger | None = None,
) -> Path:
    """Return ``cache_dir/<key>.engine``, building it only when no engine for this exact setup exists.

    fp16 lets TensorRT pick fp16 or fp32 per layer; int8 adds int8 kernels (layers without one run in fp16) and
    needs ``calibration_images`` (N, C, H, W float32, normalised like the model's inputs); the scales go
    to ``<key>.calib`` so a rebuild skips calibration. A timing cache per TensorRT version and GPU in
    ``cache_dir`` makes rebuilds of similar models much faster.
    """
    log = log or _LOG
    onnx_path, cache_dir = Path(onnx_path), Path(cache_dir)
    if not onnx_path.is_file():
        raise OfbError(f"{onnx_path}: ONNX model not found")
    calibration = _check_calibration(calibration_images, spec) if spec.precision == "int8" else None
    trt = require_tensorrt()
    gpu = _gpu_name()
    key = engine_cache_key(onnx_path, spec, trt.__version__, gpu, calibration=calibration)
    engine_path = cache_dir / f"{key}.engine"
    if engine_path.is_file():
        log.info("engine cache hit: %s", engine_path)
        return engine_path
    log.info("building TensorRT %s %s engine for %s (batch %d..%d, opt %d) on %s",
             trt.__version__, spec.precision, onnx_path.name, spec.min_batch, spec.max_batch, spec.opt_batch, gpu)
    t0 = time.perf_counter()
    timing_path = cache_dir / f"timing-{_slug(trt.__version__)}-{_slug(gpu)}.cache"
    serialized = _build(trt, onnx_path, spec, timing_path, calibration, engine_path.with_suffix(".calib"), log)
    atomic_write(engine_path, lambda tmp: tmp.write_bytes(serialized))
    log.info("engine built in %.1f s: %s", time.perf_counter() - t0, engine_path)
    return engine_path


def _check_calibration(images: np.ndarray | None, spec: EngineSpec) -> np.ndarray:
    """Refuse int8 without representative data: uncalibrated scales give a fast, wrong engine."""
    if images is None:
        raise OfbError("engine precision int8: calibration_images are required (N, C, H, W from the recipe's data)")
    expected = spec.shape(1)[1:]
    if images.ndim != 4 or tuple(images.shape[1:]) != expected or len(images) == 0:
        raise OfbError(f"calibration_images: expected shape (N, {', '.join(map(str, expected))}), got {images.shape}")
    return np.ascontiguousarray(images, dtype=np.float32)


def _array_digest(images: np.ndarray) -> str:
    """Hash of the calibration data, so new data never reuses an engine calibrated on old data."""
    return hashlib.sha256(str(images.shape).encode() + images.tobytes()).hexdigest()


def _gpu_name() -> str:
    """Name of the current CUDA device; engines are built for, and only valid on, that GPU model."""
    import torch

    if not torch.cuda.is_available():
        raise OfbError("TensorRT engine: no CUDA GPU is visible (docker run --gpus all ..., check nvidia-smi)")
    return torch.cuda.get_device_name(torch.cuda.current_device())


def _slug(text: str) -> str:
    """File-name-safe form of a version or GPU name."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")


def _build(
    trt: ModuleType,
    onnx_path: Path,
    spec: EngineSpec,
    timing_path: Path,
    calibration: np.ndarray | None,
    calib_cache: Path,
    log: logging.Logger,
) -> Any:
    """Parse, configure and build; returns TensorRT's serialized engine (a buffer)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = _onnx_is_fp16(onnx_path, spec)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise OfbError(f"{onnx_path}: TensorRT cannot parse the ONNX model: {_parser_errors(parser)}")
    _check_network_input(network, onnx_path, spec)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(spec.workspace_gb * (1 << 30)))
    if not strongly_typed:
        _set_precision(trt, config, spec.precision)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, spec.shape(spec.min_batch), spec.shape(spec.opt_batch), spec.shape(spec.max_batch))
    config.add_optimization_profile(profile)
    if calibration is not None:
        calibrator = make_int8_calibrator(calibration, calib_cache)  # referenced here until the build returns
        config.int8_calibrator = calibrator
        fixed = spec.shape(calibrator.get_batch_size())
        calib_profile = builder.create_optimization_profile()
        calib_profile.set_shape(INPUT_NAME, fixed, fixed, fixed)
        config.set_calibration_profile(calib_profile)
    timing_cache = _load_timing_cache(config, timing_path, log)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise OfbError(f"{onnx_path}: TensorRT could not build a {spec.precision} engine (see its messages above)")
    atomic_write(timing_path, lambda tmp: tmp.write_bytes(timing_cache.serialize()))
    return serialized


def _parser_errors(parser: Any) -> str:
    """Every error the ONNX parser recorded, on one line."""
    errors = (parser.get_error(i) for i in range(parser.num_errors))
    return "; ".join(" ".join(f"node {e.node()}: {e.desc()}".split()) for e in errors)


def _onnx_is_fp16(onnx_path: Path, spec: EngineSpec) -> bool:
    """True for a model exported in float16: built strongly typed, TensorRT keeps the exporter's types exactly.

    That is the documented remedy for broken fp16 results from weakly typed builds; a float32 model is built
    weakly typed with precision flags, since the builder refuses those flags on strongly typed networks.
    """
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    fp16 = any(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for i in graph.input)
    if fp16 and spec.precision != "fp16":
        raise OfbError(f"{onnx_path}: the model was exported in float16; build it with precision fp16")
    return fp16


def _check_network_input(network: Any, onnx_path: Path, spec: EngineSpec) -> None:
    """The profile names one input; say so clearly when the export does not match, not deep in the build."""
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if names != [INPUT_NAME]:
        raise OfbError(f"{onnx_path}: expected one input named {INPUT_NAME!r}, found {names}")
    shape = tuple(network.get_input(0).shape)
    fixed_batch = spec.min_batch == spec.max_batch == shape[0]
    if len(shape) != 4 or shape[1:] != spec.shape(1)[1:] or not (shape[0] == -1 or fixed_batch):
        raise OfbError(
            f"{onnx_path}: input {INPUT_NAME!r} has shape {shape}, expected (batch, "
            f"{', '.join(map(str, spec.shape(1)[1:]))}) with a dynamic batch axis (export with dynamic_axes)"
        )


def _set_precision(trt: ModuleType, config: Any, precision: str) -> None:
    """fp32 means IEEE fp32 (no TF32), so parity with ONNX Runtime can be tight; int8 falls back to fp16.

    LayerNorm stays safe in fp16: opset 17's LayerNormalization becomes TensorRT's normalization layer, which
    computes in fp32 unless told otherwise.
    """
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
        return
    config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)


def _load_timing_cache(config: Any, path: Path, log: logging.Logger) -> Any:
    """Attach the timing cache from ``path`` (or a fresh one); TensorRT adds this build's timings to it."""
    cache = config.create_timing_cache(path.read_bytes() if path.is_file() else b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s does not fit this TensorRT/GPU; starting a new one", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def make_int8_calibrator(images: np.ndarray, cache_path: Path) -> Any:
    """An entropy calibrator over ``images``; the class is made here because its base exists only with TensorRT."""
    trt = require_tensorrt()
    import torch

    class Int8Calibrator(trt.IInt8EntropyCalibrator2):
        """Feeds fixed-size batches through one CUDA buffer; scales are cached in ``cache_path``."""

        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)  # pybind trampolines crash without this explicit call
            self._batch = min(_CALIBRATION_BATCH, len(images))
            self._next = 0
            self._device = torch.empty((self._batch, *images.shape[1:]), dtype=torch.float32, device="cuda")

        def get_batch_size(self) -> int:
            return self._batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            """Next full batch as a device pointer; None ends calibration (a partial tail batch is dropped)."""
            if self._next + self._batch > len(images):
                return None
            self._device.copy_(torch.from_numpy(images[self._next:self._next + self._batch]))
            torch.cuda.synchronize()  # TensorRT reads the buffer on its own stream
            self._next += self._batch
            return [int(self._device.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:
            return cache_path.read_bytes() if cache_path.is_file() else None

        def write_calibration_cache(self, cache: Any) -> None:
            atomic_write(cache_path, lambda tmp: tmp.write_bytes(bytes(cache)))

    return Int8Calibrator()


def check_engine_parity(
    engine_path: Path,
    onnx_path: Path,
    images: np.ndarray,
    *,
    runner_factory: Callable[..., Any] | None = None,
    max_abs_diff: float,
    min_top1_agreement: float = 0.99,
    precision: str = "fp32",
) -> dict[str, float | int]:
    """Compare the engine's logits with ONNX Runtime (CPU) on ``images``; raise when they disagree.

    ``images`` must fit the engine's batch range. ``precision`` is passed to the runner for its records.
    Non-finite engine outputs always fail: an overflowing fp16 LayerNorm shows up as inf or NaN.
    """
    images = np.ascontiguousarray(images, dtype=np.float32)
    reference = _onnxruntime_logits(Path(onnx_path), images)
    if runner_factory is None:
        from ofbdeploy.deploy.backends import create_runner

        runner_factory = create_runner
    runner = runner_factory("tensorrt", engine_path=Path(engine_path), precision=precision)
    logits = np.asarray(runner.run_on(images), dtype=np.float32)
    if logits.shape != reference.shape:
        raise OfbError(f"{engine_path}: engine output shape {logits.shape}, ONNX Runtime gives {reference.shape}")
    finite = bool(np.isfinite(logits).all())
    diff = float(np.max(np.abs(logits - reference))) if finite else float("inf")
    agreement = float(np.mean(logits.argmax(axis=1) == reference.argmax(axis=1)))
    result: dict[str, float | int] = {"max_abs_diff": diff, "top1_agreement": agreement, "images": len(images)}
    if not finite or diff > max_abs_diff or agreement < min_top1_agreement:
        raise OfbError(
            f"{engine_path}: TensorRT outputs disagree with ONNX Runtime on {len(images)} images "
            f"(max |diff| {diff:.3g}, allowed {max_abs_diff:.3g}; top-1 agreement {agreement:.1%}, "
            f"required {min_top1_agreement:.1%}); do not use this engine"
        )
    return result


def _onnxruntime_logits(onnx_path: Path, images: np.ndarray) -> np.ndarray:
    """Reference outputs: ONNX Runtime's CPU provider, the most trusted implementation of the ONNX graph."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: images})[0], dtype=np.float32)
