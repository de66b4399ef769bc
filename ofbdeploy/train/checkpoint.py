"""Training checkpoints: tensors and plain Python values only, written atomically, read with weights_only.

A stopped search or finetune resumes from its last checkpoint; because every epoch reseeds its random
streams from (seed, epoch), resuming at an epoch boundary replays exactly what an uninterrupted run does.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ofbdeploy.errors import CheckpointError
from ofbdeploy.io import atomic_write


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (state dicts, numbers, strings, lists) so that a crash never leaves half a file."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise CheckpointError(f"{path}: unreadable training checkpoint ({str(err).splitlines()[0]})") from None


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one epoch on one rank: ranks draw different masks and augmentations, runs repeat."""
    return (seed * 100_003 + epoch) * 1_009 + rank


def seed_epoch(seed: int, epoch: int, loader=None, rank: int = 0) -> None:
    """Reseed every random stream of one epoch on one rank from (seed, epoch, rank).

    Global torch (CPU and CUDA), numpy and Python streams (masks, mixup/cutmix, timm's transforms and
    erasing in this process), the loader's generator (the base seed of its worker processes, which are
    started afresh every epoch) and the sampler's epoch (the shard order, shared by every rank).
    """
    value = epoch_seed(seed, epoch, rank)
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)
    if loader is None:
        return
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    generator = getattr(loader, "generator", None)
    if generator is not None:
        generator.manual_seed(value)
