"""Human-readable description of an architecture: what ``ofbdeploy info`` prints."""

from __future__ import annotations

from ofbdeploy.arch import ArchSpec
from ofbdeploy.table import format_table

ALIGN_WARN = 8


def describe(spec: ArchSpec, title: str = "") -> str:
    """Per-block table, totals against the dense model, and the widths that are not multiples of 8."""
    base = spec.base
    dense = ArchSpec.dense(base)
    rows = [
        (i, f"{blk.heads} x {blk.head_dim}", blk.attn_dim, blk.mlp_dim)
        for i, blk in enumerate(spec.blocks)
    ]
    lines = [title] if title else []
    name = base.model_name or spec.family
    lines.append(f"base: {name} ({spec.family} family), {base.img_size} px, patch {base.patch_size}, "
                 f"{base.num_classes} classes")
    lines.append(format_table(("block", "heads x width", "attn dim", "mlp dim"), rows))
    widths = [f"{e} of {d}" for e, d in zip(spec.embed_dims, base.embed_dims, strict=True)]
    stages = "" if len(widths) == 1 else " (per stage)"
    lines.append(f"embedding{stages}: {', '.join(widths)}")
    params, macs = spec.params(), spec.macs()
    lines.append(f"params: {params / 1e6:.2f} M ({params / dense.params():.1%} of dense {dense.params() / 1e6:.2f} M)")
    lines.append(f"FLOPs:  {macs / 1e9:.3f} GMACs ({macs / dense.macs():.1%} of dense {dense.macs() / 1e9:.3f} G)")
    odd = unaligned_widths(spec, ALIGN_WARN)
    if odd:
        lines.append(f"widths not multiples of {ALIGN_WARN} (slow on tensor cores): {'; '.join(odd)}")
    else:
        lines.append(f"all widths are multiples of {ALIGN_WARN}")
    return "\n".join(lines)


def unaligned_widths(spec: ArchSpec, multiple: int = ALIGN_WARN) -> list[str]:
    """Every width of ``spec`` that is not a multiple of ``multiple``, named by where it is."""
    named = [("embedding", spec.embed_dim)] if len(spec.embed_dims) == 1 else [
        (f"stage {s} embedding", e) for s, e in enumerate(spec.embed_dims)]
    found = [f"{where} {width}" for where, width in named if width % multiple]
    for i, blk in enumerate(spec.blocks):
        if blk.head_dim % multiple:
            found.append(f"block {i} head width {blk.head_dim}")
        if blk.mlp_dim % multiple:
            found.append(f"block {i} mlp {blk.mlp_dim}")
    return found
