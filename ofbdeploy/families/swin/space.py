"""The Swin's search space: one ViT-style space per stage."""

from __future__ import annotations

from ofbdeploy.arch.grids import SearchSpace
from ofbdeploy.families.swin.shape import SwinShape, SwinSpace


def swin_space(shape: SwinShape, align: int | None = None) -> SwinSpace:
    return SwinSpace(tuple(
        SearchSpace.for_model(shape.embed_dims[s], shape.num_heads[s], shape.head_dims[s], shape.mlp_dims[s], align)
        for s in range(shape.stages)
    ))
