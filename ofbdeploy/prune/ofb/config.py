"""The OFB search's section of a recipe (``search`` with ``method: ofb``, the default)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, SerializationInfo, SerializerFunctionWrapHandler, model_serializer, model_validator

from ofbdeploy.config import Strict
from ofbdeploy.latency.config import LatencyTargetCfg
from ofbdeploy.prune.config import MethodCfg


class LossWeights(Strict):
    head: float = Field(0.5, ge=0)
    mlp: float = Field(0.5, ge=0)
    embedding: float = Field(0.5, ge=0)
    flops: float = Field(5.0, ge=0)


class PMIMCfg(Strict):
    enabled: bool = True
    keep_start: float = Field(0.95, gt=0, le=1)
    keep_end: float = Field(0.75, gt=0, le=1)
    target: Literal["local", "patch"] = Field(
        "local", description="reconstruction target: pixels normalised over a 47x47 window per channel (the "
                             "authors' code) or per patch")


class SearchCfg(MethodCfg):
    """The OFB search (``method: ofb``, the default): weights, importance and sparsity learnt together."""

    method: Literal["ofb"] = "ofb"
    epochs: int = Field(100, ge=1)
    warmup_epochs: int | None = Field(
        None, ge=0, description="warm-up of lr, mixing weight and PMIM ratio; default: a fifth of epochs (20 of 100)"
    )
    lr: float = Field(2.5e-4, gt=0, description="weights and importance scores, per 256 images")
    arch_lr: float = Field(2.5e-4, gt=0, description="sparsity logits, per 256 images")
    decoder_lr: float = Field(2.5e-4, gt=0, description="PMIM decoder, per 256 images")
    min_lr: float = Field(1e-5, ge=0)
    weight_decay: float = Field(1e-3, ge=0)
    loss_weights: LossWeights = Field(default_factory=LossWeights)
    l1_attention: float = Field(4e-4, ge=0)
    l1_other: float = Field(1e-4, ge=0)
    pmim: PMIMCfg = Field(default_factory=PMIMCfg)
    shrink_threshold: float = Field(0.2, gt=0, lt=1)
    shrinks_per_epoch: int = Field(3, ge=1)
    fill_budget: bool = Field(
        True, description="when the epochs run out, widen the forced decisions toward the budget by importance"
    )
    logit_init: Literal["random", "zeros"] = Field(
        "random", description="the sparsity logits' start: random draws each cell's from U(0, 1) (the method); "
        "zeros starts every group uniform, where the one-hot loss has no gradient, so the task and budget losses "
        "choose the direction before the one-hot loss commits to it"
    )
    widest_logit: float = Field(
        0.0, ge=0, description="added to every group's widest-cell logit when a search starts: 0 is the method's "
        "start, whose soft masks scale most units down at step 0 (a pretrained model drops to chance); "
        "4 starts near the dense model's function where the mixing weight is low (no warm-up)"
    )
    mix_start: float = Field(0.99, ge=0, le=1)
    mix_end: float = Field(0.1, ge=0, le=1)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    drop_path: float = Field(0.0, ge=0, lt=1, description="stochastic depth of the last block (the authors: 0.1)")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap on optimiser steps per epoch")
    latency: LatencyTargetCfg | None = Field(None, description="latency budget (instead of, or with, FLOPs)")

    budget_keys: ClassVar[str] = "target_flops_ratio, target_gflops or latency"

    @property
    def latency_target(self) -> LatencyTargetCfg | None:
        return self.latency

    def learning_rates(self) -> dict[str, float]:
        return {"search": self.lr, "search arch": self.arch_lr}

    def searchable_options(self) -> dict[str, float]:
        return {"l1_attention": self.l1_attention, "l1_other": self.l1_other}

    @model_validator(mode="after")
    def _default_warmup(self) -> SearchCfg:
        if self.warmup_epochs is None:
            object.__setattr__(self, "warmup_epochs", self.epochs // 5)
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) exceeds epochs ({self.epochs})")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        """Plain dumps leave the default method out, so the digests of run stages, resumable checkpoints and
        baselines made before there were methods still match; the resolved recipe (dumped with the context
        ``{"resolved": True}``) names it."""
        data = handler(self)
        if not (info.context or {}).get("resolved"):
            data.pop("method", None)
        return data
