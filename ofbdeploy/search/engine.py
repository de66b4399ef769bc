"""The OFB search loop: one stage that learns weights, importance and sparsity together.

Each step: PMIM-masked images through the bi-masked model, task loss + PMIM loss (weighted to the task
loss's size) + adaptive one-hot losses + FLOPs loss, one backward, three AdamW optimisers step together.
Three times per epoch weak cells are switched off and groups are cut or decided; the search ends when
every group is decided, or at its epoch budget, where undecided groups take their most probable cell.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from ofbdeploy.arch import ArchSpec, ViTShape
from ofbdeploy.errors import OfbError
from ofbdeploy.grids import SearchSpace
from ofbdeploy.latency.objective import LatencyObjective
from ofbdeploy.recipe import SearchCfg
from ofbdeploy.search.budget import enforce_budget, spec_cost
from ofbdeploy.search.losses import flops_loss, onehot_loss
from ofbdeploy.search.pmim import random_token_mask, reconstruction_loss
from ofbdeploy.search.searchable import SearchableViT
from ofbdeploy.train.amp import amp_dtype, autocast
from ofbdeploy.train.checkpoint import load_checkpoint, save_checkpoint, seed_epoch
from ofbdeploy.train.distributed import Dist, barrier, broadcast_, wrap_ddp
from ofbdeploy.train.schedule import linear, scaled_lr, warmup_cosine

_ARCH_BETAS = (0.5, 0.999)  # the authors' betas for the sparsity logits


@dataclass
class SearchResult:
    """What the search found and what it cost."""

    spec: ArchSpec
    target_macs: float | None
    achieved_macs: float
    dense_macs: float
    epochs_run: int
    decided_epoch: int | None
    forced_groups: list[str] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0
    resumed_from: int | None = None
    budget_steps: list[str] = field(default_factory=list)
    target_latency_ms: float | None = None  # latency budget (LUT prediction), when the search had one
    predicted_latency_ms: float | None = None
    predicted_dense_latency_ms: float | None = None


def resolve_target(cfg: SearchCfg, shape: ViTShape) -> float | None:
    """The budget in MACs, from a ratio of the dense model or an absolute GMACs figure (None: latency only)."""
    if cfg.target_flops_ratio is not None:
        return cfg.target_flops_ratio * ArchSpec.dense(shape).macs()
    return cfg.target_gflops * 1e9 if cfg.target_gflops is not None else None


def check_budget(target: float | None, space: SearchSpace, shape: ViTShape) -> None:
    """Refuse, before any training, a FLOPs budget that no architecture in the search space can meet."""
    if target is None:
        return
    dense = ArchSpec.dense(shape).macs()
    floor = ArchSpec.narrowest(shape, space).macs()
    if target < floor:
        raise OfbError(
            f"search budget {target / 1e9:.3f} GMACs cannot be met: the smallest architecture the grids allow "
            f"costs {floor / 1e9:.3f} GMACs ({floor / dense:.1%} of dense); raise the target or drop search.align"
        )
    if target >= dense:
        raise OfbError(f"search budget {target / 1e9:.3f} GMACs is not below the dense model's {dense / 1e9:.3f}")


def build_optimizers(searchable: SearchableViT, cfg: SearchCfg, global_batch: int) -> dict[str, torch.optim.AdamW]:
    """Weights + importance scores, sparsity logits, PMIM decoder: three AdamW, stepped together."""
    decay, no_decay, arch, decoder = [], [], [], []
    for name, param in searchable.named_parameters():
        if name.endswith(".alpha"):
            arch.append(param)
        elif name.startswith("decoder."):
            decoder.append(param)
        elif param.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "mask_token", ".score", ".multiplier")):
            no_decay.append(param)
        else:
            decay.append(param)
    return {
        "weights": torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=scaled_lr(cfg.lr, global_batch),
        ),
        "arch": torch.optim.AdamW(arch, lr=scaled_lr(cfg.arch_lr, global_batch), betas=_ARCH_BETAS, weight_decay=0.0),
        "decoder": torch.optim.AdamW(
            decoder, lr=scaled_lr(cfg.decoder_lr, global_batch), weight_decay=cfg.weight_decay
        ),
    }


class Search:
    """State of one search run (optimisers, schedules, one step, shrinking); ``run_search`` drives it."""

    def __init__(self, model: SearchableViT, loader, cfg: SearchCfg, ctx: Dist, seed: int, amp: str,
                 log: logging.Logger, latency: LatencyObjective | None) -> None:
        self.model, self.loader, self.cfg, self.ctx, self.seed, self.amp, self.log = (
            model, loader, cfg, ctx, seed, amp, log)
        self.latency = latency
        self.steps = min(len(loader), cfg.max_steps_per_epoch or len(loader))
        if self.steps < 1:
            raise OfbError("search: the training split gives no full batch; lower data.batch_size")
        self.global_batch = loader.batch_size * ctx.world_size
        self.optimizers = build_optimizers(model, cfg, self.global_batch)
        self.base_lrs = {name: opt.param_groups[0]["lr"] for name, opt in self.optimizers.items()}
        self.dtype = amp_dtype(amp, ctx.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)
        self.target = resolve_target(cfg, model.shape)
        self.dense = ArchSpec.dense(model.shape).macs()
        self.net = wrap_ddp(model, ctx)
        self.decided_epoch: int | None = None
        self.weights = cfg.loss_weights
        self.group_weight = {
            "attention": self.weights.head, "mlp": self.weights.mlp, "embedding": self.weights.embedding
        }

    # -- checkpoints ----------------------------------------------------------------------------
    def state(self, epoch: int) -> dict:
        return {
            "epoch": epoch,
            "arch": self.model.arch_spec().to_dict(),
            "model": self.model.state_dict(),
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "scaler": self.scaler.state_dict(),
            "decided_epoch": self.decided_epoch,
        }

    def restore(self, ckpt: dict) -> int:
        self.model.apply_arch(ArchSpec.from_dict(ckpt["arch"], "search checkpoint"))
        self.model.load_state_dict(ckpt["model"])
        for _, group in self.model.groups():
            if group.is_decided:
                group.alpha.requires_grad_(False)
                group.score.requires_grad_(False)
        for name, opt in self.optimizers.items():
            opt.load_state_dict(ckpt["optimizers"][name])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.decided_epoch = ckpt["decided_epoch"]
        self.net = wrap_ddp(self.model, self.ctx)
        return int(ckpt["epoch"])

    # -- one step -------------------------------------------------------------------------------
    def schedules(self, it: int) -> float:
        """Set lrs and the mixing weight for iteration ``it``; return the PMIM keep ratio."""
        cfg, total, warm = self.cfg, self.cfg.epochs * self.steps, self.cfg.warmup_epochs * self.steps
        for name, opt in self.optimizers.items():
            lr = warmup_cosine(it, total, warm, self.base_lrs[name], cfg.min_lr)
            for group in opt.param_groups:
                group["lr"] = lr
        self.model.set_mix(linear(it, warm, cfg.mix_start, cfg.mix_end))
        if not cfg.pmim.enabled or self.model.all_decided:
            return 1.0
        return linear(it, warm, cfg.pmim.keep_start, cfg.pmim.keep_end)

    def regulariser(self) -> tuple[Tensor, Tensor]:
        """One-hot losses, and the budget losses (FLOPs and/or latency) pulling to their targets."""
        onehot = sum(self.group_weight[g.kind] * onehot_loss(g) for _, g in self.model.groups())
        budget = self.model.alpha_zero()
        if self.target is not None:
            budget = budget + self.weights.flops * flops_loss(self.model.expected_macs(), self.target, self.dense)
        if self.latency is not None:
            budget = budget + self.cfg.latency.weight * self.latency.loss(self.model)
        return onehot, budget

    def step(self, images: Tensor, labels: Tensor, keep: float) -> dict[str, float]:
        device = self.ctx.device
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        token_mask = None
        if keep < 1.0:
            token_mask = random_token_mask(images.shape[0], self.model.shape.num_patches, keep, device)
        with autocast(self.dtype):
            if token_mask is None:
                logits, pmim = self.net(images), None
            else:
                logits, recon = self.net(images, token_mask)
                pmim = reconstruction_loss(images, recon, token_mask, self.model.shape.patch_size)
            task = F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.label_smoothing)
            onehot, budget = self.regulariser()
            loss = task + onehot + budget
            if pmim is not None:
                loss = loss + (task.detach() / pmim.detach().clamp_min(1e-8)) * pmim
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        for opt in self.optimizers.values():
            self.scaler.step(opt)
        self.scaler.update()
        return {"task": task.item(), "pmim": pmim.item() if pmim is not None else 0.0,
                "onehot": float(onehot.detach()), "budget": budget.item()}

    def shrink(self) -> list:
        for _, group in self.model.groups():
            broadcast_(group.alpha.data, self.ctx)
        events = self.model.shrink(self.cfg.shrink_threshold, self.optimizers.values())
        if any(e.switched_off or e.decided for e in events) and self.ctx.enabled:
            self.net = wrap_ddp(self.model, self.ctx)  # parameter shapes changed: DDP needs fresh buckets
        for event in events:
            self.log.info("search shrink %s: %d cell(s) off, shape %s%s", event.group, event.switched_off,
                          "x".join(map(str, event.shape)), ", decided" if event.decided else "")
        return events

    def batches(self, epoch: int) -> Iterator[tuple[int, Tensor, Tensor]]:
        seed_epoch(self.seed, epoch, self.loader)
        for i, (images, labels) in enumerate(self.loader):
            if i >= self.steps:
                return
            yield i, images, labels


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
) -> SearchResult:
    """Search ``model`` (already on ``ctx.device``) on ``loader`` until every group is decided.

    ``latency`` (built from a LUT of the target device) adds the latency loss and budget.
    """
    log = log or logging.getLogger("ofbdeploy.search")
    search = Search(model, loader, cfg, ctx, seed, amp, log, latency)
    check_budget(search.target, model.space, model.shape)
    if latency is not None and latency.floor_ms(model.space) > latency.target_ms:
        raise OfbError(f"latency budget {latency.target_ms:.3f} ms cannot be met: the narrowest architecture the "
                       f"grids allow is predicted at {latency.floor_ms(model.space):.3f} ms on "
                       f"{latency.lut.key.backend} ({latency.lut.key.device})")
    start = resumed = None
    if resume and checkpoint_path is not None and checkpoint_path.is_file():
        start = resumed = search.restore(load_checkpoint(checkpoint_path, ctx.device))
        log.info("search resumed from %s at epoch %d", checkpoint_path, start)
    start = start or 0
    per_epoch = cfg.shrinks_per_epoch
    shrink_at = {max(0, round(search.steps * (k + 1) / per_epoch) - 1) for k in range(per_epoch)}
    t0, images_seen, epoch = time.perf_counter(), 0, start
    for epoch in range(start, cfg.epochs):
        if search.decided_epoch is not None:
            break
        model.train()
        totals: dict[str, float] = {}
        bar = tqdm(search.batches(epoch), total=search.steps, desc=f"search {epoch + 1}/{cfg.epochs}",
                   disable=not (progress and ctx.is_main), leave=False)
        for i, images, labels in bar:
            keep = search.schedules(epoch * search.steps + i)
            stats = search.step(images, labels, keep)
            images_seen += images.shape[0] * ctx.world_size
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value
            if i % 10 == 0:  # reading the expected cost syncs the device: not on every step
                bar.set_postfix(task=f"{stats['task']:.3f}", gmacs=f"{model.expected_macs().item() / 1e9:.3f}")
            if i in shrink_at:
                search.shrink()
        if model.all_decided and search.decided_epoch is None:
            search.decided_epoch = epoch + 1
        means = {k: v / search.steps for k, v in totals.items()}
        live = sum(int(g.alive.sum()) for _, g in model.groups())
        budget = f"expected {model.expected_macs().item() / 1e9:.4f} GMACs"
        if search.target is not None:
            budget += f" (target {search.target / 1e9:.4f})"
        if latency is not None:
            budget += f", {latency.expected_ms(model).item():.3f} ms (target {latency.target_ms:.3f})"
        log.info("search epoch %d/%d task %.4f pmim %.4f onehot %.3f budget loss %.5f %s live cells %d "
                 "decided %d/%d", epoch + 1, cfg.epochs, means.get("task", 0.0), means.get("pmim", 0.0),
                 means.get("onehot", 0.0), means.get("budget", 0.0), budget, live,
                 sum(g.is_decided for _, g in model.groups()), len(list(model.groups())))
        if checkpoint_path is not None and ctx.is_main:
            save_checkpoint(checkpoint_path, search.state(epoch + 1))
        barrier(ctx)
    forced = []
    if not model.all_decided:
        forced = [e.group for e in model.decide_most_probable(search.optimizers.values())]
        log.warning("search budget of %d epochs ended with %d undecided group(s); took their most probable "
                    "cell: %s", cfg.epochs, len(forced), ", ".join(forced))
    repairs = []
    if search.target is not None:
        repairs += enforce_budget(model, search.target, search.optimizers.values())
    if latency is not None:
        repairs += enforce_budget(model, latency.target_ms, search.optimizers.values(),
                                  cost=spec_cost(model.shape, latency.lut.predict))
    for step in repairs:
        log.warning("search over budget: narrowed %s from %s to %s (cost now %.4g)", step.group,
                    "x".join(map(str, step.before)), "x".join(map(str, step.after)), step.cost_after)
    seconds = time.perf_counter() - t0
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
        resumed_from=resumed,
        budget_steps=[f"{r.group}: {'x'.join(map(str, r.before))} -> {'x'.join(map(str, r.after))}" for r in repairs],
        target_latency_ms=latency.target_ms if latency else None,
        predicted_latency_ms=latency.lut.predict(spec) if latency else None,
        predicted_dense_latency_ms=latency.dense_ms if latency else None,
    )

