"""Tests for ofbdeploy.train.trainer: learning, exact resume, distillation, mixup, evaluation and DDP."""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import socket
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

import ofbdeploy.models.zoo  # noqa: F401  (registers the ofb_vit_* test models, also in spawned workers)
import ofbdeploy.train.trainer as trainer
from ofbdeploy.errors import OfbError
from ofbdeploy.train.amp import AMP_DTYPES, amp_dtype, grad_scaler, step_all
from ofbdeploy.train.checkpoint import seed_epoch
from ofbdeploy.train.data import DataSpec, build_datasets, build_loader
from ofbdeploy.train.distributed import Dist, init_distributed
from ofbdeploy.train.drop_path import set_drop_path
from ofbdeploy.train.trainer import (
    TrainSettings,
    build_optimizer,
    distillation_loss,
    evaluate,
    train_classifier,
)

CPU = Dist()
QUICK = TrainSettings(
    epochs=1, lr=4e-3, min_lr=1e-5, weight_decay=0.05, warmup_epochs=0, label_smoothing=0.1, max_steps_per_epoch=3
)


def pico(seed: int = 0) -> nn.Module:
    """The smallest registered ViT at 16 px, with weights fixed by ``seed``."""
    torch.manual_seed(seed)
    return timm.create_model("ofb_vit_pico_patch4_32", img_size=16, num_classes=10)


@pytest.fixture(scope="module")
def synthetic() -> tuple[Dataset, Dataset]:
    train, val, _ = build_datasets(DataSpec(kind="synthetic", img_size=16, limit_train=128, limit_val=64))
    return train, val


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_training_lowers_loss_and_beats_chance_on_digits(caplog: pytest.LogCaptureFixture) -> None:
    train, val, classes = build_datasets(DataSpec(kind="digits", img_size=16))
    model = pico()
    val_loader = build_loader(val, batch_size=256, train=False)
    before = evaluate(model, val_loader, CPU)
    settings = replace(QUICK, epochs=6, warmup_epochs=1, max_steps_per_epoch=None)
    with caplog.at_level(logging.INFO, logger="ofbdeploy.train.trainer"):
        result = train_classifier(model, build_loader(train, batch_size=32, train=True), settings, CPU, progress=False)
    after = evaluate(model, val_loader, CPU)
    assert after["loss"] < before["loss"]
    assert after["top1"] > 30.0 > 100 / classes
    assert after["images"] == len(val)
    assert result.epochs_run == 6 and result.resumed_from is None
    assert result.images_per_second > 0 and result.last_loss < 2.2
    assert any(r.getMessage().startswith("train epoch 6/6 loss ") and "img/s" in r.getMessage() for r in caplog.records)


class Interrupted(Exception):
    """Stands in for a crash right after a checkpoint was written."""


def test_resume_midway_matches_uninterrupted_run(
    synthetic: tuple[Dataset, Dataset], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train, _ = synthetic
    loader = build_loader(train, batch_size=16, train=True)
    settings = replace(QUICK, epochs=4, warmup_epochs=1, max_steps_per_epoch=4, ema_decay=0.9, mixup=0.8)
    straight = pico()
    train_classifier(straight, loader, settings, CPU, seed=3, progress=False)

    ckpt = tmp_path / "train.pt"
    real_save = trainer.save_checkpoint

    def save_then_crash(path: Path, state: dict) -> Path:
        written = real_save(path, state)
        if state["epoch"] == 2:
            raise Interrupted
        return written

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_crash)
    with pytest.raises(Interrupted):
        train_classifier(pico(), loader, settings, CPU, seed=3, checkpoint_path=ckpt, progress=False)
    monkeypatch.undo()

    resumed = pico(seed=1)  # different init: everything must come from the checkpoint
    result = train_classifier(resumed, loader, settings, CPU, seed=3, checkpoint_path=ckpt, resume=True, progress=False)
    assert (result.resumed_from, result.epochs_run) == (2, 2)
    assert_same_weights(resumed, straight)

    again = train_classifier(pico(), loader, settings, CPU, seed=3, checkpoint_path=ckpt, resume=True, progress=False)
    assert (again.resumed_from, again.epochs_run) == (4, 0)


def test_resume_without_checkpoint_starts_fresh(synthetic: tuple[Dataset, Dataset], tmp_path: Path) -> None:
    loader = build_loader(synthetic[0], batch_size=16, train=True)
    ckpt = tmp_path / "missing.pt"
    result = train_classifier(pico(), loader, QUICK, CPU, checkpoint_path=ckpt, resume=True, progress=False)
    assert (result.resumed_from, result.epochs_run) == (None, 1)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1


def test_distillation_loss_is_zero_for_matching_logits_and_scaled_kl_otherwise() -> None:
    student, teacher = torch.randn(6, 10), torch.randn(6, 10)
    assert distillation_loss(student, student.clone(), 2.0).item() == 0.0
    p_teacher = F.softmax(teacher / 2.0, dim=-1)
    expected = (p_teacher * (p_teacher.log() - F.log_softmax(student / 2.0, dim=-1))).sum(-1).mean() * 4.0
    assert torch.allclose(distillation_loss(student, teacher, 2.0), expected, atol=1e-6)


def test_distillation_training_runs_with_frozen_eval_teacher(synthetic: tuple[Dataset, Dataset]) -> None:
    loader = build_loader(synthetic[0], batch_size=16, train=True)
    teacher = pico(seed=1)
    frozen = copy.deepcopy(teacher)
    settings = replace(QUICK, distill_alpha=0.5, distill_temperature=2.0)
    result = train_classifier(pico(), loader, settings, CPU, teacher=teacher, progress=True)
    assert result.epochs_run == 1 and torch.isfinite(torch.tensor(result.last_loss))
    assert not teacher.training
    assert_same_weights(teacher, frozen)


def test_mixup_cutmix_training_runs_and_rejects_odd_batches(synthetic: tuple[Dataset, Dataset]) -> None:
    settings = replace(QUICK, mixup=0.8, cutmix=1.0)
    result = train_classifier(
        pico(), build_loader(synthetic[0], batch_size=16, train=True), settings, CPU, progress=False
    )
    assert result.epochs_run == 1 and torch.isfinite(torch.tensor(result.last_loss))
    with pytest.raises(OfbError, match="even number of images"):
        train_classifier(pico(), build_loader(synthetic[0], batch_size=15, train=True), settings, CPU, progress=False)


def test_evaluate_counts_top1_top5_and_restores_mode() -> None:
    logits = torch.arange(10.0).repeat(4, 1)  # class 9 scores highest, then 8, 7, ...
    labels = torch.tensor([9, 7, 0, 9])  # top-1 hit, top-5 hit only, miss, top-1 hit
    model = nn.Identity().train()
    batches = [(logits[:2], labels[:2]), (logits[2:], labels[2:])]
    metrics = evaluate(model, batches, CPU)
    assert metrics["top1"] == 50.0 and metrics["top5"] == 75.0 and metrics["images"] == 4
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits, labels).item())
    assert model.training
    three_way = evaluate(model.eval(), [(torch.eye(3), torch.tensor([0, 2, 2]))], CPU)
    assert three_way["top5"] == 100.0 and three_way["top1"] == pytest.approx(200 / 3)
    assert not model.training


def test_optimizer_spares_norms_biases_and_embeddings_from_weight_decay() -> None:
    model = pico()
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    assert {"pos_embed", "cls_token", "norm.weight", "head.bias", "blocks.0.attn.qkv.bias"} <= undecayed
    assert {"head.weight", "blocks.0.attn.qkv.weight", "patch_embed.proj.weight"} <= decayed
    assert len(undecayed) + len(decayed) == len(names)


def test_amp_applies_on_cpu_too_and_is_validated() -> None:
    assert amp_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert amp_dtype("fp16", torch.device("cpu")) is torch.float16 and amp_dtype("off", torch.device("cpu")) is None
    assert isinstance(grad_scaler(torch.float16, torch.device("cpu")), torch.amp.GradScaler)
    assert grad_scaler(torch.bfloat16, torch.device("cpu")) is None
    with pytest.raises(OfbError, match="amp"):
        amp_dtype("fp8", torch.device("cpu"))


def test_scaled_step_skips_an_optimizer_without_gradients() -> None:
    used, idle = nn.Linear(4, 2), nn.Linear(4, 2)
    optimizers = [torch.optim.AdamW(used.parameters()), torch.optim.AdamW(idle.parameters())]
    scaler = grad_scaler(torch.float16, torch.device("cpu"))
    before = [p.clone() for p in idle.parameters()]
    scaler.scale(used(torch.randn(3, 4)).sum()).backward()
    step_all(optimizers, scaler)  # torch's scaler.step asserts on the idle one
    assert all(torch.equal(a, b) for a, b in zip(before, idle.parameters(), strict=True))
    assert optimizers[0].state and not optimizers[1].state


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_training_under_cpu_autocast(amp: str, synthetic: tuple[Dataset, Dataset]) -> None:
    model, seen = pico(), set()
    model.blocks[0].mlp.fc1.register_forward_hook(lambda _m, _a, out: seen.add(out.dtype))
    result = train_classifier(model, build_loader(synthetic[0], batch_size=16, train=True), replace(QUICK, amp=amp),
                              CPU, progress=False)
    assert seen == {AMP_DTYPES[amp]} and result.amp == amp
    assert math.isfinite(result.last_loss) and all(torch.isfinite(p).all() for p in model.parameters())


def test_accumulating_two_halves_gives_the_full_batch_update(synthetic: tuple[Dataset, Dataset]) -> None:
    """8 images in one step, or 2 x 4 accumulated: the same gradient and so the same update."""
    grads, weights = [], []
    for batch, accum in ((8, 1), (4, 2)):
        model = pico()
        settings = replace(QUICK, max_steps_per_epoch=1, accum_steps=accum)
        result = train_classifier(model, build_loader(synthetic[0], batch_size=batch, train=True), settings, CPU,
                                  progress=False)
        assert result.global_batch == 8
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        weights.append(model.state_dict())
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], rtol=1e-4, atol=1e-7), name
    for name, weight in weights[0].items():
        assert torch.allclose(weight, weights[1][name], atol=1e-5), name


def test_drop_path_grows_linearly_with_depth_and_only_acts_in_training() -> None:
    model, x = pico(), torch.randn(4, 3, 16, 16)
    expected = model.eval()(x)
    set_drop_path(model, 0.3)
    assert isinstance(model.blocks[0].drop_path1, nn.Identity)
    assert [b.drop_path2.drop_prob for b in model.blocks[1:]] == pytest.approx([0.1, 0.2, 0.3])
    assert torch.equal(model.eval()(x), expected)
    assert not torch.equal(model.train()(x), model.train()(x))  # branches dropped at random while training
    set_drop_path(model, 0.0)
    assert all(isinstance(b.drop_path1, nn.Identity) for b in model.blocks)


def test_epoch_seeds_differ_across_ranks_and_repeat_for_a_rank() -> None:
    def draws(rank: int) -> tuple:
        seed_epoch(3, 1, rank=rank)
        return torch.rand(4).tolist(), np.random.rand(2).tolist(), random.random()

    assert draws(0) == draws(0) and draws(1) == draws(1)
    assert all(a != b for a, b in zip(draws(0), draws(1), strict=True))  # masks, mixup and erasing all differ


@pytest.mark.multiprocess
def test_resume_is_exact_with_loader_workers() -> None:
    """An epoch's augmented batches depend on (seed, epoch, rank) only, not on the epochs run before it."""
    train, _, _ = build_datasets(DataSpec(kind="synthetic", img_size=16, limit_train=32, limit_val=8, crop_padding=2,
                                          random_erasing=0.5))
    loader = build_loader(train, batch_size=8, train=True, workers=2, seed=4)

    def epoch(e: int) -> Tensor:
        seed_epoch(4, e, loader)
        return torch.cat([x for x, _ in loader])

    first, second = epoch(0), epoch(1)
    assert not torch.equal(first[:8], second[:8])
    assert torch.equal(epoch(1), second)  # a resumed run starts at epoch 1 in fresh workers


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    """One gloo rank: train one short epoch from a rank-dependent init and save what it ends with."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    try:
        train, val, _ = build_datasets(DataSpec(kind="synthetic", img_size=16, limit_train=64, limit_val=32))
        model = pico(seed=rank)  # DDP must broadcast rank 0's weights
        loader = build_loader(train, batch_size=8, train=True, distributed=True)
        result = train_classifier(model, loader, QUICK, ctx, progress=False)
        metrics = evaluate(model, build_loader(val, batch_size=8, train=False, distributed=True), ctx)
        torch.save({"state": model.state_dict(), "result": asdict(result), "metrics": metrics}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_ddp_two_cpu_ranks_end_identical(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    for name, tensor in ranks[0]["state"].items():
        assert torch.equal(tensor, ranks[1]["state"][name]), name
    initial = pico(seed=0).state_dict()
    assert any(not torch.equal(initial[n], t) for n, t in ranks[0]["state"].items())
    for out in ranks:
        assert out["result"]["epochs_run"] == 1
        assert out["metrics"]["images"] == 32
    assert ranks[0]["metrics"] == ranks[1]["metrics"]


def test_empty_loader_is_an_error(synthetic: tuple[Dataset, Dataset]) -> None:
    with pytest.raises(OfbError, match="no optimiser step"):
        train_classifier(pico(), build_loader(synthetic[0], batch_size=1000, train=True), QUICK, CPU, progress=False)
    with pytest.raises(OfbError, match="no images"):
        evaluate(pico(), [], CPU)
