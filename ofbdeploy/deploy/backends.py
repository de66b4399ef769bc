"""Latency backends: one ``Runner`` interface, one registry of factories, one implementation per runtime family.

A runner owns a model loaded on one backend and an input that already lives on the device, so that
``run()`` is exactly one forward: no host-device copies, no allocation of inputs or outputs. Every runner
fills its input from the same seeded generator, so the outputs of two runners of the same model can be
compared directly (parity checks) without passing data around.

Launch overhead is removed where the backend allows it, because a small pruned ViT on a big GPU is
otherwise timed as Python and kernel-launch cost, not as model cost:

* ``torch`` / ``torch-compile`` on CUDA capture one forward in a ``torch.cuda.CUDAGraph`` and replay it
  (``create_runner(..., cuda_graph=False)`` launches every kernel instead: what plain eager PyTorch serving
  costs, launch overhead included).
* ``ort-cuda`` enables the CUDA EP's ``enable_cuda_graph``; ``ort-trt`` enables ``trt_cuda_graph_enable``.
  Graph capture needs every node on the GPU, so the session is built per batch size with the batch
  dimension fixed (``add_free_dimension_override_by_name``), which folds the shape arithmetic away.
* ``tensorrt`` captures ``execute_async_v3`` on its own stream after a warm-up enqueue and replays the graph;
  when capture fails (a plugin or an engine that cannot be captured) it enqueues every call instead and says
  so in its rows (``cuda_graph: false``).
* On CPU there is nothing to capture.

Every GPU runner is timed with CUDA events recorded on the stream its work runs on: torch's current stream,
the engine's stream, and for ONNX Runtime a torch stream handed to the provider as its compute stream
(``user_compute_stream``), with the end-of-run synchronisation turned off so the events, not the host,
delimit the work. One TF32 policy (``tf32``) is applied to every GPU backend that has a switch: torch's
matmul and cuDNN flags, the CUDA provider's ``use_tf32`` and TensorRT's TF32 builder flag (given when the
engine is built). ONNX Runtime's TensorRT provider has no TF32 switch and builds with TensorRT's default
(on); its rows record that. Each row carries the runner's ``tf32`` and ``cuda_graph``.

``torch-compile`` uses the default mode with ``dynamic=False``: ``max-autotune`` spends minutes per shape
benchmarking kernels, and dynamic shapes would compile one generic kernel set for every batch size,
which is not what a deployed model at a fixed batch runs. On CUDA the compiled forward is then captured
in a CUDA graph like the eager one, so the two torch backends differ only in kernels, not in launch cost.
"""

from __future__ import annotations

import copy
import logging
import platform
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from ofbdeploy.deploy import trt_api
from ofbdeploy.deploy.onnx_export import graph_precision
from ofbdeploy.errors import OfbError
from ofbdeploy.numerics import set_tf32

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_INPUT_SEED = 0
_NO_CUDA = "no CUDA device visible to PyTorch: run on a machine with an NVIDIA GPU and a CUDA build of torch"
_LOG = logging.getLogger("ofbdeploy.deploy.backends")


class BackendError(OfbError, ValueError):
    """A runner request that cannot work anywhere: unknown backend, missing model file, unsupported precision."""


class BackendUnavailable(OfbError, RuntimeError):
    """The backend exists but this machine lacks what it needs (a package, a GPU, an execution provider)."""


class Timer(ABC):
    """Times one call; separate from the runner so CUDA runners can time on the device instead of the host."""

    @abstractmethod
    def start(self) -> None:
        """Mark the beginning of one timed call."""

    @abstractmethod
    def stop(self) -> float:
        """Milliseconds since ``start``, counted only once the device has finished the work."""


class WallTimer(Timer):
    """Host clock around the call, read after synchronising so queued device work is not left out."""

    def __init__(self, synchronize: Callable[[], None]) -> None:
        self._synchronize = synchronize
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        self._synchronize()
        return (time.perf_counter() - self._t0) * 1e3


class CudaEventTimer(Timer):
    """CUDA events on the runner's stream: device time, without the host's wake-up jitter after a sync."""

    def __init__(self, stream: torch.cuda.Stream) -> None:
        self._stream = stream
        self._begin = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        self._begin.record(self._stream)

    def stop(self) -> float:
        self._end.record(self._stream)
        self._end.synchronize()
        return self._begin.elapsed_time(self._end)


class Runner(ABC):
    """A model loaded on one backend with a resident input, ready to be timed.

    ``tf32`` is whether fp32 math may use TF32 (None on CPU); ``cuda_graph`` whether ``run`` replays a CUDA graph
    (None on CPU).
    """

    backend: str
    device_name: str
    precision: str
    tf32: bool | None = None
    cuda_graph: bool | None = None

    @abstractmethod
    def prepare(self, batch: int, images: np.ndarray | None = None) -> None:
        """Allocate the input (seeded, or ``images``) and outputs on the device once, and do per-shape setup."""

    @abstractmethod
    def run(self) -> Any:
        """One forward on the resident input; nothing is copied between host and device."""

    @abstractmethod
    def synchronize(self) -> None:
        """Wait for queued device work (CPU backends have nothing left to wait for after ``run``)."""

    def run_on(self, images: np.ndarray) -> np.ndarray:
        """Outputs for the given images (parity checks; not a timed path: it re-prepares the buffers)."""
        self.prepare(len(images), images)
        self.run()
        return self.outputs()

    def timer(self) -> Timer:
        """Host-clock timing unless the backend has device events."""
        return WallTimer(self.synchronize)

    def peak_memory_mb(self) -> float | None:
        """Device memory this runner needs (weights + buffers + activations); None where it cannot be told."""
        return None

    @abstractmethod
    def outputs(self) -> np.ndarray:
        """The last run's output as float32 on the host, for parity checks (never timed)."""


@dataclass(frozen=True)
class _Request:
    """What ``create_runner`` was asked for, handed to the backend's factory."""

    backend: str
    model: nn.Module | None
    onnx_path: Path | None
    engine_path: Path | None
    precision: str
    device: str
    threads: int | None
    tf32: bool = True
    cache_dir: Path | None = None
    cuda_graph: bool = True

    def file(self, field: str) -> Path:
        """The path in ``field``, which this backend needs and which must exist."""
        value = getattr(self, field)
        if value is None:
            raise BackendError(f"backend {self.backend!r} needs {field}=...")
        path = Path(value)
        if not path.is_file():
            raise BackendError(f"{field} {path} does not exist")
        return path

    def check_precision(self, allowed: Collection[str], context: str) -> None:
        """Refuse a precision the backend would silently not apply; ``context`` says what limits it."""
        if self.precision not in allowed:
            raise BackendError(f"{self.backend} {context} supports {', '.join(sorted(allowed))}, not {self.precision}")


def _device(request: _Request, allowed: tuple[str, ...]) -> torch.device:
    """Resolve ``auto`` to CUDA when the backend can use it, and give CUDA devices an explicit index."""
    preferred = "cuda" if "cuda" in allowed and torch.cuda.is_available() else allowed[-1]
    device = torch.device(preferred if request.device == "auto" else request.device)
    if device.type not in allowed:
        raise BackendError(f"{request.backend} runs on {' or '.join(allowed)}, not {request.device}")
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise BackendUnavailable(f"{request.backend}: {_NO_CUDA}")
    return torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)


def device_name(device: torch.device) -> str:
    """CPU model or GPU name, recorded with every measurement so numbers are never compared across machines."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"cpu: {models[0] if models else platform.processor() or platform.machine()}"


def _seeded_input(shape: tuple[int, ...], images: np.ndarray | None = None) -> torch.Tensor:
    """The caller's images, or the same seeded float32 host tensor for every runner of a shape, so that
    outputs of different runners are comparable."""
    if images is not None:
        if tuple(images.shape) != shape:
            raise BackendError(f"images: expected shape {shape}, got {tuple(images.shape)}")
        return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    return torch.randn(shape, generator=torch.Generator().manual_seed(_INPUT_SEED))


class _CudaPeak:
    """Growth of torch's CUDA allocator peak inside a block (0 on CPU).

    The device-wide peak would also count a second runner living in the same process (``measure_pair``),
    so each runner reports what it allocated itself.
    """

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._base = 0
        self.bytes = 0

    def __enter__(self) -> _CudaPeak:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
            self._base = torch.cuda.memory_allocated(self._device)
            torch.cuda.reset_peak_memory_stats(self._device)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
            self.bytes = torch.cuda.max_memory_allocated(self._device) - self._base


def _input_chw(model: nn.Module) -> tuple[int, ...]:
    """Channels and image size of a timm ViT, read from its patch embedding."""
    embed = getattr(model, "patch_embed", None)
    if embed is None:
        raise BackendError(f"{type(model).__name__} has no patch_embed; torch runners expect a timm ViT")
    return (embed.proj.in_channels, *embed.img_size)


def _capture(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Record one forward in a CUDA graph (after warm-up on a side stream, as capture requires) for replay."""
    side = torch.cuda.Stream(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):
        for _ in range(3):
            forward(x)
    torch.cuda.current_stream(x.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = forward(x)

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


class TorchRunner(Runner):
    """PyTorch eager or ``torch.compile`` on a private copy of the model, under ``inference_mode``."""

    def __init__(self, model: nn.Module, device: torch.device, precision: str, compiled: bool, tf32: bool,
                 cuda_graph: bool = True) -> None:
        self.backend = "torch-compile" if compiled else "torch"
        self.device_name = device_name(device)
        self.precision = precision
        on_gpu = device.type == "cuda"
        self.tf32 = tf32 if on_gpu else None
        self.cuda_graph = cuda_graph if on_gpu else None
        self._device = device
        self._chw = _input_chw(model)
        with _CudaPeak(device) as weights:
            module = copy.deepcopy(model).eval().to(device=device, dtype=_TORCH_DTYPES[precision])
        self._weights_bytes = weights.bytes
        self._forward = torch.compile(module, dynamic=False) if compiled else module
        self._step: Callable[[], torch.Tensor] | None = None
        self._x: torch.Tensor | None = None
        self._out: torch.Tensor | None = None
        self._peak_mb: float | None = None

    def prepare(self, batch: int, images: np.ndarray | None = None) -> None:
        self._step = self._x = self._out = None  # free the previous shape's buffers and graph first
        if self.tf32 is not None:
            set_tf32(self.tf32)  # before compiling and capturing: both bake the choice in
        with _CudaPeak(self._device) as peak, torch.inference_mode():
            x = _seeded_input((batch, *self._chw), images).to(self._device, _TORCH_DTYPES[self.precision])
            self._out = self._forward(x)  # compiles, for torch-compile
            self._step = _capture(self._forward, x) if self.cuda_graph else partial(self._forward, x)
            self._x = x
        if self._device.type == "cuda":
            self._peak_mb = (self._weights_bytes + peak.bytes) / 2**20

    def run(self) -> torch.Tensor:
        with torch.inference_mode():
            self._out = self._step()
        return self._out

    def synchronize(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def timer(self) -> Timer:
        if self._device.type == "cuda":
            return CudaEventTimer(torch.cuda.current_stream(self._device))
        return super().timer()

    def peak_memory_mb(self) -> float | None:
        return self._peak_mb

    def outputs(self) -> np.ndarray:
        self.synchronize()
        return self._out.float().cpu().numpy()


def _torch_runner(request: _Request, *, compiled: bool) -> Runner:
    """Eager or compiled PyTorch; reduced precision only on CUDA, where it is a deployment choice."""
    if request.model is None:
        raise BackendError(f"backend {request.backend!r} needs model=<nn.Module>")
    device = _device(request, ("cuda", "cpu"))
    request.check_precision(_TORCH_DTYPES if device.type == "cuda" else ("fp32",), f"on {device.type}")
    if request.threads is not None:
        torch.set_num_threads(request.threads)  # process-wide: PyTorch has no per-module thread pool
    return TorchRunner(request.model, device, request.precision, compiled, request.tf32, request.cuda_graph)


@dataclass(frozen=True)
class _OnnxInput:
    """The one graph input (name, free batch axis if any, sample shape, dtype) and the weights' precision."""

    name: str
    batch_axis: str | None
    chw: tuple[int, ...]
    dtype: np.dtype
    precision: str


def _onnx_input(path: Path) -> _OnnxInput:
    """Read the signature without external weights, so the session can be built for a fixed batch.

    The precision comes from the graph (:func:`graph_precision`), not the input: every export keeps fp32
    inputs and outputs.
    """
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    inputs = [value for value in graph.input if value.name not in weights]
    if len(inputs) != 1:
        raise BackendError(f"{path} has {len(inputs)} inputs; latency runners expect one image input")
    tensor = inputs[0].type.tensor_type
    dims = [dim.dim_param or dim.dim_value for dim in tensor.shape.dim]
    if not all(isinstance(d, int) and d > 0 for d in dims[1:]):
        raise BackendError(f"{path}: input {inputs[0].name} needs a static C, H, W, got {dims}")
    batch_axis = dims[0] if isinstance(dims[0], str) else None
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    return _OnnxInput(inputs[0].name, batch_axis, tuple(dims[1:]), dtype, graph_precision(graph))


class OrtRunner(Runner):
    """An ONNX Runtime session on one execution provider, fed through IOBinding with device-resident buffers.

    On CUDA the provider computes on a torch stream of this runner (``user_compute_stream``) and each run returns
    without waiting for it (``disable_synchronize_execution_providers``), so CUDA events on that stream time the
    work like every other GPU runner's. On CPU a run returns when done and the host clock times it. The precision
    is the file's, or one of ``provider_precisions`` that the provider applies itself (TensorRT's fp16 flag).
    """

    def __init__(
        self,
        request: _Request,
        device: torch.device,
        providers: Callable[[torch.cuda.Stream | None], list[tuple[str, dict[str, Any]]]],
        provider_precisions: tuple[str, ...] = (),
        tf32: bool | None = None,
        cuda_graph: bool | None = None,
    ) -> None:
        self.backend = request.backend
        self.device_name = device_name(device)
        self.precision = request.precision
        self.tf32, self.cuda_graph = tf32, cuda_graph
        self._path = request.file("onnx_path")
        self._input = _onnx_input(self._path)
        context = f"with {self._path.name} (a {self._input.precision} graph)"
        request.check_precision((self._input.precision, *provider_precisions), context)
        self._device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._providers = providers(self._stream)
        self._threads = request.threads or 0  # 0 lets ONNX Runtime use one thread per physical core
        self._run_options = ort.RunOptions()
        if self._stream is not None:
            self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self._session: ort.InferenceSession | None = None
        self._binding: ort.IOBinding | None = None
        self._y: ort.OrtValue | None = None

    def _open(self, batch: int) -> ort.InferenceSession:
        """A session specialised to ``batch``, refusing ONNX Runtime's silent fallback to the CPU provider."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = self._threads
        # Idle sessions must not spin: dense and pruned (or a LUT's probes) alternate in one process, and a
        # spinning pool of the session just timed would steal cores from the one being timed.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self._input.batch_axis is not None:
            options.add_free_dimension_override_by_name(self._input.batch_axis, batch)
        wanted = self._providers[0][0]
        try:
            session = ort.InferenceSession(str(self._path), options, providers=self._providers,
                                           disabled_optimizers=disabled_optimizers(self._input.precision))
        except Exception as err:  # a provider that fails to start raises onnxruntime's own exception types
            lines = str(err).strip().splitlines()
            raise BackendUnavailable(f"{self.backend}: ONNX Runtime could not start {wanted}: "
                                     f"{lines[0] if lines else type(err).__name__}") from None
        if wanted not in session.get_providers():
            raise BackendUnavailable(f"{self.backend}: ONNX Runtime could not start {wanted} (CUDA/TensorRT libs?)")
        return session

    def prepare(self, batch: int, images: np.ndarray | None = None) -> None:
        session = self._open(batch)
        kind, index = self._device.type, self._device.index or 0
        x = _seeded_input((batch, *self._input.chw), images).numpy().astype(self._input.dtype)
        meta = session.get_outputs()[0]
        shape = [d if isinstance(d, int) else batch for d in meta.shape]  # batch is the only free axis
        binding = session.io_binding()
        binding.bind_ortvalue_input(self._input.name, ort.OrtValue.ortvalue_from_numpy(x, kind, index))
        self._y = ort.OrtValue.ortvalue_from_shape_and_type(shape, _ORT_TYPES[meta.type], kind, index)
        binding.bind_ortvalue_output(meta.name, self._y)
        self._session, self._binding = session, binding
        self.synchronize()  # the input copy and any capture happened before the first timed call

    def run(self) -> ort.OrtValue:
        self._session.run_with_iobinding(self._binding, self._run_options)
        return self._y

    def synchronize(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()
        self._binding.synchronize_outputs()

    def timer(self) -> Timer:
        return CudaEventTimer(self._stream) if self._stream is not None else super().timer()

    def outputs(self) -> np.ndarray:
        self.synchronize()
        return self._binding.copy_outputs_to_cpu()[0].astype(np.float32)


def disabled_optimizers(precision: str) -> list[str]:
    """ONNX Runtime graph rewrites to turn off for a graph of ``precision``.

    int8: with the batch fixed (every session here is specialised to its batch), ``MatMulAddFusion`` rewrites
    each MatMul + bias Add into Reshape/Gemm/Reshape before the Q/DQ fusions run, so DequantizeLinear -> MatMul
    is no longer there to become ``MatMulIntegerToFloat``: the int8 file then runs as dequantise + fp32 Gemm,
    slower than fp32 (DeiT-S: 2x slower instead of 1.7x faster on this CPU). Other graphs keep every rewrite.
    """
    return ["MatMulAddFusion"] if precision == "int8" else []


def _stream_options(stream: torch.cuda.Stream | None) -> dict[str, str]:
    """Provider options that make ONNX Runtime compute on ``stream`` (its address as a decimal string)."""
    return {"has_user_compute_stream": "1", "user_compute_stream": str(stream.cuda_stream)}


def _ort_cpu(request: _Request) -> Runner:
    """CPU provider; ``threads`` sets intra-op parallelism."""
    return OrtRunner(request, _device(request, ("cpu",)), lambda _: [("CPUExecutionProvider", {})])


def _ort_cuda(request: _Request) -> Runner:
    """CUDA provider on the runner's stream, with CUDA-graph replay and the TF32 policy (``use_tf32``)."""
    device = _device(request, ("cuda",))

    def providers(stream: torch.cuda.Stream | None) -> list[tuple[str, dict[str, Any]]]:
        options = {"device_id": str(device.index), "enable_cuda_graph": "1", "use_tf32": str(int(request.tf32)),
                   **_stream_options(stream)}
        return [("CUDAExecutionProvider", options)]

    return OrtRunner(request, device, providers, tf32=request.tf32, cuda_graph=True)


def ort_trt_cache_dir(request_cache: Path | None) -> Path:
    """Where ONNX Runtime's TensorRT provider keeps its engines and timing cache (one per machine by default)."""
    return request_cache or Path.home() / ".cache" / "ofbdeploy" / "ort-trt"


def _ort_trt(request: _Request) -> Runner:
    """TensorRT provider with its engine and timing caches on (a session reuses the engine built for the same
    graph, TensorRT and GPU instead of rebuilding it), CUDA graphs, on the runner's stream; the CUDA provider
    takes any node TensorRT rejects.

    ONNX Runtime builds its TensorRT networks itself (weakly typed, against TensorRT 10): fp16 is its flag on
    the fp32 graph, int8 its flag on the Q/DQ graph (explicit quantisation, no calibration table). It has no
    TF32 switch: TensorRT's default (on) applies whatever the policy, and the rows say so.
    """
    device = _device(request, ("cuda",))
    cache = ort_trt_cache_dir(request.cache_dir)

    def providers(stream: torch.cuda.Stream | None) -> list[tuple[str, dict[str, Any]]]:
        cache.mkdir(parents=True, exist_ok=True)
        options = {
            "device_id": str(device.index),
            "trt_fp16_enable": str(request.precision == "fp16"),
            "trt_int8_enable": str(request.precision == "int8"),
            "trt_cuda_graph_enable": "True",
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": str(cache),
            **_stream_options(stream),
        }
        cuda = {"device_id": str(device.index), "use_tf32": str(int(request.tf32)), **_stream_options(stream)}
        return [("TensorrtExecutionProvider", options), ("CUDAExecutionProvider", cuda)]

    if not request.tf32:
        _LOG.warning("ort-trt: ONNX Runtime's TensorRT provider has no TF32 switch; its fp32 layers use TF32 "
                     "although the policy is off (recorded as tf32: true)")
    return OrtRunner(request, device, providers, provider_precisions=("fp16",), tf32=True, cuda_graph=True)


class TensorRTRunner(Runner):
    """A serialized TensorRT engine on a dedicated CUDA stream, replayed as a CUDA graph where capture works.

    The engine's precision is its ONNX graph's (strongly typed build), so ``precision`` labels what the caller
    built; ``tf32`` is the policy the engine was built with (a build-time flag in TensorRT).
    I/O buffers are torch CUDA tensors whose addresses are handed to the execution context.
    """

    def __init__(self, request: _Request, device: torch.device) -> None:
        trt = trt_api.load()
        self.backend = request.backend
        self.device_name = device_name(device)
        self.precision = request.precision
        self.tf32 = request.tf32
        self._device = device
        path = request.file("engine_path")
        with torch.cuda.device(device):
            try:
                self._engine = trt_api.Engine(trt, path.read_bytes(), str(path))
            except OfbError as err:
                raise BackendUnavailable(f"tensorrt: {err}") from None
        self._stream = torch.cuda.Stream(device)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None

    def prepare(self, batch: int, images: np.ndarray | None = None) -> None:
        low, high = self._engine.batch_range
        if not low <= batch <= high:
            raise BackendUnavailable(f"tensorrt: batch {batch} is outside the engine's profile (batch {low}..{high}; "
                                     "set export.batch_range)")
        self._graph = None
        out_shape = self._engine.set_batch(batch)
        dtypes = {name: _TORCH_DTYPES[kind] for name, kind in self._engine.dtypes.items()}
        self._x = _seeded_input((batch, *self._engine.sample_shape), images).to(self._device,
                                                                                dtypes[self._engine.input])
        self._y = torch.empty(out_shape, dtype=dtypes[self._engine.output], device=self._device)
        self._engine.bind(self._x.data_ptr(), self._y.data_ptr())
        torch.cuda.synchronize(self._device)  # the buffers were written on the default stream
        self._engine.enqueue(self._stream.cuda_stream)  # warm-up: shape-dependent setup happens outside capture
        self._stream.synchronize()
        self._graph = self._capture()
        self.cuda_graph = self._graph is not None

    def _capture(self) -> torch.cuda.CUDAGraph | None:
        """One enqueue recorded as a CUDA graph on the runner's stream; None (and a warning) when capture fails."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self._stream):
                self._engine.enqueue(self._stream.cuda_stream)
        except Exception as err:  # capture failures surface as RuntimeError or TensorRT's own error
            _LOG.warning("tensorrt: CUDA graph capture failed (%s); timing plain enqueues instead", err)
            torch.cuda.synchronize(self._device)
            return None
        return graph

    def run(self) -> torch.Tensor:
        if self._graph is not None:
            with torch.cuda.stream(self._stream):  # replay launches on the current stream: the timed one
                self._graph.replay()
        else:
            self._engine.enqueue(self._stream.cuda_stream)
        return self._y

    def synchronize(self) -> None:
        self._stream.synchronize()

    def timer(self) -> Timer:
        return CudaEventTimer(self._stream)

    def outputs(self) -> np.ndarray:
        self.synchronize()
        return self._y.float().cpu().numpy()


def _tensorrt(request: _Request) -> Runner:
    """Native TensorRT on a prebuilt engine."""
    return TensorRTRunner(request, _device(request, ("cuda",)))


def _always() -> str | None:
    """PyTorch is a hard dependency and runs on CPU everywhere."""
    return None


def _ort_missing(provider: str) -> str | None:
    """Why an ONNX Runtime provider cannot run here (every provider but the CPU one needs CUDA)."""
    if provider not in ort.get_available_providers():
        return f"ONNX Runtime here lacks {provider}: pip install the .[gpu] extra (onnxruntime-gpu) instead"
    if provider != "CPUExecutionProvider" and not torch.cuda.is_available():
        return _NO_CUDA
    return None


def _tensorrt_missing() -> str | None:
    """Why native TensorRT cannot run here."""
    try:
        trt_api.load()
    except trt_api.TensorRTUnavailable as err:
        return str(err)
    return None if torch.cuda.is_available() else _NO_CUDA


@dataclass(frozen=True)
class _Backend:
    """A registry entry: how to build the runner, and why it cannot run on this machine (None if it can)."""

    build: Callable[[_Request], Runner]
    missing: Callable[[], str | None]


_BACKENDS: dict[str, _Backend] = {
    "torch": _Backend(partial(_torch_runner, compiled=False), _always),
    "torch-compile": _Backend(partial(_torch_runner, compiled=True), _always),
    "ort-cpu": _Backend(_ort_cpu, partial(_ort_missing, "CPUExecutionProvider")),
    "ort-cuda": _Backend(_ort_cuda, partial(_ort_missing, "CUDAExecutionProvider")),
    "ort-trt": _Backend(_ort_trt, partial(_ort_missing, "TensorrtExecutionProvider")),
    "tensorrt": _Backend(_tensorrt, _tensorrt_missing),
}


def unavailable_reason(backend: str) -> str | None:
    """Why ``backend`` cannot run on this machine (None if it can, or if it is unknown)."""
    entry = _BACKENDS.get(backend)
    return None if entry is None else entry.missing()


def available_backends() -> list[str]:
    """The registered backends that can run on this machine, in registry order."""
    return [name for name, entry in _BACKENDS.items() if entry.missing() is None]


def create_runner(
    backend: str,
    *,
    model: nn.Module | None = None,
    onnx_path: Path | None = None,
    engine_path: Path | None = None,
    precision: str = "fp32",
    device: str = "auto",
    threads: int | None = None,
    tf32: bool = True,
    cache_dir: Path | None = None,
    cuda_graph: bool = True,
) -> Runner:
    """Build a runner: ``model`` for torch backends, ``onnx_path`` for ort-*, ``engine_path`` for tensorrt.

    ``tf32`` is the TF32 policy for GPU backends (engines carry the one they were built with);
    ``cache_dir`` is where ort-trt keeps its engine and timing caches. ``cuda_graph=False`` makes the torch
    backends launch every kernel on CUDA instead of replaying a captured graph; the other backends always
    use theirs, so they refuse it.
    """
    entry = _BACKENDS.get(backend)
    if entry is None:
        raise BackendError(f"unknown backend {backend!r}; known: {', '.join(_BACKENDS)}")
    if precision not in PRECISIONS:
        raise BackendError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    if not cuda_graph and not backend.startswith("torch"):
        raise BackendError(f"{backend} always replays a CUDA graph on the GPU; cuda_graph=False is for torch backends")
    reason = entry.missing()
    if reason is not None:
        raise BackendUnavailable(f"{backend}: {reason}")
    return entry.build(_Request(backend, model, onnx_path, engine_path, precision, device, threads, tf32, cache_dir,
                                cuda_graph))
