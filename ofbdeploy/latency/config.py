"""A latency budget's section (``search.latency``): the target and how its lookup table is measured."""

from __future__ import annotations

from pydantic import Field, model_validator

from ofbdeploy.config import MAX_REPEATS, BatchSize, Strict
from ofbdeploy.deploy.config import Backend, Precision


class LatencyTargetCfg(Strict):
    """A latency budget on a target device, steered by a measured lookup table (LUT)."""

    target_ms: float | None = Field(None, gt=0, description="predicted latency budget in milliseconds")
    target_ratio: float | None = Field(None, gt=0, le=1, description="budget as a fraction of the dense latency")
    backend: Backend = "ort-cpu"
    batch: BatchSize = 1
    precision: Precision = "fp32"
    weight: float = Field(5.0, ge=0, description="weight of the latency loss (like loss_weights.flops)")
    lut: str | None = Field(None, description="a LUT file from `ofbdeploy lut build`; default: cache, else build")
    cache_dir: str | None = Field(None, description="LUT cache directory (default ~/.cache/ofbdeploy/lut)")
    embed_points: int = Field(4, ge=1, le=64, description="embedding widths measured when building the LUT")
    width_points: int = Field(3, ge=1, le=64, description="head widths and MLP widths measured per embedding width")
    random_points: int = Field(16, ge=0, le=4096, description="random uneven models measured when building the LUT")
    repeats: int = Field(20, ge=5, le=MAX_REPEATS)
    tolerance: float = Field(0.03, gt=0, lt=0.5, description="after the search, the measured ratio must lie in "
                             "[target x (1 - tolerance), target]; the fit stage narrows or widens until it does")
    max_rounds: int = Field(4, ge=0, le=16, description="measured rounds of the fit stage (0: no closed loop)")

    @model_validator(mode="after")
    def _one_target(self) -> LatencyTargetCfg:
        if (self.target_ms is None) == (self.target_ratio is None):
            raise ValueError("give exactly one of target_ms and target_ratio")
        return self
