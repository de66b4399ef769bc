"""The contract between a pruning method and whoever runs it (the run's search stage, the benchmarks).

A method is a config class (its recipe section) and a ``decide(model, cfg, job)`` that leaves the searchable
model decided, every group on one width, at or under the section's budget, and returns what it did. The
run then materialises, finetunes, exports and profiles that model the same way whatever the method.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ofbdeploy.errors import OfbError
from ofbdeploy.prune.config import MethodCfg
from ofbdeploy.prune.ofb.objective import LatencyObjective
from ofbdeploy.prune.result import SearchResult
from ofbdeploy.search.searchable import SearchableModel
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


Decide = Callable[[SearchableModel, Any, Job], SearchResult]


@dataclass(frozen=True)
class Method:
    """One registered pruning method."""

    config: type[MethodCfg]
    decide: Decide
    trains: bool = False  # its decision trains the weights (they are kept, and its images count as training)
    families: tuple[str, ...] | None = None  # model families it can prune (None: every family)
    requires: str | None = None  # an optional module it needs, and how to install it
    install: str = ""

    @property
    def name(self) -> str:
        """The recipe's ``search.method`` for it: the default of its config's ``method`` literal."""
        return str(self.config.model_fields["method"].default)

    def check(self, family: str) -> None:
        """Refuse, before anything is written, a method this install or this model cannot run (one line)."""
        if self.families is not None and family not in self.families:
            raise OfbError(f"search.method {self.name} prunes {', '.join(self.families)} models, not {family}; "
                           f"use search.method ofb")
        if self.requires is not None:
            try:
                importlib.import_module(self.requires)
            except ImportError:
                raise OfbError(f"search.method {self.name} needs the {self.requires} package: {self.install}") from None
