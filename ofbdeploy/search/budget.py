"""Make a decided architecture meet its FLOPs budget when the soft FLOPs loss left it over.

The FLOPs loss steers the search towards the target but cannot guarantee it: short searches decide fast,
and a group decided early cannot be revisited by the loss. After the search, while the architecture is
over budget, the group step that saves the most MACs per unit of importance given up is taken (one grid
step narrower, least important units removed). Every step is logged and reported.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ofbdeploy.cost import vit_macs
from ofbdeploy.search.groups import MaskGroup
from ofbdeploy.search.searchable import SearchableViT


@dataclass(frozen=True)
class BudgetStep:
    group: str
    before: tuple[int, ...]
    after: tuple[int, ...]
    macs_after: float


def _macs(model: SearchableViT, override: tuple[str, tuple[int, ...]] | None = None) -> float:
    widths = {name: group.shape for name, group in model.groups()}
    if override is not None:
        widths[override[0]] = override[1]
    depth = model.shape.depth
    attn = [widths[f"blocks.{i}.attn"][0] * widths[f"blocks.{i}.attn"][1] for i in range(depth)]
    mlp = [widths[f"blocks.{i}.mlp"][0] for i in range(depth)]
    return float(vit_macs(model.shape, widths["embedding"][0], attn, mlp))


def _next_narrower(group: MaskGroup) -> list[int]:
    """Cells one grid step narrower than the group's shape along a single axis."""
    shape = torch.tensor(group.shape)
    options = []
    for axis in range(len(group.shape)):
        smaller = [k for k, c in enumerate(group.cells)
                   if c[axis] < shape[axis] and all(c[a] == shape[a] for a in range(len(shape)) if a != axis)]
        if smaller:
            options.append(max(smaller, key=lambda k: int(group.cells[k][axis])))
    return options


def _importance_lost(group: MaskGroup, extents: tuple[int, ...]) -> float:
    importance = torch.sigmoid(group.score.detach())
    if importance.dim() == 1:
        return float(importance.sort(descending=True).values[extents[0]:].sum())
    heads = importance.sum(dim=1).sort(descending=True)
    kept = importance[heads.indices[: extents[0]]].sort(dim=1, descending=True).values
    return float(heads.values[extents[0]:].sum() + kept[:, extents[1]:].sum())


@torch.no_grad()
def enforce_budget(model: SearchableViT, target: float, optimizers: Iterable = ()) -> list[BudgetStep]:
    """Narrow decided groups until the architecture costs at most ``target`` MACs."""
    optimizers = list(optimizers)
    steps: list[BudgetStep] = []
    while _macs(model) > target:
        current = _macs(model)
        best = None
        for name, group in model.groups():
            for cell in _next_narrower(group):
                extents = tuple(int(w) for w in group.cells[cell])
                saved = current - _macs(model, (name, extents))
                ratio = saved / max(_importance_lost(group, extents), 1e-9)
                if saved > 0 and (best is None or ratio > best[0]):
                    best = (ratio, name, group, cell)
        if best is None:
            break
        _, name, group, cell = best
        before = group.shape
        group.alive.fill_(False)
        group.alive[cell] = True
        model.settle(name, optimizers)
        steps.append(BudgetStep(name, before, group.shape, _macs(model)))
    return steps
