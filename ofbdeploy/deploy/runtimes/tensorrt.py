"""Native TensorRT (``tensorrt``) on a serialized engine, replayed as a CUDA graph where capture works.

The engine is captured with ``execute_async_v3`` on its own stream after a warm-up enqueue; when capture fails
(a plugin or an engine that cannot be captured) every call enqueues instead and the rows say so
(``cuda_graph: false``). Engines are built strongly typed from the ONNX file of their precision (int8: the file
made for TensorRT, int8 products and fp16 elsewhere), so ``precision`` labels what the caller built; ``tf32`` is
the policy the engine was built with (a build-time flag in TensorRT).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ofbdeploy.deploy import trt_api
from ofbdeploy.deploy.quantize import INT8_TENSORRT
from ofbdeploy.deploy.runtimes.base import (
    NO_CUDA,
    TORCH_DTYPES,
    BackendUnavailable,
    Request,
    Runner,
    Runtime,
    device_name,
    resolve_device,
    seeded_input,
)
from ofbdeploy.errors import OfbError

_LOG = logging.getLogger("ofbdeploy.deploy.runtimes.tensorrt")


class TensorRTRunner(Runner):
    """A serialized TensorRT engine on a dedicated CUDA stream; I/O buffers are torch CUDA tensors whose addresses
    are handed to the execution context."""

    def __init__(self, request: Request, device: torch.device) -> None:
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
        self.stream = torch.cuda.Stream(device)
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
        dtypes = {name: TORCH_DTYPES[kind] for name, kind in self._engine.dtypes.items()}
        self._x = seeded_input((batch, *self._engine.sample_shape), images).to(self._device,
                                                                               dtypes[self._engine.input])
        self._y = torch.empty(out_shape, dtype=dtypes[self._engine.output], device=self._device)
        self._engine.bind(self._x.data_ptr(), self._y.data_ptr())
        torch.cuda.synchronize(self._device)  # the buffers were written on the default stream
        self._engine.enqueue(self.stream.cuda_stream)  # warm-up: shape-dependent setup happens outside capture
        self.stream.synchronize()
        self._graph = self._capture()
        self.cuda_graph = self._graph is not None

    def _capture(self) -> torch.cuda.CUDAGraph | None:
        """One enqueue recorded as a CUDA graph on the runner's stream; None (and a warning) when capture fails."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                self._engine.enqueue(self.stream.cuda_stream)
        except Exception as err:  # capture failures surface as RuntimeError or TensorRT's own error
            _LOG.warning("tensorrt: CUDA graph capture failed (%s); timing plain enqueues instead", err)
            torch.cuda.synchronize(self._device)
            return None
        return graph

    def run(self) -> torch.Tensor:
        if self._graph is not None:
            with torch.cuda.stream(self.stream):  # replay launches on the current stream: the timed one
                self._graph.replay()
        else:
            self._engine.enqueue(self.stream.cuda_stream)
        return self._y

    def synchronize(self) -> None:
        self.stream.synchronize()

    def outputs(self) -> np.ndarray:
        self.synchronize()
        return self._y.float().cpu().numpy()


def _tensorrt(request: Request) -> Runner:
    """Native TensorRT on a prebuilt engine."""
    return TensorRTRunner(request, resolve_device(request, ("cuda",)))


def _tensorrt_missing() -> str | None:
    """Why native TensorRT cannot run here."""
    try:
        trt_api.load()
    except trt_api.TensorRTUnavailable as err:
        return str(err)
    return None if torch.cuda.is_available() else NO_CUDA


RUNTIMES = {
    "tensorrt": Runtime(_tensorrt, _tensorrt_missing, ("cuda",), "engine", ("fp32", "fp16", "int8"),
                        files={"int8": INT8_TENSORRT}),
}
