"""Checks of materialisation that a user can run on their own torch/timm (``ofbdeploy selfcheck``).

Random decided architectures are cut into a searchable model, and the masked model is compared with the
plain model materialised from it, with timm's fused attention on and off; the analytic FLOPs and params
are compared with PyTorch's own counter.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn

from ofbdeploy.cost import count_params, measure_macs
from ofbdeploy.materialize import materialize
from ofbdeploy.search.searchable import SearchableViT


def decide_randomly(searchable: SearchableViT, rng: random.Random, extreme: str | None = None) -> None:
    """Decide every group on a random cell (or the narrowest / widest with ``extreme``) and randomise
    the multipliers, so that folding is exercised with values far from 1."""
    for name, group in searchable.groups():
        if extreme == "narrowest":
            cell = min(range(len(group.cells)), key=lambda k: int(torch.prod(group.cells[k])))
        elif extreme == "widest":
            cell = group.widest_cell()
        else:
            cell = rng.randrange(len(group.cells))
        searchable.force_cell(name, cell)
        with torch.no_grad():
            group.multiplier.uniform_(0.25, 1.75, generator=torch.Generator().manual_seed(rng.randrange(2**31)))


def set_fused_attention(model: nn.Module, fused: bool) -> None:
    """Switch timm's fused attention on one model (the global switch only affects new modules)."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused


@dataclass(frozen=True)
class Agreement:
    """Masked vs materialised outputs and analytic vs counted cost, for one architecture."""

    max_abs_diff: float
    macs_spec: float
    macs_counted: float
    params_spec: int
    params_counted: int


@torch.no_grad()
def check_agreement(searchable: SearchableViT, batch: int = 4, seed: int = 0) -> Agreement:
    """Materialise a decided searchable model and measure how far the two disagree."""
    searchable.eval()
    model, spec = materialize(searchable)
    s = searchable.shape
    images = torch.randn(batch, s.in_chans, s.img_size, s.img_size, generator=torch.Generator().manual_seed(seed))
    diff = 0.0
    for fused in (True, False):
        set_fused_attention(searchable, fused)
        set_fused_attention(model, fused)
        diff = max(diff, float((searchable(images) - model(images)).abs().max()))
    return Agreement(diff, spec.macs(), measure_macs(model, s.img_size, s.in_chans), spec.params(), count_params(model))
