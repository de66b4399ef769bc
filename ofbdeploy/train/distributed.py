"""PyTorch DDP plumbing for ``torchrun``: one process per device, rank 0 writes, everyone computes.

Without torchrun's environment everything degrades to a single process, so the same code path serves
``ofbdeploy run`` and ``torchrun --nproc_per_node N -m ofbdeploy.cli run``.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import weakref
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

DEFAULT_TIMEOUT_MIN = 30


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


def init_distributed(wanted_device: str = "auto", timeout_min: float = DEFAULT_TIMEOUT_MIN) -> Dist:
    """Join the process group when launched by torchrun (gloo on CPU, NCCL on CUDA).

    ``timeout_min`` bounds every collective: a rank that stops answering fails the run after that long
    instead of hanging it. Waits for rank 0's solo work do not count against it (:func:`wait_for_main`).
    """
    device = pick_device(wanted_device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(0, 1, device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=timeout_min))
    return Dist(rank, world, device)


def leave(ctx: Dist) -> Dist:
    """Dissolve the process group after the last collective stage; returns this process as a single one.

    Work that only rank 0 does afterwards (export, TensorRT builds, profiling) then has nobody waiting on
    it, so no collective can time out however long it takes.
    """
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        _patient_group.cache_clear()
    return Dist(0, 1, ctx.device) if ctx.is_main else ctx


def wrap_ddp(module: nn.Module, ctx: Dist, find_unused_parameters: bool = False,
             forward_sync_buffers: bool = True) -> nn.Module:
    """DDP around ``module`` when distributed; the module itself otherwise.

    Building DDP broadcasts rank 0's parameters and buffers, so every rank starts from the same state.
    """
    if not ctx.enabled:
        return module
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused_parameters,
                                   forward_sync_buffers=forward_sync_buffers)


class Replicated:
    """A module and, under DDP, the wrapper built around it on demand and dropped before the module changes.

    DDP's reducer keeps every parameter's gradient accumulator (the autograd node that receives its
    gradient, which records the parameter's shape when it is created) alive. While a reducer holds them, a
    parameter cut in place keeps a node expecting the old shape, and the next backward fails with
    "invalid gradient ... expected shape compatible with [old shape]"; a new DDP built meanwhile picks up
    the same stale nodes. So the wrapper is released *before* a cut and rebuilt after it: once it is gone
    the nodes go too, the next forward creates them with the new shapes, and the rebuild broadcasts rank
    0's (cut) parameters and registers exactly the parameters that still train.
    """

    def __init__(self, module: nn.Module, ctx: Dist, **ddp_options) -> None:
        self.module, self.ctx, self.options = module, ctx, ddp_options
        self._net: nn.Module | None = None
        self.builds = 0

    @property
    def net(self) -> nn.Module:
        """What runs forward: the DDP wrapper (built now if released) or the bare module."""
        if self._net is None:
            self._net = wrap_ddp(self.module, self.ctx, **self.options)
            self.builds += self.ctx.enabled
        return self._net

    def release(self) -> None:
        """Drop the wrapper and its reducer; raise if anything else still holds it."""
        if self._net is None or self._net is self.module:
            self._net = None
            return
        ref = weakref.ref(self._net)
        self._net = None
        if ref() is not None:
            gc.collect()
        if ref() is not None:
            raise RuntimeError("a DDP wrapper is still referenced elsewhere; its module cannot be cut safely")

    def no_sync(self):
        """Skip the gradient all-reduce (accumulation micro-batches before the last)."""
        net = self.net
        return net.no_sync() if isinstance(net, DistributedDataParallel) else contextlib.nullcontext()


def all_reduce_sum(tensor: Tensor, ctx: Dist) -> Tensor:
    """Sum a tensor over ranks (metrics); a no-op in a single process."""
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_all_(tensors: list[Tensor], ctx: Dist) -> None:
    """Make every rank hold rank 0's values (so that decisions taken from them agree everywhere); one
    collective for many tensors of one dtype and device."""
    if not ctx.enabled or not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    dist.broadcast(flat, src=0)
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()


def barrier(ctx: Dist) -> None:
    if ctx.enabled:
        dist.barrier()


PATIENT_WAIT = timedelta(days=2)


@functools.cache
def _patient_group() -> dist.ProcessGroup:
    """A gloo group whose collectives may wait for days (for rank 0's solo work, never for a hang)."""
    return dist.new_group(backend="gloo", timeout=PATIENT_WAIT)


def wait_for_main(ctx: Dist) -> None:
    """Hold the other ranks until rank 0 ends work it does alone (measuring a latency table).

    Such work may take longer than any sensible collective timeout (a TensorRT table builds an engine per
    probe), so the wait runs on a gloo group of its own with a deadline of days: nothing else is pending
    meanwhile, and if rank 0 dies torchrun stops the others.
    """
    if ctx.enabled:
        dist.barrier(group=_patient_group())
