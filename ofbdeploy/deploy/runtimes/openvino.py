"""OpenVINO on CPUs (``openvino``): the runtime most Intel CPU deployments use, behind the same runner interface.

It reads the ONNX files ONNX Runtime reads: the fp32 export and the int8 Q/DQ graph, whose Quantize/Dequantize
pairs OpenVINO's low-precision transformations turn into int8 kernels (VNNI / AMX where the CPU has them). The
model is reshaped to the batch and compiled for the CPU:

* batch 1 with the ``LATENCY`` hint: one stream, every thread of the process on the one request;
* larger batches with the ``THROUGHPUT`` hint: OpenVINO chooses several streams; one timed call splits the batch
  into that many equal parts run as concurrent infer requests (how a throughput server runs a batch), or runs
  it as one request when the batch does not divide evenly.

Everything that is not an int8 product runs in fp32 (``INFERENCE_PRECISION_HINT: f32``): on CPUs with bf16 units
OpenVINO would otherwise run an "fp32" model in bf16 by default, and the rows would not be what they say.
``threads`` sets ``INFERENCE_NUM_THREADS`` (default: this process's share of the CPUs, ``ofbdeploy.threads``).
The package is an optional extra (``pip install 'ofbdeploy[openvino]'``); without it the runtime reports why.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ofbdeploy import threads
from ofbdeploy.deploy.runtimes.base import (
    BackendUnavailable,
    Classifier,
    Request,
    Runner,
    Runtime,
    device_name,
    onnx_input,
    seeded_input,
)

_PRECISIONS = ("fp32", "int8")


def _cpu_config(count: int, **extra: str) -> dict[str, Any]:
    """The CPU plugin's settings for every compile here: fp32 outside int8 products, ``count`` threads."""
    return {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": count, **extra}


@functools.cache
def _core() -> Any:
    """The process's one OpenVINO ``Core``, never released.

    Loading the CPU plugin gives the loading thread an alternate signal stack, and releasing the last ``Core``
    frees that stack from whichever thread releases it (a garbage collection on another thread). The loading
    thread is then left pointing at freed memory, and the next signal it handles on that stack (a child's
    SIGCHLD once torch's data loader has installed its handler) kills the process with SIGSEGV, with no
    traceback. A ``Core`` that lives as long as the process keeps the stack valid; OpenVINO also advises one
    ``Core`` per application. ``tests/deploy/test_openvino.py`` replays the crash in a child process.
    """
    import openvino  # the optional extra; _missing() has told the registry whether it is there

    return openvino.Core()


def _missing() -> str | None:
    """Why OpenVINO cannot run here."""
    if importlib.util.find_spec("openvino") is None:
        return "OpenVINO is not installed: pip install the .[openvino] extra"
    return None


class OpenVinoRunner(Runner):
    """An OpenVINO model compiled for the CPU at a fixed batch, with resident input tensors."""

    def __init__(self, request: Request) -> None:
        import openvino  # the optional extra; _missing() has told the registry whether it is there

        self._ov = openvino
        self.backend = request.backend
        self.device_name = device_name(torch.device("cpu"))
        self.precision = request.precision
        self._path = request.file("onnx_path")
        self._input = onnx_input(self._path)
        request.check_precision((self._input.precision,), f"with {self._path.name} (a {self._input.precision} graph)")
        self._threads = request.threads or threads.current().intra_op
        self._core = _core()
        self._requests: list[Any] = []
        self._parts: list[np.ndarray] = []

    def prepare(self, batch: int, images: np.ndarray | None = None) -> None:
        x = seeded_input((batch, *self._input.chw), images).numpy().astype(self._input.dtype)
        hint = "LATENCY" if batch == 1 else "THROUGHPUT"
        compiled = self._compile(batch, hint)
        streams = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")) if batch > 1 else 1
        if streams > 1 and batch % streams == 0:
            compiled = self._compile(batch // streams, hint)
        else:
            streams = 1
        self._parts = np.split(x, streams)
        self._requests = [compiled.create_infer_request() for _ in range(streams)]
        for request, part in zip(self._requests, self._parts, strict=True):
            request.set_input_tensor(self._ov.Tensor(np.ascontiguousarray(part)))
        self.run()  # the first inference allocates; it belongs to the set-up, not to the timed calls

    def _compile(self, batch: int, hint: str) -> Any:
        try:
            model = self._core.read_model(str(self._path))
            model.reshape([batch, *self._input.chw])
            return self._core.compile_model(model, "CPU", _cpu_config(self._threads, PERFORMANCE_HINT=hint))
        except RuntimeError as err:  # OpenVINO reports conversion and compile failures as RuntimeError
            lines = str(err).strip().splitlines()
            raise BackendUnavailable(f"{self.backend}: OpenVINO cannot compile {self._path.name}: "
                                     f"{lines[0] if lines else 'no reason given'}"[:300]) from None

    def run(self) -> list[Any]:
        for request in self._requests:
            request.start_async()
        for request in self._requests:
            request.wait()
        return self._requests

    def synchronize(self) -> None:
        """A run returns when every request has finished: nothing is left to wait for."""

    def outputs(self) -> np.ndarray:
        return np.concatenate([r.get_output_tensor(0).data for r in self._requests]).astype(np.float32)


def _classifier(path: Path) -> Classifier:
    """``path`` compiled with a free batch for evaluation (fp32 outside int8 products, as the runner)."""
    compiled = _core().compile_model(str(path), "CPU", _cpu_config(threads.current().intra_op))
    return lambda images: np.asarray(compiled(images)[0], dtype=np.float32)


RUNTIMES = {"openvino": Runtime(OpenVinoRunner, _missing, ("cpu",), "onnx", _PRECISIONS, classifier=_classifier)}
