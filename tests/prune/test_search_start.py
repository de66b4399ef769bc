"""Issue 21: the search's warm-up in steps, the scores' own learning rate, the informed start (magnitude scores,
logit bias), distillation during the search, and the decision diagnostic."""

import logging
from pathlib import Path

import pytest
import timm
import torch

import ofbdeploy.models.zoo  # noqa: F401  (the ofb_vit_* configs)
from ofbdeploy.arch import ArchSpec
from ofbdeploy.errors import OfbError
from ofbdeploy.families import family_of, read_shape
from ofbdeploy.families.vit.searchable import SearchableViT
from ofbdeploy.prune.method import Job
from ofbdeploy.prune.ofb.diagnostic import decision_diagnostic, spearman, summary
from ofbdeploy.prune.ofb.engine import Search, _role, build_optimizers, decide, run_search
from ofbdeploy.prune.ofb.start import SCORE_STD, allocation, bias_logits_, magnitude_scores_, nearest_cell
from ofbdeploy.recipe import SearchCfg, load_recipe
from ofbdeploy.train.data import DataSpec, build_datasets, build_loader
from ofbdeploy.train.distributed import Dist
from ofbdeploy.train.schedule import scaled_lr

NAME = "ofb_vit_pico_patch4_32"  # 64 channels, 4 blocks of 4 heads x 16, MLP 256
SWIN = "ofb_swin_pico_patch2_32"


def _vit(seed: int = 0):
    torch.manual_seed(seed)
    return timm.create_model(NAME, img_size=16, num_classes=10)


def _model(seed: int = 0) -> SearchableViT:
    return SearchableViT(_vit(seed), model_name=NAME)


def _loader(batch: int = 32, images: int = 256):
    train, _, _ = build_datasets(DataSpec(kind="synthetic", img_size=16, limit_train=images, limit_val=32))
    return build_loader(train, batch_size=batch, train=True, seed=0)


def _cfg(**kwargs) -> SearchCfg:
    settings = {"target_flops_ratio": 0.5, "epochs": 2, "lr": 1e-3, "arch_lr": 0.5, "loss_weights": {"flops": 50.0}}
    settings.update(kwargs)
    return SearchCfg(**settings)


def _search(cfg: SearchCfg, model: SearchableViT | None = None, **kwargs) -> Search:
    return Search(model or _model(), _loader(), cfg, Dist(), 0, "off", logging.getLogger("test"), None, **kwargs)


# -- 1. warm-up in steps ---------------------------------------------------------------------------------
def test_a_one_epoch_search_warms_up_over_a_fifth_of_its_steps_and_ramps_the_mixing_weight(caplog):
    search = _search(_cfg(epochs=1, pmim={"enabled": True}))
    assert search.steps == 8 and search.warmup_steps == 2  # round(0.2 x 8); the old default gave 0 // 5 = 0
    mixes, keeps, lrs = [], [], []
    for it in range(4):
        keeps.append(search.schedules(it))
        mixes.append(float(next(g for _, g in search.model.groups()).mix))
        lrs.append(search.optimizers["weights"].param_groups[0]["lr"])
    assert mixes[0] == pytest.approx(0.99) and 0.1 < mixes[1] < 0.99 and mixes[2] == pytest.approx(0.1)
    assert keeps[0] == pytest.approx(0.95) and 0.75 < keeps[1] < 0.95 and keeps[2] == pytest.approx(0.75)
    assert lrs[0] < lrs[1] < lrs[2]  # linear warm-up to the peak, then the cosine
    assert _search(_cfg(epochs=1)).schedules(1) == 1.0  # PMIM off (the default): nothing hidden
    # the paper's per-epoch form wins when a recipe gives it, 0 included
    assert _search(_cfg(epochs=2, warmup_epochs=1)).warmup_steps == 8
    assert _search(_cfg(epochs=1, warmup_epochs=0)).warmup_steps == 0
    with caplog.at_level(logging.INFO):
        run_search(_model(), _loader(), _cfg(epochs=1), Dist(), progress=False, log=logging.getLogger("t"))
    assert "search warm-up: 2 of 8 optimiser steps" in caplog.text


def test_new_keys_at_their_defaults_leave_the_recorded_section_as_it_was():
    """Stage digests and resume records compare plain dumps: keys added now stay out while at their default."""
    dumped = _cfg(warmup_epochs=1).model_dump(mode="json")
    assert not {"warmup_fraction", "score_lr", "init", "logit_bias", "distill"} & set(dumped)
    changed = _cfg(score_lr=1e-3, init="magnitude", distill={"enabled": True}).model_dump(mode="json")
    assert changed["score_lr"] == 1e-3 and changed["init"] == "magnitude" and changed["distill"]["enabled"]
    resolved = _cfg().model_dump(mode="json", context={"resolved": True})
    assert resolved["warmup_fraction"] == 0.2 and resolved["distill"] == {"enabled": False, "temperature": 1.0,
                                                                          "alpha": 0.5}


# -- 2. the scores' own group -----------------------------------------------------------------------------
def test_importance_scores_have_their_own_group_rate_and_no_decay():
    model = _model()
    cfg = _cfg(lr=1e-3, arch_lr=0.5)
    weights = build_optimizers(model, cfg, global_batch=64)["weights"]
    scores = {id(g.score) for _, g in model.groups()}
    assert len(weights.param_groups) == 3
    assert {id(p) for p in weights.param_groups[2]["params"]} == scores
    assert not scores & {id(p) for g in weights.param_groups[:2] for p in g["params"]}
    assert weights.param_groups[2]["weight_decay"] == 0.0
    assert weights.param_groups[2]["lr"] == pytest.approx(scaled_lr(0.5, 64))  # default: arch_lr (1:1)
    assert weights.param_groups[0]["lr"] == pytest.approx(scaled_lr(1e-3, 64))
    search = _search(_cfg(lr=1e-3, score_lr=0.02))
    search.schedules(search.warmup_steps)  # the peak: every group at its own base rate
    groups = search.optimizers["weights"].param_groups
    assert groups[2]["lr"] / groups[0]["lr"] == pytest.approx(20.0)
    assert cfg.learning_rates() == {"search weights": 1e-3, "search scores": 0.5, "search arch": 0.5,
                                    "search decoder": cfg.decoder_lr}


def test_a_checkpoint_from_before_the_scores_group_resumes_with_its_moments(tmp_path):
    """Checkpoints written with two weight groups (the scores among the undecayed) still load."""
    model = _model()
    named = list(model.named_parameters())
    old_decay = [p for n, p in named if _role(n, p) == "decay"]
    old_rest = [p for n, p in named if _role(n, p) in ("no_decay", "scores")]
    old = torch.optim.AdamW([{"params": old_decay, "weight_decay": 1e-3}, {"params": old_rest, "weight_decay": 0.0}])
    for p in old_decay + old_rest:
        p.grad = torch.randn_like(p)
    old.step()
    search = _search(_cfg(), model)
    state = search.state(1)
    state["optimizers"]["weights"] = old.state_dict()
    resumed = _search(_cfg(), _model())
    resumed.restore(state)
    new_state = resumed.optimizers["weights"].state
    for (name, p_old), (_, p_new) in zip(named, resumed.model.named_parameters(), strict=True):
        if _role(name, p_old) in ("decay", "no_decay", "scores"):
            assert torch.equal(new_state[p_new]["exp_avg"], old.state[p_old]["exp_avg"]), name
    assert [len(g["params"]) for g in resumed.optimizers["weights"].param_groups] == [
        len(old_decay), len(old_rest) - len(list(model.groups())), len(list(model.groups()))]


# -- 3. the informed start ---------------------------------------------------------------------------------
@torch.no_grad()
def _known_magnitudes() -> SearchableViT:
    """Block 0's units with magnitudes known by construction, every other weight zero."""
    vit = _vit()
    for p in vit.parameters():
        p.zero_()
    block = vit.blocks[0]
    mlp_order = torch.randperm(256)
    block.mlp.fc2.weight.copy_((mlp_order.float() + 1)[None, :].expand(64, -1) / 100)  # fc2 columns only
    qkv = block.attn.qkv.weight  # rows: q (64), k (64), v (64); head h owns rows 16h..16h+15 of each
    head_size = torch.tensor([3.0, 1.0, 4.0, 2.0])  # head 2 biggest, then 0, 3, 1
    within = torch.arange(16).flip(0).float() + 1  # channel 0 biggest in every head
    qkv[128:].copy_((head_size[:, None] * within[None, :]).reshape(64, 1).expand(-1, 64) / 100)  # v rows only
    block.attn.proj.weight[:, 5] = 0.5  # and a proj column: channel 5 of head 0 becomes its biggest (head 0 stays 2nd)
    vit.patch_embed.proj.weight.copy_(torch.arange(64).float().reshape(64, 1, 1, 1).expand_as(
        vit.patch_embed.proj.weight) / 100)
    return SearchableViT(vit, model_name=NAME)


def test_magnitude_start_ranks_units_by_their_coupled_weights_with_the_random_spread():
    model = _known_magnitudes()
    magnitude_scores_(model)
    groups = dict(model.groups())
    mlp = groups["blocks.0.mlp"].score
    column = model.vit.blocks[0].mlp.fc2.weight[0]  # fc2 column j carries one distinct value, in every row
    assert torch.equal(torch.argsort(mlp), torch.argsort(column))
    assert float(mlp.detach().std(unbiased=False)) == pytest.approx(SCORE_STD, rel=1e-4)
    attn = groups["blocks.0.attn"].score
    head_rank = torch.argsort(torch.sigmoid(attn).sum(dim=1), descending=True)
    assert head_rank.tolist() == [2, 0, 3, 1]  # the bi-mask's head order is the magnitude order
    assert int(torch.argmax(attn[0])) == 5  # the proj column counts with the v row
    assert torch.equal(torch.argsort(attn[1], descending=True), torch.arange(16))  # channel 0 first, then 1, ...
    embed = groups["embedding"].score
    assert torch.equal(torch.argsort(embed), torch.arange(64))  # stem filter e carries e / 100
    assert float(embed.detach().mean()) == pytest.approx(0.0, abs=1e-6)


def test_logit_bias_moves_each_groups_argmax_to_the_cell_of_a_global_allocation_at_the_target():
    model = _model()
    with torch.no_grad():  # block 1's MLP carries almost nothing: the allocation takes it first
        model.vit.blocks[1].mlp.fc1.weight.mul_(0.01)
        model.vit.blocks[1].mlp.fc2.weight.mul_(0.01)
    target = 0.6 * ArchSpec.dense(model.shape).macs()
    units = allocation(model, target)
    s = model.shape
    at = s.macs_at([units["embedding"]], [units[f"blocks.{i}.attn"] for i in range(4)],
                   [units[f"blocks.{i}.mlp"] for i in range(4)])
    assert at <= target and at > 0.59 * ArchSpec.dense(model.shape).macs()  # fills the budget, unit by unit
    assert units["blocks.1.mlp"] < min(units[f"blocks.{i}.mlp"] for i in (0, 2, 3))
    before = {name: int(torch.argmax(g.alpha)) for name, g in model.groups()}
    cells = bias_logits_(model, target, 1.0)
    groups = dict(model.groups())
    assert all(int(torch.argmax(groups[name].alpha)) == cell for name, cell in cells.items())
    assert any(before[name] != cell for name, cell in cells.items())
    assert cells["blocks.1.mlp"] == nearest_cell(groups["blocks.1.mlp"], units["blocks.1.mlp"])
    with pytest.raises(ValueError, match="logit_bias allocates at the FLOPs target"):
        SearchCfg(latency={"target_ratio": 0.5}, logit_bias=1.0)


def test_a_search_from_the_informed_start_logs_it_and_meets_the_budget(caplog):
    model = _model()
    with caplog.at_level(logging.INFO):
        result = run_search(model, _loader(), _cfg(init="magnitude", logit_bias=1.0), Dist(), progress=False,
                            log=logging.getLogger("t"))
    assert "importance scores from the dense weights' coupled magnitudes" in caplog.text
    assert "logits biased by 1 toward the magnitude allocation" in caplog.text
    assert model.all_decided and result.achieved_macs <= result.target_macs


# -- 4. distillation during the search ---------------------------------------------------------------------
def _grads(search: Search, images, labels) -> list[torch.Tensor]:
    torch.manual_seed(1)  # the same PMIM mask for every call
    search.model.zero_grad(set_to_none=True)
    _, _, loss = search.micro_loss(images, labels, keep=0.8)
    loss.backward()
    return [p.grad.clone() for p in search.model.vit.head.parameters()]


def test_search_distillation_blends_the_teachers_soft_labels_into_the_task_loss():
    images, labels = next(iter(_loader()))
    teacher = _vit(seed=7).eval()
    plain = _grads(_search(_cfg()), images, labels)
    distilled = _search(_cfg(distill={"enabled": True, "alpha": 0.5, "temperature": 2.0}), teacher=teacher)
    blended = _grads(distilled, images, labels)
    assert any(not torch.allclose(a, b) for a, b in zip(plain, blended, strict=True))
    assert all(p.grad is None for p in teacher.parameters())  # no_grad: the teacher is not trained
    no_weight = _grads(_search(_cfg(distill={"enabled": True, "alpha": 0.0}), teacher=teacher), images, labels)
    assert all(torch.allclose(a, b) for a, b in zip(plain, no_weight, strict=True))
    with pytest.raises(OfbError, match="no teacher"):
        run_search(_model(), _loader(), _cfg(distill={"enabled": True}), Dist(), progress=False)


def test_the_registry_entry_point_takes_the_teacher_from_the_job_when_the_search_distils():
    calls = []

    def teacher():
        calls.append(1)
        return _vit(seed=7).train()

    cfg = _cfg(epochs=1, distill={"enabled": True})
    result = decide(_model(), cfg, Job(teacher=teacher, loader=_loader(), progress=False))
    assert calls == [1] and result.achieved_macs <= result.target_macs
    decide(_model(), _cfg(epochs=1), Job(teacher=teacher, loader=_loader(), progress=False))
    assert calls == [1]  # not built when the search does not distil


# -- 5. the decision diagnostic -----------------------------------------------------------------------------
def test_decision_diagnostic_on_forced_decisions():
    model = _model()
    groups = dict(model.groups())
    start = {name: g.score.detach().clone() for name, g in model.groups()}
    with torch.no_grad():  # the MLP of block 0 reverses its order: it keeps the start's 64 weakest units
        groups["blocks.0.mlp"].score.copy_(-start["blocks.0.mlp"])
    model.force_cell("blocks.0.mlp", 0)  # 64 of 256 units
    model.force_cell("blocks.1.mlp", 0)  # same order as the start
    found = decision_diagnostic(model, start)
    assert found["blocks.0.mlp"]["kept"] == 64 and found["blocks.0.mlp"]["outside_start"] == 1.0
    assert found["blocks.0.mlp"]["spearman"] == pytest.approx(-1.0)
    assert found["blocks.1.mlp"]["outside_start"] == 0.0 and found["blocks.1.mlp"]["spearman"] == pytest.approx(1.0)
    assert found["embedding"]["outside_start"] == 0.0 and found["embedding"]["kept"] == 64  # not cut: all kept
    model.force_cell("blocks.2.attn", 0)  # the heads: the start's own selection, the same scores
    assert found["blocks.2.attn"]["units"] == 64
    assert decision_diagnostic(model, start)["blocks.2.attn"]["outside_start"] == 0.0
    overall = summary(found)
    assert overall["groups"] == 9 and overall["mean_outside_start"] == pytest.approx(1 / 9)
    assert spearman(torch.tensor([1.0]), torch.tensor([2.0])) is None
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 9.0, 4.0])) == pytest.approx(0.5)


def test_the_search_result_records_the_diagnostic_per_group(caplog):
    model = _model()
    with caplog.at_level(logging.INFO):
        result = run_search(model, _loader(), _cfg(), Dist(), progress=False, log=logging.getLogger("t"))
    decisions = result.state["decisions"]
    assert set(decisions) == {name for name, _ in model.groups()}
    assert all(-1.0 <= g["spearman"] <= 1.0 and 0.0 <= g["outside_start"] <= 1.0 for g in decisions.values()
               if g["spearman"] is not None)
    assert result.state["decision_summary"]["groups"] == 9
    assert "start/final score rank correlation" in caplog.text


# -- 6. the paper, one recipe away --------------------------------------------------------------------------
def test_the_paper_exact_recipe_pins_the_published_search():
    search = load_recipe(Path(__file__).parents[2] / "recipes" / "ofb_paper_exact.yaml").search
    assert search.warmup_epochs == 20 and search.epochs == 100
    assert search.scores_lr == search.lr == search.arch_lr
    assert search.init == "random" and search.logit_bias == 0 and not search.distill.enabled
    assert search.logit_init == "random" and search.widest_logit == 0


def test_the_informed_start_covers_swin_stages():
    """Swin: one embedding group per stage, written by the patch embedding or that stage's patch merging."""
    torch.manual_seed(0)
    swin = timm.create_model(SWIN)
    shape = read_shape(swin, SWIN)
    model = family_of(shape).searchable(swin, family_of(shape).space(shape), SWIN)
    with torch.no_grad():  # stage 1's channel 3 written by a merging row 10x the others
        swin.layers[1].downsample.reduction.weight[3].mul_(10.0)
    magnitude_scores_(model)
    groups = dict(model.groups())
    assert int(torch.argmax(groups["stages.1.embedding"].score)) == 3
    assert all(float(g.score.detach().std()) > 0 for _, g in model.groups())
    target = 0.5 * ArchSpec.dense(model.shape).macs()
    cells = bias_logits_(model, target, 1.0)
    assert set(cells) == set(groups) and all(int(torch.argmax(groups[n].alpha)) == k for n, k in cells.items())
