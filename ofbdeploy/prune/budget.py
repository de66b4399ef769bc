"""Make a decided architecture meet its budgets (FLOPs, predicted latency) when the soft losses left it over.

The FLOPs and latency losses steer the search towards their targets but cannot guarantee them: short
searches decide fast, and a group decided early cannot be revisited by a loss. After the search, while a
cost is over its budget, the group step that saves the most of that cost per unit of importance given up
is taken (one grid step narrower, least important units removed). Every step is logged and reported.

The other way round, a search that runs out of epochs decides its undecided groups on their most probable
cells, and those picks can land far under the budget (a 2-epoch DeiT-S search asked for 50% returned 32%).
Before they are applied, ``fill_budget`` widens them, one grid step at a time, by the importance gained per
unit of budget spent, while every budget still holds.

These are shared by every pruning method: the one-shot methods decide every group at full width and reach
their budget by ``enforce_budget`` alone; ``resolve_target`` and ``check_budget`` turn a section's budget
into MACs and refuse one the grids cannot meet, before anything is trained.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ofbdeploy.arch import ArchSpec, ModelShape
from ofbdeploy.arch.grids import SearchSpace
from ofbdeploy.errors import OfbError
from ofbdeploy.prune.config import MethodCfg
from ofbdeploy.search.groups import MaskGroup
from ofbdeploy.search.searchable import SearchableModel


@dataclass(frozen=True)
class BudgetStep:
    group: str
    before: tuple[int, ...]
    after: tuple[int, ...]
    cost_after: float

    def describe(self) -> str:
        """"group: before -> after" as the run log and report.json say it."""
        return f"{self.group}: {'x'.join(map(str, self.before))} -> {'x'.join(map(str, self.after))}"


Widths = dict[str, tuple[int, ...]]
Cost = Callable[[Widths], float]


def _widths(model: SearchableModel, override: tuple[str, tuple[int, ...]] | None = None) -> Widths:
    widths = {name: group.shape for name, group in model.groups()}
    if override is not None:
        widths[override[0]] = override[1]
    return widths


def as_spec(shape: ModelShape, widths: Widths) -> ArchSpec:
    """The architecture the widths describe (no kept indices: for costing only)."""
    return shape.spec_from_widths(widths)


def spec_cost(shape: ModelShape, predict: Callable[[ArchSpec], float]) -> Cost:
    """A cost of whole architectures (a latency table's prediction) as a cost of the widths."""
    return lambda widths: predict(as_spec(shape, widths))


def macs_cost(shape: ModelShape) -> Cost:
    """MACs of the widths (the same function as the FLOPs loss and the reports)."""
    return lambda widths: as_spec(shape, widths).macs()


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


def _extents(group: MaskGroup, cell: int) -> tuple[int, ...]:
    """The units cell ``cell`` keeps of what the group physically has now."""
    return tuple(min(int(w), size) for w, size in zip(group.cells[cell], group.shape, strict=True))


def _next_wider(group: MaskGroup, cell: int) -> list[int]:
    """Live cells one grid step wider than ``cell`` along a single axis, within the group's physical extents."""
    here = _extents(group, cell)
    options = []
    for axis in range(len(here)):
        wider = [k for k in range(len(group.cells)) if bool(group.alive[k])
                 and _extents(group, k)[axis] > here[axis]
                 and all(_extents(group, k)[a] == here[a] for a in range(len(here)) if a != axis)]
        if wider:
            options.append(min(wider, key=lambda k: _extents(group, k)[axis]))
    return options


@torch.no_grad()
def fill_budget(model: SearchableModel, picks: dict[str, int], budgets: list[tuple[Cost, float]]) -> dict[str, int]:
    """Widen the picked cells of undecided groups toward the budgets, keeping every one of them.

    Each step takes the one-step widening with the most importance gained per share of budget spent (the
    largest share over the budgets). Picks that are over a budget already are returned as they are: the
    enforcement narrows them afterwards.
    """
    groups = dict(model.groups())
    picks = dict(picks)

    def widths(trial: tuple[str, int] | None = None) -> Widths:
        chosen = {**picks, **dict([trial])} if trial else picks
        return {**_widths(model), **{name: _extents(groups[name], cell) for name, cell in chosen.items()}}

    def spent(w: Widths) -> list[float]:
        return [cost(w) / target for cost, target in budgets]

    if not budgets or max(spent(widths())) > 1:
        return picks
    while True:
        base = spent(widths())
        best = None
        for name, cell in picks.items():
            group = groups[name]
            for wider in _next_wider(group, cell):
                after = spent(widths((name, wider)))
                if max(after) > 1:
                    continue
                lost_now, lost_after = (_importance_lost(group, _extents(group, k)) for k in (cell, wider))
                gained = lost_now - lost_after
                share = max(max(a - b for a, b in zip(after, base, strict=True)), 1e-12)
                if best is None or gained / share > best[0]:
                    best = (gained / share, name, wider)
        if best is None:
            return picks
        picks[best[1]] = best[2]


@torch.no_grad()
def enforce_budget(model: SearchableModel, target: float, optimizers: Iterable = (),
                   cost: Cost | None = None) -> list[BudgetStep]:
    """Narrow decided groups until ``cost`` (default: MACs) of the architecture is at most ``target``."""
    cost = cost or macs_cost(model.shape)
    optimizers = list(optimizers)
    steps: list[BudgetStep] = []
    while cost(_widths(model)) > target:
        current = cost(_widths(model))
        best = None
        for name, group in model.groups():
            for cell in _next_narrower(group):
                extents = tuple(int(w) for w in group.cells[cell])
                saved = current - cost(_widths(model, (name, extents)))
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
        steps.append(BudgetStep(name, before, group.shape, cost(_widths(model))))
    return steps


def resolve_target(cfg: MethodCfg, shape: ModelShape) -> float | None:
    """The budget in MACs, from a ratio of the dense model or an absolute GMACs figure (None: latency only)."""
    if cfg.target_flops_ratio is not None:
        return cfg.target_flops_ratio * ArchSpec.dense(shape).macs()
    return cfg.target_gflops * 1e9 if cfg.target_gflops is not None else None


def check_budget(target: float | None, space: SearchSpace, shape: ModelShape) -> None:
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
