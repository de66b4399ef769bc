"""Stochastic depth on a built timm model (ViT or Swin), so that search and finetune can set it from the recipe."""

from __future__ import annotations

from timm.layers import DropPath
from torch import nn


def set_drop_path(vit: nn.Module, rate: float) -> None:
    """Drop whole residual branches of block i with probability ``rate * i / (depth - 1)`` while training.

    timm's own rule (linear in depth, 0 for the first block); a rate of 0 puts plain identities back.
    Only the training forward changes: evaluation and exported models never drop.
    """
    blocks = [m for m in vit.modules() if hasattr(m, "drop_path1")]  # a ViT's blocks, a Swin's across stages
    for i, block in enumerate(blocks):
        p = rate * i / max(len(blocks) - 1, 1)
        for name in ("drop_path1", "drop_path2"):
            if hasattr(block, name):
                setattr(block, name, DropPath(p) if p > 0 else nn.Identity())
