"""The part of a ``search`` section every pruning method has (its name and its FLOPs budget), and the sections of
the one-shot methods, which add nothing else; kept free of torch so that reading a recipe stays light.

Each method's own section subclasses :class:`MethodCfg` with ``method: Literal["<name>"]`` and its own keys, so
that the recipe's ``search`` field is a union told apart by ``method`` and a key of another method is the
usual "unknown field". The run asks a section only what this base declares.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from ofbdeploy.arch.grids import ALIGNMENTS
from ofbdeploy.config import Strict
from ofbdeploy.latency.config import LatencyTargetCfg


class MethodCfg(Strict):
    """Budget and search-space settings shared by every method."""

    method: str
    target_flops_ratio: float | None = Field(None, gt=0, le=1, description="budget as a fraction of dense MACs")
    target_gflops: float | None = Field(None, gt=0, description="budget in G multiply-accumulates")
    align: Literal[ALIGNMENTS] | None = Field(None, description="widths on multiples of this (the grids)")

    budget_keys: ClassVar[str] = "target_flops_ratio or target_gflops"  # named when no budget is given

    @property
    def latency_target(self) -> LatencyTargetCfg | None:
        """The latency budget, for methods that take one (the run builds its lookup table)."""
        return None

    def learning_rates(self) -> dict[str, float]:
        """Learning rates per 256 images the method trains with, for the run log (none: it does not train)."""
        return {}

    def searchable_options(self) -> dict[str, float]:
        """Options of the searchable model the method needs (the OFB search's importance L1 weights)."""
        return {}

    @model_validator(mode="after")
    def _one_budget(self) -> MethodCfg:
        if self.target_flops_ratio is not None and self.target_gflops is not None:
            raise ValueError("give one of target_flops_ratio and target_gflops, not both")
        if self.target_flops_ratio is None and self.target_gflops is None and self.latency_target is None:
            raise ValueError(f"give a budget: {self.budget_keys}")
        return self

class L1Cfg(MethodCfg):
    """``method: l1``: L1-magnitude importance, widths by the budget enforcement."""

    method: Literal["l1"] = "l1"


class RandomCfg(MethodCfg):
    """``method: random``: random importance, widths by the budget enforcement."""

    method: Literal["random"] = "random"


class UniformCfg(MethodCfg):
    """``method: uniform``: one width fraction for every group, units by L1 magnitude."""

    method: Literal["uniform"] = "uniform"


TORCH_PRUNING = "torch_pruning"  # the optional package, and how to get it
TORCH_PRUNING_INSTALL = "pip install 'ofbdeploy[bench]'"

class TorchPruningCfg(MethodCfg):
    """``method: torch-pruning``: Torch-Pruning's isomorphic global magnitude pruning to the FLOPs budget."""

    method: Literal["torch-pruning"] = "torch-pruning"
    prune_step: float = Field(0.01, gt=0, le=0.5, description="width fraction removed per pruning step")

    @model_validator(mode="after")
    def _no_align(self) -> TorchPruningCfg:
        if self.align is not None:
            raise ValueError("torch-pruning removes a fraction of every width, not grid steps: drop search.align")
        return self
