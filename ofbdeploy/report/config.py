"""The ``budget`` section: limits a run must meet (exit 1 when one is missed)."""

from __future__ import annotations

from pydantic import Field

from ofbdeploy.config import BatchSize, Strict
from ofbdeploy.deploy.config import Backend, Precision


class LatencyLimit(Strict):
    backend: Backend
    batch: BatchSize
    precision: Precision = "fp32"
    max_ms: float = Field(gt=0)


class SpeedupLimit(Strict):
    backend: Backend
    batch: BatchSize
    precision: Precision = "fp32"
    min: float = Field(gt=0, description="dense median latency / pruned median latency, measured in one run")


class BudgetCfg(Strict):
    """Limits the run must meet; `ofbdeploy run` and `ofbdeploy check` exit 1 when any is missed."""

    max_gflops: float | None = Field(None, gt=0, description="G multiply-accumulates of the pruned model")
    max_params_m: float | None = Field(None, gt=0, description="millions of parameters of the pruned model")
    min_top1: float | None = Field(None, ge=0, le=100, description="top-1 %% of the finetuned model")
    latency: list[LatencyLimit] = Field(default_factory=list)
    speedup: list[SpeedupLimit] = Field(default_factory=list)
