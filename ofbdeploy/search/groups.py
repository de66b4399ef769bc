"""The bi-mask of one prunable group: importance scores and sparsity logits in one soft mask.

A group owns its scores, its cell logits and its bookkeeping (which cells are alive, which dense units
it still keeps); it knows nothing about the layers it masks. The searchable model asks it for the mask,
and when a cut is due the group says which of its current units survive so that the model can slice the
layers to match.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from ofbdeploy.search.slicing import Take, slice_tensor_, take_along

MIX_START = 0.99


def ranks(values: Tensor, dim: int = -1) -> Tensor:
    """Rank of each entry along ``dim``, 0 for the largest (ties broken by position, so it is stable)."""
    order = torch.argsort(values, dim=dim, descending=True, stable=True)
    return torch.argsort(order, dim=dim)


def _top_sorted(values: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest entries of a vector, in ascending index order."""
    return torch.sort(torch.argsort(values, descending=True, stable=True)[:k]).values


class MaskGroup(nn.Module):
    """Bi-mask over units of shape ``dense_shape`` with candidate widths ``cells`` (one tuple per cell)."""

    def __init__(self, kind: str, dense_shape: Sequence[int], cells: Sequence[Sequence[int]], l1: float) -> None:
        super().__init__()
        if not cells:
            raise ValueError(f"{kind} group needs at least one cell")
        self.kind = kind
        self.l1 = l1
        self.dense_shape = tuple(int(s) for s in dense_shape)
        self.score = nn.Parameter(nn.init.trunc_normal_(torch.empty(self.dense_shape), std=0.2))
        self.alpha = nn.Parameter(torch.rand(len(cells)))
        self.multiplier = nn.Parameter(torch.ones(self.dense_shape))
        self.register_buffer("cells", torch.tensor([list(c) for c in cells], dtype=torch.long))
        self.register_buffer("alive", torch.ones(len(cells), dtype=torch.bool))
        self.register_buffer("mix", torch.tensor(MIX_START))
        self.register_buffer("decided", torch.tensor(False))
        self._decided = False  # host copy of ``decided``: read in every forward, so never from the device
        self._keeps: tuple | None = None  # (shape, device, keep matrices): rebuilt when the group is cut
        self.register_load_state_dict_post_hook(lambda module, _keys: module._refresh())

    def _refresh(self) -> None:
        """Re-read the host copies after the buffers were loaded (resume)."""
        self._decided = bool(self.decided)
        self._keeps = None

    # -- the soft mask ------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        """Current (physically kept) extents of the group."""
        return tuple(self.score.shape)

    @property
    def is_decided(self) -> bool:
        return self._decided

    def probs(self) -> Tensor:
        """Softmax of the logits over the cells still alive (dead cells get probability 0)."""
        return torch.softmax(self.alpha.masked_fill(~self.alive, float("-inf")), dim=0)

    def keeps(self) -> list[Tensor]:
        """Per axis, (cells x current extent) 0/1 matrices: which ranks each cell keeps. Cached per shape."""
        key = (self.shape, self.cells.device)
        if self._keeps is None or self._keeps[0] != key:
            widths = torch.minimum(self.cells, self.cells.new_tensor(self.shape))
            keeps = [(torch.arange(size, device=widths.device)[None, :] < widths[:, d, None]).float()
                     for d, size in enumerate(self.shape)]
            self._keeps = (key, keeps)
        return self._keeps[1]

    def rank_mask(self, probs: Tensor) -> Tensor:
        """Expected mask in rank order: entry i is the probability that the unit of rank i survives.

        Products and sums written elementwise, so autocast leaves them in fp32 whatever the amp setting.
        """
        keeps = self.keeps()
        if len(keeps) == 1:
            return (probs[:, None] * keeps[0]).sum(dim=0)
        return (probs[:, None, None] * keeps[0][:, :, None] * keeps[1][:, None, :]).sum(dim=0)

    def restore(self, rank_mask: Tensor) -> Tensor:
        """Put the rank-ordered mask back in unit order, the most important unit taking rank 0."""
        return rank_mask[ranks(self.score)]

    def mask(self) -> Tensor:
        """The mask this forward pass multiplies its units by."""
        if self.is_decided:
            return self.multiplier
        restored = self.restore(self.rank_mask(self.probs()))
        return (1 - self.mix) * restored + self.mix * torch.sigmoid(self.score)

    def expected_units(self) -> Tensor | float:
        """Expected number of live units (differentiable in the logits): what the FLOPs loss sees."""
        if self.is_decided:
            return float(math.prod(self.shape))
        return self.rank_mask(self.probs()).sum()

    # -- progressive shrinking ----------------------------------------------------------------------
    @torch.no_grad()
    def switch_off(self, dead: Tensor, optimizers: Iterable[torch.optim.Optimizer] = ()) -> int:
        """Switch the cells in ``dead`` off for good: out of the softmax, logits and moments zeroed."""
        dead = dead & self.alive
        if bool(dead.all()) or not bool(self.alive[~dead].any()):
            raise ValueError(f"{self.kind} group: cannot switch off every live cell")
        self.alpha[dead] = 0.0
        self.alive &= ~dead
        for optimizer in optimizers:
            for value in optimizer.state.get(self.alpha, {}).values():
                if isinstance(value, Tensor) and value.shape == self.alpha.shape:
                    value[dead] = 0.0
        return int(dead.sum())

    @torch.no_grad()
    def weak_cells(self, threshold: float) -> Tensor:
        """Live cells whose probability is at most ``threshold / K`` (K live cells)."""
        return self.alive & (self.probs() <= threshold / int(self.alive.sum()))

    def widest_cell(self) -> int:
        """Index of the cell that keeps the most units."""
        return max(range(len(self.cells)), key=lambda k: int(torch.prod(self.cells[k])))

    def target_extents(self) -> tuple[int, ...] | None:
        """Extents to cut to now (the widest live width), or None when the group already has them."""
        widest = tuple(int(w) for w in self.cells[self.alive].max(dim=0).values)
        target = tuple(min(w, s) for w, s in zip(widest, self.shape, strict=True))
        return None if target == self.shape else target

    def cut_(self, extents: Sequence[int], optimizers: Iterable[torch.optim.Optimizer] = ()) -> Tensor:
        """Keep the most important units within ``extents``; return their flat positions among the current."""
        raise NotImplementedError

    @torch.no_grad()
    def mark_decided(self) -> None:
        """Freeze the logits and turn the mask into a free multiplier, continuous with the soft mask."""
        if int(self.alive.sum()) != 1:
            raise ValueError(f"{self.kind} group: {int(self.alive.sum())} cells alive, cannot decide")
        self.multiplier.data = self.mix * torch.sigmoid(self.score) + (1 - self.mix)
        self.decided.fill_(True)
        self._decided = True
        self.alpha.requires_grad_(False)
        self.score.requires_grad_(False)

    def _take_scores_(self, take: Take, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        optimizers = list(optimizers)
        for tensor in (self.score, self.multiplier):
            slice_tensor_(tensor, take, optimizers)

    # -- losses ------------------------------------------------------------------------------------
    def importance_l1(self) -> Tensor:
        """Light L1 pull on the importance scores (lambda * sum sigmoid(s))."""
        return self.l1 * torch.sigmoid(self.score).sum()


class VectorGroup(MaskGroup):
    """Units along one axis: MLP hidden neurons or embedding channels."""

    def __init__(self, kind: str, size: int, widths: Sequence[int], l1: float) -> None:
        super().__init__(kind, (size,), [(w,) for w in widths], l1)
        self.register_buffer("kept", torch.arange(size))

    def kept_indices(self) -> list[int]:
        return [int(i) for i in self.kept]

    @torch.no_grad()
    def local_positions(self, dense_indices: Sequence[int]) -> Tensor:
        """Positions among the current units of the given dense indices (for cutting to a known spec)."""
        where = {int(k): i for i, k in enumerate(self.kept)}
        return torch.tensor([where[i] for i in dense_indices], dtype=torch.long)

    @torch.no_grad()
    def cut_(self, extents: Sequence[int], optimizers: Iterable[torch.optim.Optimizer] = ()) -> Tensor:
        return self.cut_to_(_top_sorted(self.score, int(extents[0])), optimizers)

    @torch.no_grad()
    def cut_to_(self, local: Tensor, optimizers: Iterable[torch.optim.Optimizer] = ()) -> Tensor:
        """Keep the units at ``local`` (current positions); return those positions."""
        self._take_scores_(take_along(0, local), optimizers)
        self.kept = self.kept[local.to(self.kept.device)]
        return local


class HeadGroup(MaskGroup):
    """Attention heads x per-head qkv channels; every kept head keeps the same number of channels."""

    def __init__(self, num_heads: int, head_dim: int, cells: Sequence[tuple[int, int]], l1: float) -> None:
        super().__init__("attention", (num_heads, head_dim), cells, l1)
        self.register_buffer("kept_heads", torch.arange(num_heads))
        self.register_buffer("kept_channels", torch.arange(head_dim).repeat(num_heads, 1))

    def restore(self, rank_mask: Tensor) -> Tensor:
        """Heads ranked by the sum of their channel importances, channels ranked within each head."""
        head_rank = ranks(torch.sigmoid(self.score).sum(dim=1))
        return rank_mask[head_rank].gather(1, ranks(self.score, dim=1))

    def expected_heads(self) -> Tensor | float:
        """Expected number of live heads (differentiable in the logits): the latency loss counts per-head work
        (softmax, the attention matmuls' launches) apart from per-channel work."""
        if self.is_decided:
            return float(self.shape[0])
        heads = torch.minimum(self.cells[:, 0], self.cells.new_tensor(self.shape[0]))
        return (self.probs() * heads.to(self.alpha.dtype)).sum()

    @torch.no_grad()
    def cut_(self, extents: Sequence[int], optimizers: Iterable[torch.optim.Optimizer] = ()) -> Tensor:
        heads = _top_sorted(torch.sigmoid(self.score).sum(dim=1), int(extents[0]))
        channels = torch.stack([_top_sorted(self.score[h], int(extents[1])) for h in heads])
        return self.cut_to_(heads, channels, optimizers)

    @torch.no_grad()
    def cut_to_(
        self, heads: Tensor, channels: Tensor, optimizers: Iterable[torch.optim.Optimizer] = ()
    ) -> Tensor:
        """Keep ``heads`` (current positions) and, per kept head, ``channels``; return flat positions."""
        width = self.shape[1]
        flat = (heads[:, None] * width + channels).reshape(-1)
        self._take_scores_(lambda t: t[heads.to(t.device)].gather(1, channels.to(t.device)), optimizers)
        self.kept_channels = self.kept_channels[heads.to(self.kept_channels.device)].gather(
            1, channels.to(self.kept_channels.device)
        )
        self.kept_heads = self.kept_heads[heads.to(self.kept_heads.device)]
        return flat

    @torch.no_grad()
    def local_positions(
        self, dense_heads: Sequence[int], dense_channels: Sequence[Sequence[int]]
    ) -> tuple[Tensor, Tensor]:
        """Current positions of the given dense heads and, per head, dense channels."""
        head_at = {int(h): i for i, h in enumerate(self.kept_heads)}
        heads = torch.tensor([head_at[h] for h in dense_heads], dtype=torch.long)
        rows = []
        for h, chans in zip(heads.tolist(), dense_channels, strict=True):
            chan_at = {int(c): i for i, c in enumerate(self.kept_channels[h])}
            rows.append([chan_at[c] for c in chans])
        return heads, torch.tensor(rows, dtype=torch.long)
