"""The stages of a run, one :class:`Stage` record each, in the order they run.

A record says everything the driver needs to know about a stage: the recipe sections its result depends
on, what it reads from outside the run directory, the files it writes, its epoch checkpoint (if it can
resume), whether every torchrun process takes part in it, and its body. Adding a stage is one record here
plus its body; the driver, the skip/resume bookkeeping, the ``check`` gate and the export/profile target
read this table and nothing else.

Stages run in one direction (dense -> search -> materialize -> fit -> finetune -> evaluate -> export -> profile ->
report); each reads the artifacts of the previous ones from the run directory and writes its own
atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ofbdeploy.arch import ArchSpec, arch_to_dict
from ofbdeploy.deploy.workflow import DeployArtifacts, export_models, profile_models
from ofbdeploy.families import arch_from_dict, load_arch
from ofbdeploy.io import file_digest
from ofbdeploy.models.dense import load_weights
from ofbdeploy.models.hub import model_source
from ofbdeploy.models.materialize import TOLERANCE as MATERIALIZE_TOLERANCE
from ofbdeploy.models.materialize import materialize
from ofbdeploy.models.pruned import load_pruned, save_pruned, save_weights
from ofbdeploy.prune.method import Job
from ofbdeploy.prune.ofb.objective import LatencyObjective, build_objective
from ofbdeploy.prune.registry import get_method
from ofbdeploy.recipe import Recipe
from ofbdeploy.report.checks import format_checks, recipe_checks
from ofbdeploy.report.render import latency_table, plot_report, write_markdown
from ofbdeploy.run.context import RunContext
from ofbdeploy.run.fit import fit_stage, quiet_host
from ofbdeploy.run.paths import RunPaths
from ofbdeploy.run.report import build_report, summary_table
from ofbdeploy.run.rundir import digest_of, tree_identity, write_json
from ofbdeploy.search.searchable import SearchableModel
from ofbdeploy.train.checkpoint import load_checkpoint, save_checkpoint
from ofbdeploy.train.data import FASHION_MNIST_ROOT, calibration_batch, sample_batch
from ofbdeploy.train.distributed import wait_for_main
from ofbdeploy.train.trainer import TrainSettings, evaluate, train_classifier

log = logging.getLogger("ofbdeploy.run")



@dataclass(frozen=True)
class Checkpoint:
    """A stage's epoch checkpoint, which ``--resume`` may continue: where it is, and the recipe section whose
    ``epochs`` (and ``warmup_epochs``) it counts. ``when`` says whether the stage trains at all under a recipe."""

    path: Callable[[RunPaths], Path]
    section: str
    when: Callable[[Recipe], bool] = lambda _recipe: True


@dataclass(frozen=True)
class Stage:
    """One stage of a run.

    - ``sections``: the recipe sections its result depends on (a change re-runs it and every later stage);
    - ``artifacts``: the files or folders it writes (stages.json records each file's size and digest);
    - ``inputs``: content identity of what it reads from outside the run directory;
    - ``checkpoint``: its epoch checkpoint, for ``--resume``;
    - ``collective``: every torchrun process takes part; the processes part after the last such stage,
      and the rest is rank 0's alone;
    - ``body``: the work, given the run's context.
    """

    name: str
    sections: tuple[str, ...]
    artifacts: Callable[[RunPaths], list[Path]]
    body: Callable[[RunContext], None]
    inputs: Callable[[Recipe], dict[str, str]] = lambda _recipe: {}
    checkpoint: Checkpoint | None = None
    collective: bool = True


# -- bodies ---------------------------------------------------------------------------------------------
def dense(run: RunContext) -> None:
    """The dense model: built, loaded from the recipe's checkpoint, trained if the recipe asks."""
    p = run.recipe.pretrain
    model = run.build_dense_model()
    weights = run.source[1]
    if weights is not None:
        report = load_weights(model, weights)
        log.info("dense weights from %s (%s%s)", weights, report.format,
                 ", head reset" if report.reset_head else "")
    model = model.to(run.dist.device)
    seconds = 0.0
    if p.epochs > 0:
        settings = TrainSettings(epochs=p.epochs, lr=p.lr, min_lr=p.min_lr, weight_decay=p.weight_decay,
                                 warmup_epochs=p.warmup_epochs, label_smoothing=p.label_smoothing,
                                 max_steps_per_epoch=p.max_steps_per_epoch, amp=run.recipe.amp,
                                 accum_steps=run.batch.accum, drop_path=p.drop_path)
        result = train_classifier(model, run.loader(True), settings, run.dist, seed=run.recipe.seed,
                                  checkpoint_path=run.paths.dense_ckpt, resume=run.resume, log=log,
                                  progress=run.progress, stage="pretrain")
        seconds = result.seconds
    metrics = evaluate(model, run.loader(False), run.dist, run.recipe.amp)
    log.info("dense top-1 %.2f%% top-5 %.2f%%", metrics["top1"], metrics["top5"])
    if run.dist.is_main:
        save_weights(model, run.paths.dense_weights)
        write_json(run.paths.dense_metrics, {**metrics, "pretrain_seconds": seconds})


def latency_objective(run: RunContext, model: SearchableModel) -> LatencyObjective | None:
    """The recipe's latency budget with its LUT (given, cached, or measured now on this machine).

    Under torchrun only the first process measures (every rank timing at once would measure their
    contention) and writes the run's copy; the others wait for it and read it.
    """
    cfg = run.recipe.search.latency_target
    if cfg is None:
        return None
    if run.dist.is_main:
        build_objective(cfg, model, progress=run.progress).lut.save(run.paths.lut)
    wait_for_main(run.dist)
    return build_objective(cfg.model_copy(update={"lut": str(run.paths.lut)}), model)


def search(run: RunContext) -> None:
    """The recipe's pruning method (``search.method``) decides an architecture from the dense weights (the OFB
    search trains them; one-shot methods cut the teacher's); the decided state is kept for materialisation."""
    cfg = run.recipe.search
    model = run.searchable(run.load_dense().train()).to(run.dist.device)
    latency = latency_objective(run, model)
    job = Job(teacher=run.load_dense, loader=run.loader(True), ctx=run.dist, seed=run.recipe.seed, amp=run.recipe.amp,
              checkpoint_path=run.paths.search_ckpt, resume=run.resume, log=log, progress=run.progress,
              latency=latency, accum_steps=run.batch.accum)
    result = get_method(cfg.method).decide(model, cfg, job)
    if run.dist.is_main:
        save_checkpoint(run.paths.search_final, {"arch": arch_to_dict(result.spec), "model": model.state_dict()})
        summary = asdict(result)
        summary["spec"] = arch_to_dict(result.spec)
        summary["fp32_matmul"] = run.fp32_matmul
        write_json(run.paths.search_result, summary)


def materialize_stage(run: RunContext) -> None:
    """Plain timm model from the decided search state, checked against the masked model on real images.

    Rank 0's work alone: the others wait for its files at the stage's end.
    """
    if not run.dist.is_main:
        return
    final = load_checkpoint(run.paths.search_final)
    model = run.searchable(run.build_dense_model())
    model.apply_arch(arch_from_dict(final["arch"], str(run.paths.search_final)))
    model.load_state_dict(final["model"])
    model.eval()
    pruned, spec = materialize(model)
    val = run.data()[1]
    images = sample_batch(val, min(64, len(val)))
    with torch.no_grad():
        diff = float((model(images) - pruned(images)).abs().max())
    if diff > MATERIALIZE_TOLERANCE:
        raise RuntimeError(f"materialised model disagrees with the masked model: max |diff| {diff:.2e}")
    log.info("materialised: max |masked - plain| = %.2e on %d val images", diff, len(images))
    save_pruned(pruned, spec, run.paths.pruned)
    write_json(run.paths.pruned_check, {"max_abs_diff": diff, "images": len(images)})


def finetune(run: RunContext) -> None:
    """Finetune the pruned model, distilling from the dense one."""
    f = run.recipe.finetune
    student = load_pruned(run.paths.fitted, run.dist.device).train()
    teacher = run.load_dense() if f.distill.enabled else None
    settings = TrainSettings(epochs=f.epochs, lr=f.lr, min_lr=f.min_lr, weight_decay=f.weight_decay,
                             warmup_epochs=f.warmup_epochs, label_smoothing=f.label_smoothing, mixup=f.mixup,
                             cutmix=f.cutmix, ema_decay=f.ema_decay,
                             distill_alpha=f.distill.alpha if f.distill.enabled else 0.0,
                             distill_temperature=f.distill.temperature,
                             max_steps_per_epoch=f.max_steps_per_epoch, amp=run.recipe.amp,
                             accum_steps=run.batch.accum, drop_path=f.drop_path)
    result = train_classifier(student, run.loader(True), settings, run.dist, teacher=teacher,
                              seed=run.recipe.seed, checkpoint_path=run.paths.finetune_ckpt,
                              resume=run.resume, log=log, progress=run.progress, stage="finetune")
    if run.dist.is_main:
        save_pruned(student, load_arch(run.paths.fitted / "arch.json"), run.paths.finetuned)
        write_json(run.paths.finetuned / "train.json", asdict(result))


def evaluate_stage(run: RunContext) -> None:
    """Top-1/top-5 of the dense, the pruned (before finetune) and the finetuned model."""
    val, device, amp = run.loader(False), run.dist.device, run.recipe.amp
    metrics = {
        "dense": evaluate(run.load_dense(), val, run.dist, amp),
        "pruned": evaluate(load_pruned(run.paths.pruned, device), val, run.dist, amp),
        "finetuned": evaluate(load_pruned(run.paths.finetuned, device), val, run.dist, amp),
    }
    if run.dist.is_main:
        write_json(run.paths.metrics, metrics)


def export(run: RunContext) -> None:
    """ONNX of dense and pruned in each precision asked for (checked in ONNX Runtime on val images; int8
    calibrated on a class-balanced sample of the training split), TensorRT engines if asked, and the
    ONNX Runtime CPU accuracy of every file on the validation split."""
    cfg = run.recipe.export
    if not cfg.enabled:
        DeployArtifacts().save(run.paths.export)
        return
    train, val, _ = run.data()
    check = sample_batch(val, min(cfg.check_images, len(val)))
    calibration = None
    if "int8" in cfg.onnx_precisions():
        calibration = calibration_batch(train, val, min(cfg.calibration_images, len(train)), run.recipe.seed).numpy()
    artifacts = export_models(run.deploy_models(), run.paths.export, cfg, img_size=run.img_size(),
                              in_chans=check.shape[1], check_images=check, calibration=calibration,
                              tf32=run.recipe.profile.tf32)
    artifacts.accuracy = run.onnx_accuracy(artifacts)
    artifacts.save(run.paths.export)


def profile(run: RunContext) -> None:
    """Dense vs pruned latency on each backend of the recipe, measured alternately in this process."""
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    if run.recipe.profile.enabled:
        spec = load_arch(run.paths.finetuned / "arch.json")
        ratio = spec.macs() / ArchSpec.dense(spec.base).macs()
        rows, skipped = profile_models(run.deploy_models(), DeployArtifacts.load(run.paths.export),
                                       run.recipe.profile, ratio, quiet_host(run.paths.fit))
    write_json(run.paths.profile, {"latency": rows, "skipped": skipped})


def report(run: RunContext) -> None:
    """report.json, report.md with its plot, the budget checks, and the summary table on the terminal."""
    paths = run.paths
    result = build_report(paths)
    checks = recipe_checks(result, run.recipe.budget, run.recipe.search.latency_target)
    result["budget"] = [asdict(c) for c in checks]
    result["budget_met"] = all(c.ok for c in checks)
    write_json(paths.report, result)
    write_markdown(result, checks, paths.report_md, plot_report(result, paths.plot))
    text = summary_table(result)
    if result["latency"]:
        text += "\n" + latency_table(result)
    if checks:
        text += "\n" + format_checks(checks)
    log.info("report written to %s and %s\n%s", paths.report, paths.report_md, text)


# -- inputs from outside the run directory ---------------------------------------------------------------
def dense_inputs(recipe: Recipe) -> dict[str, str]:
    """The recipe's checkpoint (content) and dataset folder (file names, sizes and times)."""
    found: dict[str, str] = {}
    m, d = recipe.model, recipe.data
    weights = model_source(m.name, m.checkpoint, m.pretrained)[1]
    if weights is not None:
        found["model.checkpoint" if m.checkpoint else "model.pretrained"] = file_digest(weights)
    root = d.root or (FASHION_MNIST_ROOT if d.kind == "fashion_mnist" else None)
    if root:
        found["data.root"] = tree_identity(Path(root))
    return found


def search_inputs(recipe: Recipe) -> dict[str, str]:
    """A latency table the recipe names."""
    lat = recipe.search.latency_target
    return {"search.latency.lut": file_digest(lat.lut)} if lat is not None and lat.lut else {}


# -- the table ------------------------------------------------------------------------------------------
STAGES: tuple[Stage, ...] = (
    Stage("dense", ("seed", "amp", "model", "data", "pretrain"),
          lambda p: [p.dense_weights, p.dense_metrics], dense, inputs=dense_inputs,
          checkpoint=Checkpoint(lambda p: p.dense_ckpt, "pretrain", when=lambda r: r.pretrain.epochs > 0)),
    Stage("search", ("search",), lambda p: [p.search_final, p.search_result, p.lut], search, inputs=search_inputs,
          checkpoint=Checkpoint(lambda p: p.search_ckpt, "search")),
    Stage("materialize", (), lambda p: [p.pruned / "model.safetensors", p.pruned / "arch.json", p.pruned_check],
          materialize_stage),
    Stage("fit", (), lambda p: [p.fitted / "model.safetensors", p.fitted / "arch.json", p.fit], fit_stage),
    Stage("finetune", ("finetune",),
          lambda p: [p.finetuned / "model.safetensors", p.finetuned / "arch.json", p.finetuned / "train.json"],
          finetune, checkpoint=Checkpoint(lambda p: p.finetune_ckpt, "finetune")),
    Stage("evaluate", (), lambda p: [p.metrics], evaluate_stage),
    # engines are built with the profile's TF32 policy
    Stage("export", ("export", "profile"), lambda p: [p.export], export, collective=False),
    Stage("profile", ("profile",), lambda p: [p.profile], profile, collective=False),
    Stage("report", ("budget",), lambda p: [p.report, p.report_md, p.plot], report, collective=False),
)


def upto(name: str, table: tuple[Stage, ...] = STAGES) -> tuple[Stage, ...]:
    """``name``'s stage and every stage before it."""
    names = [s.name for s in table]
    return table[: names.index(name) + 1]


def stage_sections(recipe: Recipe, name: str, table: tuple[Stage, ...] = STAGES) -> dict[str, str]:
    """Digest of every recipe section stage ``name`` and the stages before it depend on."""
    data = recipe.model_dump(mode="json")
    return {n: digest_of(data[n]) for s in upto(name, table) for n in s.sections}


def section_values(recipe: Recipe, name: str, table: tuple[Stage, ...] = STAGES) -> dict[str, Any]:
    """The values (not digests) of those sections: what a resume record compares, to name a change."""
    data = recipe.model_dump(mode="json")
    return {n: data[n] for s in upto(name, table) for n in s.sections}

