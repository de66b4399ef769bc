"""The search's latency term: the LUT's latency expected under the cell distributions, differentiable.

Every group's probabilities are independent, and the LUT splits a block into an attention part depending
on (embedding, attention cell) and an MLP part depending on (embedding, MLP cell), so the expectation is
exact: q^T S + sum over blocks of q^T A p_attn + q^T M p_mlp, with q the embedding cell probabilities.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from ofbdeploy.arch import ArchSpec
from ofbdeploy.arch.grids import SearchSpace
from ofbdeploy.families import family_of
from ofbdeploy.families.vit.searchable import SearchableViT
from ofbdeploy.latency.config import LatencyTargetCfg
from ofbdeploy.latency.lut import LatencyLUT, load_or_build


class LatencyObjective:
    """Expected latency of a searchable model and the target it is pulled to."""

    def __init__(self, lut: LatencyLUT, space: SearchSpace, *, target_ms: float | None = None,
                 target_ratio: float | None = None) -> None:
        self.lut = lut
        self.tables = lut.tables(space)
        self.dense_ms = lut.dense_ms  # measured (median over the whole build), not fitted
        self.target_ms = target_ms if target_ms is not None else float(target_ratio) * self.dense_ms
        self._placed: dict[tuple, tuple[Tensor, ...]] = {}

    def expected_ms(self, model: SearchableViT) -> Tensor:
        q = model.embed_group.probs()
        key = (q.device, q.dtype)
        if key not in self._placed:  # copied once, not in every step (a host-to-device copy waits)
            self._placed[key] = tuple(self.tables[k].to(q.device, q.dtype) for k in ("stem", "attn", "mlp"))
        stem, attn, mlp = self._placed[key]
        total = q @ stem
        for a, m in zip(model.attn_groups, model.mlp_groups, strict=True):
            total = total + q @ attn @ a.probs() + q @ mlp @ m.probs()
        return total

    def loss(self, model: SearchableViT) -> Tensor:
        """((E[latency] - target) / dense latency)^2, the latency analogue of the FLOPs loss."""
        return ((self.expected_ms(model) - self.target_ms) / self.dense_ms) ** 2

    def floor_ms(self, space: SearchSpace) -> float:
        """Predicted latency of the narrowest architecture the grids allow."""
        return self.lut.predict(ArchSpec.narrowest(self.lut.shape, space))


def build_objective(cfg: LatencyTargetCfg, model: SearchableViT, *, progress: bool = True) -> LatencyObjective:
    """The latency budget of ``cfg`` for ``model``'s search space, with its LUT: the given file, else the
    cached one, else measured now on this machine. One builder, so that a run and a benchmark steer the
    search with the same table for the same settings. Families the table does not model are refused."""
    family_of(model.shape).check_latency()
    if cfg.lut is not None:
        lut = LatencyLUT.load(Path(cfg.lut))
    else:
        lut = load_or_build(model.shape, model.space, backend=cfg.backend, precision=cfg.precision, batch=cfg.batch,
                            cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else None, embed_points=cfg.embed_points,
                            width_points=cfg.width_points, random_points=cfg.random_points, repeats=cfg.repeats,
                            progress=progress)
    return LatencyObjective(lut, model.space, target_ms=cfg.target_ms, target_ratio=cfg.target_ratio)
