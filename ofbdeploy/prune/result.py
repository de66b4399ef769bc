"""What a pruning method hands back to the run: the decided architecture, its cost, and how it got there.

The run writes it to ``search/result.json`` and the report reads it from there, whatever the method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ofbdeploy.arch import ArchSpec


@dataclass
class SearchResult:
    """What the search found and what it cost."""

    spec: ArchSpec
    target_macs: float | None
    achieved_macs: float
    dense_macs: float
    epochs_run: int
    decided_epoch: int | None
    forced_groups: list[str] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0
    resumed_from: int | None = None
    budget_steps: list[str] = field(default_factory=list)
    target_latency_ms: float | None = None  # latency budget (LUT prediction), when the search had one
    predicted_latency_ms: float | None = None
    predicted_dense_latency_ms: float | None = None
    amp: str = "off"  # the autocast precision actually used
    global_batch: int = 0  # images per optimiser step over all processes
    accum_steps: int = 1
    ddp_builds: int = 0  # DDP wrappers built (the first, and one after each shrink that ran under DDP)
    cut_steps: list[int] = field(default_factory=list)  # optimiser steps after which layers were cut in training
    steps_run: int = 0  # optimiser steps this call ran
    method: str = "ofb"  # the pruning method that decided (search.method)
    state: dict[str, Any] = field(default_factory=dict)  # the method's own record of how it decided
