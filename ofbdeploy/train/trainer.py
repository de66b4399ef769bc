"""Supervised training and evaluation of a timm classifier: dense pretraining and distilled finetuning.

One loop serves both pipeline stages; knowledge distillation is nothing more than an optional teacher.
Every epoch reseeds its random streams (:func:`seed_epoch`) and ends with a checkpoint, so a stopped run
resumed with ``resume=True`` reaches the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_weight_decay
from timm.utils import ModelEmaV3
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ofbdeploy.errors import CheckpointError, OfbError
from ofbdeploy.train.amp import amp_dtype, amp_name, autocast, grad_scaler, step_all
from ofbdeploy.train.checkpoint import load_checkpoint, save_checkpoint, seed_epoch
from ofbdeploy.train.distributed import Dist, all_reduce_sum, barrier, wrap_ddp
from ofbdeploy.train.drop_path import set_drop_path
from ofbdeploy.train.schedule import scaled_lr, warmup_cosine

logger = logging.getLogger(__name__)

_POSTFIX_EVERY = 10  # steps between progress-bar loss updates (each one syncs the device)
_CHECKPOINT_KEYS = frozenset({"epoch", "model", "optimizer"})


@dataclass(frozen=True)
class TrainSettings:
    """One training stage, built by the caller from ``PretrainCfg`` or ``FinetuneCfg``.

    ``lr`` is per 256 images and is scaled by the global batch; ``min_lr`` is absolute. ``distill_alpha``
    of 0 (or no teacher) trains on labels alone.
    """

    epochs: int
    lr: float
    min_lr: float
    weight_decay: float
    warmup_epochs: int
    label_smoothing: float
    mixup: float = 0.0
    cutmix: float = 0.0
    ema_decay: float | None = None
    distill_alpha: float = 0.0
    distill_temperature: float = 1.0
    max_steps_per_epoch: int | None = None  # optimiser steps
    amp: str = "off"
    accum_steps: int = 1  # loader batches per optimiser step (gradient accumulation)
    drop_path: float = 0.0

    @property
    def mixing(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


@dataclass
class TrainResult:
    """What one call did: epochs run by this call (not counting resumed ones) and global throughput."""

    epochs_run: int
    seconds: float
    images_per_second: float
    last_loss: float  # mean training loss of the last epoch run, nan when none ran
    resumed_from: int | None
    amp: str = "off"  # the autocast precision actually used
    global_batch: int = 0  # images per optimiser step over all processes
    accum_steps: int = 1


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton's soft-target term T^2 * KL(p_teacher || p_student) at temperature T, averaged over the batch.

    The T^2 factor keeps the gradient scale independent of T, so ``distill_alpha`` means the same at any T.
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature**2


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW that leaves 1-D parameters (biases, norms), position embedding and class token undecayed."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)
    return torch.optim.AdamW(groups, lr=lr)


@dataclass
class _Loop:
    """Everything one optimisation step needs, so that the epoch loop reads in a few lines."""

    model: nn.Module  # the bare module: checkpoints, EMA
    net: nn.Module  # what runs forward: DDP around ``model`` when distributed
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    settings: TrainSettings
    dtype: torch.dtype | None
    mixer: Mixup | None
    teacher: nn.Module | None
    scaler: torch.amp.GradScaler | None
    ema: ModelEmaV3 | None

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        """Label loss on the (possibly mixed) batch, blended with distillation when there is a teacher."""
        if self.mixer is not None:
            x, y = self.mixer(x, y)
        with autocast(self.dtype, x.device):
            logits = self.net(x)
            teacher_logits = self._teach(x)
        label_loss = self.criterion(logits.float(), y)
        if teacher_logits is None:
            return label_loss
        alpha = self.settings.distill_alpha
        kd = distillation_loss(logits, teacher_logits, self.settings.distill_temperature)
        return (1 - alpha) * label_loss + alpha * kd

    def _teach(self, x: Tensor) -> Tensor | None:
        if self.teacher is None:
            return None
        with torch.no_grad():
            return self.teacher(x)

    def step(self, batches: list[tuple[Tensor, Tensor]], lr: float) -> Tensor:
        """One update at learning rate ``lr`` from this process's micro-batches (their gradients averaged,
        all-reduced with the last); returns the detached mean loss (no device sync)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        total = None
        for k, (x, y) in enumerate(batches):
            sync = k == len(batches) - 1 or not isinstance(self.net, DistributedDataParallel)
            with contextlib.nullcontext() if sync else self.net.no_sync():
                loss = self.loss(x, y) / len(batches)
                (loss if self.scaler is None else self.scaler.scale(loss)).backward()
            total = loss.detach() if total is None else total + loss.detach()
        step_all([self.optimizer], self.scaler)
        if self.ema is not None:
            self.ema.update(self.model)
        return total


def _build_loop(
    model: nn.Module, settings: TrainSettings, ctx: Dist, teacher: nn.Module | None, base_lr: float
) -> _Loop:
    """Optimiser, loss, mixing, EMA and scaler for ``settings``; the teacher is dropped when alpha is 0."""
    dtype = amp_dtype(settings.amp, ctx.device)
    if settings.drop_path > 0:
        set_drop_path(model, settings.drop_path)
    mixer = None
    criterion: nn.Module = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    if settings.mixing:
        # Mixup produces smoothed soft targets itself, hence the soft-target loss.
        mixer = Mixup(
            mixup_alpha=settings.mixup,
            cutmix_alpha=settings.cutmix,
            label_smoothing=settings.label_smoothing,
            num_classes=model.num_classes,
        )
        criterion = SoftTargetCrossEntropy()
    if teacher is not None and settings.distill_alpha > 0:
        teacher.eval()
    else:
        teacher = None
    return _Loop(
        model=model,
        net=wrap_ddp(model, ctx),
        optimizer=build_optimizer(model, base_lr, settings.weight_decay),
        criterion=criterion,
        settings=settings,
        dtype=dtype,
        mixer=mixer,
        teacher=teacher,
        scaler=grad_scaler(dtype, ctx.device),
        ema=ModelEmaV3(model, decay=settings.ema_decay) if settings.ema_decay is not None else None,
    )


def _state(obj: nn.Module | torch.amp.GradScaler | None) -> dict[str, Any] | None:
    return None if obj is None else obj.state_dict()


def _save(loop: _Loop, path: Path, epoch: int, ctx: Dist) -> None:
    """Rank 0 writes; the barrier keeps other ranks from racing ahead of a file they may read on resume."""
    if ctx.is_main:
        state = {
            "epoch": epoch,
            "model": loop.model.state_dict(),
            "optimizer": loop.optimizer.state_dict(),
            "ema": _state(loop.ema),
            "scaler": _state(loop.scaler),
        }
        save_checkpoint(path, state)
    barrier(ctx)


def _restore(loop: _Loop, path: Path, ctx: Dist) -> int:
    """Load a checkpoint written by :func:`_save` into the loop; returns the number of epochs it holds."""
    state = load_checkpoint(path, map_location=ctx.device)
    missing = _CHECKPOINT_KEYS - state.keys()
    if missing:
        raise CheckpointError(f"{path}: not a training checkpoint (missing {sorted(missing)})")
    loop.model.load_state_dict(state["model"])
    loop.optimizer.load_state_dict(state["optimizer"])
    for obj, key in ((loop.ema, "ema"), (loop.scaler, "scaler")):
        if obj is not None and state.get(key) is not None:
            obj.load_state_dict(state[key])
    return int(state["epoch"])


def _steps_per_epoch(loader: DataLoader, accum: int, cap: int | None) -> int:
    """Optimiser steps per epoch: full groups of ``accum`` loader batches, at most ``cap``."""
    steps = len(loader) // accum if cap is None else min(len(loader) // accum, cap)
    if steps < 1:
        raise OfbError("train loader yields no optimiser step (fewer images than the batch, with drop_last?)")
    return steps


def _grouped(loader: DataLoader, accum: int, steps: int, device: torch.device) -> Iterator[list[tuple[Tensor, Tensor]]]:
    """``steps`` lists of ``accum`` batches each, on ``device``."""
    batches = ((x.to(device, non_blocking=True), y.to(device, non_blocking=True))
               for x, y in islice(loader, steps * accum))
    while group := list(islice(batches, accum)):
        yield group


def _run_epoch(
    loop: _Loop, loader: DataLoader, ctx: Dist, first_step: int, steps: int, lr_at: Callable[[int], float], bar: tqdm
) -> tuple[float, int]:
    """Train ``steps`` optimiser steps; returns the mean loss and the number of images, over all ranks."""
    loss_sum = torch.zeros((), device=ctx.device)
    images = 0
    for i, group in enumerate(_grouped(loader, loop.settings.accum_steps, steps, ctx.device)):
        lr = lr_at(first_step + i)
        loss = loop.step(group, lr)
        loss_sum += loss
        images += sum(len(y) for _, y in group)
        bar.update()
        if not bar.disable and (i % _POSTFIX_EVERY == 0 or i == steps - 1):
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")
    totals = torch.tensor([0.0, steps, images], dtype=torch.float64, device=ctx.device)
    totals[0] = loss_sum
    loss_total, steps_total, images_total = all_reduce_sum(totals, ctx).tolist()
    return loss_total / steps_total, int(images_total)


def train_classifier(
    model: nn.Module,
    train_loader: DataLoader,
    settings: TrainSettings,
    ctx: Dist,
    *,
    teacher: nn.Module | None = None,
    seed: int = 0,
    checkpoint_path: Path | None = None,
    resume: bool = False,
    log: logging.Logger | None = None,
    progress: bool = True,
    stage: str = "train",
) -> TrainResult:
    """Train ``model`` in place (the bare module, already on ``ctx.device``; DDP wrapping happens here).

    With ``ema_decay`` set, ``model`` ends holding the EMA weights, so the caller always evaluates ``model``.
    With ``resume`` and an existing ``checkpoint_path`` training continues after the saved epoch; a finished
    run resumes to a no-op. The teacher, when used, is put in eval mode and never updated.
    """
    log = log or logger
    steps = _steps_per_epoch(train_loader, settings.accum_steps, settings.max_steps_per_epoch)
    global_batch = train_loader.batch_size * ctx.world_size * settings.accum_steps
    base_lr = scaled_lr(settings.lr, global_batch)
    loop = _build_loop(model, settings, ctx, teacher, base_lr)
    if loop.mixer is not None and train_loader.batch_size % 2:
        raise OfbError(f"mixup/cutmix need an even number of images per forward, got {train_loader.batch_size}")
    start = 0
    resumed_from = None
    if resume and checkpoint_path is not None and checkpoint_path.is_file():
        start = resumed_from = _restore(loop, checkpoint_path, ctx)
        log.info("%s: resumed from %s at epoch %d/%d", stage, checkpoint_path, start, settings.epochs)

    def lr_at(step: int) -> float:
        total, warmup = settings.epochs * steps, settings.warmup_epochs * steps
        return warmup_cosine(step, total, warmup, base_lr, settings.min_lr)

    model.train()
    began = time.perf_counter()
    images, last_loss = 0, math.nan
    for epoch in range(start, settings.epochs):
        seed_epoch(seed, epoch, train_loader, ctx.rank)  # also numpy's global RNG, which timm's Mixup draws from
        epoch_began = time.perf_counter()
        show = progress and ctx.is_main
        hide = None if show else True  # None: tqdm draws only on a terminal; a log without one gets no bar
        with tqdm(total=steps, desc=f"{stage} {epoch + 1}/{settings.epochs}", disable=hide, leave=False) as bar:
            last_loss, epoch_images = _run_epoch(loop, train_loader, ctx, epoch * steps, steps, lr_at, bar)
        rate = epoch_images / max(time.perf_counter() - epoch_began, 1e-9)
        lr = lr_at((epoch + 1) * steps - 1)
        images += epoch_images
        if checkpoint_path is not None:
            _save(loop, checkpoint_path, epoch + 1, ctx)
        log.info("%s epoch %d/%d loss %.3f lr %.1e %.0f img/s", stage, epoch + 1, settings.epochs, last_loss, lr, rate)
    if loop.ema is not None:
        model.load_state_dict(loop.ema.module.state_dict())
    seconds = time.perf_counter() - began
    return TrainResult(
        epochs_run=max(0, settings.epochs - start),
        seconds=seconds,
        images_per_second=images / seconds if images else 0.0,
        last_loss=last_loss,
        resumed_from=resumed_from,
        amp=amp_name(loop.dtype),
        global_batch=global_batch,
        accum_steps=settings.accum_steps,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], ctx: Dist, amp: str = "off"
) -> dict[str, float]:
    """Top-1 / top-5 accuracy in percent, mean cross-entropy and image count, summed over all ranks.

    Top-5 is top-min(5, classes). The model's train/eval mode is restored afterwards, so evaluating
    mid-training leaves dropout and friends as they were.
    """
    dtype = amp_dtype(amp, ctx.device)
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=ctx.device)  # top-1 hits, top-5 hits, loss sum, images
    images = 0  # counted on the host: no copy to the device per batch
    for x, y in loader:
        x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        with autocast(dtype, ctx.device):
            logits = model(x).float()
        hits = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == y[:, None]
        loss = F.cross_entropy(logits, y, reduction="sum")
        totals[:3] += torch.stack([hits[:, 0].sum(), hits.any(dim=-1).sum(), loss]).to(totals)
        images += len(y)
    model.train(was_training)
    totals[3] = images
    all_reduce_sum(totals, ctx)
    top1, top5, loss_sum, n = totals.tolist()
    if n == 0:
        raise OfbError("evaluate: the loader yielded no images")
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss_sum / n, "images": int(n)}
