"""ONNX Runtime on its CPU (``ort-cpu``), CUDA (``ort-cuda``) and TensorRT (``ort-trt``) execution providers.

Launch overhead is removed where the provider allows it: ``ort-cuda`` enables the CUDA EP's ``enable_cuda_graph``,
``ort-trt`` enables ``trt_cuda_graph_enable``. Graph capture needs every node on the GPU, so the session is built
per batch size with the batch dimension fixed (``add_free_dimension_override_by_name``), which folds the shape
arithmetic away. On CUDA the provider computes on a torch stream of the runner, handed over as its compute stream
(``user_compute_stream``), and the end-of-run synchronisation is turned off; ONNX Runtime's graph replay still
waits for the stream before ``run()`` returns, which the timing protocol (``base``) makes every GPU runner pay
alike. The CUDA provider takes the TF32 policy (``use_tf32``); the TensorRT provider has no TF32 switch and builds
with TensorRT's default (on), which its rows record.

Provider option keys are checked against the tables read from the onnxruntime-gpu wheel's binding
(tools/scripts/ort_provider_keys.py, tests/data/ort_provider_keys.json): the binding throws on any key it does not know.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from ofbdeploy import threads
from ofbdeploy.deploy.onnx_export import ort_session
from ofbdeploy.deploy.quantize import INT8_TENSORRT
from ofbdeploy.deploy.runtimes.base import (
    NO_CUDA,
    BackendUnavailable,
    Classifier,
    Request,
    Runner,
    Runtime,
    device_name,
    onnx_input,
    resolve_device,
    seeded_input,
)

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_GRAPH_PRECISIONS = ("fp32", "fp16", "int8")
_LOG = logging.getLogger("ofbdeploy.deploy.runtimes.ort")

Providers = list[tuple[str, dict[str, Any]]]




class OrtRunner(Runner):
    """An ONNX Runtime session on one execution provider, fed through IOBinding with device-resident buffers.

    On CUDA the provider computes on a torch stream of this runner (``user_compute_stream``) and each run is asked
    not to wait for it (``disable_synchronize_execution_providers``). On CPU a run returns when done. The precision
    is the file's, or one of ``provider_precisions`` that the provider applies itself (TensorRT's fp16 flag).
    """

    def __init__(
        self,
        request: Request,
        device: torch.device,
        providers: Callable[[torch.cuda.Stream | None], Providers],
        provider_precisions: tuple[str, ...] = (),
        tf32: bool | None = None,
        cuda_graph: bool | None = None,
    ) -> None:
        self.backend = request.backend
        self.device_name = device_name(device)
        self.precision = request.precision
        self.tf32, self.cuda_graph = tf32, cuda_graph
        self._path = request.file("onnx_path")
        self._input = onnx_input(self._path)
        context = f"with {self._path.name} (a {self._input.precision} graph)"
        request.check_precision((self._input.precision, *provider_precisions), context)
        self._device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._providers = providers(self.stream)
        self._threads = request.threads or threads.current().intra_op  # this process's share of the CPUs
        self._run_options = ort.RunOptions()
        if self.stream is not None:
            self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self._session: ort.InferenceSession | None = None
        self._binding: ort.IOBinding | None = None
        self._y: ort.OrtValue | None = None

    def _open(self, batch: int) -> ort.InferenceSession:
        """A session specialised to ``batch``, refusing ONNX Runtime's silent fallback to the CPU provider."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = self._threads
        # ONNX Runtime's own spinning thread pool is kept: it is what a deployed session runs with (a session
        # that never spins is measured slower on small models, so its pruned/dense ratios were several points
        # above those of plain sessions). Models alternate in blocks, each opened by an untimed call, so the
        # idle pool of the model timed before has stopped spinning when timing starts.
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
        x = seeded_input((batch, *self._input.chw), images).numpy().astype(self._input.dtype)
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
        if self.stream is not None:
            self.stream.synchronize()
        self._binding.synchronize_outputs()

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


def cuda_providers(request: Request, device: torch.device, stream: torch.cuda.Stream | None) -> Providers:
    """CUDA provider on ``stream`` with CUDA-graph replay and the TF32 policy (``use_tf32``).

    The CUDA provider's own stream switch is ``has_user_compute_stream`` plus the stream's address.
    """
    options = {"device_id": str(device.index), "enable_cuda_graph": "1", "use_tf32": str(int(request.tf32)),
               "has_user_compute_stream": "1", "user_compute_stream": str(stream.cuda_stream)}
    return [("CUDAExecutionProvider", options)]


def ort_trt_cache_dir(request_cache: Path | None) -> Path:
    """Where ONNX Runtime's TensorRT provider keeps its engines and timing cache (one per machine by default)."""
    return request_cache or Path.home() / ".cache" / "ofbdeploy" / "ort-trt"


def tensorrt_providers(request: Request, device: torch.device, stream: torch.cuda.Stream | None) -> Providers:
    """TensorRT provider with its engine and timing caches on, CUDA graphs, on ``stream``; the CUDA provider
    (:func:`cuda_providers`, without its graph) takes any node TensorRT rejects.

    The TensorRT provider's binding knows ``user_compute_stream`` only (``has_user_compute_stream`` is the CUDA
    provider's; given to TensorRT it is an ``Invalid TensorRT EP option`` and no session starts).
    """
    cache = ort_trt_cache_dir(request.cache_dir)
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
        "user_compute_stream": str(stream.cuda_stream),
    }
    [(cuda_name, cuda)] = cuda_providers(request, device, stream)
    del cuda["enable_cuda_graph"]  # the fallback runs the nodes TensorRT rejects; the graph is TensorRT's
    return [("TensorrtExecutionProvider", options), (cuda_name, cuda)]


def _ort_cpu(request: Request) -> Runner:
    """CPU provider; ``threads`` sets intra-op parallelism."""
    return OrtRunner(request, resolve_device(request, ("cpu",)), lambda _: [("CPUExecutionProvider", {})])


def _ort_cuda(request: Request) -> Runner:
    """CUDA provider on the runner's stream (:func:`cuda_providers`)."""
    device = resolve_device(request, ("cuda",))
    return OrtRunner(request, device, partial(cuda_providers, request, device), tf32=request.tf32, cuda_graph=True)


def _ort_trt(request: Request) -> Runner:
    """TensorRT provider (:func:`tensorrt_providers`).

    ONNX Runtime builds its TensorRT networks itself (weakly typed, against TensorRT 10): fp16 is its flag on
    the fp32 graph, int8 its flag on the Q/DQ graph meant for TensorRT (explicit quantisation, no calibration
    table). It has no TF32 switch: TensorRT's default (on) applies whatever the policy, and the rows say so.
    """
    device = resolve_device(request, ("cuda",))
    if not request.tf32:
        _LOG.warning("ort-trt: ONNX Runtime's TensorRT provider has no TF32 switch; its fp32 layers use TF32 "
                     "although the policy is off (recorded as tf32: true)")
    return OrtRunner(request, device, partial(tensorrt_providers, request, device), provider_precisions=("fp16",),
                     tf32=True, cuda_graph=True)


def _ort_missing(provider: str) -> str | None:
    """Why an ONNX Runtime provider cannot run here (every provider but the CPU one needs CUDA)."""
    if provider not in ort.get_available_providers():
        return f"ONNX Runtime here lacks {provider}: pip install the .[gpu] extra (onnxruntime-gpu) instead"
    if provider != "CPUExecutionProvider" and not torch.cuda.is_available():
        return NO_CUDA
    return None


def _cpu_classifier(path: Path) -> Classifier:
    """A CPU session of ``path`` for evaluation: logits of any batch of float32 images."""
    session = ort_session(path, ["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: images})[0].astype(np.float32)


RUNTIMES = {
    "ort-cpu": Runtime(_ort_cpu, partial(_ort_missing, "CPUExecutionProvider"), ("cpu",), "onnx", _GRAPH_PRECISIONS,
                       classifier=_cpu_classifier),
    "ort-cuda": Runtime(_ort_cuda, partial(_ort_missing, "CUDAExecutionProvider"), ("cuda",), "onnx",
                        _GRAPH_PRECISIONS),
    "ort-trt": Runtime(_ort_trt, partial(_ort_missing, "TensorrtExecutionProvider"), ("cuda",), "onnx",
                       _GRAPH_PRECISIONS, files={"fp16": "fp32", "int8": INT8_TENSORRT}),
}
