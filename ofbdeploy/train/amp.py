"""Numeric precision of training: the recipe's ``amp`` as autocast + gradient scaling, and TF32 for fp32.

Autocast runs on CUDA and on the CPU alike (torch's CPU autocast takes bf16 and fp16, and a CPU
``GradScaler`` exists), so the mixed-precision paths are the same code wherever they run and are tested
without a GPU. Losses that sum large numbers (the FLOPs and latency budgets, the one-hot entropy) are the
caller's to compute outside autocast.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext

import torch

from ofbdeploy import threads
from ofbdeploy.errors import OfbError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
AMP_NAMES = {dtype: name for name, dtype in AMP_DTYPES.items()}


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``amp`` on ``device``, or None for full precision."""
    if amp != "off" and amp not in AMP_DTYPES:
        raise OfbError(f"amp: expected 'off', 'bf16' or 'fp16', got {amp!r}")
    if amp == "off":
        return None
    if device.type == "cuda" and amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise OfbError(f"amp: bf16 is not supported on {torch.cuda.get_device_name(device)}; use fp16 or off")
    return AMP_DTYPES[amp]


def amp_name(dtype: torch.dtype | None) -> str:
    """The recipe's word for an autocast dtype ('off' for full precision): what reports record."""
    return AMP_NAMES.get(dtype, "off")


def autocast(dtype: torch.dtype | None, device: torch.device | None = None) -> AbstractContextManager:
    """Autocast on ``device`` (CUDA when not given) in ``dtype``; a no-op for full precision."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type if device is not None else "cuda", dtype=dtype)


def full_precision(device: torch.device) -> AbstractContextManager:
    """Leave autocast for a block that must run in fp32 (sums of large or tiny numbers)."""
    return torch.autocast(device.type, enabled=False)


def grad_scaler(dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 (its range needs one); None for bf16 and fp32."""
    return torch.amp.GradScaler(device.type) if dtype is torch.float16 else None


def has_grad(optimizer: torch.optim.Optimizer) -> bool:
    """Whether any parameter of ``optimizer`` got a gradient this step (a host-side check, no sync)."""
    return any(p.grad is not None for group in optimizer.param_groups for p in group["params"])


def step_all(optimizers: Iterable[torch.optim.Optimizer], scaler: torch.amp.GradScaler | None) -> None:
    """Step every optimiser that got a gradient, through the scaler when there is one.

    Optimisers without gradients (the PMIM decoder while PMIM is off, the sparsity logits once every group
    is decided) are skipped: a scaler refuses to step them, and without one there is nothing to do. Every
    training loop steps here, so this is where the thread governor looks at the CPUs.
    """
    threads.tick()
    stepped = [opt for opt in optimizers if has_grad(opt)]
    for opt in stepped:
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
    if scaler is not None and stepped:
        scaler.update()
