"""The OFB search loop: one stage that learns weights, importance and sparsity together.

Each step: PMIM-masked images through the bi-masked model, task loss + PMIM loss (weighted to the task
loss's size) + adaptive one-hot losses + FLOPs loss, one backward, three AdamW optimisers step together.
Three times per epoch weak cells are switched off and groups are cut or decided; the search ends when
every group is decided, or at its epoch budget, where undecided groups take their most probable cell.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ofbdeploy.arch import ArchSpec, arch_to_dict
from ofbdeploy.errors import OfbError
from ofbdeploy.families import arch_from_dict
from ofbdeploy.families.vit.searchable import SearchableViT
from ofbdeploy.prune.budget import check_budget, enforce_budget, fill_budget, macs_cost, resolve_target, spec_cost
from ofbdeploy.prune.method import Job
from ofbdeploy.prune.ofb.config import SearchCfg
from ofbdeploy.prune.ofb.diagnostic import decision_diagnostic, summary
from ofbdeploy.prune.ofb.objective import LatencyObjective
from ofbdeploy.prune.ofb.start import bias_logits_, magnitude_scores_
from ofbdeploy.prune.result import SearchResult
from ofbdeploy.search.losses import flops_loss, onehot_loss
from ofbdeploy.search.pmim import random_token_mask, reconstruction_loss
from ofbdeploy.train.amp import amp_dtype, amp_name, autocast, full_precision, grad_scaler, step_all
from ofbdeploy.train.checkpoint import load_checkpoint, save_checkpoint, seed_epoch
from ofbdeploy.train.distributed import Dist, Replicated, all_reduce_sum, barrier, broadcast_all_
from ofbdeploy.train.drop_path import set_drop_path
from ofbdeploy.train.schedule import linear, scaled_lr, warmup_cosine
from ofbdeploy.train.trainer import distillation_loss

_ARCH_BETAS = (0.5, 0.999)  # the authors' betas for the sparsity logits
_POSTFIX_EVERY = 10  # steps between progress-bar updates (each reads values from the device)


def _role(name: str, param: torch.nn.Parameter) -> str:
    """Which optimiser group a parameter of the searchable model belongs to."""
    if name.endswith(".alpha"):
        return "arch"
    if name.startswith("decoder."):
        return "decoder"
    if name.endswith(".score"):
        return "scores"
    if param.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "mask_token", ".multiplier")):
        return "no_decay"
    return "decay"


def build_optimizers(searchable: SearchableViT, cfg: SearchCfg, global_batch: int) -> dict[str, torch.optim.AdamW]:
    """Weights + importance scores, sparsity logits, PMIM decoder: three AdamW, stepped together.

    The weights' AdamW has three groups: decayed weights, undecayed ones, and the importance scores at their
    own rate (``score_lr``) without decay.
    """
    params: dict[str, list] = {"decay": [], "no_decay": [], "scores": [], "arch": [], "decoder": []}
    for name, param in searchable.named_parameters():
        params[_role(name, param)].append(param)
    return {
        "weights": torch.optim.AdamW(
            [{"params": params["decay"], "weight_decay": cfg.weight_decay},
             {"params": params["no_decay"], "weight_decay": 0.0},
             {"params": params["scores"], "weight_decay": 0.0, "lr": scaled_lr(cfg.scores_lr, global_batch)}],
            lr=scaled_lr(cfg.lr, global_batch),
        ),
        "arch": torch.optim.AdamW(params["arch"], lr=scaled_lr(cfg.arch_lr, global_batch), betas=_ARCH_BETAS,
                                  weight_decay=0.0),
        "decoder": torch.optim.AdamW(
            params["decoder"], lr=scaled_lr(cfg.decoder_lr, global_batch), weight_decay=cfg.weight_decay
        ),
    }


def upgrade_weights_state(state: dict, searchable: SearchableViT) -> dict:
    """A weights-optimiser state saved before the scores had their own group (two groups, the scores among
    the undecayed parameters), renumbered for the three groups of :func:`build_optimizers`."""
    if len(state["param_groups"]) != 2:
        return state
    roles = [_role(name, p) for name, p in searchable.named_parameters()]
    weights = [k for k, role in enumerate(roles) if role in ("decay", "no_decay", "scores")]
    old = [k for k in weights if roles[k] == "decay"] + [k for k in weights if roles[k] != "decay"]
    new = [[k for k in weights if roles[k] == role] for role in ("decay", "no_decay", "scores")]
    position = {k: i for i, k in enumerate(k for group in new for k in group)}
    renumber = {i: position[k] for i, k in enumerate(old)}
    groups = [{**state["param_groups"][0], "params": [position[k] for k in new[0]]},
              {**state["param_groups"][1], "params": [position[k] for k in new[1]]},
              {**state["param_groups"][1], "params": [position[k] for k in new[2]]}]
    return {"state": {renumber[i]: v for i, v in state["state"].items()}, "param_groups": groups}


Batch = tuple[Tensor, Tensor]


class Search:
    """State of one search run (optimisers, schedules, one step, shrinking); ``run_search`` drives it.

    One optimiser step takes ``accum_steps`` micro-batches per process (gradient accumulation); the
    schedules, the shrink cadence and ``max_steps_per_epoch`` count optimiser steps.
    """

    def __init__(self, model: SearchableViT, loader, cfg: SearchCfg, ctx: Dist, seed: int, amp: str,
                 log: logging.Logger, latency: LatencyObjective | None, accum_steps: int = 1,
                 teacher: nn.Module | None = None) -> None:
        self.model, self.loader, self.cfg, self.ctx, self.seed, self.amp, self.log = (
            model, loader, cfg, ctx, seed, amp, log)
        self.latency = latency
        self.teacher = teacher  # the dense model, in eval mode, distilled from when search.distill is on
        self.accum = accum_steps
        self.steps = min(len(loader) // accum_steps, cfg.max_steps_per_epoch or len(loader))
        if self.steps < 1:
            raise OfbError("search: the training split gives no full batch; lower data.batch_size")
        self.global_batch = loader.batch_size * ctx.world_size * accum_steps
        self.optimizers = build_optimizers(model, cfg, self.global_batch)
        self.base_lrs = {name: [group["lr"] for group in opt.param_groups] for name, opt in self.optimizers.items()}
        self.warmup_steps = cfg.warmup_steps(self.steps)
        self.dtype = amp_dtype(amp, ctx.device)
        self.scaler = grad_scaler(self.dtype, ctx.device)
        self.target = resolve_target(cfg, model.shape)
        self.dense = ArchSpec.dense(model.shape).macs()
        # Parameters idle in some steps (multipliers before their group is decided, the decoder while PMIM
        # is off) need find_unused_parameters; the groups' buffers are the same on every rank by construction.
        self.replica = Replicated(model, ctx, find_unused_parameters=True, forward_sync_buffers=False)
        self.decided_epoch: int | None = None
        self.start_scores: dict[str, Tensor] = {}  # importance scores at the start (the decision diagnostic)
        self.cut_steps: list[int] = []  # optimiser steps after which layers were cut (this call's)
        self.weights = cfg.loss_weights
        self.group_weight = {
            "attention": self.weights.head, "mlp": self.weights.mlp, "embedding": self.weights.embedding
        }

    # -- checkpoints ----------------------------------------------------------------------------
    def state(self, epoch: int) -> dict:
        return {
            "epoch": epoch,
            "arch": arch_to_dict(self.model.arch_spec()),
            "model": self.model.state_dict(),
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "decided_epoch": self.decided_epoch,
            "start_scores": self.start_scores,
        }

    def restore(self, ckpt: dict) -> int:
        """Cut the model to the checkpoint's architecture and load it (before any DDP wrapper exists)."""
        self.replica.release()
        self.model.apply_arch(arch_from_dict(ckpt["arch"], "search checkpoint"))
        self.model.load_state_dict(ckpt["model"])
        for _, group in self.model.groups():
            if group.is_decided:
                group.alpha.requires_grad_(False)
                group.score.requires_grad_(False)
        for name, opt in self.optimizers.items():
            saved = ckpt["optimizers"][name]
            opt.load_state_dict(upgrade_weights_state(saved, self.model) if name == "weights" else saved)
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.decided_epoch = ckpt["decided_epoch"]
        self.start_scores = ckpt.get("start_scores", {})  # absent from checkpoints older than the diagnostic
        return int(ckpt["epoch"])

    # -- one step -------------------------------------------------------------------------------
    def schedules(self, it: int) -> float:
        """Set lrs and the mixing weight for optimiser step ``it``; return the PMIM keep ratio."""
        cfg, total, warm = self.cfg, self.cfg.epochs * self.steps, self.warmup_steps
        for name, opt in self.optimizers.items():
            for group, base in zip(opt.param_groups, self.base_lrs[name], strict=True):
                group["lr"] = warmup_cosine(it, total, warm, base, cfg.min_lr)
        self.model.set_mix(linear(it, warm, cfg.mix_start, cfg.mix_end))
        if not cfg.pmim.enabled or self.model.all_decided:
            return 1.0
        return linear(it, warm, cfg.pmim.keep_start, cfg.pmim.keep_end)

    def regulariser(self) -> tuple[Tensor, Tensor]:
        """One-hot losses, and the budget losses (FLOPs and/or latency) pulling to their targets, in fp32.

        They sum MAC counts and entropies whose range half precision does not have (``probs @ keeps``
        times millions of MACs overflows fp16), so they run outside autocast whatever the recipe's amp.
        """
        with full_precision(self.ctx.device):
            onehot = sum(self.group_weight[g.kind] * onehot_loss(g) for _, g in self.model.groups())
            budget = self.model.alpha_zero()
            if self.target is not None:
                budget = budget + self.weights.flops * flops_loss(self.model.expected_macs(), self.target, self.dense)
            if self.latency is not None:
                budget = budget + self.cfg.latency.weight * self.latency.loss(self.model)
        return onehot, budget

    def micro_loss(self, images: Tensor, labels: Tensor, keep: float) -> tuple[Tensor, Tensor, Tensor]:
        """Task loss, PMIM loss (zero when PMIM is off) and their weighted sum for one micro-batch."""
        device = self.ctx.device
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        token_mask = None
        if keep < 1.0:
            token_mask = random_token_mask(images.shape[0], self.model.shape.num_patches, keep, device)
        with autocast(self.dtype, device):
            if token_mask is None:
                logits, recon = self.replica.net(images), None
            else:
                logits, recon = self.replica.net(images, token_mask)
            teacher_logits = self.teach(images)
        task = F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.label_smoothing)
        if teacher_logits is not None:
            distill = self.cfg.distill
            task = (1 - distill.alpha) * task + distill.alpha * distillation_loss(logits, teacher_logits,
                                                                                  distill.temperature)
        if recon is None:
            return task, task.new_zeros(()), task
        pmim = reconstruction_loss(images, recon, token_mask, self.model.shape.patch_size, self.cfg.pmim.target)
        return task, pmim, task + (task.detach() / pmim.detach().clamp_min(1e-8)) * pmim

    def teach(self, images: Tensor) -> Tensor | None:
        """The teacher's logits on the whole images (no PMIM masking: the dense model never learnt the mask
        token, and the student learns to predict, from the visible patches, what it sees in all of them)."""
        if self.teacher is None:
            return None
        with torch.no_grad():
            return self.teacher(images)

    def step(self, batches: list[Batch], keep: float) -> Tensor:
        """One optimiser step over ``batches`` (this process's micro-batches); returns the detached losses
        (task, pmim, onehot, budget) without reading them, so the step queues no device sync."""
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        task_sum = pmim_sum = None
        for k, (images, labels) in enumerate(batches):
            last = k == len(batches) - 1
            with contextlib.nullcontext() if last else self.replica.no_sync():
                task, pmim, loss = self.micro_loss(images, labels, keep)
                loss = loss / len(batches)
                if last:  # the regularisers once per optimiser step, in the backward that all-reduces
                    onehot, budget = self.regulariser()
                    loss = loss + onehot + budget
                (loss if self.scaler is None else self.scaler.scale(loss)).backward()
            task_sum = task.detach() if task_sum is None else task_sum + task.detach()
            pmim_sum = pmim.detach() if pmim_sum is None else pmim_sum + pmim.detach()
        step_all(self.optimizers.values(), self.scaler)
        n = len(batches)
        return torch.stack([task_sum / n, pmim_sum / n, onehot.detach(), budget.detach()])

    def sync_decisions(self) -> None:
        """Every rank takes rank 0's logits and scores before deciding from them, so all cut alike."""
        tensors = [t for _, g in self.model.groups() if not g.is_decided for t in (g.alpha.data, g.score.data)]
        broadcast_all_(tensors, self.ctx)

    def shrink(self, step: int = -1) -> list:
        """Switch off weak cells and cut; the DDP wrapper is dropped first and rebuilt at the next step.

        ``step`` (the global optimiser step) is recorded in :attr:`cut_steps` when a layer changed shape.
        """
        self.sync_decisions()
        self.replica.release()
        before = [g.shape for _, g in self.model.groups()]
        events = self.model.shrink(self.cfg.shrink_threshold, self.optimizers.values())
        if before != [g.shape for _, g in self.model.groups()]:
            self.cut_steps.append(step)
        for event in events:
            self.log.info("search shrink %s: %d cell(s) off, shape %s%s", event.group, event.switched_off,
                          "x".join(map(str, event.shape)), ", decided" if event.decided else "")
        return events

    def batches(self, epoch: int) -> Iterator[tuple[int, list[Batch]]]:
        """This epoch's optimiser steps: ``accum`` micro-batches each, in a reseeded order."""
        seed_epoch(self.seed, epoch, self.loader, self.ctx.rank)
        group: list[Batch] = []
        step = 0
        for images, labels in self.loader:
            group.append((images, labels))
            if len(group) == self.accum:
                yield step, group
                group, step = [], step + 1
                if step >= self.steps:
                    return


def run_search(
    model: SearchableViT,
    loader,
    cfg: SearchCfg,
    ctx: Dist,
    *,
    seed: int = 0,
    amp: str = "off",
    checkpoint_path: Path | None = None,
    resume: bool = False,
    log: logging.Logger | None = None,
    progress: bool = True,
    latency: LatencyObjective | None = None,
    accum_steps: int = 1,
    teacher: nn.Module | None = None,
) -> SearchResult:
    """Search ``model`` (already on ``ctx.device``) on ``loader`` until every group is decided.

    ``latency`` (built from a LUT of the target device) adds the latency loss and budget. Each optimiser
    step accumulates ``accum_steps`` batches of ``loader`` per process. ``teacher`` (the dense model, in
    eval mode) is distilled from when ``search.distill`` is enabled.
    """
    log = log or logging.getLogger("ofbdeploy.search")
    if cfg.distill.enabled and teacher is None:
        raise OfbError("search.distill is enabled but the search was given no teacher")
    search = Search(model, loader, cfg, ctx, seed, amp, log, latency, accum_steps,
                    teacher if cfg.distill.enabled else None)
    check_budget(search.target, model.space, model.shape)
    if latency is not None and latency.floor_ms(model.space) > latency.target_ms:
        raise OfbError(f"latency budget {latency.target_ms:.3f} ms cannot be met: the narrowest architecture the "
                       f"grids allow is predicted at {latency.floor_ms(model.space):.3f} ms on "
                       f"{latency.lut.key.backend} ({latency.lut.key.device})")
    start = resumed = None
    if resume and checkpoint_path is not None and checkpoint_path.is_file():
        start = resumed = search.restore(load_checkpoint(checkpoint_path, ctx.device))
        log.info("search resumed from %s at epoch %d", checkpoint_path, start)
    else:
        start_(model, cfg, search.target, log)
        search.start_scores = {name: g.score.detach().cpu().clone() for name, g in model.groups()}
    pmim = (f"PMIM keep {cfg.pmim.keep_start:.2f} -> {cfg.pmim.keep_end:.2f}" if cfg.pmim.enabled else "PMIM off")
    log.info("search warm-up: %d of %d optimiser steps (lr, mixing weight %.2f -> %.2f, %s)", search.warmup_steps,
             cfg.epochs * search.steps, cfg.mix_start, cfg.mix_end, pmim)
    start = start or 0
    per_epoch = cfg.shrinks_per_epoch
    shrink_at = {max(0, round(search.steps * (k + 1) / per_epoch) - 1) for k in range(per_epoch)}
    t0, images_seen, epoch, steps_run = time.perf_counter(), 0, start, 0
    for epoch in range(start, cfg.epochs):
        if search.decided_epoch is not None:
            break
        model.train()
        totals = torch.zeros(4, device=ctx.device)  # task, pmim, onehot, budget: read once per epoch
        bar = tqdm(search.batches(epoch), total=search.steps, desc=f"search {epoch + 1}/{cfg.epochs}",
                   disable=None if progress and ctx.is_main else True, leave=False)  # None: only on a terminal
        for i, batches in bar:
            keep = search.schedules(epoch * search.steps + i)
            losses = search.step(batches, keep)
            totals += losses
            steps_run += 1
            images_seen += sum(len(labels) for _, labels in batches) * ctx.world_size
            if not bar.disable and i % _POSTFIX_EVERY == 0:  # reading values syncs the device
                bar.set_postfix(task=f"{losses[0].item():.3f}", gmacs=f"{model.expected_macs().item() / 1e9:.3f}")
            if i in shrink_at:
                search.shrink(epoch * search.steps + i)
        if model.all_decided and search.decided_epoch is None:
            search.decided_epoch = epoch + 1
        task, pmim, onehot, budget_loss = (all_reduce_sum(totals, ctx) / (search.steps * ctx.world_size)).tolist()
        live = sum(int(g.alive.sum()) for _, g in model.groups())
        budget = f"expected {model.expected_macs().item() / 1e9:.4f} GMACs"
        if search.target is not None:
            budget += f" (target {search.target / 1e9:.4f})"
        if latency is not None:
            budget += f", {latency.expected_ms(model).item():.3f} ms (target {latency.target_ms:.3f})"
        if not all(math.isfinite(v) for v in (task, pmim, onehot, budget_loss)):
            raise OfbError(f"search epoch {epoch + 1}: a loss is not finite (task {task}, pmim {pmim}, onehot "
                           f"{onehot}, budget {budget_loss}); lower the learning rates or use amp off/bf16")
        log.info("search epoch %d/%d task %.4f pmim %.4f onehot %.3f budget loss %.5f %s live cells %d "
                 "decided %d/%d", epoch + 1, cfg.epochs, task, pmim, onehot, budget_loss, budget, live,
                 sum(g.is_decided for _, g in model.groups()), len(list(model.groups())))
        if checkpoint_path is not None and ctx.is_main:
            save_checkpoint(checkpoint_path, search.state(epoch + 1))
        barrier(ctx)
    search.replica.release()
    search.sync_decisions()
    budgets = [(macs_cost(model.shape), search.target)] if search.target is not None else []
    if latency is not None:
        budgets.append((spec_cost(model.shape, latency.lut.predict), latency.target_ms))
    forced = []
    if not model.all_decided:
        picks = model.most_probable_cells()
        forced = list(picks)
        log.warning("search budget of %d epochs ended with %d undecided group(s); took their most probable "
                    "cell: %s", cfg.epochs, len(forced), ", ".join(forced))
        if cfg.fill_budget:
            filled = fill_budget(model, picks, budgets)
            widened = [name for name in picks if filled[name] != picks[name]]
            if widened:
                log.info("widened %d of them toward the budget by importance: %s", len(widened), ", ".join(widened))
            picks = filled
        model.decide_cells(picks, search.optimizers.values())
    repairs = [step for cost, target in budgets
               for step in enforce_budget(model, target, search.optimizers.values(), cost=cost)]
    for step in repairs:
        log.warning("search over budget: narrowed %s from %s to %s (cost now %.4g)", step.group,
                    "x".join(map(str, step.before)), "x".join(map(str, step.after)), step.cost_after)
    seconds = time.perf_counter() - t0
    decisions = decision_diagnostic(model, search.start_scores)
    overall = summary(decisions)
    if overall["mean_spearman"] is not None:
        log.info("search decisions: start/final score rank correlation %.3f (mean over %d groups), %.1f%% of kept "
                 "units outside the start's choice", overall["mean_spearman"], overall["groups"],
                 100 * overall["mean_outside_start"])
    spec = model.arch_spec()
    achieved = spec.macs()
    log.info("search result %.4f GMACs (%.1f%% of dense)%s", achieved / 1e9, 100 * achieved / search.dense,
             f" against target {search.target / 1e9:.4f} GMACs" if search.target is not None else "")
    if latency is not None:
        log.info("search result predicted %.3f ms on %s (dense %.3f ms) against target %.3f ms",
                 latency.lut.predict(spec), latency.lut.key.backend, latency.dense_ms, latency.target_ms)
    return SearchResult(
        spec=spec, target_macs=search.target, achieved_macs=achieved, dense_macs=search.dense,
        epochs_run=(search.decided_epoch or cfg.epochs) - (resumed or 0), decided_epoch=search.decided_epoch,
        forced_groups=forced, seconds=seconds, images_per_second=images_seen / max(seconds, 1e-9),
        resumed_from=resumed, amp=amp_name(search.dtype), global_batch=search.global_batch,
        accum_steps=search.accum, ddp_builds=search.replica.builds, cut_steps=search.cut_steps,
        steps_run=steps_run,
        budget_steps=[r.describe() for r in repairs],
        target_latency_ms=latency.target_ms if latency else None,
        predicted_latency_ms=latency.lut.predict(spec) if latency else None,
        predicted_dense_latency_ms=latency.dense_ms if latency else None,
        state={"decisions": decisions, "decision_summary": overall},
    )



def start_(model: SearchableViT, cfg: SearchCfg, target: float | None, log: logging.Logger) -> None:
    """A fresh search's start: the importance scores (``search.init``), the sparsity logits (``logit_init``,
    ``widest_logit``), then the logit bias toward the global magnitude allocation (``logit_bias``)."""
    if cfg.init == "magnitude":
        magnitude_scores_(model)
        log.info("search init: importance scores from the dense weights' coupled magnitudes")
    model.start_logits_(cfg.logit_init, cfg.widest_logit)
    if cfg.logit_bias > 0 and target is not None:
        groups = dict(model.groups())
        cells = bias_logits_(model, target, cfg.logit_bias)
        log.info("search init: logits biased by %g toward the magnitude allocation at the target: %s", cfg.logit_bias,
                 ", ".join(f"{name} {'x'.join(map(str, groups[name].cells[k].tolist()))}" for name, k in cells.items()))


def decide(model: SearchableViT, cfg: SearchCfg, job: Job) -> SearchResult:
    """The registry's entry point: the OFB search of ``model`` with the recipe's stochastic depth (and the
    dense teacher, when the search distils)."""
    set_drop_path(model, cfg.drop_path)
    teacher = job.teacher().to(job.ctx.device).eval() if cfg.distill.enabled else None
    return run_search(model, job.loader, cfg, job.ctx, seed=job.seed, amp=job.amp,
                      checkpoint_path=job.checkpoint_path, resume=job.resume, log=job.log, progress=job.progress,
                      latency=job.latency, accum_steps=job.accum_steps, teacher=teacher)
