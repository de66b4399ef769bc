"""Searched masks -> a physically smaller plain timm ViT that computes what the masked model computes.

The search has already sliced the layers to the decided widths; what is left is to fold each group's
multiplier (and the attention scale correction) into the weights in front of it, and to rebuild the
model from timm parts so that no ofbdeploy layer or hook remains.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from ofbdeploy.arch import ArchSpec
from ofbdeploy.errors import ArchError
from ofbdeploy.models.pruned import build_plain
from ofbdeploy.search.searchable import SearchableViT


@torch.no_grad()
def folded_state_dict(searchable: SearchableViT) -> dict[str, Tensor]:
    """The timm model's state dict with every mask multiplied into the preceding weights."""
    state = {k: v.detach().clone() for k, v in searchable.vit.state_dict().items()}

    def scale_rows(prefix: str, factor: Tensor) -> None:
        weight = state[f"{prefix}.weight"]
        state[f"{prefix}.weight"] = weight * factor.reshape(-1, *([1] * (weight.dim() - 1)))
        if f"{prefix}.bias" in state:
            state[f"{prefix}.bias"] = state[f"{prefix}.bias"] * factor

    for i, block in enumerate(searchable.vit.blocks):
        scale_rows(f"blocks.{i}.attn.qkv", searchable.qkv_scale(block.attn, searchable.attn_groups[i]))
        scale_rows(f"blocks.{i}.mlp.fc1", searchable.mlp_groups[i].mask())
    embed = searchable.embed_group.mask()
    scale_rows("patch_embed.proj", embed)
    for token in ("cls_token", "pos_embed"):
        if token in state:
            state[token] = state[token] * embed
    return state


def materialize(searchable: SearchableViT) -> tuple[VisionTransformer, ArchSpec]:
    """Build the plain pruned model (eval mode) and its architecture record from a decided search."""
    undecided = [name for name, group in searchable.groups() if not group.is_decided]
    if undecided:
        raise ArchError(
            f"cannot materialise: {len(undecided)} group(s) still undecided ({', '.join(undecided[:3])}"
            f"{', ...' if len(undecided) > 3 else ''}); finish the search or decide them first"
        )
    spec = searchable.arch_spec()
    model = build_plain(spec)
    model.load_state_dict(folded_state_dict(searchable), strict=True)
    return model.eval(), spec
