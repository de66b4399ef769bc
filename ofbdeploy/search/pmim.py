"""Progressive Masked Image Modeling: hide a growing share of patches, reconstruct them, keep features honest.

The search replaces hidden patch tokens by a learnable mask token; the decoder of :class:`SearchableViT`
reconstructs the image from the last block's patch tokens, and the L1 error on hidden pixels regularises
the features while dimensions are being removed. The target is the input normalised pixel by pixel over a
47x47 window per channel, as the authors' code computes it ("local"); "patch" normalises each patch by
its own mean and variance instead (MAE's target), kept as an option.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LOCAL_WINDOW = 47
EPS = 1e-6


def random_token_mask(batch: int, patches: int, keep_ratio: float, device: torch.device) -> Tensor:
    """(batch, patches) booleans, True = hidden; each image hides round((1 - keep) * patches) patches."""
    hidden = round((1.0 - keep_ratio) * patches)
    order = torch.rand(batch, patches, device=device).argsort(dim=1)
    return order < hidden


def _patchify(images: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) -> (B, patches, patch*patch*C)."""
    return F.unfold(images, kernel_size=patch, stride=patch).transpose(1, 2)


def _valid_counts(size: int, window: int, device: torch.device) -> Tensor:
    """How many in-image positions the window centred on each of ``size`` positions covers (one axis)."""
    pos = torch.arange(size, device=device)
    half = window // 2
    return (torch.clamp(pos + half, max=size - 1) - torch.clamp(pos - half, min=0) + 1).float()


def _box_sums(t: Tensor, window: int) -> Tensor:
    """Sum over the ``window`` x ``window`` neighbourhood of every pixel, zeros outside the image.

    Running sums along each axis and their differences: a few operations per pixel whatever the window
    (a direct 47x47 pool reads 2,209 pixels for each one).
    """
    half = window // 2
    for _ in range(2):
        running = F.pad(t, (half + 1, half)).cumsum(dim=-1)
        t = (running[..., window:] - running[..., :-window]).transpose(-1, -2)
    return t


def local_normalise(images: Tensor, window: int = LOCAL_WINDOW, eps: float = EPS) -> Tensor:
    """Each pixel minus the mean of the ``window`` x ``window`` neighbourhood around it in its channel, over
    sqrt(that neighbourhood's unbiased variance, clamped at 0, + eps); padding is left out of both.

    Computed in fp32 on a copy centred per image and channel, so that the running sums stay small and the
    variance's cancellation harmless.
    """
    x = images.float()
    x = x - x.mean(dim=(2, 3), keepdim=True)
    channels = x.shape[1]
    sums = _box_sums(torch.cat([x, x * x], dim=1), window)
    total, total_sq = sums[:, :channels], sums[:, channels:]
    h, w = x.shape[-2:]
    n = _valid_counts(h, window, x.device)[:, None] * _valid_counts(w, window, x.device)[None, :]
    mean = total / n
    var = ((total_sq - total * mean) / (n - 1).clamp_min(1)).clamp_min(0)
    return (x - mean) / (var + eps).sqrt()


def _local_target(images: Tensor, patch: int) -> Tensor:
    return _patchify(local_normalise(images), patch)


def _patch_target(images: Tensor, patch: int) -> Tensor:
    target = _patchify(images.float(), patch)
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + EPS).sqrt()


TARGETS: dict[str, Callable[[Tensor, int], Tensor]] = {"local": _local_target, "patch": _patch_target}


def reconstruction_loss(images: Tensor, reconstruction: Tensor, token_mask: Tensor, patch: int,
                        target: str = "local") -> Tensor:
    """Mean L1 error over the pixels and channels of hidden patches, against the ``target`` normalisation."""
    wanted = TARGETS[target](images, patch)
    error = (_patchify(reconstruction.float(), patch) - wanted).abs().mean(dim=-1)
    hidden = token_mask.float()
    return (error * hidden).sum() / hidden.sum().clamp(min=1.0)
