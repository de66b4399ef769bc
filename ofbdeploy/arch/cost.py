"""Cost shared by every family: a transformer block's MACs, and the counts of a live module to check them by.

Each family's shape composes its analytic cost from :func:`block_macs` (``ModelShape.macs_at``): the one
function behind the FLOPs loss, ``ArchSpec.macs()`` and every report.

Convention: FLOPs are multiply-accumulates (MACs) of matrix products and convolutions, for one image,
counting every token including prefix tokens (class, registers, distillation), as the DeiT and OFB tables
count them. Layer norms, softmax, GELU, residual additions, biases and pooling are left out (a fraction of a
percent). Widths may be Python numbers or tensors: with tensors of expected widths the result is
differentiable, which is how the search's FLOPs loss uses it.
"""

from __future__ import annotations

from typing import TypeVar

from torch import Tensor, nn

Width = TypeVar("Width", int, float, Tensor)


def block_macs(tokens: int, embed: Width, attn_dim: Width, mlp_dim: Width) -> Width:
    """One block: qkv projection, q.k^T, attention.v, output projection, two MLP layers."""
    qkv = tokens * embed * 3 * attn_dim
    attention = 2 * tokens * tokens * attn_dim
    proj = tokens * attn_dim * embed
    mlp = 2 * tokens * embed * mlp_dim
    return qkv + attention + proj + mlp


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
