"""A timm ViT with OFB bi-masks attached, without forking timm's model code.

The timm modules stay timm modules: forward hooks on each block's ``attn.qkv`` and ``mlp.fc1`` multiply
their outputs by the group masks, and the embedding mask is applied to the network input. Physical cuts
slice the timm layers in place (and the optimiser state with them), so the model that comes out of a
search is already the smaller timm model; materialisation only folds the masks into the weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ofbdeploy.arch import ArchSpec, BlockSpec, ViTShape
from ofbdeploy.errors import ArchError
from ofbdeploy.grids import SearchSpace, space_for
from ofbdeploy.search.groups import HeadGroup, MaskGroup, VectorGroup
from ofbdeploy.search.slicing import slice_layer_norm_, slice_linear_, slice_tensor_, take_along

Optimizers = Iterable[torch.optim.Optimizer]

# Light L1 on importance: 4e-4 for attention, 1e-4 for the other groups (method page, section 3).
L1_ATTENTION = 4e-4
L1_OTHER = 1e-4


class PixelDecoder(nn.Module):
    """PMIM's light decoder: a 1x1 convolution to patch_size^2 * channels, then a pixel shuffle.

    The 1x1 convolution is written as the Linear on tokens it equals: same product, and a weight gradient
    laid out like the weight (a 1x1 Conv2d's is not, which DDP's gradient buckets warn about).
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


@dataclass(frozen=True)
class ShrinkEvent:
    """One change of a group's structure, for the search log."""

    group: str
    switched_off: int
    shape: tuple[int, ...]
    decided: bool


class SearchableViT(nn.Module):
    """Wraps a timm ``VisionTransformer``; ``forward`` is the masked model."""

    def __init__(
        self,
        vit: VisionTransformer,
        space: SearchSpace | None = None,
        model_name: str = "",
        l1_attention: float = L1_ATTENTION,
        l1_other: float = L1_OTHER,
    ) -> None:
        super().__init__()
        self.shape = ViTShape.from_model(vit, model_name)
        s = self.shape
        self.space = space or space_for(s)
        self.vit = vit
        self.embed_group = VectorGroup("embedding", s.embed_dim, self.space.embedding, l1_other)
        self.attn_groups = nn.ModuleList(
            HeadGroup(s.num_heads, s.head_dim, self.space.attention, l1_attention) for _ in range(s.depth)
        )
        self.mlp_groups = nn.ModuleList(
            VectorGroup("mlp", s.mlp_dim, self.space.mlp, l1_other) for _ in range(s.depth)
        )
        self.mask_token = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, 1, s.embed_dim), std=0.02))
        self.decoder = PixelDecoder(s.embed_dim, s.patch_size, s.in_chans)
        for block, attn_group, mlp_group in zip(vit.blocks, self.attn_groups, self.mlp_groups, strict=True):
            block.attn.qkv.register_forward_hook(self._qkv_hook(block.attn, attn_group))
            block.mlp.fc1.register_forward_hook(self._fc1_hook(mlp_group))

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
        """Per-row factor of a block's qkv output: the mask on q, k and v, and on q the scale correction.

        The search keeps the dense attention scale 1/sqrt(d); timm scales by 1/sqrt(current head width)
        (its fused path cannot be told otherwise), so q carries sqrt(width / d) to undo the difference.
        """
        mask = group.mask().reshape(-1)
        correction = (attn.head_dim / self.shape.head_dim) ** 0.5
        return torch.cat([mask * correction, mask, mask])

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
        x = x * self.embed_group.mask().to(x.dtype)
        x = vit.norm_pre(vit.patch_drop(x))
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

    def _check_images(self, images: Tensor) -> None:
        s = self.shape
        expected = (s.in_chans, s.img_size, s.img_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images: expected a batch of shape (B, {', '.join(map(str, expected))}), got {tuple(images.shape)}"
            )

    # -- groups ---------------------------------------------------------------------------------
    def groups(self) -> Iterator[tuple[str, MaskGroup]]:
        """Every group with a stable name (used in logs and checkpoints)."""
        yield "embedding", self.embed_group
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
        return self.embed_group.alpha.new_zeros(())

    def expected_macs(self) -> Tensor:
        """MACs at the expected widths, differentiable in the sparsity logits (the FLOPs loss input)."""
        from ofbdeploy.cost import vit_macs

        embed = self.embed_group.expected_units()
        attn = [g.expected_units() for g in self.attn_groups]
        mlp = [g.expected_units() for g in self.mlp_groups]
        return self.alpha_zero() + vit_macs(self.shape, embed, attn, mlp)  # a tensor even when all are decided

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
    def decide_most_probable(self, optimizers: Optimizers = ()) -> list[ShrinkEvent]:
        """End of budget: every undecided group keeps its most probable cell."""
        optimizers = list(optimizers)
        events = []
        for name, group in self.groups():
            if group.is_decided:
                continue
            best = torch.zeros_like(group.alive)
            best[int(torch.argmax(group.probs()))] = True
            dropped = group.switch_off(group.alive & ~best, optimizers) if int(group.alive.sum()) > 1 else 0
            events.append(self._settle(name, group, dropped, optimizers))
        return events

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

    # -- physical slicing -----------------------------------------------------------------------
    def _slice_layers(self, name: str, keep: Tensor, optimizers: list) -> None:
        if name == "embedding":
            self._slice_embedding(keep, optimizers)
            return
        _, index, kind = name.split(".")
        block = self.vit.blocks[int(index)]
        if kind == "mlp":
            slice_linear_(block.mlp.fc1, take_along(0, keep), 0, optimizers)
            slice_linear_(block.mlp.fc2, take_along(1, keep), 1, optimizers)
            return
        attn, group = block.attn, self.attn_groups[int(index)]
        rows = torch.cat([keep + part * attn.attn_dim for part in range(3)])
        slice_linear_(attn.qkv, take_along(0, rows), 0, optimizers)
        slice_linear_(attn.proj, take_along(1, keep), 1, optimizers)
        attn.num_heads, attn.head_dim = group.shape
        attn.attn_dim = attn.num_heads * attn.head_dim
        attn.scale = attn.head_dim**-0.5

    def _slice_embedding(self, keep: Tensor, optimizers: list) -> None:
        """Cut the residual stream everywhere: stem, tokens, every block's inputs/outputs, norms, head."""
        vit = self.vit
        first, last, third = take_along(0, keep), take_along(1, keep), take_along(2, keep)
        conv = vit.patch_embed.proj
        slice_tensor_(conv.weight, first, optimizers)
        if conv.bias is not None:
            slice_tensor_(conv.bias, first, optimizers)
        conv.out_channels = int(conv.weight.shape[0])
        for token in (vit.cls_token, vit.pos_embed, self.mask_token):
            if token is not None:
                slice_tensor_(token, third, optimizers)
        for block in vit.blocks:
            slice_layer_norm_(block.norm1, first, optimizers)
            slice_layer_norm_(block.norm2, first, optimizers)
            slice_linear_(block.attn.qkv, last, 1, optimizers)
            slice_linear_(block.attn.proj, first, 0, optimizers)
            slice_linear_(block.mlp.fc1, last, 1, optimizers)
            slice_linear_(block.mlp.fc2, first, 0, optimizers)
            for scale in (block.ls1, block.ls2):
                if hasattr(scale, "gamma"):
                    slice_tensor_(scale.gamma, first, optimizers)
        slice_linear_(self.decoder.proj, last, 1, optimizers)
        for norm in (vit.norm, vit.fc_norm):
            if isinstance(norm, nn.LayerNorm):
                slice_layer_norm_(norm, first, optimizers)
        if isinstance(vit.head, nn.Linear):
            slice_linear_(vit.head, last, 1, optimizers)
        vit.embed_dim = vit.num_features = vit.head_hidden_size = int(conv.weight.shape[0])

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
        return ArchSpec(self.shape, self.embed_group.shape[0], blocks, tuple(self.embed_group.kept_indices()))

    @torch.no_grad()
    def apply_arch(self, spec: ArchSpec, optimizers: Optimizers = ()) -> None:
        """Cut every group to the units ``spec`` keeps (resuming a search, or pinning an architecture).

        The spec must keep a subset of what the model still has; groups are cut, not decided.
        """
        if spec.base.embed_dim != self.shape.embed_dim or spec.base.depth != self.shape.depth:
            raise ArchError("architecture does not belong to this model (embedding width or depth differ)")
        optimizers = list(optimizers)
        try:
            if spec.embed_dim != self.embed_group.shape[0]:
                local = self.embed_group.local_positions(spec.kept_embed)
                self._slice_layers("embedding", self.embed_group.cut_to_(local, optimizers), optimizers)
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

