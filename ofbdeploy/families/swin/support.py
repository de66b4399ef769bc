"""Which timm Swins ofbdeploy can prune (what the search has no unit for is named in one line), and reading
the :class:`SwinShape` of one."""

from __future__ import annotations

from timm.layers import ClassifierHead, Mlp, PatchEmbed
from timm.models.swin_transformer import (
    PatchMerging,
    SwinTransformer,
    SwinTransformerBlock,
    SwinTransformerStage,
    WindowAttention,
)
from torch import nn

from ofbdeploy.families.base import kind, norm_problems, refuse
from ofbdeploy.families.swin.shape import POOLS, SwinShape


def _block_problems(s: int, block: nn.Module) -> list[str]:
    if type(block) is not SwinTransformerBlock:
        return [f"stage {s}: block {kind(block)} is not timm's SwinTransformerBlock"]
    attn, mlp = block.attn, block.mlp
    act = getattr(mlp, "act", None)
    return [f"stage {s}: {reason}" for reason, bad in (
        (f"attention {kind(attn)} is not timm's WindowAttention", type(attn) is not WindowAttention),
        (f"MLP {kind(mlp)} is not timm's Mlp", type(mlp) is not Mlp),
        (f"MLP activation {kind(act)} (supported: exact GELU)",
         type(act) is not nn.GELU or getattr(act, "approximate", "") != "none"),
        ("MLP hidden norm", not isinstance(getattr(mlp, "norm", None), nn.Identity)),
        ("MLP without biases", getattr(mlp.fc1, "bias", None) is None or getattr(mlp.fc2, "bias", None) is None),
        ("windows always partitioned (always_partition)", block.always_partition),
        ("dynamic attention masks", block.dynamic_mask),
    ) if bad]


def swin_problems(model: nn.Module) -> list[str]:
    """Every feature of a timm Swin that the Swin family cannot prune (empty: prunable)."""
    embed = model.patch_embed
    problems: list[str] = []
    if type(embed) is not PatchEmbed or not isinstance(getattr(embed, "proj", None), nn.Conv2d):
        return [f"patch embedding {kind(embed)} is not timm's PatchEmbed"]
    for s, stage in enumerate(model.layers):
        if type(stage) is not SwinTransformerStage:
            return [f"stage {s}: {kind(stage)} is not timm's SwinTransformerStage"]
        if len(stage.blocks) == 0:
            return [f"stage {s} has no blocks (depth 0)"]
        down = stage.downsample
        if (s == 0) != isinstance(down, nn.Identity) or (s > 0 and type(down) is not PatchMerging):
            problems.append(f"stage {s}: downsampling {kind(down)} (supported: timm's PatchMerging after stage 0)")
        for block in stage.blocks:
            problems += _block_problems(s, block)
        if problems:
            return problems
        blocks = list(stage.blocks)
        if len({(b.attn.num_heads, b.attn.qkv.out_features, b.mlp.fc1.out_features, b.attn.qkv.bias is not None)
                for b in blocks}) > 1:
            problems.append(f"stage {s}: blocks of different widths (ofbdeploy prunes uniform dense stages)")
    head = model.head
    problems += [reason for reason, bad in (
        ("dynamic image size", model.dynamic_img_size),
        (f"global_pool {model.global_pool!r} (supported: {', '.join(POOLS)})", model.global_pool not in POOLS),
        ("classifier head other than timm's ClassifierHead with a Linear layer",
         type(head) is not ClassifierHead or not isinstance(head.fc, nn.Linear | nn.Identity)),
        ("qkv biases that differ between stages",
         len({b.attn.qkv.bias is not None for st in model.layers for b in st.blocks}) > 1),
        ("rectangular windows", any(w[0] != w[1] for w in model._ref_window_sizes)),
    ) if bad]
    problems += norm_problems(model)
    return problems


def read_swin_shape(model: nn.Module, model_name: str = "") -> SwinShape:
    """The shape of a timm Swin, or a one-line :class:`ModelError` naming what the search cannot prune."""
    if type(model) is not SwinTransformer:
        refuse([f"expected a timm SwinTransformer, got {type(model).__name__}"], "Swin")
    refuse(swin_problems(model), "Swin")
    img, patch = model.patch_embed.img_size, model.patch_embed.patch_size
    if img[0] != img[1] or patch[0] != patch[1] or img[0] % patch[0]:
        refuse([f"only square images that are a multiple of a square patch, got img {img} patch {patch}"], "Swin")
    firsts = [stage.blocks[0] for stage in model.layers]
    heads = tuple(int(b.attn.num_heads) for b in firsts)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    shape = SwinShape(
        img_size=int(img[0]),
        patch_size=int(patch[0]),
        in_chans=int(model.patch_embed.proj.in_channels),
        num_classes=int(model.num_classes),
        embed_dims=tuple(int(b.norm1.normalized_shape[0]) for b in firsts),
        depths=tuple(len(stage.blocks) for stage in model.layers),
        num_heads=heads,
        head_dims=tuple(int(b.attn.qkv.out_features // 3 // h) for b, h in zip(firsts, heads, strict=True)),
        mlp_dims=tuple(int(b.mlp.fc1.out_features) for b in firsts),
        window_sizes=tuple(int(w[0]) for w in model._ref_window_sizes),
        qkv_bias=firsts[0].attn.qkv.bias is not None,
        patch_norm=not isinstance(model.patch_embed.norm, nn.Identity),
        global_pool=str(model.global_pool),
        norm_eps=float(norms[0].eps),
        model_name=model_name,
    )
    clamped = [f"stage {s}: window {b.window_size} is not the requested one clamped to the feature size "
               f"({shape.window(s)})" for s, st in enumerate(model.layers) for b in st.blocks
               if tuple(b.window_size) != (shape.window(s),) * 2]
    refuse(clamped, "Swin")
    return shape
