"""What ``ofbdeploy export`` and ``ofbdeploy profile`` work on: a finished run directory or a pruned model
directory.

A run directory is locked while the command works in it, and its models are used only when the stages
that wrote them finished under its recipe.yaml and their files are intact. Nothing of the driver is built:
a run is reached through a single-process :class:`RunContext` of its recipe.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ofbdeploy.arch import ArchSpec
from ofbdeploy.deploy.config import ExportCfg, ProfileCfg
from ofbdeploy.deploy.runtimes import registry
from ofbdeploy.deploy.workflow import DeployArtifacts, dense_like, export_models, profile_models
from ofbdeploy.errors import InputError
from ofbdeploy.families import load_arch
from ofbdeploy.io import atomic_write_text
from ofbdeploy.models.pruned import ARCH_FILE, build_plain, load_pruned
from ofbdeploy.recipe import load_recipe
from ofbdeploy.report.render import format_skip
from ofbdeploy.run.context import RunContext
from ofbdeploy.run.rundir import RunLock, StageBook, to_json
from ofbdeploy.run.stages import stage_sections
from ofbdeploy.train.data import calibration_batch, sample_batch
from ofbdeploy.train.distributed import Dist

# The stages whose files a target's models come from.
MODEL_STAGES = ("dense", "finetune")


def _check_fits_memory(spec: ArchSpec, record: Path) -> None:
    """Refuse, in one line, a record whose dense counterpart cannot be held here (a hand-edited arch.json within
    the per-field bounds can still describe a model of tens of GB)."""
    need = 4 * ArchSpec.dense(spec.base).params()
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have // 2:
        raise InputError(f"{record}: its dense model needs {need / 2**30:.1f} GiB of fp32 weights, more than half "
                         f"of this machine's {have / 2**30:.1f} GiB; is the record what export/profile should build?")


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
                self.spec = load_arch(path / "finetuned" / ARCH_FILE)
            except BaseException:
                self.lock.release()
                raise
            self.run = RunContext(recipe, Dist())
        elif (path / ARCH_FILE).is_file():
            self.spec = load_arch(path / ARCH_FILE)
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
        pruned = load_pruned(self.path)  # checks the weights against their record before anything is built from it
        _check_fits_memory(self.spec, self.path / ARCH_FILE)
        return {"dense": dense_like(self.spec, build_plain), "pruned": pruned}

    def check_images(self, count: int) -> torch.Tensor:
        """Validation images of the run's data; seeded random images for a bare model directory."""
        if self.run is not None:
            val = self.run.data()[1]
            return sample_batch(val, min(count, len(val)))
        b = self.spec.base
        return torch.randn(count, b.in_chans, b.img_size, b.img_size, generator=torch.Generator().manual_seed(0))

    def export(self, cfg: ExportCfg, tf32: bool) -> DeployArtifacts:
        """ONNX files (and engines) of dense and pruned into ``export/``, each checked; int8 is calibrated on
        the run's training split, and a run's export.json carries the files' accuracy as `ofbdeploy run`
        writes it."""
        calibration = None
        if "int8" in cfg.onnx_precisions():
            if self.run is None:
                raise InputError("--precision int8: int8 needs calibration images from the training data: export "
                                 "from a run directory")
            train, val, _ = self.run.data()
            calibration = calibration_batch(train, val, min(cfg.calibration_images, len(train)),
                                            self.run.recipe.seed).numpy()
        images = self.check_images(cfg.check_images)
        artifacts = export_models(self.models(), self.export_dir, cfg, img_size=self.spec.base.img_size,
                                  in_chans=self.spec.base.in_chans, check_images=images, calibration=calibration,
                                  tf32=tf32)
        if self.run is not None:
            artifacts.accuracy = self.run.onnx_accuracy(artifacts)
            artifacts.save(self.export_dir)
        return artifacts

    def profile(self, cfg: ProfileCfg) -> tuple[list[dict[str, Any]], float]:
        """Dense vs pruned latency rows (and the FLOPs ratio) into ``profile.json``, exporting ONNX first when
        an ONNX Runtime backend needs it and there is none. Anything not measured is an error, and the last
        profile.json is left as it was."""
        artifacts = DeployArtifacts.load(self.export_dir)
        models = self.models()
        if any(registry.get(b).artifact == "onnx" for b in cfg.backends) and "pruned" not in artifacts.onnx:
            artifacts = export_models(models, self.export_dir, ExportCfg(fp16="fp16" in cfg.precisions),
                                      img_size=self.spec.base.img_size, in_chans=self.spec.base.in_chans,
                                      check_images=self.check_images(16))
        ratio = self.spec.macs() / ArchSpec.dense(self.spec.base).macs()
        rows, skipped = profile_models(models, artifacts, cfg, ratio)
        if skipped:
            raise InputError(f"not measured: {'; '.join(format_skip(s) for s in skipped)}; "
                             f"{self.path / 'profile.json'} left as it was")
        if not rows:
            raise InputError("nothing was measured; profile.json left as it was")
        atomic_write_text(self.path / "profile.json", to_json({"latency": rows, "skipped": skipped}))
        return rows, ratio
