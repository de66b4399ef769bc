"""The OFB search loop: losses, PMIM, budget, resume and DDP."""

import copy
import logging
import math
import os
import socket
from pathlib import Path

import pytest
import timm
import torch
import torch.multiprocessing as mp

import ofbdeploy.models.zoo  # noqa: F401  (spawned DDP workers need the registry too)
from ofbdeploy.arch import ArchSpec, arch_to_dict
from ofbdeploy.errors import OfbError
from ofbdeploy.families import arch_from_dict
from ofbdeploy.families.vit.searchable import SearchableViT
from ofbdeploy.models.materialize import materialize
from ofbdeploy.prune.budget import _next_wider, enforce_budget, fill_budget, macs_cost
from ofbdeploy.prune.ofb.engine import Search, run_search
from ofbdeploy.recipe import SearchCfg
from ofbdeploy.search.groups import VectorGroup
from ofbdeploy.search.losses import flops_loss, onehot_loss
from ofbdeploy.search.pmim import LOCAL_WINDOW, local_normalise, random_token_mask, reconstruction_loss
from ofbdeploy.train.amp import AMP_DTYPES
from ofbdeploy.train.data import DataSpec, build_datasets, build_loader
from ofbdeploy.train.distributed import Dist, init_distributed


def _model(seed: int = 0) -> SearchableViT:
    torch.manual_seed(seed)
    vit = timm.create_model("ofb_vit_pico_patch4_32", img_size=16, num_classes=10)
    return SearchableViT(vit, model_name="ofb_vit_pico_patch4_32")


def _loader(distributed: bool = False, batch: int = 32, images: int = 256):
    train, _, _ = build_datasets(DataSpec(kind="synthetic", img_size=16, limit_train=images, limit_val=32))
    return build_loader(train, batch_size=batch, train=True, seed=0, distributed=distributed)


def _cfg(**kwargs) -> SearchCfg:
    settings = {"target_flops_ratio": 0.5, "epochs": 4, "warmup_epochs": 1, "lr": 1e-3, "arch_lr": 0.5,
                "loss_weights": {"flops": 50.0}}
    settings.update(kwargs)
    return SearchCfg(**settings)


def test_onehot_loss_prefers_decided_distributions():
    group = VectorGroup("mlp", 16, (4, 8, 12, 16), l1=0.0)
    with torch.no_grad():
        group.alpha.fill_(0.0)
    uniform = float(onehot_loss(group).detach())
    with torch.no_grad():
        group.alpha.copy_(torch.tensor([6.0, 0.0, 0.0, 0.0]))
    sharp = float(onehot_loss(group).detach())
    assert uniform > 100 and sharp < uniform
    probs = torch.softmax(group.alpha.detach(), 0)
    v = float(((probs - 0.25) ** 2).sum() / 0.75)
    entropy = float(-(probs * probs.log()).sum())
    assert sharp == pytest.approx(entropy + math.tan(math.pi / 2 - math.pi * v) / 4, rel=1e-4)
    group.alive[1:] = False
    group.mark_decided()
    assert float(onehot_loss(group)) == 0.0


def test_flops_loss_is_zero_at_target_and_grows_quadratically():
    dense = 100.0
    assert float(flops_loss(torch.tensor(50.0), 50.0, dense)) == 0.0
    assert float(flops_loss(torch.tensor(70.0), 50.0, dense)) == pytest.approx(4 * float(flops_loss(torch.tensor(60.0),
                                                                                                    50.0, dense)))


def test_token_mask_hides_the_scheduled_share():
    mask = random_token_mask(8, 16, keep_ratio=0.75, device=torch.device("cpu"))
    assert mask.shape == (8, 16) and mask.sum(dim=1).tolist() == [4] * 8
    assert not random_token_mask(2, 16, 1.0, torch.device("cpu")).any()


def test_reconstruction_loss_counts_hidden_patches_only():
    images = torch.randn(2, 3, 8, 8)
    patches = torch.nn.functional.unfold(images, 4, stride=4).transpose(1, 2)
    normalised = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6).sqrt()
    perfect = torch.nn.functional.fold(normalised.transpose(1, 2), (8, 8), 4, stride=4)
    mask = torch.tensor([[True, False, False, True], [False, True, False, False]])
    assert float(reconstruction_loss(images, perfect, mask, 4, "patch")) == pytest.approx(0.0, abs=1e-5)
    wrong_visible = perfect.clone()
    wrong_visible[:, :, 0:4, 4:8] += 5.0  # patch 1 is visible in image 0, hidden in image 1
    assert float(reconstruction_loss(images, wrong_visible, mask, 4, "patch")) == pytest.approx(5.0 / 3, rel=1e-4)


def _windowed(images, window):
    """The local target by its definition, pixel by pixel (slow; small images only)."""
    half, out = window // 2, torch.empty_like(images)
    for i in range(images.shape[2]):
        for j in range(images.shape[3]):
            win = images[:, :, max(0, i - half): i + half + 1, max(0, j - half): j + half + 1].flatten(2)
            out[:, :, i, j] = (images[:, :, i, j] - win.mean(-1)) / (win.var(-1).clamp_min(0) + 1e-6).sqrt()
    return out


def test_local_target_matches_its_definition_and_is_the_default():
    images = torch.randn(2, 3, 12, 12) * 2 + 3
    for window in (5, LOCAL_WINDOW):  # clipped by the border everywhere with 47 on 12 px
        assert torch.allclose(local_normalise(images, window), _windowed(images, window), atol=1e-5)
    assert SearchCfg(target_flops_ratio=0.5).pmim.target == "local"
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[:, 4] = True
    perfect = local_normalise(images)
    assert float(reconstruction_loss(images, perfect, mask, 4)) == pytest.approx(0.0, abs=1e-5)
    off = perfect.clone()
    off[:, 1, 4:8, 4:8] += 3.0  # the hidden patch, one channel of three
    assert float(reconstruction_loss(images, off, mask, 4)) == pytest.approx(1.0, rel=1e-4)


def test_search_decides_and_meets_the_budget():
    model = _model()
    result = run_search(model, _loader(), _cfg(), Dist(), progress=False)
    assert model.all_decided
    assert result.achieved_macs <= result.target_macs
    assert result.achieved_macs == model.arch_spec().macs()
    assert result.target_macs == pytest.approx(0.5 * ArchSpec.dense(model.shape).macs())
    materialize(model)  # decided -> materialisable


def test_a_widest_start_keeps_the_dense_function_and_the_search_still_meets_the_budget(monkeypatch):
    torch.manual_seed(0)
    vit = timm.create_model("ofb_vit_pico_patch4_32", img_size=16, num_classes=10)
    dense = copy.deepcopy(vit).eval()  # before wrapping: the wrapper hooks the qkv and fc1 layers
    model = SearchableViT(vit, model_name="ofb_vit_pico_patch4_32")
    images = torch.randn(4, 3, 16, 16)
    model.eval().set_mix(0.1)  # a search without warm-up starts at the final mixing weight
    with torch.no_grad():
        reference = dense(images)
        uniform_gap = float((model(images) - reference).abs().max())
        model.start_logits_("random", 8.0)
        widest_gap = float((model(images) - reference).abs().max())
    assert widest_gap < 0.1 * uniform_gap
    calls = []
    original = SearchableViT.start_logits_
    monkeypatch.setattr(SearchableViT, "start_logits_", lambda self, init, widest: (calls.append((init, widest)),
                                                                                   original(self, init, widest)))
    model = _model()
    result = run_search(model, _loader(), _cfg(widest_logit=4.0), Dist(), progress=False)
    assert calls == [("random", 4.0)] and model.all_decided and result.achieved_macs <= result.target_macs


def test_a_zero_logit_start_leaves_the_direction_to_the_task_and_budget_losses():
    """Equal logits: the one-hot loss has no gradient at step 0 (the drawn start gives it the largest)."""
    model = _model()
    model.start_logits_("zeros")
    groups = [group for _, group in model.groups()]
    assert all(bool((g.alpha == 0).all()) for g in groups)
    onehot = sum(onehot_loss(g) for g in groups)
    grads = torch.autograd.grad(onehot, [g.alpha for g in groups], allow_unused=True)
    assert all(gr is None or float(gr.abs().max()) < 1e-6 for gr in grads)
    drawn = _model()
    onehot = sum(onehot_loss(g) for _, g in drawn.groups())
    grads = torch.autograd.grad(onehot, [g.alpha for _, g in drawn.groups()])
    assert max(float(gr.abs().max()) for gr in grads) > 1.0
    # and the search run with it from a recipe still decides every group within the budget
    model = _model()
    result = run_search(model, _loader(), _cfg(logit_init="zeros"), Dist(), progress=False)
    assert model.all_decided and result.achieved_macs <= result.target_macs
    with pytest.raises(ValueError, match="logit init"):
        model.start_logits_("ones")


def test_impossible_budget_is_refused_before_training():
    with pytest.raises(OfbError, match="cannot be met: the smallest architecture"):
        run_search(_model(), _loader(), _cfg(target_flops_ratio=0.01), Dist(), progress=False)


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_search_under_cpu_autocast_cuts_decides_and_meets_the_budget(amp):
    model, seen = _model(), set()
    model.vit.blocks[0].mlp.fc1.register_forward_hook(lambda _m, _a, out: seen.add(out.dtype))
    result = run_search(model, _loader(), _cfg(epochs=3, shrink_threshold=0.9), Dist(), amp=amp, progress=False)
    assert seen == {AMP_DTYPES[amp]} and result.amp == amp  # autocast really ran, and is recorded
    assert result.cut_steps and min(result.cut_steps) < result.steps_run - 1  # cut while training in half precision
    assert model.all_decided and result.achieved_macs <= result.target_macs  # epoch losses were finite (else raise)


def test_budget_and_onehot_losses_are_fp32_under_fp16_autocast():
    model = _model()
    search = Search(model, _loader(), _cfg(), Dist(), 0, "fp16", logging.getLogger("test"), None)
    plain = search.regulariser()
    with torch.autocast("cpu", dtype=torch.float16):
        naive = model.embed_group.probs() @ model.embed_group.keeps()[0] * 1e5  # the old route: overflows
        under = search.regulariser()
    assert naive.dtype == torch.float16 and not torch.isfinite(naive).all()
    for a, b in zip(plain, under, strict=True):
        assert b.dtype == torch.float32 and torch.isfinite(b) and torch.allclose(a, b)


def test_a_step_with_pmim_on_hides_patches_and_trains_the_decoder():
    model = _model()
    search = Search(model, _loader(), _cfg(pmim={"enabled": True}), Dist(), 0, "off", logging.getLogger("test"),
                    None)
    keep = search.schedules(search.warmup_steps)  # after the warm-up: a quarter of the patches hidden
    assert keep == pytest.approx(0.75)
    images, labels = next(iter(_loader()))
    task, pmim, _, _ = search.step([(images, labels)], keep).tolist()
    assert task > 0 and pmim > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())


def test_fp16_step_with_pmim_off_skips_the_decoder_that_got_no_gradient():
    model = _model()
    search = Search(model, _loader(), _cfg(pmim={"enabled": False}), Dist(), 0, "fp16", logging.getLogger("test"),
                    None)
    decoder = [p.clone() for p in model.decoder.parameters()]
    images, labels = next(iter(_loader()))
    losses = search.step([(images, labels)], search.schedules(0))  # a scaler asserted on the idle decoder
    assert torch.isfinite(losses).all() and all(p.grad is None for p in model.decoder.parameters())
    assert all(torch.equal(a, b) for a, b in zip(decoder, model.decoder.parameters(), strict=True))


def test_search_step_accumulating_two_halves_equals_the_full_batch():
    images, labels = next(iter(_loader(batch=8)))
    grads = []
    for batches, accum in (([(images, labels)], 1), ([(images[:4], labels[:4]), (images[4:], labels[4:])], 2)):
        model = _model()
        search = Search(model, _loader(batch=8 // accum), _cfg(pmim={"enabled": False}), Dist(), 0, "off",
                        logging.getLogger("test"), None, accum_steps=accum)
        assert search.global_batch == 8
        search.step(batches, search.schedules(3))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], rtol=1e-4, atol=1e-7), name


def test_enforce_budget_narrows_until_under_target():
    model = _model()
    model.decide_widest()
    dense = ArchSpec.dense(model.shape).macs()
    steps = enforce_budget(model, 0.6 * dense)
    assert steps and model.arch_spec().macs() <= 0.6 * dense
    assert all(group.is_decided for _, group in model.groups())


def _narrowest_picks(model: SearchableViT) -> dict[str, int]:
    return {name: min(range(len(g.cells)), key=lambda k: int(torch.prod(g.cells[k]))) for name, g in model.groups()}


def _picked_macs(model: SearchableViT, picks: dict[str, int]) -> float:
    groups = dict(model.groups())
    return macs_cost(model.shape)({name: tuple(int(w) for w in groups[name].cells[cell])
                                   for name, cell in picks.items()})


def test_fill_budget_widens_forced_picks_by_importance_up_to_the_budget():
    model = _model()
    with torch.no_grad():  # one MLP much more important than another of the same cost
        dict(model.groups())["blocks.0.mlp"].score.fill_(5.0)
        dict(model.groups())["blocks.1.mlp"].score.fill_(-5.0)
    target = 0.5 * ArchSpec.dense(model.shape).macs()
    picks = _narrowest_picks(model)
    filled = fill_budget(model, picks, [(macs_cost(model.shape), target)])
    assert _picked_macs(model, picks) < _picked_macs(model, filled) <= target
    groups = dict(model.groups())
    for name, cell in filled.items():  # maximal: no single further step fits
        for wider in _next_wider(groups[name], cell):
            assert _picked_macs(model, {**filled, name: wider}) > target
    mlp = {name: int(groups[name].cells[filled[name]][0]) for name in ("blocks.0.mlp", "blocks.1.mlp")}
    assert mlp["blocks.0.mlp"] > mlp["blocks.1.mlp"], mlp


def test_fill_budget_leaves_picks_over_budget_to_the_enforcement():
    model = _model()
    widest = {name: g.widest_cell() for name, g in model.groups()}
    budget = [(macs_cost(model.shape), 0.5 * ArchSpec.dense(model.shape).macs())]
    assert fill_budget(model, widest, budget) == widest


def test_a_search_out_of_epochs_fills_its_forced_decisions_toward_the_budget(caplog):
    achieved = {}
    for fill in (False, True):
        model = _model()
        cfg = _cfg(epochs=1, warmup_epochs=0, arch_lr=1e-4, shrink_threshold=0.01, fill_budget=fill)
        with caplog.at_level(logging.INFO, logger="ofbdeploy"):
            result = run_search(model, _loader(), cfg, Dist(), seed=0, progress=False)
        assert result.forced_groups  # the event under test: the epochs ran out before the groups decided
        assert result.achieved_macs <= result.target_macs
        achieved[fill] = result.achieved_macs
    assert achieved[True] > achieved[False], achieved
    assert "toward the budget by importance" in caplog.text


class _KilledLoader:
    """A loader that dies part-way through a given epoch, like a process killed mid-run."""

    def __init__(self, loader, die_in_epoch: int, after_batches: int) -> None:
        self.loader, self.die_in_epoch, self.after = loader, die_in_epoch, after_batches
        self.epoch = -1

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.epoch += 1
        for i, batch in enumerate(self.loader):
            if self.epoch == self.die_in_epoch and i == self.after:
                raise KeyboardInterrupt("killed")
            yield batch


def test_resume_reaches_the_same_result_as_an_uninterrupted_run(tmp_path):
    cfg = _cfg(epochs=5, arch_lr=0.1)  # slower decisions: the stop falls mid-search
    straight = _model()
    run_search(straight, _loader(), cfg, Dist(), seed=3, checkpoint_path=tmp_path / "a.ckpt", progress=False)

    stopped = _model()
    with pytest.raises(KeyboardInterrupt):
        run_search(stopped, _KilledLoader(_loader(), die_in_epoch=2, after_batches=3), cfg, Dist(), seed=3,
                   checkpoint_path=tmp_path / "b.ckpt", progress=False)
    resumed = _model()
    result = run_search(resumed, _loader(), cfg, Dist(), seed=3, checkpoint_path=tmp_path / "b.ckpt", resume=True,
                        progress=False)
    assert result.resumed_from == 2
    assert resumed.arch_spec() == straight.arch_spec()
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_CFG = {"epochs": 4, "shrink_threshold": 0.9}  # cells die from the first shrinks: layers are cut mid-training
DDP_RUN = {"seed": 5, "progress": False, "accum_steps": 2}  # 2 processes x 2 accumulated batches of 8


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    """Each rank runs a search straight through, one killed in its third epoch, and that one resumed."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    cfg, found = _cfg(**DDP_CFG), {}
    try:
        straight = _model()
        result = run_search(straight, _loader(distributed=True, batch=8, images=128), cfg, ctx, **DDP_RUN,
                            checkpoint_path=Path(out) / "straight.ckpt")
        found["straight"] = {"arch": arch_to_dict(straight.arch_spec()), "state": straight.state_dict(),
                             "cut_steps": result.cut_steps, "steps_run": result.steps_run,
                             "ddp_builds": result.ddp_builds, "global_batch": result.global_batch}
        try:
            killed = _KilledLoader(_loader(distributed=True, batch=8, images=128), die_in_epoch=2, after_batches=3)
            run_search(_model(), killed, cfg, ctx, **DDP_RUN, checkpoint_path=Path(out) / "stopped.ckpt")
        except KeyboardInterrupt:
            found["stopped_arch"] = torch.load(Path(out) / "stopped.ckpt", weights_only=True)["arch"]
        resumed = _model()
        result = run_search(resumed, _loader(distributed=True, batch=8, images=128), cfg, ctx, **DDP_RUN,
                            checkpoint_path=Path(out) / "stopped.ckpt", resume=True)
        found["resumed"] = {"arch": arch_to_dict(resumed.arch_spec()), "state": resumed.state_dict(),
                            "resumed_from": result.resumed_from}
        torch.save(found, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> list[dict]:
    """Two gloo processes on the CPU: a straight search, a killed one and its resumption, per rank."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.multiprocess
def test_ddp_search_cuts_layers_mid_training_and_ranks_stay_identical(ddp_runs):
    r0, r1 = (r["straight"] for r in ddp_runs)
    assert r0["cut_steps"] and min(r0["cut_steps"]) < r0["steps_run"] - 1  # steps trained after a physical cut
    assert r0["ddp_builds"] > 1 and r0["global_batch"] == 32  # rebuilt around the cut model; accumulating
    assert r0["steps_run"] > 4  # more than one epoch of 4 steps: the search went on training after its cuts
    assert r0["arch"] == r1["arch"] and _same_state(r0["state"], r1["state"])
    spec = arch_from_dict(r0["arch"])
    assert spec.macs() <= 0.5 * ArchSpec.dense(spec.base).macs()


@pytest.mark.multiprocess
def test_ddp_search_killed_after_a_cut_resumes_to_the_uninterrupted_result(ddp_runs):
    for rank in ddp_runs:
        stopped = arch_from_dict(rank["stopped_arch"])
        assert stopped != ArchSpec.dense(stopped.base)  # the checkpoint it resumed from was already cut
        assert rank["resumed"]["resumed_from"] == 2
        assert rank["resumed"]["arch"] == rank["straight"]["arch"]
        assert _same_state(rank["resumed"]["state"], rank["straight"]["state"])
