"""The search's regularisers: adaptive one-hot loss per group and the FLOPs loss."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ofbdeploy.search.groups import MaskGroup

# tan() of the adaptive term is unbounded at v = 0 and v = 1; stay a hair inside.
_V_EPS = 1e-4


def onehot_loss(group: MaskGroup) -> Tensor:
    """entropy(p) + tan(pi/2 - pi v) / K + lambda * sum sigmoid(s) over the K live cells.

    v is the variance of p relative to a one-hot vector's (0 uniform, 1 one-hot): the tan term is steep
    near uniform and relaxes as p sharpens, so the push towards a decision adapts its own strength.
    A decided group contributes nothing.
    """
    if group.is_decided:
        return group.alpha.new_zeros(())
    probs = group.probs()[group.alive]
    k = probs.numel()
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
    if k < 2:
        return entropy + group.importance_l1()
    v = ((probs - 1.0 / k) ** 2).sum() / (1.0 - 1.0 / k)
    v = v.clamp(_V_EPS, 1.0 - _V_EPS)
    return entropy + torch.tan(math.pi / 2 - math.pi * v) / k + group.importance_l1()


def flops_loss(expected_macs: Tensor, target_macs: float, dense_macs: float) -> Tensor:
    """((F(expected widths) - F_target) / F_dense)^2."""
    return ((expected_macs - target_macs) / dense_macs) ** 2
