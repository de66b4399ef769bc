"""One-shot baselines: score the units of the dense model, then pick widths under the FLOPs budget.

  l1       units ranked by the L1 magnitude of their weights; widths allocated by the shared budget
           enforcement (every group starts at full width and the cheapest importance per MAC is cut first)
  random   random scores, widths allocated the same way (the floor any importance has to beat)
  uniform  the same width fraction in every group, the widest that fits; units ranked by L1 magnitude

The kept units keep the teacher's weights as they are: the mixing weight is 0, so a decided group's
multipliers are 1 and its scores only rank. Nothing is trained here; the run's finetune does the training.
"""

from __future__ import annotations

import time

import torch

from ofbdeploy.arch import ArchSpec
from ofbdeploy.errors import OfbError
from ofbdeploy.families.vit.searchable import SearchableViT
from ofbdeploy.prune.budget import enforce_budget, macs_cost, resolve_target
from ofbdeploy.prune.config import MethodCfg
from ofbdeploy.prune.method import Job
from ofbdeploy.prune.result import SearchResult
from ofbdeploy.search.groups import MaskGroup


@torch.no_grad()
def l1_scores(model: SearchableViT) -> None:
    """Scores from weight magnitudes: qkv rows per head/channel, fc1 rows, patch-embedding filters."""
    for block, attn, mlp in zip(model.vit.blocks, model.attn_groups, model.mlp_groups, strict=True):
        rows = block.attn.qkv.weight.abs().sum(dim=1).reshape(3, *attn.shape).sum(dim=0)
        attn.score.copy_(rows / rows.mean())
        fc1 = block.mlp.fc1.weight.abs().sum(dim=1)
        mlp.score.copy_(fc1 / fc1.mean())
    stem = model.vit.patch_embed.proj.weight.abs().flatten(1).sum(dim=1)
    model.embed_group.score.copy_(stem / stem.mean())


@torch.no_grad()
def random_scores(model: SearchableViT) -> None:
    """Scores drawn from the global generator (the run seeds it at the start of every stage)."""
    for _, group in model.groups():
        group.score.copy_(torch.rand_like(group.score))


def _cell_at(group: MaskGroup, fraction: float) -> int:
    """The group's largest cell keeping at most ``fraction`` of its units (its smallest if none does)."""
    full = torch.tensor(group.shape, dtype=torch.float)
    sizes = [(float(torch.prod(c.float() / full)), k) for k, c in enumerate(group.cells)]
    fitting = [(size, k) for size, k in sizes if size <= fraction + 1e-9]
    return max(fitting)[1] if fitting else min(sizes)[1]


def decide_uniform(model: SearchableViT, target: float) -> None:
    """Decide every group on the largest common width fraction (in 1% steps) whose architecture fits."""
    cost = macs_cost(model.shape)
    groups = list(model.groups())
    for step in range(100, 0, -1):
        cells = {name: _cell_at(group, step / 100) for name, group in groups}
        widths = {name: tuple(int(w) for w in group.cells[cells[name]]) for name, group in groups}
        if cost(widths) <= target:
            model.decide_cells(cells)
            return
    raise OfbError("search.method uniform: no uniform architecture fits the budget")


def _scored(scores, uniform: bool):
    """A ``decide`` that scores with ``scores`` and reaches the budget uniformly or by the shared enforcement."""
    def decide(model: SearchableViT, cfg: MethodCfg, job: Job) -> SearchResult:
        t0 = time.perf_counter()
        model.set_mix(0.0)
        dense = ArchSpec.dense(model.shape).macs()
        target = resolve_target(cfg, model.shape)
        scores(model)
        steps = []
        if uniform:
            decide_uniform(model, target)
        else:
            model.decide_widest()
            steps = enforce_budget(model, target)
        spec = model.arch_spec()
        job.log.info("%s decided %.4f GMACs (%.1f%% of dense) against target %.4f GMACs", cfg.method,
                     spec.macs() / 1e9, 100 * spec.macs() / dense, target / 1e9)
        return SearchResult(spec=spec, target_macs=target, achieved_macs=spec.macs(), dense_macs=dense, epochs_run=0,
                            decided_epoch=None, seconds=time.perf_counter() - t0, method=cfg.method,
                            budget_steps=[s.describe() for s in steps])
    return decide


decide_l1 = _scored(l1_scores, uniform=False)
decide_random = _scored(random_scores, uniform=False)
decide_uniform_l1 = _scored(l1_scores, uniform=True)
