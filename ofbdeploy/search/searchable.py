"""Timm models with OFB bi-masks attached, without forking timm's model code.

:class:`SearchableModel` is what the search engine, the budget enforcement and materialisation talk to:
the groups, progressive shrinking, deciding, the architecture record. Each family subclasses it with how its
groups attach to the timm modules (forward hooks on ``qkv`` and ``fc1``, the embedding mask where the
residual stream starts), how a cut slices the layers, and how the masks fold into the weights.
Each family's subclass lives in its folder (``ofbdeploy.families.vit.searchable``, ``...swin.searchable``);
this module knows no family: the shape it is given answers the cost (``ModelShape.macs_at``).

The timm modules stay timm modules. Physical cuts slice them in place (and the optimiser state with them),
so the model that comes out of a search is already the smaller timm model; materialisation only folds the
masks into the weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ofbdeploy.arch import ArchSpec, BlockSpec, ModelShape
from ofbdeploy.errors import ArchError
from ofbdeploy.search.groups import HeadGroup, MaskGroup
from ofbdeploy.search.slicing import Take, slice_layer_norm_, slice_linear_, slice_tensor_, take_along

Optimizers = Iterable[torch.optim.Optimizer]

# Light L1 on importance: 4e-4 for attention, 1e-4 for the other groups (method page, section 3).
L1_ATTENTION = 4e-4
L1_OTHER = 1e-4


class PixelDecoder(nn.Module):
    """PMIM's light decoder: a 1x1 convolution to stride^2 * channels, then a pixel shuffle.

    ``patch_size`` is the stride of the tokens it decodes: the patch size of a ViT, the last stage's stride
    of a hierarchical model. The 1x1 convolution is written as the Linear on tokens it equals: same product,
    and a weight gradient laid out like the weight (a 1x1 Conv2d's is not, which DDP's gradient buckets warn
    about).
    """

    def __init__(self, embed_dim: int, patch_size: int, in_chans: int) -> None:
        super().__init__()
        self.proj = nn.Linear(embed_dim, patch_size**2 * in_chans)
        self.shuffle = nn.PixelShuffle(patch_size)

    def forward(self, patch_tokens: Tensor) -> Tensor:
        """(B, patches, E) tokens of a square grid -> (B, C, H, W) image."""
        b, n, _ = patch_tokens.shape
        side = round(n**0.5)
        grid = self.proj(patch_tokens).transpose(1, 2).reshape(b, -1, side, side)
        return self.shuffle(grid)

    def slice_inputs_(self, take: Take, optimizers: list) -> None:
        """Keep the input channels ``take`` selects (the embedding it reads was cut)."""
        slice_linear_(self.proj, take, 1, optimizers)


@dataclass(frozen=True)
class ShrinkEvent:
    """One change of a group's structure, for the search log."""

    group: str
    switched_off: int
    shape: tuple[int, ...]
    decided: bool


def qkv_factor(group: HeadGroup, head_dim: int, dense_head_dim: int) -> Tensor:
    """Per-row factor of a qkv projection's output: the mask on q, k and v, and on q the scale correction.

    The search keeps the dense attention scale 1/sqrt(d); timm scales by 1/sqrt(current head width) (its
    fused path cannot be told otherwise), so q carries sqrt(width / d) to undo the difference.
    """
    mask = group.mask().reshape(-1)
    return torch.cat([mask * (head_dim / dense_head_dim) ** 0.5, mask, mask])


def scale_rows(state: dict[str, Tensor], prefix: str, factor: Tensor) -> None:
    """Multiply the output rows of ``prefix``'s weight (and bias) in a state dict by ``factor``."""
    weight = state[f"{prefix}.weight"]
    state[f"{prefix}.weight"] = weight * factor.reshape(-1, *([1] * (weight.dim() - 1)))
    if state.get(f"{prefix}.bias") is not None:
        state[f"{prefix}.bias"] = state[f"{prefix}.bias"] * factor


class SearchableModel(nn.Module, ABC):
    """The family-agnostic part of a searchable model: groups, shrinking, deciding, the architecture record.

    Subclasses fill ``embed_groups`` (one per stage), ``attn_groups`` and ``mlp_groups`` (one per block),
    name the embedding groups, and implement the forward pass, slicing and folding; the shape answers the
    analytic MACs.
    """

    embed_names: tuple[str, ...]

    def __init__(self, shape: ModelShape, space: Any) -> None:
        super().__init__()
        self.shape, self.space = shape, space
        self.embed_groups = nn.ModuleList()
        self.attn_groups = nn.ModuleList()
        self.mlp_groups = nn.ModuleList()

    # -- what each family provides ------------------------------------------------------------------
    @abstractmethod
    def forward(self, images: Tensor, token_mask: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Logits; with a PMIM ``token_mask`` (B x patches, True = hidden), logits and the reconstruction."""

    @abstractmethod
    def _slice_layers(self, name: str, keep: Tensor, optimizers: list) -> None:
        """Cut the layers group ``name`` masks to the units at ``keep`` (positions among the current ones)."""

    @abstractmethod
    def folded_state_dict(self) -> dict[str, Tensor]:
        """The timm model's state dict with every mask multiplied into the weights in front of it."""

    # -- groups ---------------------------------------------------------------------------------
    def groups(self) -> Iterator[tuple[str, MaskGroup]]:
        """Every group with a stable name (used in logs and checkpoints)."""
        yield from zip(self.embed_names, self.embed_groups, strict=True)
        for i, (attn_group, mlp_group) in enumerate(zip(self.attn_groups, self.mlp_groups, strict=True)):
            yield f"blocks.{i}.attn", attn_group
            yield f"blocks.{i}.mlp", mlp_group

    @property
    def all_decided(self) -> bool:
        return all(group.is_decided for _, group in self.groups())

    def set_mix(self, weight: float) -> None:
        """Set the importance/sparsity mixing weight w of every group (the schedule lives in the search)."""
        for _, group in self.groups():
            group.mix.fill_(weight)

    def alpha_zero(self) -> Tensor:
        """A zero on the logits' device and dtype, to start sums of losses from."""
        return self.embed_groups[0].alpha.new_zeros(())

    def expected_macs(self) -> Tensor:
        """MACs at the expected widths, differentiable in the sparsity logits (the FLOPs loss input)."""
        embeds = [g.expected_units() for g in self.embed_groups]
        attn = [g.expected_units() for g in self.attn_groups]
        mlp = [g.expected_units() for g in self.mlp_groups]
        return self.alpha_zero() + self.shape.macs_at(embeds, attn, mlp)  # a tensor even when all are decided

    def expected_latency_features(self) -> Tensor:
        """The latency table's work counts (``shape.latency_features``) at the expected widths. Exact
        expectations: every count is linear in each group's widths and the groups are independent."""
        embeds = [g.expected_units() for g in self.embed_groups]
        attn = [(g.expected_heads(), g.expected_units()) for g in self.attn_groups]
        mlp = [g.expected_units() for g in self.mlp_groups]
        zero = self.alpha_zero()
        return torch.stack([zero + f for f in self.shape.latency_features(embeds, attn, mlp)])

    def _check_images(self, images: Tensor) -> None:
        s = self.shape
        expected = (s.in_chans, s.img_size, s.img_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images: expected a batch of shape (B, {', '.join(map(str, expected))}), got {tuple(images.shape)}"
            )

    # -- progressive shrinking ------------------------------------------------------------------
    @torch.no_grad()
    def shrink(self, threshold: float, optimizers: Optimizers = ()) -> list[ShrinkEvent]:
        """Switch off weak cells in every undecided group, cut and decide where due."""
        optimizers = list(optimizers)
        events = []
        for name, group in self.groups():
            if group.is_decided:
                continue
            weak = group.weak_cells(threshold)
            dropped = group.switch_off(weak, optimizers) if bool(weak.any()) else 0
            if dropped or int(group.alive.sum()) == 1:
                events.append(self._settle(name, group, dropped, optimizers))
        return events

    @torch.no_grad()
    def start_logits_(self, init: str = "random", widest: float = 0.0) -> None:
        """The sparsity logits a fresh search starts from (see ``search.logit_init`` and ``widest_logit``).

        "random" keeps the drawn U(0, 1) logits (the method); "zeros" makes the cells equal, where the
        one-hot loss has no gradient, so the task and budget losses choose each group's direction. Then the
        widest cell's logit is raised by ``widest`` (soft masks near 1).
        """
        if init not in ("random", "zeros"):
            raise ValueError(f"logit init {init!r}: expected 'random' or 'zeros'")
        for _, group in self.groups():
            if group.is_decided:
                continue
            if init == "zeros":
                group.alpha.zero_()
            group.alpha[group.widest_cell()] += widest

    @torch.no_grad()
    def most_probable_cells(self) -> dict[str, int]:
        """End of budget: the most probable live cell of every undecided group (not applied yet)."""
        return {name: int(torch.argmax(group.probs())) for name, group in self.groups() if not group.is_decided}

    @torch.no_grad()
    def decide_cells(self, picks: dict[str, int], optimizers: Optimizers = ()) -> list[ShrinkEvent]:
        """Decide each named group on its picked cell index, cutting its weights to that width."""
        optimizers = list(optimizers)
        return [self.force_cell(name, cell, optimizers) for name, cell in picks.items()]

    @torch.no_grad()
    def force_cell(self, name: str, cell: int, optimizers: Optimizers = ()) -> ShrinkEvent:
        """Decide group ``name`` on cell index ``cell`` (tests, and users pinning a width by hand)."""
        group = dict(self.groups())[name]
        keep = torch.zeros_like(group.alive)
        keep[cell] = True
        dropped = group.switch_off(group.alive & ~keep, optimizers) if int(group.alive.sum()) > 1 else 0
        return self._settle(name, group, dropped, optimizers)

    @torch.no_grad()
    def decide_widest(self, optimizers: Optimizers = ()) -> None:
        """Decide every group at full width: the start of pruning by budget enforcement alone."""
        for name, group in self.groups():
            self.force_cell(name, group.widest_cell(), optimizers)

    def settle(self, name: str, optimizers: Optimizers = ()) -> ShrinkEvent:
        """Cut group ``name`` to its widest live cell, deciding it when one cell is left."""
        return self._settle(name, dict(self.groups())[name], 0, list(optimizers))

    def _settle(self, name: str, group: MaskGroup, dropped: int, optimizers: list) -> ShrinkEvent:
        extents = group.target_extents()
        if extents is not None:
            self._slice_layers(name, group.cut_(extents, optimizers), optimizers)
        if int(group.alive.sum()) == 1 and not group.is_decided:
            group.mark_decided()
        return ShrinkEvent(name, dropped, group.shape, group.is_decided)

    # -- architecture record --------------------------------------------------------------------
    def arch_spec(self) -> ArchSpec:
        """The architecture the model physically has now (final once every group is decided)."""
        blocks = tuple(
            BlockSpec(
                heads=a.shape[0],
                head_dim=a.shape[1],
                mlp_dim=m.shape[0],
                kept_heads=tuple(int(h) for h in a.kept_heads),
                kept_channels=tuple(tuple(int(c) for c in row) for row in a.kept_channels),
                kept_mlp=tuple(m.kept_indices()),
            )
            for a, m in zip(self.attn_groups, self.mlp_groups, strict=True)
        )
        return ArchSpec(self.shape, tuple(g.shape[0] for g in self.embed_groups), blocks,
                        tuple(tuple(g.kept_indices()) for g in self.embed_groups))

    @torch.no_grad()
    def apply_arch(self, spec: ArchSpec, optimizers: Optimizers = ()) -> None:
        """Cut every group to the units ``spec`` keeps (resuming a search, or pinning an architecture).

        The spec must keep a subset of what the model still has; groups are cut, not decided.
        """
        if (spec.family != self.shape.family or spec.base.embed_dims != self.shape.embed_dims
                or spec.base.depth != self.shape.depth):
            raise ArchError("architecture does not belong to this model (family, embedding widths or depth differ)")
        optimizers = list(optimizers)
        try:
            for name, group, width, kept in zip(self.embed_names, self.embed_groups, spec.embed_dims,
                                                spec.kept_embeds or [()] * len(spec.embed_dims), strict=True):
                if width != group.shape[0]:
                    self._slice_layers(name, group.cut_to_(group.local_positions(kept), optimizers), optimizers)
            for i, blk in enumerate(spec.blocks):
                attn, mlp = self.attn_groups[i], self.mlp_groups[i]
                if (blk.heads, blk.head_dim) != attn.shape:
                    heads, channels = attn.local_positions(blk.kept_heads, blk.kept_channels)
                    self._slice_layers(f"blocks.{i}.attn", attn.cut_to_(heads, channels, optimizers), optimizers)
                if blk.mlp_dim != mlp.shape[0]:
                    local = mlp.local_positions(blk.kept_mlp)
                    self._slice_layers(f"blocks.{i}.mlp", mlp.cut_to_(local, optimizers), optimizers)
        except KeyError as err:
            raise ArchError(f"architecture keeps unit {err.args[0]} that this model no longer has") from None


def slice_heads_(attn: nn.Module, group: HeadGroup, keep: Tensor, optimizers: list) -> None:
    """Cut an attention's qkv rows and projection inputs to the kept (head, channel) positions ``keep``."""
    rows = torch.cat([keep + part * (attn.qkv.out_features // 3) for part in range(3)])
    slice_linear_(attn.qkv, take_along(0, rows), 0, optimizers)
    slice_linear_(attn.proj, take_along(1, keep), 1, optimizers)
    attn.num_heads = group.shape[0]
    attn.scale = group.shape[1] ** -0.5


def slice_mlp_(mlp: nn.Module, keep: Tensor, optimizers: list) -> None:
    slice_linear_(mlp.fc1, take_along(0, keep), 0, optimizers)
    slice_linear_(mlp.fc2, take_along(1, keep), 1, optimizers)


def slice_block_embedding_(block: nn.Module, keep: Tensor, optimizers: list) -> None:
    """Cut a transformer block's residual width: its norms, the inputs of qkv and fc1, the outputs of proj and
    fc2, and LayerScale."""
    first, last = take_along(0, keep), take_along(1, keep)
    slice_layer_norm_(block.norm1, first, optimizers)
    slice_layer_norm_(block.norm2, first, optimizers)
    slice_linear_(block.attn.qkv, last, 1, optimizers)
    slice_linear_(block.attn.proj, first, 0, optimizers)
    slice_linear_(block.mlp.fc1, last, 1, optimizers)
    slice_linear_(block.mlp.fc2, first, 0, optimizers)
    for scale in (getattr(block, "ls1", None), getattr(block, "ls2", None)):
        if hasattr(scale, "gamma"):
            slice_tensor_(scale.gamma, first, optimizers)
