"""Did the search decide from evidence or from its start? Per group, compare the final scores with the start.

- ``spearman``: rank correlation between the starting and the final importance scores of the units the group
  kept (1: the search kept the order it was given; the scores learnt nothing that reordered them);
- ``outside_start``: the share of kept units that the starting scores would not have kept at the same width
  (the same rule as a cut: top units, or top heads by summed sigmoid score and top channels per head).
"""

from __future__ import annotations

import statistics

import torch
from torch import Tensor

from ofbdeploy.search.groups import HeadGroup, MaskGroup, ranks
from ofbdeploy.search.searchable import SearchableModel


def _kept_flat(group: MaskGroup) -> Tensor:
    """Dense flat indices of the units the group keeps, in the order of its current scores."""
    if isinstance(group, HeadGroup):
        width = group.dense_shape[1]
        return (group.kept_heads[:, None] * width + group.kept_channels).reshape(-1).cpu()
    return group.kept.cpu()


def _start_selection(group: MaskGroup, start: Tensor) -> set[int]:
    """Dense flat indices the starting scores keep at the group's current extents."""
    if isinstance(group, HeadGroup):
        heads, width = group.shape
        chosen = torch.argsort(torch.sigmoid(start).sum(dim=1), descending=True, stable=True)[:heads]
        return {int(h) * start.shape[1] + int(c) for h in chosen
                for c in torch.argsort(start[h], descending=True, stable=True)[:width]}
    return {int(i) for i in torch.argsort(start, descending=True, stable=True)[: group.shape[0]]}


def spearman(a: Tensor, b: Tensor) -> float | None:
    """Spearman's rank correlation of two vectors (None with fewer than two units or a constant one)."""
    if a.numel() < 2:
        return None
    ra, rb = ranks(a.float()).float(), ranks(b.float()).float()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    norm = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / norm if norm > 0 else None


@torch.no_grad()
def decision_diagnostic(model: SearchableModel, start_scores: dict[str, Tensor]) -> dict[str, dict]:
    """Per group with a recorded start: ``spearman``, ``outside_start``, and ``kept``/``units`` counts."""
    found = {}
    for name, group in model.groups():
        start = start_scores.get(name)
        if start is None:
            continue
        start = start.detach().float().cpu()
        kept = _kept_flat(group)
        final = group.score.detach().float().cpu().reshape(-1)
        chosen = _start_selection(group, start)
        outside = sum(int(k) not in chosen for k in kept) / max(len(kept), 1)
        found[name] = {"spearman": spearman(start.reshape(-1)[kept], final), "outside_start": outside,
                       "kept": len(kept), "units": start.numel()}
    return found


def summary(per_group: dict[str, dict]) -> dict[str, float | int | None]:
    """Means over the groups (Spearman over the groups where it is defined)."""
    rhos = [g["spearman"] for g in per_group.values() if g["spearman"] is not None]
    shares = [g["outside_start"] for g in per_group.values()]
    return {"groups": len(per_group), "mean_spearman": statistics.fmean(rhos) if rhos else None,
            "mean_outside_start": statistics.fmean(shares) if shares else None}
