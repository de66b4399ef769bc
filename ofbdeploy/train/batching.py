"""The global batch: a recipe states images per optimiser step; processes and accumulation share them.

Learning rates are quoted per 256 images and scaled by the global batch, so a recipe gives the same
optimisation on 1, 2 or 8 GPUs: what changes with the world size is only how the batch is split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ofbdeploy.errors import OfbError


@dataclass(frozen=True)
class BatchPlan:
    """``global_batch`` = ``world`` processes x ``accum`` accumulation steps x ``micro`` images per forward."""

    requested: int
    world: int
    accum: int
    micro: int

    @property
    def global_batch(self) -> int:
        return self.world * self.accum * self.micro

    @property
    def per_process(self) -> int:
        return self.accum * self.micro

    def describe(self) -> str:
        text = (f"global batch {self.global_batch} = {self.world} process(es) x {self.accum} accumulation step(s) "
                f"x {self.micro} images per forward")
        if self.global_batch != self.requested:
            text += f" (data.batch_size {self.requested} does not split evenly)"
        return text


def plan_batch(global_batch: int, world: int, max_per_process: int | None = None) -> BatchPlan:
    """Split ``global_batch`` over ``world`` processes, accumulating where a share exceeds the memory cap.

    The fewest accumulation steps that bring a forward under ``max_per_process``, or up to twice that many
    when they split the share evenly. Every micro-batch has the same size (so the accumulated gradient is
    the batch's mean): when the batch does not split evenly the few images left over are dropped from the
    step, and the learning rates follow the batch actually used.
    """
    if global_batch < world:
        raise OfbError(f"data.batch_size: {global_batch} images per step cannot be shared by {world} processes")
    share = global_batch // world
    fewest = 1 if max_per_process is None else math.ceil(share / max_per_process)
    accum = next((a for a in range(fewest, 2 * fewest + 1) if share % a == 0), fewest)
    return BatchPlan(global_batch, world, accum, share // accum)
