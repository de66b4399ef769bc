"""Rebuilding a plain timm ViT of an :class:`ArchSpec`'s widths (what materialisation and loading fill)."""

from __future__ import annotations

from functools import partial

from timm.layers import Attention, LayerNorm, Mlp
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from ofbdeploy.arch import ArchSpec
from ofbdeploy.families.vit.support import BLOCKS


def build_vit(spec: ArchSpec) -> VisionTransformer:
    """A timm ``VisionTransformer`` (or ``VisionTransformerDistilled``) with the widths of ``spec``.

    Built with the dense model's options, then every block gets timm's own ``Attention`` and ``Mlp`` of its
    searched widths (weights uninitialised: they are loaded).
    """
    b = spec.base
    embed = spec.embed_dim
    norm = partial(LayerNorm, eps=b.norm_eps)
    cls = VisionTransformerDistilled if b.distilled else VisionTransformer
    model = cls(
        img_size=b.img_size, patch_size=b.patch_size, in_chans=b.in_chans, num_classes=b.num_classes,
        global_pool=b.global_pool, embed_dim=embed, depth=b.depth,
        num_heads=b.pool_heads or 1, mlp_ratio=b.pool_mlp_dim / embed if b.pool_mlp_dim else 1.0,
        qkv_bias=b.qkv_bias, proj_bias=b.proj_bias, init_values=1.0 if b.layer_scale else None,
        class_token=b.class_token, pos_embed="learn" if b.pos_embed else "none", no_embed_class=b.no_embed_class,
        reg_tokens=b.reg_tokens, pre_norm=b.pre_norm, final_norm=b.final_norm, fc_norm=b.fc_norm,
        pool_include_prefix=b.pool_include_prefix, dynamic_img_size=b.dynamic_img_size,
        embed_norm_layer=norm if b.patch_norm else None, norm_layer=norm, act_layer=b.act,
        block_fn=BLOCKS[b.block], weight_init="skip",
    )
    act = model.blocks[0].mlp.act.__class__
    for block, blk in zip(model.blocks, spec.blocks, strict=True):
        block.attn = Attention(embed, num_heads=blk.heads, attn_head_dim=blk.head_dim, qkv_bias=b.qkv_bias,
                               proj_bias=b.proj_bias)
        block.mlp = Mlp(embed, hidden_features=blk.mlp_dim, act_layer=act, bias=b.proj_bias)
    if model.attn_pool is not None and model.attn_pool.mlp.fc1.out_features != b.pool_mlp_dim:
        model.attn_pool.mlp = Mlp(embed, hidden_features=b.pool_mlp_dim, out_features=embed, act_layer=act)
    return model
