"""Rebuilding a plain timm Swin of an :class:`ArchSpec`'s widths (what materialisation and loading fill)."""

from __future__ import annotations

from functools import partial

from timm.layers import ClassifierHead, Mlp, PatchEmbed
from timm.models.swin_transformer import SwinTransformer, SwinTransformerStage, WindowAttention
from torch import nn

from ofbdeploy.arch import ArchSpec
from ofbdeploy.families.swin.shape import SwinShape


def build_swin(spec: ArchSpec) -> SwinTransformer:
    """A timm ``SwinTransformer`` with the widths of ``spec``: built with the dense options, then the patch
    embedding, every stage (its patch merging sized E_prev -> E), every block's ``WindowAttention`` and ``Mlp``,
    the final norm and the classifier are timm modules of the searched widths (weights uninitialised)."""
    b: SwinShape = spec.base
    norm = partial(nn.LayerNorm, eps=b.norm_eps)
    model = SwinTransformer(
        img_size=b.img_size, patch_size=b.patch_size, in_chans=b.in_chans, num_classes=b.num_classes,
        global_pool=b.global_pool, embed_dim=spec.embed_dims[0], depths=b.depths, num_heads=(1,) * b.stages,
        head_dim=1, window_size=tuple((w, w) for w in b.window_sizes), mlp_ratio=1.0, qkv_bias=b.qkv_bias,
        drop_path_rate=0.0, norm_layer=norm, weight_init="skip",
    )
    model.patch_embed = PatchEmbed(b.img_size, b.patch_size, b.in_chans, spec.embed_dims[0],
                                   norm_layer=norm if b.patch_norm else None, output_fmt="NHWC")
    blocks = iter(spec.blocks)
    in_dim = spec.embed_dims[0]
    for s, old in enumerate(model.layers):
        width = spec.embed_dims[s]
        stage = SwinTransformerStage(dim=in_dim, out_dim=width, input_resolution=old.input_resolution,
                                     depth=b.depths[s], downsample=s > 0, num_heads=1, head_dim=1,
                                     window_size=b.window_sizes[s], mlp_ratio=1.0, qkv_bias=b.qkv_bias,
                                     norm_layer=norm)
        for block in stage.blocks:
            blk = next(blocks)
            block.attn = WindowAttention(width, num_heads=blk.heads, head_dim=blk.head_dim,
                                         window_size=block.window_size, qkv_bias=b.qkv_bias)
            block.mlp = Mlp(width, hidden_features=blk.mlp_dim, act_layer=nn.GELU)
        model.layers[s] = stage
        in_dim = width
    model.norm = norm(in_dim)
    model.head = ClassifierHead(in_dim, b.num_classes, pool_type=b.global_pool, input_fmt="NHWC")
    model.embed_dim = spec.embed_dims[0]
    model.num_features = model.head_hidden_size = in_dim
    return model
