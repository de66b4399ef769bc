"""Every runtime by name: the one list the CLI choices, the recipe validator, the profile workflow and the latency
table read. A runtime is one module of this package exposing ``RUNTIMES`` (name -> ``base.Runtime``) plus one row
here; its module is imported on first use, so naming runtimes (``--help``, validating a recipe) loads neither torch
nor ONNX Runtime nor TensorRT.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from ofbdeploy.deploy.runtimes.errors import BackendError, BackendUnavailable

if TYPE_CHECKING:
    from torch import nn

    from ofbdeploy.deploy.runtimes.base import Runner, Runtime

PRECISIONS = ("fp32", "fp16", "bf16", "int8")  # every precision a runtime may run
ONNX_PRECISIONS = ("fp32", "fp16", "int8")  # those an exported file (and an engine built from it) is made in

_ROWS = {  # runtime name -> the module (in this package) that implements it
    "torch": "torch",
    "torch-compile": "torch",
    "ort-cpu": "ort",
    "ort-cuda": "ort",
    "ort-trt": "ort",
    "tensorrt": "tensorrt",
    "openvino": "openvino",
}


def names() -> list[str]:
    """Every registered runtime, in registry order."""
    return list(_ROWS)


def unknown(name: str) -> str:
    """The one-line refusal of a name that is not registered."""
    return f"unknown backend {name!r}; known: {', '.join(_ROWS)}"


def get(name: str) -> Runtime:
    """The runtime called ``name`` (its module imported now)."""
    if name not in _ROWS:
        raise BackendError(unknown(name))
    return importlib.import_module(f"{__package__}.{_ROWS[name]}").RUNTIMES[name]


def unavailable_reason(name: str) -> str | None:
    """Why ``name`` cannot run on this machine (None if it can, or if it is unknown)."""
    return get(name).missing() if name in _ROWS else None


def available_backends() -> list[str]:
    """The registered runtimes that can run on this machine, in registry order."""
    return [name for name in _ROWS if get(name).missing() is None]


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
    """Build a runner: ``model`` for torch runtimes, ``onnx_path`` for ort-*, ``engine_path`` for tensorrt (each
    runtime's ``artifact``).

    ``tf32`` is the TF32 policy for GPU runtimes (engines carry the one they were built with); ``cache_dir`` is
    where ort-trt keeps its engine and timing caches. ``cuda_graph=False`` makes the torch runtimes launch every
    kernel on CUDA instead of replaying a captured graph; the other runtimes always use theirs, so they refuse it.
    """
    runtime = get(backend)
    if precision not in PRECISIONS:
        raise BackendError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    if not cuda_graph and not runtime.eager_option:
        raise BackendError(f"{backend} always replays a CUDA graph on the GPU; cuda_graph=False is for torch backends")
    reason = runtime.missing()
    if reason is not None:
        raise BackendUnavailable(f"{backend}: {reason}")
    return runtime.create(backend, model=model, onnx_path=onnx_path, engine_path=engine_path, precision=precision,
                          device=device, threads=threads, tf32=tf32, cache_dir=cache_dir, cuda_graph=cuda_graph)
