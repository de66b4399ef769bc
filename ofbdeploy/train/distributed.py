"""PyTorch DDP plumbing for ``torchrun``: one process per device, rank 0 writes, everyone computes.

Without torchrun's environment everything degrades to a single process, so the same code path serves
``ofbdeploy run`` and ``torchrun --nproc_per_node N -m ofbdeploy.cli run``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Dist:
    """Where this process stands: rank, world size and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(wanted: str) -> torch.device:
    """``auto`` takes CUDA when there is one; asking for CUDA without one is a clear error."""
    from ofbdeploy.errors import OfbError

    if wanted == "cuda" and not torch.cuda.is_available():
        raise OfbError("device: 'cuda' requested but torch sees no CUDA device")
    if wanted == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def init_distributed(wanted_device: str = "auto") -> Dist:
    """Join the process group when launched by torchrun (gloo on CPU, NCCL on CUDA)."""
    device = pick_device(wanted_device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(0, 1, device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, device)


def wrap_ddp(module: nn.Module, ctx: Dist) -> nn.Module:
    """DDP around ``module`` when distributed; the module itself otherwise.

    ``find_unused_parameters`` is on because a search has parameters that are idle in some steps (the
    post-decision multipliers before their group is decided, frozen logits after).
    """
    if not ctx.enabled:
        return module
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


def all_reduce_sum(tensor: Tensor, ctx: Dist) -> Tensor:
    """Sum a tensor over ranks (metrics); a no-op in a single process."""
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_(tensor: Tensor, ctx: Dist) -> None:
    """Make every rank hold rank 0's value (so that decisions taken from it agree everywhere)."""
    if ctx.enabled:
        dist.broadcast(tensor, src=0)


def barrier(ctx: Dist) -> None:
    if ctx.enabled:
        dist.barrier()
