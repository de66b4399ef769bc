"""Where each file of a run directory lives: one name per artifact, used by the stages, the report and the
commands that read a finished run."""

from __future__ import annotations

from pathlib import Path


class RunPaths:
    """The artifacts of the run in ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.recipe, self.log, self.stages = root / "recipe.yaml", root / "run.log", root / "stages.json"
        self.dense_weights, self.dense_metrics = root / "dense/model.safetensors", root / "dense/metrics.json"
        self.dense_ckpt = root / "dense/train.ckpt"
        self.search_ckpt, self.search_final = root / "search/search.ckpt", root / "search/final.ckpt"
        self.search_result, self.lut = root / "search/result.json", root / "search/lut.json"
        self.pruned, self.pruned_check = root / "pruned", root / "pruned/check.json"
        self.fitted, self.fit, self.fit_lut = root / "fitted", root / "fit/fit.json", root / "fit/lut.json"
        self.finetune_ckpt, self.finetuned = root / "finetune/train.ckpt", root / "finetuned"
        self.metrics, self.report = root / "metrics.json", root / "report.json"
        self.export, self.profile = root / "export", root / "profile.json"
        self.report_md, self.plot = root / "report.md", root / "report.png"
