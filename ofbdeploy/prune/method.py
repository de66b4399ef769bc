"""The contract between a pruning method and whoever runs it (the run's search stage, the benchmarks).

A method is a config class (its recipe section) and a ``decide(model, cfg, job)`` that leaves the searchable
model decided, every group on one width, at or under the section's budget, and returns what it did. The
run then materialises, finetunes, exports and profiles that model the same way whatever the method.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ofbdeploy.prune.ofb.objective import LatencyObjective
from ofbdeploy.train.distributed import Dist


@dataclass
class Job:
    """What a method may use besides the model it decides: training data and processes (methods that train),
    the dense teacher as a fresh module (methods that prune a plain copy), checkpointing and logging."""

    teacher: Callable[[], nn.Module]  # a fresh dense model with the weights the searchable model starts from
    loader: Any = None  # training batches of the per-process micro-batch size
    ctx: Dist = field(default_factory=Dist)
    seed: int = 0
    amp: str = "off"
    checkpoint_path: Path | None = None
    resume: bool = False
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("ofbdeploy.prune"))
    progress: bool = True
    latency: LatencyObjective | None = None
    accum_steps: int = 1
