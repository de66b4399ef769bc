"""The search's latency term: the LUT's latency expected under the cell distributions, differentiable.

The table's latency is its coefficients times the family's work counts (``shape.latency_features``), and
every count is linear in each group's widths, with the groups' probabilities independent. So the expected
latency is exactly the coefficients times the counts at the expected widths, for a ViT as for a Swin.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ofbdeploy.arch import ArchSpec
from ofbdeploy.latency.config import LatencyTargetCfg
from ofbdeploy.latency.lut import LatencyLUT, load_or_build
from ofbdeploy.search.searchable import SearchableModel


class LatencyObjective:
    """Expected latency of a searchable model and the target it is pulled to."""

    def __init__(self, lut: LatencyLUT, *, target_ms: float | None = None, target_ratio: float | None = None) -> None:
        self.lut = lut
        self.coefficients = torch.tensor(lut.coefficients, dtype=torch.float64)
        self.dense_ms = lut.dense_ms  # measured (median over the whole build), not fitted
        self.target_ms = target_ms if target_ms is not None else float(target_ratio) * self.dense_ms
        self._placed: dict[tuple, Tensor] = {}

    def expected_ms(self, model: SearchableModel) -> Tensor:
        features = model.expected_latency_features()
        key = (features.device, features.dtype)
        if key not in self._placed:  # copied once, not in every step (a host-to-device copy waits)
            self._placed[key] = self.coefficients.to(features.device, features.dtype)
        return features @ self._placed[key]

    def loss(self, model: SearchableModel) -> Tensor:
        """((E[latency] - target) / dense latency)^2, the latency analogue of the FLOPs loss."""
        return ((self.expected_ms(model) - self.target_ms) / self.dense_ms) ** 2

    def floor_ms(self, space: object) -> float:
        """Predicted latency of the narrowest architecture the grids allow."""
        return self.lut.predict(ArchSpec.narrowest(self.lut.shape, space))


def build_objective(cfg: LatencyTargetCfg, model: SearchableModel, *, progress: bool = True) -> LatencyObjective:
    """The latency budget of ``cfg`` for ``model``'s search space, with its LUT: the given file, else the
    cached one, else measured now on this machine. One builder, so that a run and a benchmark steer the
    search with the same table for the same settings."""
    if cfg.lut is not None:
        lut = LatencyLUT.load(Path(cfg.lut))
    else:
        lut = load_or_build(model.shape, model.space, backend=cfg.backend, precision=cfg.precision, batch=cfg.batch,
                            cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else None, embed_points=cfg.embed_points,
                            width_points=cfg.width_points, random_points=cfg.random_points, repeats=cfg.repeats,
                            progress=progress)
    return LatencyObjective(lut, target_ms=cfg.target_ms, target_ratio=cfg.target_ratio)
