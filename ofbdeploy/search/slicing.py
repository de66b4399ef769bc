"""Shrinking live parameters in place, together with the optimiser state that tracks them.

The parameter object stays the same (only its data changes), so optimisers, hooks and references held
elsewhere keep working; every optimiser state tensor shaped like the parameter is cut the same way, so
Adam's moments stay aligned with the units that survive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

Take = Callable[[Tensor], Tensor]


def take_along(dim: int, index: Tensor) -> Take:
    """A cut that keeps ``index`` along ``dim``."""
    return lambda t: t.index_select(dim, index.to(t.device))


def slice_tensor_(tensor: Tensor, take: Take, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
    """Replace ``tensor``'s data by ``take(data)``; cut matching optimiser state and drop its gradient."""
    old_shape = tensor.shape
    with torch.no_grad():
        tensor.data = take(tensor.data).contiguous()
    tensor.grad = None
    for optimizer in optimizers:
        state = optimizer.state.get(tensor)
        if not state:
            continue
        for key, value in list(state.items()):
            if isinstance(value, Tensor) and value.shape == old_shape:
                state[key] = take(value).contiguous()


def slice_linear_(
    linear: nn.Linear, take: Take, dim: int, optimizers: Iterable[torch.optim.Optimizer] = ()
) -> None:
    """Cut a Linear's outputs (``dim=0``) or inputs (``dim=1``) and keep its size attributes true."""
    slice_tensor_(linear.weight, take, optimizers)
    if dim == 0 and linear.bias is not None:
        slice_tensor_(linear.bias, take, optimizers)
    linear.out_features, linear.in_features = linear.weight.shape


def slice_layer_norm_(norm: nn.LayerNorm, take: Take, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
    """Cut a LayerNorm so that it normalises over the kept channels only."""
    for tensor in (norm.weight, norm.bias):
        if tensor is not None:
            slice_tensor_(tensor, take, optimizers)
    norm.normalized_shape = (int(norm.weight.shape[0]),)
