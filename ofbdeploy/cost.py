"""Analytic cost of each model family: the one function behind the FLOPs loss, ``ArchSpec`` and every report.

Convention: FLOPs are multiply-accumulates (MACs) of matrix products and convolutions, for one image,
counting every token including prefix tokens (class, registers, distillation), as the DeiT and OFB tables
count them. Layer norms, softmax, GELU, residual additions, biases and pooling are left out (a fraction of a
percent). Widths may be Python numbers or tensors: with tensors of expected widths the result is
differentiable, which is how the search's FLOPs loss uses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

from torch import Tensor, nn

if TYPE_CHECKING:
    from ofbdeploy.arch import ViTShape

Width = TypeVar("Width", int, float, Tensor)


def block_macs(tokens: int, embed: Width, attn_dim: Width, mlp_dim: Width) -> Width:
    """One block: qkv projection, q.k^T, attention.v, output projection, two MLP layers."""
    qkv = tokens * embed * 3 * attn_dim
    attention = 2 * tokens * tokens * attn_dim
    proj = tokens * attn_dim * embed
    mlp = 2 * tokens * embed * mlp_dim
    return qkv + attention + proj + mlp


def attention_pool_macs(shape: ViTShape, embed: Width) -> Width:
    """SigLIP's attention-pool head ('map'): one latent query over the patch tokens, then its MLP."""
    tokens = shape.num_patches + (shape.num_prefix_tokens if shape.pool_include_prefix else 0)
    query = embed * embed
    keys_values = tokens * embed * 2 * embed
    attention = 2 * tokens * embed
    return query + keys_values + attention + embed * embed + 2 * embed * shape.pool_mlp_dim


def vit_macs(shape: ViTShape, embed: Width, attn_dims: Sequence[Width], mlp_dims: Sequence[Width]) -> Width:
    """MACs of a ViT of ``shape`` whose embedding, attention (heads x head width) and MLP widths are given."""
    n = shape.num_tokens
    total = shape.num_patches * shape.in_chans * shape.patch_size**2 * embed
    for attn_dim, mlp_dim in zip(attn_dims, mlp_dims, strict=True):
        total = total + block_macs(n, embed, attn_dim, mlp_dim)
    if shape.global_pool == "map":
        total = total + attention_pool_macs(shape, embed)
    return total + embed * shape.num_classes * (2 if shape.distilled else 1)


def _norm(embed: Width, present: bool) -> Width:
    return 2 * embed * int(present)


def attention_pool_params(shape: ViTShape, embed: Width) -> Width:
    """Latent, q, kv and output projections, norm and MLP of the attention-pool head."""
    hidden = shape.pool_mlp_dim
    projections = (embed * embed + embed) + (embed * 2 * embed + 2 * embed) + (embed * embed + embed)
    return embed + projections + 2 * embed + (embed * hidden + hidden + hidden * embed + embed)


def vit_params(shape: ViTShape, embed: Width, attn_dims: Sequence[Width], mlp_dims: Sequence[Width]) -> Width:
    """Parameters (weights, biases, norms, tokens, position embedding, heads) of the same ViT."""
    prefix = shape.num_prefix_tokens
    stem = embed * shape.in_chans * shape.patch_size**2 + embed * int(not shape.pre_norm)  # timm: no bias with pre-norm
    positions = shape.num_patches + (0 if shape.no_embed_class else prefix)
    stem = stem + embed * positions * int(shape.pos_embed) + embed * prefix
    stem = stem + _norm(embed, shape.patch_norm) + _norm(embed, shape.pre_norm) + _norm(embed, shape.final_norm)
    heads = (embed + 1) * shape.num_classes * (2 if shape.distilled else 1)
    total = stem + heads
    if shape.global_pool == "map":
        total = total + attention_pool_params(shape, embed)
    bias = int(shape.proj_bias)
    for attn_dim, mlp_dim in zip(attn_dims, mlp_dims, strict=True):
        qkv = embed * 3 * attn_dim + 3 * attn_dim * int(shape.qkv_bias)
        proj = attn_dim * embed + embed * bias
        mlp = embed * mlp_dim + mlp_dim * bias + mlp_dim * embed + embed * bias
        norms = 4 * embed + 2 * embed * int(shape.layer_scale)
        total = total + qkv + proj + mlp + norms
    return total


def count_params(model: nn.Module) -> int:
    """Parameters of a live module, for checking the analytic count."""
    return sum(p.numel() for p in model.parameters())


def measure_macs(model: nn.Module, img_size: int, in_chans: int = 3) -> float:
    """MACs of one image counted by PyTorch's own FLOP counter (an independent check of the analytic counts).

    Fused attention is switched off while counting so that every product is an ordinary ``bmm`` that the
    counter sees, whichever attention kernel the platform would pick. Parameters stop requiring gradients
    meanwhile: the counter's module tracker fails on a view of a parameter taken under ``no_grad`` (the
    latent query of SigLIP's attention pool).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    fused = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    trainable = [p for p in model.parameters() if p.requires_grad]
    device = next(model.parameters()).device
    try:
        for m, _ in fused:
            m.fused_attn = False
        for p in trainable:
            p.requires_grad_(False)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, in_chans, img_size, img_size, device=device))
    finally:
        for m, flag in fused:
            m.fused_attn = flag
        for p in trainable:
            p.requires_grad_(True)
    return counter.get_total_flops() / 2
