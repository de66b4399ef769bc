"""A timm Swin Transformer (v1) with OFB bi-masks attached: the Swin family's searchable model.

Groups: one embedding group per stage (``stages.{s}.embedding``), and per block (numbered across stages)
heads x head width (``blocks.{i}.attn``) and MLP width (``blocks.{i}.mlp``). Hooks on each block's
``attn.qkv`` and ``mlp.fc1`` apply the head and MLP masks, as for a ViT; a hook on each patch merging
applies its stage's embedding mask, and the first stage's is applied to the patch embedding's output in
:meth:`SearchableSwin.forward`, right after PMIM's mask tokens replace hidden patches.
"""

from __future__ import annotations

import torch
from timm.models.swin_transformer import SwinTransformer
from torch import Tensor, nn

from ofbdeploy.families.swin.shape import SwinShape, SwinSpace
from ofbdeploy.families.swin.space import swin_space
from ofbdeploy.families.swin.support import read_swin_shape
from ofbdeploy.search.groups import HeadGroup, VectorGroup
from ofbdeploy.search.searchable import (
    L1_ATTENTION,
    L1_OTHER,
    PixelDecoder,
    SearchableModel,
    qkv_factor,
    scale_rows,
    slice_block_embedding_,
    slice_heads_,
    slice_mlp_,
)
from ofbdeploy.search.slicing import slice_layer_norm_, slice_linear_, slice_tensor_, take_along


class SearchableSwin(SearchableModel):
    """Wraps a timm ``SwinTransformer``; ``forward`` is the masked model."""

    def __init__(
        self,
        swin: SwinTransformer,
        space: SwinSpace | None = None,
        model_name: str = "",
        l1_attention: float = L1_ATTENTION,
        l1_other: float = L1_OTHER,
    ) -> None:
        shape = read_swin_shape(swin, model_name)
        super().__init__(shape, space or swin_space(shape))
        s: SwinShape = self.shape
        self.swin = swin
        self.embed_names = tuple(f"stages.{k}.embedding" for k in range(s.stages))
        for k, stage_space in enumerate(self.space.stages):
            self.embed_groups.append(VectorGroup("embedding", s.embed_dims[k], stage_space.embedding, l1_other))
        self.block_stage = [k for k, depth in enumerate(s.depths) for _ in range(depth)]
        self.blocks = [block for stage in swin.layers for block in stage.blocks]
        for block, k in zip(self.blocks, self.block_stage, strict=True):
            stage_space = self.space.stages[k]
            attn = HeadGroup(s.num_heads[k], s.head_dims[k], stage_space.attention, l1_attention)
            mlp = VectorGroup("mlp", s.mlp_dims[k], stage_space.mlp, l1_other)
            self.attn_groups.append(attn)
            self.mlp_groups.append(mlp)
            block.attn.qkv.register_forward_hook(self._qkv_hook(attn, s.head_dims[k]))
            block.mlp.fc1.register_forward_hook(self._mask_hook(mlp))
        for k in range(1, s.stages):
            swin.layers[k].downsample.register_forward_hook(self._mask_hook(self.embed_groups[k]))
        self.mask_token = nn.Parameter(nn.init.trunc_normal_(torch.empty(s.embed_dims[0]), std=0.02))
        self.decoder = PixelDecoder(s.embed_dims[-1], s.stride, s.in_chans)

    # -- forward --------------------------------------------------------------------------------
    def _qkv_hook(self, group: HeadGroup, dense_head_dim: int):
        def hook(_module: nn.Module, _args: tuple, out: Tensor) -> Tensor:
            return out * qkv_factor(group, group.shape[1], dense_head_dim).to(out.dtype)

        return hook

    @staticmethod
    def _mask_hook(group: VectorGroup):
        def hook(_module: nn.Module, _args: tuple, out: Tensor) -> Tensor:
            return out * group.mask().to(out.dtype)

        return hook

    def forward(self, images: Tensor, token_mask: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Logits; with a PMIM ``token_mask`` (B x patch-embedding tokens, True = hidden), logits and the
        decoder's reconstruction of the images from the last stage."""
        self._check_images(images)
        swin = self.swin
        x = swin.patch_embed(images)  # (B, H, W, C)
        if token_mask is not None:
            hidden = token_mask.reshape(*x.shape[:3], 1)
            x = torch.where(hidden, self.mask_token.to(x.dtype), x)
        x = x * self.embed_groups[0].mask().to(x.dtype)
        x = swin.norm(swin.layers(x))
        logits = swin.forward_head(x)
        if token_mask is None:
            return logits
        b, h, w, c = x.shape
        size = images.shape[-2:]
        return logits, self.decoder(x.reshape(b, h * w, c))[..., : size[0], : size[1]]

    # -- physical slicing -----------------------------------------------------------------------
    def _slice_layers(self, name: str, keep: Tensor, optimizers: list) -> None:
        kind, index, _ = name.split(".")
        if kind == "stages":
            self._slice_stage(int(index), keep, optimizers)
            return
        block, group = self.blocks[int(index)], self.attn_groups[int(index)]
        if name.endswith(".mlp"):
            slice_mlp_(block.mlp, keep, optimizers)
            return
        old_width = block.attn.qkv.out_features // 3 // block.attn.num_heads
        heads = keep.reshape(group.shape[0], group.shape[1])[:, 0] // old_width
        slice_tensor_(block.attn.relative_position_bias_table, take_along(1, heads), optimizers)
        slice_heads_(block.attn, group, keep, optimizers)

    def _slice_stage(self, k: int, keep: Tensor, optimizers: list) -> None:
        """Cut stage ``k``'s residual width: what feeds it, its blocks, and what reads it (the next merging's
        four input groups, or the final norm, the classifier and the PMIM decoder)."""
        swin, first, last = self.swin, take_along(0, keep), take_along(1, keep)
        stage = swin.layers[k]
        old = stage.blocks[0].norm1.normalized_shape[0]
        if k == 0:
            conv = swin.patch_embed.proj
            slice_tensor_(conv.weight, first, optimizers)
            if conv.bias is not None:
                slice_tensor_(conv.bias, first, optimizers)
            conv.out_channels = int(conv.weight.shape[0])
            if isinstance(swin.patch_embed.norm, nn.LayerNorm):
                slice_layer_norm_(swin.patch_embed.norm, first, optimizers)
            slice_tensor_(self.mask_token, first, optimizers)
        else:
            slice_linear_(stage.downsample.reduction, first, 0, optimizers)
            stage.downsample.out_dim = len(keep)
        for block in stage.blocks:
            slice_block_embedding_(block, keep, optimizers)
            block.dim = block.attn.dim = len(keep)
        if k + 1 < len(swin.layers):
            merge = swin.layers[k + 1].downsample
            quads = torch.cat([keep + j * old for j in range(4)])
            slice_layer_norm_(merge.norm, take_along(0, quads), optimizers)
            slice_linear_(merge.reduction, take_along(1, quads), 1, optimizers)
            merge.dim = swin.layers[k + 1].dim = len(keep)
            return
        slice_layer_norm_(swin.norm, first, optimizers)
        if isinstance(swin.head.fc, nn.Linear):
            slice_linear_(swin.head.fc, last, 1, optimizers)
        self.decoder.slice_inputs_(last, optimizers)
        swin.num_features = swin.head_hidden_size = swin.head.in_features = swin.head.num_features = len(keep)

    # -- materialisation ------------------------------------------------------------------------
    @torch.no_grad()
    def folded_state_dict(self) -> dict[str, Tensor]:
        """The Swin's state dict with the head and MLP masks folded into qkv and fc1 rows, and each stage's
        embedding mask into what starts the stage (the patch embedding's norm or convolution, the merging's
        reduction)."""
        state = {k: v.detach().clone() for k, v in self.swin.state_dict().items()}
        names = [f"layers.{k}.blocks.{j}" for k, depth in enumerate(self.shape.depths) for j in range(depth)]
        for name, attn, mlp, k in zip(names, self.attn_groups, self.mlp_groups, self.block_stage, strict=True):
            scale_rows(state, f"{name}.attn.qkv", qkv_factor(attn, attn.shape[1], self.shape.head_dims[k]))
            scale_rows(state, f"{name}.mlp.fc1", mlp.mask())
        first = "patch_embed.norm" if self.shape.patch_norm else "patch_embed.proj"
        scale_rows(state, first, self.embed_groups[0].mask())
        for k in range(1, self.shape.stages):
            scale_rows(state, f"layers.{k}.downsample.reduction", self.embed_groups[k].mask())
        return state
