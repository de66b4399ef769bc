"""Training checkpoints: tensors and plain Python values only, written atomically, read with weights_only.

A stopped search or finetune resumes from its last checkpoint; because every epoch reseeds its random
streams from (seed, epoch), resuming at an epoch boundary replays exactly what an uninterrupted run does.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

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


def seed_epoch(seed: int, epoch: int, loader: torch.utils.data.DataLoader | None = None) -> None:
    """Reseed every random stream of one epoch from (seed, epoch): global torch RNG, the loader's order."""
    torch.manual_seed(seed * 100_003 + epoch)
    if loader is None:
        return
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(seed * 100_003 + epoch)
