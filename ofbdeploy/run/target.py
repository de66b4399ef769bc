"""What ``ofbdeploy export`` and ``ofbdeploy profile`` work on: a finished run directory or a pruned model
directory.

A run directory is locked while the command works in it, and its models are used only when the stages
that wrote them finished under its recipe.yaml and their files are intact. Nothing of the driver is built:
a run is reached through a single-process :class:`RunContext` of its recipe.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ofbdeploy.arch import ArchSpec
from ofbdeploy.deploy.workflow import dense_like
from ofbdeploy.errors import InputError
from ofbdeploy.models.pruned import ARCH_FILE, load_pruned
from ofbdeploy.recipe import load_recipe
from ofbdeploy.run.context import RunContext
from ofbdeploy.run.rundir import RunLock, StageBook
from ofbdeploy.run.stages import stage_sections
from ofbdeploy.train.data import sample_batch
from ofbdeploy.train.distributed import Dist

# The stages whose files a target's models come from.
MODEL_STAGES = ("dense", "finetune")


class Target:
    """A run directory (recipe.yaml + finetuned/) or a pruned model directory, as a context manager that
    holds a run's lock until the command is done."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.run: RunContext | None = None
        self.lock: RunLock | None = None
        if not path.is_dir():
            raise InputError(f"{path}: expected a run directory or a pruned model directory"
                             if path.exists() else f"not found: {path}")
        if (path / "recipe.yaml").is_file():
            recipe = load_recipe(path / "recipe.yaml", [f"output_dir={path}"])
            self.lock = RunLock(path)
            self.lock.acquire()
            try:
                book = StageBook(path)
                for stage in MODEL_STAGES:
                    book.verify(stage, stage_sections(recipe, stage))
                self.spec = ArchSpec.load(path / "finetuned" / ARCH_FILE)
            except BaseException:
                self.lock.release()
                raise
            self.run = RunContext(recipe, Dist())
        elif (path / ARCH_FILE).is_file():
            self.spec = ArchSpec.load(path / ARCH_FILE)
        else:
            raise InputError(f"{path}: expected a run directory (recipe.yaml) or a pruned model directory "
                             f"({ARCH_FILE})")
        self.export_dir = path / "export"

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.lock is not None:
            self.lock.release()

    def models(self) -> dict[str, torch.nn.Module]:
        """Dense and pruned; outside a run the dense model has random weights (fine for latency)."""
        if self.run is not None:
            return self.run.deploy_models()
        return {"dense": dense_like(self.spec), "pruned": load_pruned(self.path)}

    def check_images(self, count: int) -> torch.Tensor:
        """Validation images of the run's data; seeded random images for a bare model directory."""
        if self.run is not None:
            val = self.run.data()[1]
            return sample_batch(val, min(count, len(val)))
        b = self.spec.base
        return torch.randn(count, b.in_chans, b.img_size, b.img_size, generator=torch.Generator().manual_seed(0))
