"""``ofbdeploy run``: the stages of a run, its directory, and skipping or resuming what is already done.

Stages run in one direction (dense -> search -> materialize -> finetune -> evaluate -> export -> profile ->
report); each reads the artifacts of the previous ones from the run directory and writes its own
atomically. The driver (:meth:`Run.execute`) holds the directory's lock, checks every input before it
writes anything, and asks :mod:`ofbdeploy.rundir` which stages are done: one is skipped only while its
recipe sections, inputs and artifacts are what they were when it finished. A stopped pretrain, search or
finetune resumes from its last epoch checkpoint with ``--resume`` when its settings allow.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ofbdeploy.arch import ArchSpec, ModelShape
from ofbdeploy.deploy.accuracy import accuracy_entry
from ofbdeploy.deploy.workflow import DeployArtifacts, export_models, profile_models
from ofbdeploy.errors import InputError, OfbError, note_traceback
from ofbdeploy.families import family_of, read_shape
from ofbdeploy.io import atomic_write_text, check_output_dir, file_digest
from ofbdeploy.latency.lut import LatencyLUT
from ofbdeploy.materialize import materialize
from ofbdeploy.models.dense import build_dense
from ofbdeploy.models.pruned import load_pruned, save_pruned, save_weights
from ofbdeploy.numerics import set_tf32
from ofbdeploy.prune.budget import check_budget, resolve_target
from ofbdeploy.prune.method import Job
from ofbdeploy.prune.ofb.objective import LatencyObjective, build_objective
from ofbdeploy.prune.registry import get_method
from ofbdeploy.recipe import Recipe
from ofbdeploy.report.checks import format_checks, recipe_checks
from ofbdeploy.report.render import latency_table, plot_report, write_markdown
from ofbdeploy.rundir import (
    RunLock,
    StageBook,
    check_run_dir,
    digest_of,
    on_main,
    remove_leftovers,
    resume_plan,
    to_json,
    tree_identity,
)
from ofbdeploy.search.searchable import SearchableModel
from ofbdeploy.table import format_table
from ofbdeploy.train.batching import plan_batch
from ofbdeploy.train.checkpoint import load_checkpoint, save_checkpoint
from ofbdeploy.train.data import (
    FASHION_MNIST_ROOT,
    DataSpec,
    build_datasets,
    build_loader,
    calibration_batch,
    sample_batch,
)
from ofbdeploy.train.distributed import Dist, init_distributed, leave, wait_for_main
from ofbdeploy.train.schedule import scaled_lr
from ofbdeploy.train.trainer import TrainSettings, evaluate, train_classifier

log = logging.getLogger("ofbdeploy.run")

STAGES = ("dense", "search", "materialize", "finetune", "evaluate", "export", "profile", "report")
# Under torchrun the processes part after this stage: the rest is rank 0's alone (export, TensorRT builds,
# profiling), with nobody left waiting on a collective that could time out.
LAST_COLLECTIVE_STAGE = "evaluate"
# The recipe sections each stage depends on: a change there re-runs the stage and every later one.
_DEPENDS = {
    "dense": ("seed", "amp", "model", "data", "pretrain"),
    "search": ("search",),
    "materialize": (),
    "finetune": ("finetune",),
    "evaluate": (),
    "export": ("export", "profile"),  # engines are built with the profile's TF32 policy
    "profile": ("profile",),
    "report": ("budget",),
}
MATERIALIZE_TOLERANCE = 1e-4


def stage_sections(recipe: Recipe, stage: str) -> dict[str, str]:
    """Digest of every recipe section ``stage`` and the stages before it depend on."""
    data = recipe.model_dump(mode="json")
    names = [n for s in STAGES[: STAGES.index(stage) + 1] for n in _DEPENDS[s]]
    return {n: digest_of(data[n]) for n in names}


class RunPaths:
    """Where each artifact of a run lives."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.recipe, self.log, self.stages = root / "recipe.yaml", root / "run.log", root / "stages.json"
        self.dense_weights, self.dense_metrics = root / "dense/model.safetensors", root / "dense/metrics.json"
        self.dense_ckpt = root / "dense/train.ckpt"
        self.search_ckpt, self.search_final = root / "search/search.ckpt", root / "search/final.ckpt"
        self.search_result, self.lut = root / "search/result.json", root / "search/lut.json"
        self.pruned, self.pruned_check = root / "pruned", root / "pruned/check.json"
        self.finetune_ckpt, self.finetuned = root / "finetune/train.ckpt", root / "finetuned"
        self.metrics, self.report = root / "metrics.json", root / "report.json"
        self.export, self.profile = root / "export", root / "profile.json"
        self.report_md, self.plot = root / "report.md", root / "report.png"


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, to_json(data))


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


class Run:
    """One run of a recipe in its directory; ``execute`` runs the stages that are not done yet."""

    def __init__(self, recipe: Recipe, resume: bool = False, progress: bool = True) -> None:
        self.recipe, self.resume, self.progress = recipe, resume, progress
        self.paths = RunPaths(Path(recipe.output_dir))
        self.ctx = init_distributed(recipe.device, recipe.dist_timeout_min)
        if not self.ctx.is_main:
            logging.getLogger("ofbdeploy").setLevel(logging.ERROR)  # one voice on the console: rank 0
        self.fp32_matmul = set_tf32(not recipe.strict_fp32) if self.ctx.device.type == "cuda" else "ieee (cpu)"
        self.batch = plan_batch(recipe.data.batch_size, self.ctx.world_size, recipe.data.max_batch_per_process)
        self._data: tuple | None = None
        self._inputs: dict[str, dict[str, str]] = {}
        self.book = StageBook(self.paths.root)

    # -- bookkeeping (decisions in ofbdeploy.rundir; this says what each stage depends on and writes) ----
    def sections(self, stage: str) -> dict[str, str]:
        return stage_sections(self.recipe, stage)

    def inputs(self, stage: str) -> dict[str, str]:
        """Content identity of what a stage reads from outside the run directory."""
        if stage not in self._inputs:
            found: dict[str, str] = {}
            m, d, lat = self.recipe.model, self.recipe.data, self.recipe.search.latency_target
            if stage == "dense" and m.checkpoint:
                found["model.checkpoint"] = file_digest(Path(m.checkpoint).expanduser())
            root = d.root or (FASHION_MNIST_ROOT if d.kind == "fashion_mnist" else None)
            if stage == "dense" and root:
                found["data.root"] = tree_identity(Path(root))
            if stage == "search" and lat is not None and lat.lut:
                found["search.latency.lut"] = file_digest(lat.lut)
            self._inputs[stage] = found
        return self._inputs[stage]

    def artifacts(self, stage: str) -> list[Path]:
        """The files (or folders) a stage writes; stages.json records each file's size and digest."""
        p = self.paths
        return {
            "dense": [p.dense_weights, p.dense_metrics],
            "search": [p.search_final, p.search_result, p.lut],
            "materialize": [p.pruned / "model.safetensors", p.pruned / "arch.json", p.pruned_check],
            "finetune": [p.finetuned / "model.safetensors", p.finetuned / "arch.json", p.finetuned / "train.json"],
            "evaluate": [p.metrics],
            "export": [p.export],
            "profile": [p.profile],
            "report": [p.report, p.report_md, p.plot],
        }[stage]

    def _checkpoint(self, stage: str) -> tuple[Path, str] | None:
        """The epoch checkpoint of a training stage and the recipe section whose epochs it counts."""
        if stage == "dense" and self.recipe.pretrain.epochs > 0:
            return self.paths.dense_ckpt, "pretrain"
        if stage == "search":
            return self.paths.search_ckpt, "search"
        if stage == "finetune":
            return self.paths.finetune_ckpt, "finetune"
        return None

    def _prepare_resume(self, stage: str, apply: bool = True) -> None:
        """Rank 0: may this stage continue its checkpoint (``--resume``)? Refuses in one line if not."""
        found = self._checkpoint(stage)
        if found is None:
            return
        path, section = found
        data = self.recipe.model_dump(mode="json")
        before = STAGES[: STAGES.index(stage)]
        records, _ = self.book.load()
        settings = {
            **{n: data[n] for s in (*before, stage) for n in _DEPENDS[s]},
            "world_size": self.ctx.world_size,
            "inputs": {s: self.inputs(s) for s in (*before, stage)},
            "upstream": {s: digest_of(records.get(s, {}).get("artifacts")) for s in before},
        }
        resume_plan(path, settings, self.resume, f"{section}.epochs", (f"{section}.warmup_epochs",), apply)

    def _plan(self) -> list[tuple[str, str | None]]:
        """Rank 0: per stage, why it must run (None: done and intact)."""
        plan: list[tuple[str, str | None]] = []
        first = None
        for stage in STAGES:
            reason = f"after {first}" if first else self.book.why_not_done(stage, self.sections(stage),
                                                                           self.inputs(stage))
            first = first or (stage if reason else None)
            plan.append((stage, reason))
        return plan

    # -- shared inputs --------------------------------------------------------------------------
    def data(self) -> tuple:
        """Train set, val set and class count (built once per process)."""
        if self._data is None:
            d, img = self.recipe.data, self.img_size()
            spec = DataSpec(kind=d.kind, root=d.root, img_size=img, val_fraction=d.val_fraction, seed=self.recipe.seed,
                            limit_train=d.limit_train, limit_val=d.limit_val, hflip=d.augment.hflip,
                            crop_padding=d.augment.crop_padding, random_erasing=d.augment.random_erasing,
                            randaugment=d.augment.randaugment)
            self._data = build_datasets(spec)
        return self._data

    @functools.cached_property
    def _img_size(self) -> int:
        m = self.recipe.model
        if m.img_size is not None:
            return m.img_size
        return int(build_dense(m.name, **m.overrides).patch_embed.img_size[0])

    def img_size(self) -> int:
        """The model's input size: the recipe's, or the named model's own."""
        return self._img_size

    def loader(self, train: bool):
        """Training batches of the per-process micro-batch size (see :attr:`batch`), or evaluation batches."""
        train_set, val_set, _ = self.data()
        d = self.recipe.data
        size = self.batch.micro if train else d.eval_batch_size
        return build_loader(train_set if train else val_set, batch_size=size, train=train, workers=d.workers,
                            seed=self.recipe.seed, distributed=self.ctx.enabled,
                            repeats=d.repeated_aug if train else 1, device=self.ctx.device)

    def log_precision_and_batch(self) -> None:
        """The run log says how the batch is split and what the learning rates become, and the precision."""
        r, b = self.recipe, self.batch
        log.info("precision: amp %s, fp32 products %s%s", r.amp, self.fp32_matmul,
                 " (strict_fp32)" if r.strict_fp32 and self.ctx.device.type == "cuda" else "")
        if r.amp != "off" and self.ctx.device.type == "cpu":
            log.warning("amp %s on the CPU (%s): autocast runs, but without native half-precision products (AMX, "
                        "AVX512-BF16/FP16) it is several times slower than fp32", r.amp,
                        torch.backends.cpu.get_cpu_capability())
        lrs = ", ".join(f"{name} {lr:.3g} -> {scaled_lr(lr, b.global_batch):.3g}" for name, lr in
                        (("pretrain", r.pretrain.lr), *r.search.learning_rates().items(), ("finetune", r.finetune.lr)))
        (log.warning if b.global_batch != b.requested else log.info)(
            "batch: %s; learning rates per 256 images x %d/256: %s", b.describe(), b.global_batch, lrs)

    def build_dense_model(self) -> torch.nn.Module:
        m = self.recipe.model
        num_classes = m.num_classes or self.data()[2]
        return build_dense(m.name, num_classes=num_classes, img_size=self.img_size(), **m.overrides)

    def load_dense(self) -> torch.nn.Module:
        model = self.build_dense_model()
        model.load_state_dict(load_file(str(self.paths.dense_weights)))
        return model.to(self.ctx.device).eval()

    # -- stages ---------------------------------------------------------------------------------
    def stage_dense(self) -> None:
        """The dense model: built, loaded from the recipe's checkpoint, trained if the recipe asks."""
        m, p = self.recipe.model, self.recipe.pretrain
        model = self.build_dense_model()
        if m.checkpoint:
            from ofbdeploy.models.dense import load_weights

            report = load_weights(model, m.checkpoint)
            log.info("dense weights from %s (%s%s)", m.checkpoint, report.format,
                     ", head reset" if report.reset_head else "")
        model = model.to(self.ctx.device)
        seconds = 0.0
        if p.epochs > 0:
            settings = TrainSettings(epochs=p.epochs, lr=p.lr, min_lr=p.min_lr, weight_decay=p.weight_decay,
                                     warmup_epochs=p.warmup_epochs, label_smoothing=p.label_smoothing,
                                     max_steps_per_epoch=p.max_steps_per_epoch, amp=self.recipe.amp,
                                     accum_steps=self.batch.accum, drop_path=p.drop_path)
            result = train_classifier(model, self.loader(True), settings, self.ctx, seed=self.recipe.seed,
                                      checkpoint_path=self.paths.dense_ckpt, resume=self.resume, log=log,
                                      progress=self.progress, stage="pretrain")
            seconds = result.seconds
        metrics = evaluate(model, self.loader(False), self.ctx, self.recipe.amp)
        log.info("dense top-1 %.2f%% top-5 %.2f%%", metrics["top1"], metrics["top5"])
        if self.ctx.is_main:
            save_weights(model, self.paths.dense_weights)
            write_json(self.paths.dense_metrics, {**metrics, "pretrain_seconds": seconds})

    def space(self, shape: ModelShape):
        return family_of(shape).space(shape, self.recipe.search.align)

    def searchable(self, dense: torch.nn.Module) -> SearchableModel:
        shape = read_shape(dense, self.recipe.model.name)
        return family_of(shape).searchable(dense, self.space(shape), self.recipe.model.name,
                                           **self.recipe.search.searchable_options())

    def check_inputs(self) -> None:
        """Fail in seconds, not after pretraining, and before the run directory is touched: the data is
        there, the model builds and is prunable, its checkpoint reads and fits, the budget can be met, a
        given latency table is one of this model and target."""
        from ofbdeploy.models.dense import load_weights

        try:
            self.data()
            model = self.build_dense_model()
        except (MemoryError, RuntimeError) as err:  # sizes the recipe allows but this machine cannot hold
            if not isinstance(err, MemoryError) and "allocate" not in str(err):
                raise
            raise InputError(f"model.img_size {self.recipe.model.img_size or '(the model default)'}: the data or "
                             f"the model does not fit in memory ({type(err).__name__}: {str(err)[:120]})") from None
        if self.recipe.model.checkpoint:
            load_weights(model, self.recipe.model.checkpoint)
        shape = read_shape(model, self.recipe.model.name)
        get_method(self.recipe.search.method).check(shape.family)
        if self.recipe.search.latency_target is not None:
            family_of(shape).check_latency()
        check_budget(resolve_target(self.recipe.search, shape), self.space(shape), shape)
        lat = self.recipe.search.latency_target
        if lat is not None and lat.lut:
            LatencyLUT.load(Path(lat.lut)).check_fits(shape, lat.backend, lat.precision, lat.batch,
                                                      "search.latency.lut")

    def latency_objective(self, model: SearchableModel) -> LatencyObjective | None:
        """The recipe's latency budget with its LUT (given, cached, or measured now on this machine).

        Under torchrun only the first process measures (every rank timing at once would measure their
        contention) and writes the run's copy; the others wait for it and read it.
        """
        cfg = self.recipe.search.latency_target
        if cfg is None:
            return None
        if self.ctx.is_main:
            build_objective(cfg, model, progress=self.progress).lut.save(self.paths.lut)
        wait_for_main(self.ctx)
        return build_objective(cfg.model_copy(update={"lut": str(self.paths.lut)}), model)

    # -- search stage: the recipe's pruning method (search.method), through the registry in ofbdeploy.prune ----
    def stage_search(self) -> None:
        """The recipe's pruning method decides an architecture from the dense weights (the OFB search trains
        them; one-shot methods cut the teacher's); the decided state is kept for materialisation."""
        cfg = self.recipe.search
        model = self.searchable(self.load_dense().train()).to(self.ctx.device)
        latency = self.latency_objective(model)
        job = Job(teacher=self.load_dense, loader=self.loader(True), ctx=self.ctx, seed=self.recipe.seed,
                  amp=self.recipe.amp, checkpoint_path=self.paths.search_ckpt, resume=self.resume, log=log,
                  progress=self.progress, latency=latency, accum_steps=self.batch.accum)
        result = get_method(cfg.method).decide(model, cfg, job)
        if self.ctx.is_main:
            save_checkpoint(self.paths.search_final, {"arch": result.spec.to_dict(), "model": model.state_dict()})
            summary = asdict(result)
            summary["spec"] = result.spec.to_dict()
            summary["fp32_matmul"] = self.fp32_matmul
            write_json(self.paths.search_result, summary)
    # -- end of the search stage ----------------------------------------------------------------------------

    def stage_materialize(self) -> None:
        """Plain timm model from the decided search state, checked against the masked model on real images.

        Rank 0's work alone: the others wait for its files at the stage's end.
        """
        if not self.ctx.is_main:
            return
        final = load_checkpoint(self.paths.search_final)
        model = self.searchable(self.build_dense_model())
        model.apply_arch(ArchSpec.from_dict(final["arch"], str(self.paths.search_final)))
        model.load_state_dict(final["model"])
        model.eval()
        pruned, spec = materialize(model)
        images = sample_batch(self.data()[1], min(64, len(self.data()[1])))
        with torch.no_grad():
            diff = float((model(images) - pruned(images)).abs().max())
        if diff > MATERIALIZE_TOLERANCE:
            raise RuntimeError(f"materialised model disagrees with the masked model: max |diff| {diff:.2e}")
        log.info("materialised: max |masked - plain| = %.2e on %d val images", diff, len(images))
        save_pruned(pruned, spec, self.paths.pruned)
        write_json(self.paths.pruned_check, {"max_abs_diff": diff, "images": len(images)})

    def stage_finetune(self) -> None:
        """Finetune the pruned model, distilling from the dense one."""
        f = self.recipe.finetune
        student = load_pruned(self.paths.pruned, self.ctx.device).train()
        teacher = self.load_dense() if f.distill.enabled else None
        settings = TrainSettings(epochs=f.epochs, lr=f.lr, min_lr=f.min_lr, weight_decay=f.weight_decay,
                                 warmup_epochs=f.warmup_epochs, label_smoothing=f.label_smoothing, mixup=f.mixup,
                                 cutmix=f.cutmix, ema_decay=f.ema_decay,
                                 distill_alpha=f.distill.alpha if f.distill.enabled else 0.0,
                                 distill_temperature=f.distill.temperature,
                                 max_steps_per_epoch=f.max_steps_per_epoch, amp=self.recipe.amp,
                                 accum_steps=self.batch.accum, drop_path=f.drop_path)
        result = train_classifier(student, self.loader(True), settings, self.ctx, teacher=teacher,
                                  seed=self.recipe.seed, checkpoint_path=self.paths.finetune_ckpt,
                                  resume=self.resume, log=log, progress=self.progress, stage="finetune")
        if self.ctx.is_main:
            save_pruned(student, ArchSpec.load(self.paths.pruned / "arch.json"), self.paths.finetuned)
            write_json(self.paths.finetuned / "train.json", asdict(result))

    def stage_evaluate(self) -> None:
        """Top-1/top-5 of the dense, the pruned (before finetune) and the finetuned model."""
        val = self.loader(False)
        metrics = {
            "dense": evaluate(self.load_dense(), val, self.ctx, self.recipe.amp),
            "pruned": evaluate(load_pruned(self.paths.pruned, self.ctx.device), val, self.ctx, self.recipe.amp),
            "finetuned": evaluate(load_pruned(self.paths.finetuned, self.ctx.device), val, self.ctx, self.recipe.amp),
        }
        if self.ctx.is_main:
            write_json(self.paths.metrics, metrics)

    def deploy_models(self) -> dict[str, torch.nn.Module]:
        """The dense and the finetuned pruned model, on the CPU: the deploy code takes them from here."""
        return {"dense": self.load_dense().cpu(), "pruned": load_pruned(self.paths.finetuned)}

    def stage_export(self) -> None:
        """ONNX of dense and pruned in each precision asked for (checked in ONNX Runtime on val images; int8
        calibrated on a class-balanced sample of the training split), TensorRT engines if asked, and the
        ONNX Runtime CPU accuracy of every file on the validation split."""
        cfg = self.recipe.export
        if self.ctx.is_main:
            if not cfg.enabled:
                DeployArtifacts().save(self.paths.export)
                return
            train, val, _ = self.data()
            check = sample_batch(val, min(cfg.check_images, len(val)))
            calibration = None
            if "int8" in cfg.onnx_precisions():
                calibration = calibration_batch(train, val, min(cfg.calibration_images, len(train)),
                                                self.recipe.seed).numpy()
            artifacts = export_models(self.deploy_models(), self.paths.export, cfg, img_size=self.img_size(),
                                      in_chans=check.shape[1], check_images=check, calibration=calibration,
                                      tf32=self.recipe.profile.tf32)
            artifacts.accuracy = self.onnx_accuracy(artifacts)
            artifacts.save(self.paths.export)

    def onnx_accuracy(self, artifacts: DeployArtifacts) -> list[dict[str, Any]]:
        """Top-1/top-5 of every exported ONNX file on ONNX Runtime CPU, over the validation split (or the
        recipe's sample of it)."""
        val = self.data()[1]
        limit = self.recipe.export.accuracy_images
        if limit is not None and limit < len(val):
            order = torch.randperm(len(val), generator=torch.Generator().manual_seed(self.recipe.seed))
            val = torch.utils.data.Subset(val, order[:limit].tolist())
        loader = build_loader(val, batch_size=self.recipe.data.eval_batch_size, train=False,
                              workers=self.recipe.data.workers, seed=self.recipe.seed)
        entries = []
        for key, path in artifacts.onnx.items():
            model, _, precision = key.partition("-")
            entry = accuracy_entry(model, precision or "fp32", Path(path), loader)
            log.info("ONNX Runtime CPU accuracy of %s: top-1 %.2f%%, top-5 %.2f%% on %d images", key, entry["top1"],
                     entry["top5"], entry["images"])
            entries.append(entry)
        return entries

    def stage_profile(self) -> None:
        """Dense vs pruned latency on each backend of the recipe, measured alternately in this process."""
        if not self.ctx.is_main:
            return
        rows: list[dict[str, Any]] = []
        skipped: list[dict[str, Any]] = []
        if self.recipe.profile.enabled:
            spec = ArchSpec.load(self.paths.finetuned / "arch.json")
            ratio = spec.macs() / ArchSpec.dense(spec.base).macs()
            rows, skipped = profile_models(self.deploy_models(), DeployArtifacts.load(self.paths.export),
                                           self.recipe.profile, ratio)
        write_json(self.paths.profile, {"latency": rows, "skipped": skipped})

    def stage_report(self) -> None:
        """report.json, report.md with its plot, the budget checks, and the summary table on the terminal."""
        if not self.ctx.is_main:
            return
        report = build_report(self.paths)
        checks = recipe_checks(report, self.recipe)
        report["budget"] = [asdict(c) for c in checks]
        report["budget_met"] = all(c.ok for c in checks)
        write_json(self.paths.report, report)
        write_markdown(report, checks, self.paths.report_md, plot_report(report, self.paths.plot))
        text = summary_table(report)
        if report["latency"]:
            text += "\n" + latency_table(report)
        if checks:
            text += "\n" + format_checks(checks)
        log.info("report written to %s and %s\n%s", self.paths.report, self.paths.report_md, text)

    # -- driver ---------------------------------------------------------------------------------
    def execute(self) -> dict[str, Any] | None:
        """Lock the directory, check every input, then write recipe.yaml and run what is not done.

        Under torchrun rank 0 alone locks, decides and records; the others follow its decisions and return
        None when they part after the last collective stage (rank 0 writes the report).
        """
        root = self.paths.root
        lock = RunLock(root)
        stage, handler = "input checks", None
        try:
            on_main(self.ctx, lambda: check_run_dir(root))
            if root.exists():  # refuse a busy directory before spending time on checks
                on_main(self.ctx, lock.acquire)
            self.check_inputs()
            plan = on_main(self.ctx, lambda: self._open(lock))
            handler = _log_to_file(self.paths.log, self.ctx)
            log.info("run %s in %s (device %s, %d process(es))", self.recipe.name, root, self.ctx.device,
                     self.ctx.world_size)
            self.log_precision_and_batch()
            for stage, reason in plan:
                if reason is None:
                    log.info("stage %s: done already, skipped", stage)
                else:
                    log.info("stage %s: running (%s)", stage, reason)
                    on_main(self.ctx, lambda s=stage: self._prepare_resume(s))
                    t0 = time.perf_counter()
                    torch.manual_seed(self.recipe.seed)  # a stage's result must not depend on what ran before it
                    getattr(self, f"stage_{stage}")()
                    on_main(self.ctx, lambda s=stage: self.book.record(s, self.sections(s), self.inputs(s),
                                                                       self.artifacts(s)))
                    log.info("stage %s: finished in %.1f s", stage, time.perf_counter() - t0)
                if self._part_after(stage):
                    return None
        except KeyboardInterrupt:
            _file_only(handler, logging.WARNING, f"interrupted during {stage}; finished stages are kept, "
                                                 f"`--resume` continues a stopped pretrain, search or finetune")
            raise
        except OfbError as err:  # the console gets the one-line error from the CLI; the log keeps it too
            _file_only(handler, logging.ERROR, f"stopped during {stage}: {err}")
            raise
        except Exception as err:
            if handler is not None:  # an internal error: its traceback goes into the run's log
                _file_only(handler, logging.ERROR, f"internal error during {stage}", err)
                note_traceback(err, handler.baseFilename)
            raise
        finally:
            if self.ctx.is_main:
                lock.release()
            if handler is not None:
                logging.getLogger("ofbdeploy").removeHandler(handler)
                handler.close()
        return read_json(self.paths.report) if self.paths.report.is_file() else {}

    def _open(self, lock: RunLock) -> list[tuple[str, str | None]]:
        """Rank 0, every input checked: hold the lock, clear leftovers of killed writes, decide what runs
        (a refused ``--resume`` of the first stage to run is one more input check), and only then write
        recipe.yaml and unmark the stages that will run."""
        if not lock.held:
            check_run_dir(self.paths.root)
            check_output_dir(self.paths.root, "output directory")
            lock.acquire()
        for path in remove_leftovers(self.paths.root):
            log.info("removed %s, left by a write that was killed", path)
        plan = self._plan()
        first = next((stage for stage, reason in plan if reason), None)
        if first is not None and self.resume:
            self._prepare_resume(first, apply=False)
        self.recipe.save(self.paths.recipe)
        if first is not None:
            self.book.forget(list(STAGES[STAGES.index(first):]))
        return plan

    def _part_after(self, stage: str) -> bool:
        """After the last collective stage: dissolve the process group; True when this process is done."""
        if stage != LAST_COLLECTIVE_STAGE or not self.ctx.enabled:
            return False
        main = self.ctx.is_main
        log.info("processes part after stage %s: export, profile and report run on rank 0 alone", stage)
        self.ctx = leave(self.ctx)
        return not main


def build_report(paths: RunPaths) -> dict[str, Any]:
    """The run's headline numbers, from the artifacts the stages wrote."""
    search = read_json(paths.search_result)
    spec = ArchSpec.load(paths.pruned / "arch.json")
    dense_spec = ArchSpec.dense(spec.base)
    metrics = read_json(paths.metrics)
    finetune = read_json(paths.finetuned / "train.json")
    profile = read_json(paths.profile) if paths.profile.is_file() else {"latency": [], "skipped": []}
    artifacts = DeployArtifacts.load(paths.export)
    return {
        "model": spec.base.model_name,
        "method": search.get("method", "ofb"),
        "flops_dense": dense_spec.macs(),
        "flops_pruned": spec.macs(),
        "flops_target": search["target_macs"],
        "latency_target_ms": search["target_latency_ms"],
        "flops_ratio": spec.macs() / dense_spec.macs(),
        "params_dense": dense_spec.params(),
        "params_pruned": spec.params(),
        "top1_dense": metrics["dense"]["top1"],
        "top5_dense": metrics["dense"]["top5"],
        "top1_pruned_before_finetune": metrics["pruned"]["top1"],
        "top1_pruned": metrics["finetuned"]["top1"],
        "top5_pruned": metrics["finetuned"]["top5"],
        "amp": search.get("amp", "off"),
        "fp32_matmul": search.get("fp32_matmul", "ieee"),
        "global_batch": search.get("global_batch"),
        "accum_steps": search.get("accum_steps", 1),
        "search_seconds": search["seconds"],
        "search_images_per_second": search["images_per_second"],
        "search_decided_epoch": search["decided_epoch"],
        "search_forced_groups": search["forced_groups"],
        "search_budget_steps": search["budget_steps"],
        "finetune_seconds": finetune["seconds"],
        "materialize_max_abs_diff": read_json(paths.pruned_check)["max_abs_diff"],
        "export": artifacts.checks,
        "accuracy": [{k: entry[k] for k in ("model", "precision", "runtime", "top1", "top5", "images")}
                     for entry in artifacts.accuracy],
        "latency": profile["latency"],
        "profile_skipped": profile["skipped"],
        "latency_prediction": _prediction(paths, spec, profile["latency"]),
        "arch": {"family": spec.family, "embed_dim": spec.embed_dim, "embed_dims": list(spec.embed_dims),
                 "blocks": [{"heads": b.heads, "head_dim": b.head_dim, "mlp_dim": b.mlp_dim} for b in spec.blocks]},
    }


def _prediction(paths: RunPaths, spec: ArchSpec, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The LUT's prediction next to the measured latency on the LUT's own backend/batch/precision."""
    if not paths.lut.is_file():
        return None
    lut = LatencyLUT.load(paths.lut)
    k = lut.key
    row = next((r for r in rows if (r["backend"], r["batch"], r["precision"]) == (k.backend, k.batch, k.precision)),
               None)
    predicted, dense = lut.predict(spec), lut.predict(ArchSpec.dense(spec.base))
    result: dict[str, Any] = {"backend": k.backend, "batch": k.batch, "precision": k.precision,
                              "predicted_ms_pruned": predicted, "predicted_ms_dense": dense,
                              "dense_ms_at_build": lut.dense_ms}
    if row is not None:
        measured_fraction = row["latency_ms_pruned"] / row["latency_ms_dense"]
        result.update(measured_ms_pruned=row["latency_ms_pruned"], measured_ms_dense=row["latency_ms_dense"],
                      rel_error_pruned=predicted / row["latency_ms_pruned"] - 1,
                      rel_error_dense=dense / row["latency_ms_dense"] - 1,
                      rel_error_fraction=predicted / lut.dense_ms / measured_fraction - 1)
    return result


def summary_table(report: dict[str, Any]) -> str:
    """The closing table: dense vs pruned, side by side."""
    rows = [
        ("dense", f"{report['params_dense'] / 1e6:.3f}", f"{report['flops_dense'] / 1e9:.4f}", "100.0%",
         f"{report['top1_dense']:.2f}", f"{report['top5_dense']:.2f}"),
        ("pruned", f"{report['params_pruned'] / 1e6:.3f}", f"{report['flops_pruned'] / 1e9:.4f}",
         f"{report['flops_ratio']:.1%}", f"{report['top1_pruned']:.2f}", f"{report['top5_pruned']:.2f}"),
    ]
    table = format_table(("model", "params (M)", "GMACs", "of dense", "top-1 %", "top-5 %"), rows)
    return (f"{table}\nsearch {report['search_seconds']:.1f} s, finetune {report['finetune_seconds']:.1f} s; "
            f"pruned before finetune: top-1 {report['top1_pruned_before_finetune']:.2f}%")


def _file_only(handler: logging.Handler | None, level: int, message: str, error: BaseException | None = None) -> None:
    """A record for the run's log file only (the console already gets the CLI's one-line error)."""
    if handler is not None:
        exc_info = (type(error), error, error.__traceback__) if error is not None else None
        handler.handle(log.makeRecord(log.name, level, __file__, 0, message, (), exc_info))


def _log_to_file(path: Path, ctx: Dist) -> logging.Handler | None:
    """Append every log line of rank 0 to the run's log file (grep-able: time level logger message) until
    the returned handler is removed."""
    if not ctx.is_main:
        return None
    root = logging.getLogger("ofbdeploy")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))
    return handler
