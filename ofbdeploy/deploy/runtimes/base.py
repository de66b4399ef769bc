"""What every runtime shares: the ``Runner`` interface, the timing protocol, the request, the seeded input,
device resolution and CUDA-graph capture. One file per runtime builds on this; ``registry`` names them.

A runner owns a model loaded on one runtime and an input that already lives on the device, so that ``run()`` is
exactly one forward: no host-device copies, no allocation of inputs or outputs. Every runner fills its input from
the same seeded generator, so the outputs of two runners of the same model can be compared directly (parity
checks) without passing data around.

**The timing protocol** (``span_timer``) decides what one timed call contains, the same for every runner: the
call as the host that asked for the result sees it, from enqueueing the work until the host has been told it is
done. A runner only says where its work runs (``stream``: the CUDA stream it computes on, or None for the host).
On a stream, an event is recorded before the call, the host waits for the stream after it, and the end event is
recorded only then, so one host wake-up lies inside every span: a runner whose ``run()`` already waits (ONNX
Runtime's CUDA-graph replay synchronises before it returns) and one that returns at once (torch and TensorRT
graph replays) are timed alike. Without a stream the host clock times the call to completion.
"""

from __future__ import annotations

import platform
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import onnx
import torch
from torch import nn

from ofbdeploy.deploy.onnx_export import graph_precision
from ofbdeploy.deploy.runtimes.errors import BackendError, BackendUnavailable

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
INPUT_SEED = 0
NO_CUDA = "no CUDA device visible to PyTorch: run on a machine with an NVIDIA GPU and a CUDA build of torch"

Artifact = Literal["module", "onnx", "engine"]  # what a runtime runs: the torch module, an ONNX file, an engine


class Timer(ABC):
    """Times one call; built by the protocol (``span_timer``), never by a runner."""

    @abstractmethod
    def start(self) -> None:
        """Mark the beginning of one timed call."""

    @abstractmethod
    def stop(self) -> float:
        """Milliseconds since ``start``, counted only once the work is done."""


class DeviceStream(Protocol):
    """What the protocol needs of a stream (``torch.cuda.Stream`` in production, a fake in tests)."""

    def synchronize(self) -> None: ...


class WallTimer(Timer):
    """Host clock around the call, read after synchronising so queued work is not left out."""

    def __init__(self, synchronize: Callable[[], None]) -> None:
        self._synchronize = synchronize
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        self._synchronize()
        return (time.perf_counter() - self._t0) * 1e3


def cuda_event() -> Any:
    """A timing CUDA event (the protocol's default; tests hand ``span_timer`` a fake one)."""
    return torch.cuda.Event(enable_timing=True)


class StreamTimer(Timer):
    """Events on the runner's stream; the end is recorded after the host has waited for the stream."""

    def __init__(self, stream: DeviceStream, event: Callable[[], Any] | None = None) -> None:
        self._stream = stream
        self._begin = (event or cuda_event)()
        self._end = (event or cuda_event)()

    def start(self) -> None:
        self._begin.record(self._stream)

    def stop(self) -> float:
        self._stream.synchronize()  # the host learns the work is done: inside the span, whatever run() did
        self._end.record(self._stream)
        self._end.synchronize()
        return self._begin.elapsed_time(self._end)


def span_timer(stream: DeviceStream | None, synchronize: Callable[[], None],
               event: Callable[[], Any] | None = None) -> Timer:
    """The one timing protocol (module docstring): events on ``stream``, or the host clock without one."""
    return WallTimer(synchronize) if stream is None else StreamTimer(stream, event)


class Runner(ABC):
    """A model loaded on one runtime with a resident input, ready to be timed.

    ``stream`` is where its work runs (None: on the host); the protocol times it from there. ``tf32`` is whether
    fp32 math may use TF32 (None on CPU); ``cuda_graph`` whether ``run`` replays a CUDA graph (None on CPU).
    """

    backend: str
    device_name: str
    precision: str
    stream: DeviceStream | None = None
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
        """Wait for queued device work (CPU runtimes have nothing left to wait for after ``run``)."""

    def run_on(self, images: np.ndarray) -> np.ndarray:
        """Outputs for the given images (parity checks; not a timed path: it re-prepares the buffers)."""
        self.prepare(len(images), images)
        self.run()
        return self.outputs()

    def timer(self) -> Timer:
        """The protocol's timer for this runner's stream (runtimes do not override it)."""
        return span_timer(self.stream, self.synchronize)

    def peak_memory_mb(self) -> float | None:
        """Device memory this runner needs (weights + buffers + activations); None where it cannot be told."""
        return None

    @abstractmethod
    def outputs(self) -> np.ndarray:
        """The last run's output as float32 on the host, for parity checks (never timed)."""


@dataclass(frozen=True)
class Request:
    """What ``create_runner`` was asked for, handed to the runtime's factory."""

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


Classifier = Callable[[np.ndarray], np.ndarray]  # float32 images (N, C, H, W) -> float32 logits (N, classes)


@dataclass(frozen=True)
class Runtime:
    """One registered runtime: how to build its runner and what the rest of the package needs to know of it.

    ``devices`` are the device kinds it runs on, preferred first; ``artifact`` the file it runs; ``precisions``
    those it can run; ``files`` the file it reads for a precision where that is not the file of the precision
    itself (ONNX Runtime's TensorRT fp16 flag on the fp32 file; the int8 file made for TensorRT); ``eager_option``
    whether ``cuda_graph=False`` means anything; ``classifier`` opens a file for evaluation at any batch (the
    exported files' accuracy), for the CPU runtimes.
    """

    build: Callable[[Request], Runner]
    missing: Callable[[], str | None]
    devices: tuple[str, ...]
    artifact: Artifact
    precisions: tuple[str, ...]
    files: dict[str, str] = field(default_factory=dict)
    eager_option: bool = False
    classifier: Callable[[Path], Classifier] | None = None

    def open_classifier(self, path: Path) -> Classifier:
        """``path`` loaded for evaluation at any batch size (the files' accuracy); refused where unsupported."""
        if self.classifier is None:
            raise BackendError("this runtime does not evaluate files; measure accuracy on ort-cpu or openvino")
        return self.classifier(path)

    def device(self) -> torch.device:
        """The device kind it runs on here when asked for ``auto`` (CUDA where it can use it and there is one)."""
        return torch.device("cuda" if "cuda" in self.devices and torch.cuda.is_available() else "cpu")

    def device_name(self) -> str:
        """The machine a measurement on this runtime describes (the latency table's key)."""
        return device_name(self.device())

    def create(self, backend: str, **request: Any) -> Runner:
        """The runner of ``request`` (the fields of ``Request``), built by this runtime's factory."""
        return self.build(Request(backend, **request))

    def file_precision(self, precision: str) -> str:
        """The label of the ONNX file it reads (or its engine is built from) to run in ``precision``."""
        return self.files.get(precision, precision)


def always() -> str | None:
    """PyTorch is a hard dependency and runs on CPU everywhere."""
    return None


def resolve_device(request: Request, allowed: tuple[str, ...]) -> torch.device:
    """Resolve ``auto`` to CUDA when the backend can use it, and give CUDA devices an explicit index."""
    preferred = "cuda" if "cuda" in allowed and torch.cuda.is_available() else allowed[-1]
    device = torch.device(preferred if request.device == "auto" else request.device)
    if device.type not in allowed:
        raise BackendError(f"{request.backend} runs on {' or '.join(allowed)}, not {request.device}")
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise BackendUnavailable(f"{request.backend}: {NO_CUDA}")
    return torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)


# The vector and matrix extensions that decide CPU speed for these models (fp32 width, int8 dot products, bf16,
# AMX tiles): CPUs with one model name exist with and without some of them (virtual machines hide flags).
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_isa(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The ISA_FLAGS this CPU reports, in that order (empty where /proc/cpuinfo is not there)."""
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    flags = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())
    return [flag for flag in ISA_FLAGS if flag in flags]


def device_name(device: torch.device) -> str:
    """CPU model (with its ISA flags) or GPU name, recorded with every measurement so numbers are never compared
    across machines."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    isa = cpu_isa(cpuinfo)
    return f"cpu: {models[0] if models else platform.processor() or platform.machine()}" + \
        (f" ({' '.join(isa)})" if isa else "")


def seeded_input(shape: tuple[int, ...], images: np.ndarray | None = None) -> torch.Tensor:
    """The caller's images, or the same seeded float32 host tensor for every runner of a shape, so that
    outputs of different runners are comparable."""
    if images is not None:
        if tuple(images.shape) != shape:
            raise BackendError(f"images: expected shape {shape}, got {tuple(images.shape)}")
        return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    return torch.randn(shape, generator=torch.Generator().manual_seed(INPUT_SEED))


class CudaPeak:
    """Growth of torch's CUDA allocator peak inside a block (0 on CPU).

    The device-wide peak would also count a second runner living in the same process (``measure_pair``),
    so each runner reports what it allocated itself.
    """

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._base = 0
        self.bytes = 0

    def __enter__(self) -> CudaPeak:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
            self._base = torch.cuda.memory_allocated(self._device)
            torch.cuda.reset_peak_memory_stats(self._device)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
            self.bytes = torch.cuda.max_memory_allocated(self._device) - self._base


def capture(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], torch.Tensor]:
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


@dataclass(frozen=True)
class OnnxInput:
    """The one graph input (name, free batch axis if any, sample shape, dtype) and the weights' precision."""

    name: str
    batch_axis: str | None
    chw: tuple[int, ...]
    dtype: np.dtype
    precision: str


def onnx_input(path: Path) -> OnnxInput:
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
    return OnnxInput(inputs[0].name, batch_axis, tuple(dims[1:]), dtype, graph_precision(graph))
