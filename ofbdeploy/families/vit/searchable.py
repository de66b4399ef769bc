"""A timm ViT with OFB bi-masks attached: the ViT family's searchable model.

Groups: the embedding (``embedding``), and per block heads x head width (``blocks.{i}.attn``) and MLP width
(``blocks.{i}.mlp``). Hooks on each block's ``attn.qkv`` and ``mlp.fc1`` apply the head and MLP masks; the
embedding mask multiplies the tokens where the residual stream starts (see :class:`SearchableViT`).
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ofbdeploy.arch.grids import SearchSpace
from ofbdeploy.errors import ArchError
from ofbdeploy.families.vit.space import space_for
from ofbdeploy.families.vit.support import read_vit_shape
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
        shape = read_vit_shape(vit, model_name)
        super().__init__(shape, space or space_for(shape))
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
