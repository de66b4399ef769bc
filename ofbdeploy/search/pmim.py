"""Progressive Masked Image Modeling: hide a growing share of patches, reconstruct them, keep features honest.

The search replaces hidden patch tokens by a learnable mask token; the decoder of :class:`SearchableViT`
reconstructs the image from the last block's patch tokens, and the L1 error on hidden pixels (against
per-patch normalised targets) regularises the features while dimensions are being removed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def random_token_mask(batch: int, patches: int, keep_ratio: float, device: torch.device) -> Tensor:
    """(batch, patches) booleans, True = hidden; each image hides round((1 - keep) * patches) patches."""
    hidden = round((1.0 - keep_ratio) * patches)
    order = torch.rand(batch, patches, device=device).argsort(dim=1)
    return order < hidden


def _patchify(images: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) -> (B, patches, patch*patch*C)."""
    return F.unfold(images, kernel_size=patch, stride=patch).transpose(1, 2)


def reconstruction_loss(images: Tensor, reconstruction: Tensor, token_mask: Tensor, patch: int) -> Tensor:
    """Mean L1 error on hidden patches, each target patch normalised by its own mean and variance."""
    target = _patchify(images.float(), patch)
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1e-6).sqrt()
    error = (_patchify(reconstruction.float(), patch) - target).abs().mean(dim=-1)
    hidden = token_mask.float()
    return (error * hidden).sum() / hidden.sum().clamp(min=1.0)
