"""An informed start for the OFB search (``search.init: magnitude``, ``search.logit_bias``), beyond the paper.

A short search barely moves the importance scores, so the units it keeps are the top of their random draw.
Here the scores start from the dense weights instead: each unit's coupled weight magnitude, the L2 norm of
every weight that exists only because of that unit (what removing it deletes):

- attention (head h, qkv channel c): the q, k and v rows of the channel and the ``proj`` column it feeds;
- MLP hidden unit j: the ``fc1`` row and the ``fc2`` column;
- embedding (residual) channel e: every block linear weight that reads or writes it in its stage (``qkv``
  and ``fc1`` columns, ``proj`` and ``fc2`` rows) and the stem filter that writes it (the patch embedding,
  or a Swin stage's patch-merging row).

LayerScale gains multiply the ``proj``/``fc2`` outputs first, so a residual-writing weight counts as it acts.
The magnitudes become scores by rank: standardised ranks times the random draw's std, so the spread the
optimiser and the sigmoid see is the method's. Attention scores are a head term (heads ranked by the summed
magnitude of their channels) plus a channel term (ranked within the head); every head gets the same set of
channel terms, so the bi-mask's head order (summed sigmoid scores) is the magnitude order.

The logit bias adds to each group's cell nearest a global allocation at the FLOPs target: units ranked by
squared magnitude per MAC they cost, the lowest removed until the MACs fit (see :func:`allocation`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ofbdeploy.errors import OfbError
from ofbdeploy.families.swin.searchable import SearchableSwin
from ofbdeploy.families.vit.searchable import SearchableViT
from ofbdeploy.search.groups import HeadGroup, MaskGroup
from ofbdeploy.search.searchable import SearchableModel

SCORE_STD = 0.2  # the std of the groups' random score draw (MaskGroup)


@dataclass
class _Block:
    """One transformer block's linears and the embedding group (stage) whose residual stream it carries."""

    module: nn.Module
    stage: int


def _blocks(model: SearchableModel) -> list[_Block]:
    if isinstance(model, SearchableViT):
        return [_Block(b, 0) for b in model.vit.blocks]
    if isinstance(model, SearchableSwin):
        return [_Block(b, k) for b, k in zip(model.blocks, model.block_stage, strict=True)]
    raise OfbError(f"search.init magnitude: no magnitudes for {type(model).__name__}")


def _stems(model: SearchableModel) -> list[Tensor]:
    """Per embedding group, the weight whose output rows write its channels (rows = channels)."""
    if isinstance(model, SearchableViT):
        return [model.vit.patch_embed.proj.weight.flatten(1)]
    swin = model.swin
    return [swin.patch_embed.proj.weight.flatten(1),
            *(swin.layers[k].downsample.reduction.weight for k in range(1, len(swin.layers)))]


def _gain(block: nn.Module, name: str, rows: int) -> Tensor:
    """The LayerScale gain on a residual write (ones without LayerScale)."""
    scale = getattr(block, name, None)
    gamma = getattr(scale, "gamma", None)
    return gamma.detach() if gamma is not None else torch.ones(rows)


@torch.no_grad()
def magnitudes(model: SearchableModel) -> dict[str, Tensor]:
    """Squared coupled weight magnitudes per unit of every group, shaped like the group's scores (dense model)."""
    blocks = _blocks(model)
    embeds = [(stem.float() ** 2).sum(dim=1) for stem in _stems(model)]
    out: dict[str, Tensor] = {}
    for i, blk in enumerate(blocks):
        attn, mlp = blk.module.attn, blk.module.mlp
        qkv, fc1 = attn.qkv.weight.float(), mlp.fc1.weight.float()
        proj = attn.proj.weight.float() * _gain(blk.module, "ls1", attn.proj.out_features).float()[:, None]
        fc2 = mlp.fc2.weight.float() * _gain(blk.module, "ls2", mlp.fc2.out_features).float()[:, None]
        heads = (qkv**2).sum(dim=1).reshape(3, -1).sum(dim=0) + (proj**2).sum(dim=0)
        out[f"blocks.{i}.attn"] = heads
        out[f"blocks.{i}.mlp"] = (fc1**2).sum(dim=1) + (fc2**2).sum(dim=0)
        embeds[blk.stage] = embeds[blk.stage] + (qkv**2).sum(0) + (fc1**2).sum(0) + (proj**2).sum(1) + (fc2**2).sum(1)
    out.update(zip(model.embed_names, embeds, strict=True))
    return {name: out[name].reshape(group.shape).cpu() for name, group in model.groups()}


def _standard_ranks(values: Tensor) -> Tensor:
    """Ranks along the last axis (0 = smallest), standardised to mean 0 and std 1 (zeros for one unit)."""
    r = torch.argsort(torch.argsort(values, dim=-1, stable=True), dim=-1).float()
    n = values.shape[-1]
    if n < 2:
        return torch.zeros_like(r)
    return (r - (n - 1) / 2) / r.std(dim=-1, keepdim=True, unbiased=False)


def scores_from(magnitude: Tensor, head_group: bool, std: float = SCORE_STD) -> Tensor:
    """Scores ordered as ``magnitude``, spread like the random draw (see the module docstring)."""
    if not head_group:
        return std * _standard_ranks(magnitude)
    head = _standard_ranks(magnitude.sum(dim=1))[:, None]
    return std * (head + _standard_ranks(magnitude)) / 2**0.5


@torch.no_grad()
def magnitude_scores_(model: SearchableModel) -> None:
    """Set every undecided group's importance scores from the dense weights' coupled magnitudes."""
    found = magnitudes(model)
    for name, group in model.groups():
        if not group.is_decided:
            group.score.copy_(scores_from(found[name], isinstance(group, HeadGroup)).to(group.score))


def _units(group: MaskGroup) -> int:
    return int(torch.tensor(group.shape).prod())


@torch.no_grad()
def allocation(model: SearchableModel, target_macs: float) -> dict[str, int]:
    """Units each group keeps in a global allocation at ``target_macs`` (see the module docstring).

    The removal order is fixed by each unit's weight energy per MAC: its squared coupled magnitude (which grows
    with the number of weights the unit owns, as its cost does) over the MACs it costs at the dense widths.
    Untrained weights give every kind of unit about the same energy per MAC, so the allocation follows what
    training made of them. The cut point is the shortest prefix of that order whose exact MACs fit (a
    bisection over the prefix length).
    """
    groups = list(model.groups())
    names = [name for name, _ in groups]
    dense = {name: _units(group) for name, group in groups}

    def macs(units: dict[str, int]) -> float:
        embeds = [units[n] for n in model.embed_names]
        attn = [units[f"blocks.{i}.attn"] for i in range(len(model.attn_groups))]
        mlp = [units[f"blocks.{i}.mlp"] for i in range(len(model.mlp_groups))]
        return float(model.shape.macs_at(embeds, attn, mlp))

    full = macs(dense)
    found = magnitudes(model)
    density, owner = [], []
    for k, (name, _) in enumerate(groups):
        unit_cost = max(full - macs({**dense, name: dense[name] - 1}), 1e-9)
        density.append(found[name].reshape(-1) / unit_cost)
        owner.append(torch.full((density[-1].numel(),), k))
    order = torch.argsort(torch.cat(density), stable=True)
    owners = torch.cat(owner)[order]

    def kept(removed: int) -> dict[str, int]:
        counts = torch.bincount(owners[:removed], minlength=len(groups))
        return {name: dense[name] - int(counts[k]) for k, name in enumerate(names)}

    lo, hi = 0, len(order)  # the smallest prefix that fits lies in (lo, hi]
    if macs(kept(0)) <= target_macs:
        return kept(0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if macs(kept(mid)) <= target_macs else (mid, hi)
    return kept(hi)


def nearest_cell(group: MaskGroup, units: int) -> int:
    """The live cell whose kept units are nearest ``units`` (ties: the wider cell)."""
    sizes = [(abs(int(torch.prod(c)) - units), -int(torch.prod(c)), k)
             for k, c in enumerate(group.cells) if bool(group.alive[k])]
    return min(sizes)[2]


@torch.no_grad()
def bias_logits_(model: SearchableModel, target_macs: float, bias: float) -> dict[str, int]:
    """Add ``bias`` to each undecided group's cell nearest the global allocation; return the cells biased."""
    units = allocation(model, target_macs)
    cells = {}
    for name, group in model.groups():
        if not group.is_decided:
            cells[name] = nearest_cell(group, units[name])
            group.alpha[cells[name]] += bias
    return cells
