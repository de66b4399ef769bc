"""The ViT's search space: one joint set of grids for every block, and the embedding's."""

from __future__ import annotations

from dataclasses import replace

from ofbdeploy.arch.grids import SearchSpace
from ofbdeploy.families.vit.shape import ViTShape


def space_for(shape: ViTShape, align: int | None = None) -> SearchSpace:
    """The search space of a dense ViT of ``shape``; with an attention-pool head the embedding keeps its
    width (see :mod:`ofbdeploy.families.vit`)."""
    space = SearchSpace.for_model(shape.embed_dim, shape.num_heads, shape.head_dim, shape.mlp_dim, align)
    return replace(space, embedding=(shape.embed_dim,)) if shape.global_pool == "map" else space
