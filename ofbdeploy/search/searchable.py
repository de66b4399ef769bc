"""Timm models with OFB bi-masks attached, without forking timm's model code.

:class:`SearchableModel` is what the search engine, the budget enforcement and materialisation talk to:
the groups, progressive shrinking, deciding, the architecture record. Each family subclasses it with how its
groups attach to the timm modules (forward hooks on ``qkv`` and ``fc1``, the embedding mask where the
residual stream starts), how a cut slices the layers, and how the masks fold into the weights.
:class:`SearchableViT` is the ViT family's; the Swin family's lives in :mod:`ofbdeploy.search.searchable_swin`.

The timm modules stay timm modules. Physical cuts slice them in place (and the optimiser state with them),
so the model that comes out of a search is already the smaller timm model; materialisation only folds the
masks into the weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ofbdeploy.arch import ArchSpec, BlockSpec
from ofbdeploy.errors import ArchError
from ofbdeploy.families import family_of
from ofbdeploy.grids import SearchSpace
from ofbdeploy.search.groups import HeadGroup, MaskGroup, VectorGroup
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
    name the embedding groups, and implement the forward pass, slicing, folding and the analytic MACs.
    """

    embed_names: tuple[str, ...]

    def __init__(self, shape, space) -> None:
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

    @abstractmethod
    def _macs(self, embeds: list, attn_dims: list, mlp_dims: list) -> Tensor | float:
        """The family's MACs at the given (possibly expected, tensor) widths."""

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
        return self.alpha_zero() + self._macs(embeds, attn, mlp)  # a tensor even when every group is decided

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


class SearchableViT(SearchableModel):
    """Wraps a timm ``VisionTransformer`` (or ``VisionTransformerDistilled``); ``forward`` is the masked model.

    The embedding mask multiplies the tokens where the residual stream starts: after the position embedding
    and prefix tokens, or after CLIP's pre-norm when the model has one (a mask in front of a LayerNorm would
    be normalised away).
    """

    embed_names = ("embedding",)

    def __init__(
        self,
        vit: VisionTransformer,
        space: SearchSpace | None = None,
        model_name: str = "",
        l1_attention: float = L1_ATTENTION,
        l1_other: float = L1_OTHER,
    ) -> None:
        from ofbdeploy.families.vit import read_vit_shape

        shape = read_vit_shape(vit, model_name)
        super().__init__(shape, space or family_of(shape).space(shape))
        s = self.shape
        self.vit = vit
        self.embed_groups.append(VectorGroup("embedding", s.embed_dim, self.space.embedding, l1_other))
        self.attn_groups.extend(
            HeadGroup(s.num_heads, s.head_dim, self.space.attention, l1_attention) for _ in range(s.depth)
        )
        self.mlp_groups.extend(VectorGroup("mlp", s.mlp_dim, self.space.mlp, l1_other) for _ in range(s.depth))
        self.mask_token = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, 1, s.embed_dim), std=0.02))
        self.decoder = PixelDecoder(s.embed_dim, s.patch_size, s.in_chans)
        for block, attn_group, mlp_group in zip(vit.blocks, self.attn_groups, self.mlp_groups, strict=True):
            block.attn.qkv.register_forward_hook(self._qkv_hook(block.attn, attn_group))
            block.mlp.fc1.register_forward_hook(self._fc1_hook(mlp_group))

    @property
    def embed_group(self) -> VectorGroup:
        return self.embed_groups[0]

    # -- forward --------------------------------------------------------------------------------
    def _qkv_hook(self, attn: nn.Module, group: HeadGroup):
        def hook(_module: nn.Module, _args: tuple, out: Tensor) -> Tensor:
            return out * self.qkv_scale(attn, group).to(out.dtype)

        return hook

    def _fc1_hook(self, group: VectorGroup):
        def hook(_module: nn.Module, _args: tuple, out: Tensor) -> Tensor:
            return out * group.mask().to(out.dtype)

        return hook

    def qkv_scale(self, attn: nn.Module, group: HeadGroup) -> Tensor:
        """Per-row factor of a block's qkv output (see :func:`qkv_factor`)."""
        return qkv_factor(group, attn.head_dim, self.shape.head_dim)

    def forward_features(self, images: Tensor, token_mask: Tensor | None = None) -> Tensor:
        """Tokens after the final norm; ``token_mask`` (B x patches, True = hidden) is PMIM's masking.

        Hidden patches are replaced whole by the mask token, so they carry no position embedding.
        """
        self._check_images(images)
        vit = self.vit
        x = vit._pos_embed(vit.patch_embed(images))
        if token_mask is not None:
            prefix = vit.num_prefix_tokens
            patches = torch.where(token_mask[..., None], self.mask_token.to(x.dtype), x[:, prefix:])
            x = torch.cat([x[:, :prefix], patches], dim=1)
        mask = self.embed_group.mask().to(x.dtype)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x) * mask if self.shape.pre_norm else vit.norm_pre(x * mask)
        x = vit.blocks(x)
        return vit.norm(x)

    def forward(self, images: Tensor, token_mask: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Logits; with a PMIM ``token_mask``, logits and the decoder's reconstruction of the images.

        One forward for both, so that DDP sees every parameter that takes part in the step.
        """
        tokens = self.forward_features(images, token_mask)
        logits = self.vit.forward_head(tokens)
        if token_mask is None:
            return logits
        return logits, self.decoder(tokens[:, self.vit.num_prefix_tokens :])

    def _macs(self, embeds: list, attn_dims: list, mlp_dims: list) -> Tensor | float:
        from ofbdeploy.cost import vit_macs

        return vit_macs(self.shape, embeds[0], attn_dims, mlp_dims)

    # -- physical slicing -----------------------------------------------------------------------
    def _slice_layers(self, name: str, keep: Tensor, optimizers: list) -> None:
        if name == "embedding":
            self._slice_embedding(keep, optimizers)
            return
        _, index, kind = name.split(".")
        block = self.vit.blocks[int(index)]
        if kind == "mlp":
            slice_mlp_(block.mlp, keep, optimizers)
            return
        slice_heads_(block.attn, self.attn_groups[int(index)], keep, optimizers)
        block.attn.head_dim = self.attn_groups[int(index)].shape[1]
        block.attn.attn_dim = block.attn.num_heads * block.attn.head_dim

    def _slice_embedding(self, keep: Tensor, optimizers: list) -> None:
        """Cut the residual stream everywhere: stem, tokens, every block's inputs/outputs, norms, heads."""
        vit = self.vit
        if vit.attn_pool is not None:
            raise ArchError("the embedding of a model with an attention-pool head is not searched")
        first, last, third = take_along(0, keep), take_along(1, keep), take_along(2, keep)
        conv = vit.patch_embed.proj
        slice_tensor_(conv.weight, first, optimizers)
        if conv.bias is not None:
            slice_tensor_(conv.bias, first, optimizers)
        conv.out_channels = int(conv.weight.shape[0])
        for token in (vit.cls_token, vit.reg_token, getattr(vit, "dist_token", None), vit.pos_embed, self.mask_token):
            if token is not None:
                slice_tensor_(token, third, optimizers)
        for block in vit.blocks:
            slice_block_embedding_(block, keep, optimizers)
        self.decoder.slice_inputs_(last, optimizers)
        for norm in (vit.patch_embed.norm, vit.norm_pre, vit.norm, vit.fc_norm):
            if isinstance(norm, nn.LayerNorm):
                slice_layer_norm_(norm, first, optimizers)
        for head in (vit.head, getattr(vit, "head_dist", None)):
            if isinstance(head, nn.Linear):
                slice_linear_(head, last, 1, optimizers)
        vit.embed_dim = vit.num_features = vit.head_hidden_size = int(conv.weight.shape[0])

    # -- materialisation ------------------------------------------------------------------------
    @torch.no_grad()
    def folded_state_dict(self) -> dict[str, Tensor]:
        """The timm model's state dict with every mask multiplied into the preceding weights.

        The embedding mask folds into what starts the residual stream: the pre-norm's affine weights when
        there is one, else the prefix tokens, the position embedding and the patch embedding (its norm's
        affine weights when it has a norm, its convolution otherwise).
        """
        state = {k: v.detach().clone() for k, v in self.vit.state_dict().items()}
        for i, block in enumerate(self.vit.blocks):
            scale_rows(state, f"blocks.{i}.attn.qkv", self.qkv_scale(block.attn, self.attn_groups[i]))
            scale_rows(state, f"blocks.{i}.mlp.fc1", self.mlp_groups[i].mask())
        embed = self.embed_group.mask()
        if self.shape.pre_norm:
            scale_rows(state, "norm_pre", embed)
            return state
        scale_rows(state, "patch_embed.norm" if self.shape.patch_norm else "patch_embed.proj", embed)
        for token in ("cls_token", "reg_token", "dist_token", "pos_embed"):
            if token in state:
                state[token] = state[token] * embed
        return state
