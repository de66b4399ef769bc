"""Analytic cost of a ViT: the one function behind the FLOPs loss, ``ArchSpec`` and every report.

Convention: FLOPs are multiply-accumulates (MACs) of matrix products and the patch convolution, for one
image, counting every token including the class token, as the DeiT and OFB tables count them. Layer
norms, softmax, GELU, residual additions and biases are left out (they are a fraction of a percent).
Widths may be Python numbers or tensors: with tensors of expected widths the result is differentiable,
which is how the search's FLOPs loss uses it.
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


def vit_macs(shape: ViTShape, embed: Width, attn_dims: Sequence[Width], mlp_dims: Sequence[Width]) -> Width:
    """MACs of a ViT of ``shape`` whose embedding, attention (heads x head width) and MLP widths are given."""
    n = shape.num_tokens
    total = shape.num_patches * shape.in_chans * shape.patch_size**2 * embed
    for attn_dim, mlp_dim in zip(attn_dims, mlp_dims, strict=True):
        total = total + block_macs(n, embed, attn_dim, mlp_dim)
    return total + embed * shape.num_classes


def vit_params(shape: ViTShape, embed: Width, attn_dims: Sequence[Width], mlp_dims: Sequence[Width]) -> Width:
    """Parameters (weights, biases, norms, tokens, position embedding) of the same ViT."""
    stem = embed * shape.in_chans * shape.patch_size**2 + embed + embed * shape.num_tokens
    stem = stem + embed * int(shape.class_token)
    total = stem + 2 * embed + (embed + 1) * shape.num_classes
    for attn_dim, mlp_dim in zip(attn_dims, mlp_dims, strict=True):
        qkv = embed * 3 * attn_dim + 3 * attn_dim * int(shape.qkv_bias)
        proj = attn_dim * embed + embed
        mlp = embed * mlp_dim + mlp_dim + mlp_dim * embed + embed
        norms = 4 * embed + 2 * embed * int(shape.layer_scale)
        total = total + qkv + proj + mlp + norms
    return total


def count_params(model: nn.Module) -> int:
    """Parameters of a live module, for checking the analytic count."""
    return sum(p.numel() for p in model.parameters())


def measure_macs(model: nn.Module, img_size: int, in_chans: int = 3) -> float:
    """MACs of one image counted by PyTorch's own FLOP counter (an independent check of :func:`vit_macs`).

    Fused attention is switched off while counting so that every product is an ordinary ``bmm`` that the
    counter sees, whichever attention kernel the platform would pick.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    fused = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    device = next(model.parameters()).device
    try:
        for m, _ in fused:
            m.fused_attn = False
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, in_chans, img_size, img_size, device=device))
    finally:
        for m, flag in fused:
            m.fused_attn = flag
    return counter.get_total_flops() / 2
