"""Narrow or grow the groups of a materialised model (a ViT, a Swin) after its search: the teacher gives back
what the cut took.

After the search a decided group has physically lost the units it did not keep, so widening it needs units
that are gone. The dense model the run started from (the teacher) still has them: a grown group re-inserts
dense units the spec did not keep, with the teacher's weights (restricted to the embedding channels the
pruned model kept); the finetune that follows distils from that teacher and trains them. A narrowed group
drops its kept units of least importance; a Swin head brings its column of the relative-position bias table
along.

A stage's embedding resizes the same way, one rule for every tensor: an entry comes from the pruned model when
every unit it belongs to was kept, else from the teacher (cut to the new blocks' units). Which axes of which
tensors run along a stage's embedding is read off the family's own plain model (built once a channel narrower
and compared), so no family lists its tensors. Growing the residual stream changes every LayerNorm's
statistics, which the teacher's entries only approximate: the fit moves the embedding only when no block can
move (:mod:`ofbdeploy.prune.fit`), and the finetune trains what it grew.

Importance (:func:`unit_importance`) is one number per dense unit, so one rule ranks kept and missing units:

- a unit's *magnitude* is the sum of squares of its coupled weights: an MLP unit's fc1 row and bias and fc2
  column; an attention channel's q, k and v rows and biases and proj column (q unfolded from the attention
  scale correction, see below);
- kept units are measured in the pruned model (what the search trained), missing ones in the teacher, and
  the teacher's figures are scaled by the ratio of the medians of the two over the kept units, so the two
  scales meet;
- every figure is divided by the group's mean over all its dense units (scaled teacher figures), so an
  average unit weighs 1 in every group and groups compare by relative importance;
- an embedding channel's coupled weights are every entry on its index of every tensor along the embedding.

Attention scale: timm scales the logits by 1/sqrt(head width) while the search keeps the dense 1/sqrt(d);
materialisation folds sqrt(c/d) into the q rows of a block of head width c. A q row kept at a new width c'
is rescaled by sqrt(c'/c), a q row taken from the teacher gets sqrt(c'/d).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from ofbdeploy.arch import ArchSpec, BlockSpec
from ofbdeploy.errors import ArchError
from ofbdeploy.families import family_of


@dataclass(frozen=True)
class UnitImportance:
    """Per block, the importance of every dense MLP unit (``[mlp_dim]``) and every dense attention channel
    (``[heads, head_dim]``), and per stage of every dense embedding channel, kept or not, on one scale (see the
    module's rule)."""

    mlp: tuple[Tensor, ...]
    channels: tuple[Tensor, ...]
    embeds: tuple[Tensor, ...]


def _check(spec: ArchSpec) -> None:
    if not spec.kept_embeds or any(not b.kept_mlp or not b.kept_heads or not b.kept_channels for b in spec.blocks):
        raise ArchError("resizing needs an architecture record with kept unit indices")


def _rows(weight: Tensor, bias: Tensor | None) -> Tensor:
    """Sum of squares per output row (weight row plus bias)."""
    out = weight.double().pow(2).sum(dim=1)
    return out if bias is None else out + bias.double().pow(2)


def _calibrated(teacher: Tensor, kept: Tensor, kept_scores: Tensor) -> Tensor:
    """Dense-indexed scores: the pruned model's at ``kept``, the teacher's (scaled to meet them) elsewhere,
    divided by the group's mean."""
    flat = teacher.reshape(-1)
    ratio = float(kept_scores.median() / flat[kept].median().clamp_min(1e-30)) if len(kept) else 1.0
    scores = flat * ratio
    scores[kept] = kept_scores
    return (scores / (flat * ratio).mean().clamp_min(1e-30)).reshape(teacher.shape).float()


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


def _block(spec: ArchSpec, i: int) -> tuple[str, Tensor]:
    """Block ``i``'s state-dict prefix and the dense embedding channels its stage kept."""
    return family_of(spec.base).block_prefix(spec.base, i), torch.tensor(spec.kept_embeds[spec.base.stage_of(i)])


def _q_unfold(spec: ArchSpec, i: int) -> float:
    """The factor materialisation folded into block ``i``'s q rows: sqrt(c/d)."""
    return (spec.blocks[i].head_dim / spec.base.block_dims(i)[1]) ** 0.5


@torch.no_grad()
def unit_importance(model: nn.Module, spec: ArchSpec, teacher: nn.Module) -> UnitImportance:
    """Importance of every dense unit of every block's MLP and attention (see the module's rule)."""
    _check(spec)
    p, t = _state(model), _state(teacher)
    mlp, channels = [], []
    for i, blk in enumerate(spec.blocks):
        heads, d, _ = spec.base.block_dims(i)
        pre, embed = _block(spec, i)
        tw = _rows(t[pre + "mlp.fc1.weight"][:, embed], t.get(pre + "mlp.fc1.bias"))
        tw = tw + t[pre + "mlp.fc2.weight"][embed].double().pow(2).sum(dim=0)
        pw = _rows(p[pre + "mlp.fc1.weight"], p.get(pre + "mlp.fc1.bias"))
        pw = pw + p[pre + "mlp.fc2.weight"].double().pow(2).sum(dim=0)
        mlp.append(_calibrated(tw, torch.tensor(blk.kept_mlp), pw))

        qkv_t = t[pre + "attn.qkv.weight"][:, embed].reshape(3, heads * d, -1)
        bias_t = t.get(pre + "attn.qkv.bias")
        tc = sum(_rows(qkv_t[k], None if bias_t is None else bias_t.reshape(3, -1)[k]) for k in range(3))
        tc = tc + t[pre + "attn.proj.weight"][embed].double().pow(2).sum(dim=0)
        width = blk.heads * blk.head_dim
        qkv_p = p[pre + "attn.qkv.weight"].reshape(3, width, -1).clone()
        bias_p = p.get(pre + "attn.qkv.bias")
        bias_p = None if bias_p is None else bias_p.reshape(3, -1).clone()
        qkv_p[0] /= _q_unfold(spec, i)
        if bias_p is not None:
            bias_p[0] /= _q_unfold(spec, i)
        pc = sum(_rows(qkv_p[k], None if bias_p is None else bias_p[k]) for k in range(3))
        pc = pc + p[pre + "attn.proj.weight"].double().pow(2).sum(dim=0)
        kept = torch.tensor([h * d + c for h, chans in zip(blk.kept_heads, blk.kept_channels, strict=True)
                             for c in chans])
        channels.append(_calibrated(tc.reshape(heads, d), kept, pc))
    embeds = []
    for s, kept_embed in enumerate(spec.kept_embeds):
        axes = embedding_axes(spec.base, s)
        embeds.append(_calibrated(_embedding_rows(t, axes), torch.tensor(kept_embed), _embedding_rows(p, axes)))
    return UnitImportance(tuple(mlp), tuple(channels), tuple(embeds))


@functools.cache
def embedding_axes(base: Any, stage: int) -> dict[str, tuple[int, int]]:
    """Every tensor of the family's plain model that runs along stage ``stage``'s embedding: its name -> (axis,
    copies), the axis holding ``copies`` runs of the embedding one after another (a Swin's patch merging joins
    four). Read off the plain model built (on the meta device: shapes only) at the dense widths and one channel
    narrower; empty where the family keeps that embedding whole."""
    dense = ArchSpec.dense(base)
    embeds, kept = list(dense.embed_dims), list(dense.kept_embeds)
    embeds[stage], kept[stage] = embeds[stage] - 1, kept[stage][:-1]
    try:
        narrower = ArchSpec(base, tuple(embeds), dense.blocks, tuple(kept))
    except ArchError:
        return {}
    family = family_of(base)
    with torch.device("meta"):
        wide, narrow = family.build_plain(dense).state_dict(), family.build_plain(narrower).state_dict()
    found = {}
    for name, tensor in wide.items():
        moved = [(axis, a - b) for axis, (a, b) in enumerate(zip(tensor.shape, narrow[name].shape, strict=True))
                 if a != b]
        if len(moved) > 1:
            raise ArchError(f"{name}: runs along the embedding on {len(moved)} axes; resizing handles one")
        if moved:
            found[name] = moved[0]
    return found


def _embedding_rows(state: dict[str, Tensor], axes: dict[str, tuple[int, int]]) -> Tensor:
    """Sum of squares per embedding channel over every tensor along it (each run of a joined axis counted)."""
    total = torch.zeros((), dtype=torch.float64)
    for name, (axis, copies) in axes.items():
        squares = state[name].double().pow(2).movedim(axis, 0)
        total = total + squares.reshape(copies, squares.shape[0] // copies, -1).sum(dim=(0, 2))
    return total


def _top(scores: Tensor, candidates: Sequence[int], count: int) -> list[int]:
    """The ``count`` candidates of highest score, in descending score order (ties: the lower index)."""
    if count <= 0 or not candidates:
        return []
    index = torch.tensor(list(candidates))
    order = torch.argsort(scores[index], descending=True, stable=True)
    return index[order[:count]].tolist()


def _keep(current: Sequence[int], scores: Tensor, size: int, dense: int) -> tuple[int, ...]:
    """``size`` of the ``dense`` units: the best of ``current`` in their order, or all of them and the best others."""
    if size <= len(current):
        chosen = set(_top(scores, current, size))
        return tuple(k for k in current if k in chosen)
    kept = set(current)
    return (*current, *_top(scores, [k for k in range(dense) if k not in kept], size - len(current)))


def resize_block(blk: BlockSpec, mlp: Tensor, channels: Tensor, heads: int, head_dim: int, mlp_dim: int) -> BlockSpec:
    """The block at new widths: the kept units of highest importance, plus the best missing ones.

    Kept units keep their order (so an unchanged group keeps its layout); added ones follow, best first. A new
    head brings its ``head_dim`` best channels and is ranked by their sum.
    """
    dense_heads, d = channels.shape
    chans = {h: _keep(c, channels[h], head_dim, d) for h, c in zip(blk.kept_heads, blk.kept_channels, strict=True)}
    for h in range(dense_heads):
        if h not in chans:
            chans[h] = _keep((), channels[h], head_dim, d)
    head_scores = torch.tensor([float(channels[h][list(chans[h])].sum()) for h in range(dense_heads)])
    kept_heads = _keep(blk.kept_heads, head_scores, heads, dense_heads)
    return BlockSpec(heads, head_dim, mlp_dim, kept_heads, tuple(chans[h] for h in kept_heads),
                     _keep(blk.kept_mlp, mlp, mlp_dim, len(mlp)))


def resize_embedding(spec: ArchSpec, importance: UnitImportance, stage: int, width: int) -> ArchSpec:
    """``spec`` with stage ``stage``'s embedding ``width`` channels wide, chosen as :func:`resize_block` chooses."""
    embeds, kept = list(spec.embed_dims), list(spec.kept_embeds)
    embeds[stage] = width
    kept[stage] = _keep(kept[stage], importance.embeds[stage], width, spec.base.embed_dims[stage])
    return replace(spec, embed_dims=tuple(embeds), kept_embeds=tuple(kept))


def resized_spec(spec: ArchSpec, importance: UnitImportance, widths: Sequence[tuple[int, int, int]]) -> ArchSpec:
    """``spec`` with block ``i`` at ``widths[i]`` = (heads, head width, MLP width), units chosen by importance."""
    _check(spec)
    blocks = tuple(resize_block(blk, importance.mlp[i], importance.channels[i], *widths[i])
                   for i, blk in enumerate(spec.blocks))
    return ArchSpec(spec.base, spec.embed_dims, blocks, spec.kept_embeds)


def _gather(sources: Sequence[tuple[Tensor, int]], dim: int) -> Tensor:
    """Slices ``index`` along ``dim`` of each source tensor, stacked along ``dim``."""
    return torch.stack([t.select(dim, k) for t, k in sources], dim=dim)


@torch.no_grad()
def resize(model: nn.Module, spec: ArchSpec, teacher: nn.Module, new: ArchSpec) -> nn.Module:
    """The plain model of ``new`` (same family and base as ``spec``): units ``spec`` kept come from ``model``,
    the others from ``teacher`` (see the module's rules for the attention scale and the embedding)."""
    _check(spec)
    _check(new)
    if new.base != spec.base:
        raise ArchError("resizing keeps the base model: the new architecture is of another dense model")
    blocks = replace(spec, blocks=new.blocks)  # the blocks first, at the searched embedding
    dense = _state(teacher)
    state = _resized_blocks(_state(model), spec, dense, blocks)
    if new.kept_embeds != spec.kept_embeds:
        state = _resized_embedding(state, blocks, dense, new)
    plain = family_of(new.base).build_plain(new)
    plain.load_state_dict(state, strict=True)
    return plain.eval()


def _resized_embedding(p: dict[str, Tensor], spec: ArchSpec, t: dict[str, Tensor],
                       new: ArchSpec) -> dict[str, Tensor]:
    """The state of ``spec`` (``p``) at ``new``'s embedding (its blocks are ``spec``'s): an entry stays when every
    embedding channel it lies on was kept, else it is the teacher's (cut to the blocks' units and to every
    stage's new embedding; a Swin's patch merging lies on two stages)."""
    dense = ArchSpec.dense(spec.base)
    t = _resized_blocks(t, dense, t, replace(dense, blocks=spec.blocks))
    runs: dict[str, list[tuple[int, int, int, tuple[int, ...], tuple[int, ...]]]] = {}
    for s, (old, now) in enumerate(zip(spec.kept_embeds, new.kept_embeds, strict=True)):
        for name, (axis, copies) in embedding_axes(spec.base, s).items():
            runs.setdefault(name, []).append((axis, copies, spec.base.embed_dims[s], old, now))
    state = dict(p)
    for name, along in runs.items():
        if all(old == now for *_, old, now in along):
            continue
        kept, grown, mask = p[name], t[name], torch.ones((), dtype=torch.bool)
        for axis, copies, width, old, now in along:
            at = {j: k for k, j in enumerate(old)}
            kept = kept.index_select(axis, torch.tensor([c * len(old) + at.get(j, 0) for c in range(copies)
                                                         for j in now]))
            grown = grown.index_select(axis, torch.tensor([c * width + j for c in range(copies) for j in now]))
            shape = [1] * kept.dim()
            shape[axis] = -1
            mask = mask & torch.tensor([j in at for j in now] * copies).reshape(shape)
        state[name] = torch.where(mask, kept, grown)
    return state


def _resized_blocks(p: dict[str, Tensor], spec: ArchSpec, t: dict[str, Tensor], new: ArchSpec) -> dict[str, Tensor]:
    """The state of ``spec`` (``p``) at ``new``'s block widths (its embedding is ``spec``'s)."""
    state = {k: v.clone() for k, v in p.items()}
    for i, (old, blk) in enumerate(zip(spec.blocks, new.blocks, strict=True)):
        heads, d, _ = spec.base.block_dims(i)
        pre, embed = _block(spec, i)
        at = {j: k for k, j in enumerate(old.kept_mlp)}

        def pick(name: str, dim: int, teacher_cut: Tensor, index: dict[int, int], units: Sequence[int]) -> None:
            state[name] = _gather([(p[name], index[j]) if j in index else (teacher_cut, j) for j in units], dim)

        pick(pre + "mlp.fc1.weight", 0, t[pre + "mlp.fc1.weight"][:, embed], at, blk.kept_mlp)
        pick(pre + "mlp.fc2.weight", 1, t[pre + "mlp.fc2.weight"][embed], at, blk.kept_mlp)
        if pre + "mlp.fc1.bias" in p:
            pick(pre + "mlp.fc1.bias", 0, t[pre + "mlp.fc1.bias"], at, blk.kept_mlp)

        # attention: dense channel h*d + c; positions in the pruned model a*c_old + b
        at = {h * d + c: a * old.head_dim + b for a, (h, chans) in
              enumerate(zip(old.kept_heads, old.kept_channels, strict=True)) for b, c in enumerate(chans)}
        units = [h * d + c for h, chans in zip(blk.kept_heads, blk.kept_channels, strict=True) for c in chans]
        q_old, q_teacher = (blk.head_dim / old.head_dim) ** 0.5, (blk.head_dim / d) ** 0.5
        parts = []
        for name in ("attn.qkv.weight", "attn.qkv.bias"):
            if pre + name not in p:
                continue
            pruned = p[pre + name].reshape(3, old.heads * old.head_dim, *p[pre + name].shape[1:])
            dense = t[pre + name].reshape(3, heads * d, *t[pre + name].shape[1:])
            if name.endswith("weight"):
                dense = dense[:, :, embed]
            rows = []
            for k in range(3):
                kept = _gather([(pruned[k], at[j]) if j in at else (dense[k], j) for j in units], 0)
                if k == 0:  # the attention-scale fold, per source
                    factor = torch.tensor([q_old if j in at else q_teacher for j in units], dtype=kept.dtype)
                    kept = kept * factor.reshape(-1, *([1] * (kept.dim() - 1)))
                rows.append(kept)
            parts.append((name, torch.cat(rows)))
        for name, value in parts:
            state[pre + name] = value
        pick(pre + "attn.proj.weight", 1, t[pre + "attn.proj.weight"][embed], at, units)
        table = pre + "attn.relative_position_bias_table"  # a Swin's: one column per head
        if table in p:
            pick(table, 1, t[table], {h: a for a, h in enumerate(old.kept_heads)}, blk.kept_heads)
    return state
