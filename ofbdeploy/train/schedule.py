"""Learning-rate and search schedules, stepped every iteration."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, warmup: int, base: float, floor: float) -> float:
    """Linear warm-up from ``floor`` to ``base`` over ``warmup`` steps, then cosine down to ``floor``."""
    if warmup > 0 and step < warmup:
        return floor + (base - floor) * step / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * progress))


def linear(step: int, span: int, start: float, end: float) -> float:
    """``start`` at step 0, ``end`` from step ``span`` on (the mixing weight and the PMIM keep ratio)."""
    if span <= 0:
        return end
    return start + (end - start) * min(1.0, step / span)


def scaled_lr(lr_per_256: float, global_batch: int) -> float:
    """The linear scaling rule the DeiT and OFB settings are quoted in."""
    return lr_per_256 * global_batch / 256
