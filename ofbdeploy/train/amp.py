"""Mixed precision: one place that turns the recipe's ``amp`` into an autocast context."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext

import torch

from ofbdeploy.errors import OfbError

logger = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``amp``, or None for full precision: off CUDA autocast would only cost time."""
    if amp != "off" and amp not in AMP_DTYPES:
        raise OfbError(f"amp: expected 'off', 'bf16' or 'fp16', got {amp!r}")
    if amp == "off":
        return None
    if device.type != "cuda":
        logger.debug("amp=%s ignored on %s: autocast is only used on CUDA", amp, device)
        return None
    return AMP_DTYPES[amp]


def autocast(dtype: torch.dtype | None) -> AbstractContextManager:
    """Autocast on CUDA in ``dtype``; a no-op for full precision."""
    return nullcontext() if dtype is None else torch.autocast("cuda", dtype=dtype)
