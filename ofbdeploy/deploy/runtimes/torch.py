"""PyTorch eager (``torch``) and ``torch.compile`` (``torch-compile``) on the module itself.

On CUDA one forward is captured in a ``torch.cuda.CUDAGraph`` and replayed, because a small pruned ViT on a big
GPU is otherwise timed as Python and kernel-launch cost, not as model cost (``cuda_graph=False`` launches every
kernel instead: what plain eager PyTorch serving costs, launch overhead included). On CPU there is nothing to
capture. ``torch-compile`` uses the default mode with ``dynamic=False``: ``max-autotune`` spends minutes per shape
benchmarking kernels, and dynamic shapes would compile one generic kernel set for every batch size, which is not
what a deployed model at a fixed batch runs; its forward is then captured like the eager one, so the two differ
only in kernels, not in launch cost. Reduced precision only on CUDA, where it is a deployment choice.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from torch import nn

from ofbdeploy.deploy.runtimes.base import (
    TORCH_DTYPES,
    BackendError,
    CudaPeak,
    Request,
    Runner,
    Runtime,
    always,
    capture,
    device_name,
    resolve_device,
    seeded_input,
)
from ofbdeploy.numerics import set_tf32

_DEVICES = ("cuda", "cpu")


def _input_chw(model: nn.Module) -> tuple[int, ...]:
    """Channels and image size of a timm ViT, read from its patch embedding."""
    embed = getattr(model, "patch_embed", None)
    if embed is None:
        raise BackendError(f"{type(model).__name__} has no patch_embed; torch runners expect a timm ViT")
    return (embed.proj.in_channels, *embed.img_size)


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
        self.stream = torch.cuda.current_stream(device) if on_gpu else None
        self._device = device
        self._chw = _input_chw(model)
        with CudaPeak(device) as weights:
            module = copy.deepcopy(model).eval().to(device=device, dtype=TORCH_DTYPES[precision])
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
        with CudaPeak(self._device) as peak, torch.inference_mode():
            x = seeded_input((batch, *self._chw), images).to(self._device, TORCH_DTYPES[self.precision])
            self._out = self._forward(x)  # compiles, for torch-compile
            self._step = capture(self._forward, x) if self.cuda_graph else partial(self._forward, x)
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

    def peak_memory_mb(self) -> float | None:
        return self._peak_mb

    def outputs(self) -> np.ndarray:
        self.synchronize()
        return self._out.float().cpu().numpy()


def _torch_runner(request: Request, *, compiled: bool) -> Runner:
    """Eager or compiled PyTorch; reduced precision only on CUDA, where it is a deployment choice."""
    if request.model is None:
        raise BackendError(f"backend {request.backend!r} needs model=<nn.Module>")
    device = resolve_device(request, _DEVICES)
    request.check_precision(TORCH_DTYPES if device.type == "cuda" else ("fp32",), f"on {device.type}")
    if request.threads is not None:
        torch.set_num_threads(request.threads)  # process-wide: PyTorch has no per-module thread pool
    return TorchRunner(request.model, device, request.precision, compiled, request.tf32, request.cuda_graph)


RUNTIMES = {
    name: Runtime(partial(_torch_runner, compiled=name == "torch-compile"), always, _DEVICES, "module",
                  tuple(TORCH_DTYPES), eager_option=True)
    for name in ("torch", "torch-compile")
}
