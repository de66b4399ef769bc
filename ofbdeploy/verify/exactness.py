"""Checks of materialisation that a user can run on their own torch/timm (``ofbdeploy selfcheck``).

Random decided architectures are cut into a searchable model, and the masked model is compared with the
plain model materialised from it, with timm's fused attention on and off; the analytic FLOPs and params
are compared with PyTorch's own counter.
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import timm.layers.weight_init as timm_init
import torch
from torch import nn

from ofbdeploy.arch.cost import count_params, measure_macs
from ofbdeploy.families import family_of, read_shape
from ofbdeploy.models.dense import build_dense
from ofbdeploy.models.materialize import TOLERANCE, materialize
from ofbdeploy.search.searchable import SearchableModel

# The analytic MACs must equal PyTorch's count up to float summation.
MACS_TOLERANCE = 1e-6


@contextlib.contextmanager
def meta_device() -> Iterator[None]:
    """Build on the meta device; timm's truncated-normal init (slow on meta tensors, and meaningless there)
    is skipped for meta tensors only."""
    original = timm_init._trunc_normal_

    def trunc_normal(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return tensor if tensor.is_meta else original(tensor, *args, **kwargs)

    timm_init._trunc_normal_ = trunc_normal
    try:
        with torch.device("meta"):
            yield
    finally:
        timm_init._trunc_normal_ = original


def decide_randomly(searchable: SearchableModel, rng: random.Random, extreme: str | None = None) -> None:
    """Decide every group on a random cell (or the narrowest / widest with ``extreme``) and randomise
    the multipliers, so that folding is exercised with values far from 1."""
    for name, group in searchable.groups():
        if extreme == "narrowest":
            cell = min(range(len(group.cells)), key=lambda k: int(torch.prod(group.cells[k])))
        elif extreme == "widest":
            cell = group.widest_cell()
        else:
            cell = rng.randrange(len(group.cells))
        searchable.force_cell(name, cell)
        with torch.no_grad():
            group.multiplier.uniform_(0.25, 1.75, generator=torch.Generator().manual_seed(rng.randrange(2**31)))


def set_fused_attention(model: nn.Module, fused: bool) -> None:
    """Switch timm's fused attention on one model (the global switch only affects new modules)."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused


@dataclass(frozen=True)
class Agreement:
    """Masked vs materialised outputs and analytic vs counted cost, for one architecture."""

    max_abs_diff: float
    macs_spec: float
    macs_counted: float
    params_spec: int
    params_counted: int
    output_scale: float = 1.0  # largest |output| of the masked model

    @property
    def ok(self) -> bool:
        """Outputs agree to float rounding, params exactly, MACs to float summation."""
        # relative to the outputs' size (at least 1e-2, so that near-zero outputs of randomly initialised models
        # do not ask for more than float32 can give)
        return (self.max_abs_diff <= TOLERANCE * max(1e-2, self.output_scale)
                and self.params_counted == self.params_spec
                and abs(self.macs_counted - self.macs_spec) <= MACS_TOLERANCE * self.macs_spec)


@torch.no_grad()
def check_agreement(searchable: SearchableModel, batch: int = 4, seed: int = 0) -> Agreement:
    """Materialise a decided searchable model and measure how far the two disagree."""
    searchable.eval()
    model, spec = materialize(searchable)
    s = searchable.shape
    images = torch.randn(batch, s.in_chans, s.img_size, s.img_size, generator=torch.Generator().manual_seed(seed))
    diff, scale = 0.0, 0.0
    for fused in (True, False):
        set_fused_attention(searchable, fused)
        set_fused_attention(model, fused)
        masked = searchable(images)
        diff = max(diff, float((masked - model(images)).abs().max()))
        scale = max(scale, float(masked.abs().max()))
    return Agreement(diff, spec.macs(), measure_macs(model, s.img_size, s.in_chans), spec.params(), count_params(model),
                     scale)


@dataclass
class SelfcheckReport:
    """What ``ofbdeploy selfcheck`` found for one model: a header line and one row per architecture."""

    header: str
    rows: list[tuple[str, Agreement]] = field(default_factory=list)
    last: SearchableModel | None = None

    @property
    def ok(self) -> bool:
        return all(a.ok for _, a in self.rows)

    def table(self) -> list[tuple]:
        return [(name, f"{a.max_abs_diff:.2e}", f"{a.macs_spec / 1e6:.2f}", f"{a.macs_counted / 1e6:.2f}",
                 a.params_spec, a.params_counted, "ok" if a.ok else "FAIL") for name, a in self.rows]


def selfcheck_model(model_name: str, *, img_size: int | None = None, trials: int = 5, align: int | None = None,
                    seed: int = 0, batch: int = 2, keep_last: bool = False) -> SelfcheckReport:
    """Build ``model_name`` with random weights (refused in one :class:`ModelError` line when no family can
    prune it), decide the narrowest, the widest and ``trials`` random architectures, and check each.

    Without ``img_size`` the model is built at its own size, or, when its token grid is large, at the
    family's smaller check size (exactness does not depend on it; CPU time does).
    """
    own = None
    if img_size is None:
        with meta_device():  # the shape only: no weights are made
            probe = read_shape(build_dense(model_name), model_name)
        own, img_size = probe.img_size, family_of(probe).check_img_size(probe)
    torch.manual_seed(seed)
    dense = build_dense(model_name, img_size=img_size)
    shape = read_shape(dense, model_name)
    family = family_of(shape)
    space = family.space(shape, align)
    size = f"{shape.img_size} px" + (f" (its own {own} px: pass --img-size {own} to check at it)"
                                     if own not in (None, shape.img_size) else "")
    report = SelfcheckReport(f"{model_name}: {family.name} family, {size}; {family.summary(shape)}")
    rng = random.Random(seed)
    for trial, extreme in enumerate(["narrowest", "widest"] + [None] * trials):
        searchable = family.searchable(copy.deepcopy(dense), space, model_name)
        decide_randomly(searchable, rng, extreme)
        report.rows.append((extreme or f"random {trial - 1}", check_agreement(searchable, batch, seed + trial)))
        report.last = searchable if keep_last else None
    return report
