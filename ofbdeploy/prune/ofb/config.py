"""The OFB search's section of a recipe (``search`` with ``method: ofb``, the default)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, SerializationInfo, SerializerFunctionWrapHandler, model_serializer, model_validator

from ofbdeploy.config import Strict
from ofbdeploy.latency.config import LatencyTargetCfg
from ofbdeploy.prune.config import MethodCfg
from ofbdeploy.train.config import DistillCfg


class LossWeights(Strict):
    head: float = Field(0.5, ge=0)
    mlp: float = Field(0.5, ge=0)
    embedding: float = Field(0.5, ge=0)
    flops: float = Field(5.0, ge=0)


class PMIMCfg(Strict):
    """PMIM (progressive masked image modelling): the search trains on images with a growing share of patches
    hidden and reconstructs them. Off by default: in short searches from pretrained weights it cost 2-4 points
    of top-1 after the finetune on every seed measured (docs/benchmarks.md); the paper's long searches keep it
    (deit_s_50.yaml, swin_t_50.yaml, ofb_paper_exact.yaml)."""

    enabled: bool = Field(False, description="train the search on PMIM-masked images and reconstruct them")
    keep_start: float = Field(0.95, gt=0, le=1)
    keep_end: float = Field(0.75, gt=0, le=1)
    target: Literal["local", "patch"] = Field(
        "local", description="reconstruction target: pixels normalised over a 47x47 window per channel (the "
                             "authors' code) or per patch")


class SearchDistillCfg(DistillCfg):
    """Distillation from the dense teacher during the search (off, as in the paper's search)."""

    enabled: bool = False


# Keys added after runs were recorded: a plain dump leaves each out while it holds its default, so that the
# digests of search stages and the resume records written before them still match.
_LATER_KEYS = ("warmup_fraction", "score_lr", "init", "logit_bias", "distill")


class SearchCfg(MethodCfg):
    """The OFB search (``method: ofb``, the default): weights, importance and sparsity learnt together."""

    method: Literal["ofb"] = "ofb"
    epochs: int = Field(100, ge=1)
    warmup_fraction: float = Field(
        0.2, ge=0, lt=1, description="warm-up of lr, mixing weight and PMIM keep ratio as a fraction of the search's "
        "optimiser steps (0.2: 20 of 100 epochs, as published, and a warm-up in searches of any length)"
    )
    warmup_epochs: int | None = Field(
        None, ge=0, description="the warm-up in whole epochs instead (the paper's form: 20 of 100); wins over "
        "warmup_fraction when given"
    )
    lr: float = Field(2.5e-4, gt=0, description="weights, per 256 images")
    arch_lr: float = Field(2.5e-4, gt=0, description="sparsity logits, per 256 images")
    score_lr: float | None = Field(
        None, gt=0, description="importance scores (their own group, no weight decay), per 256 images; default: "
        "arch_lr, the published 1:1 ratio to the sparsity logits"
    )
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
    init: Literal["random", "magnitude"] = Field(
        "random", description="the importance scores' start: random draws (the method) or the dense weights' "
        "coupled magnitudes, ranked and spread like the random draw"
    )
    logit_bias: float = Field(
        0.0, ge=0, description="added at the start to each group's cell nearest a global allocation of the dense "
        "weights' magnitudes per MAC at the FLOPs target (0: off; 1 exceeds the U(0, 1) draw's range, so that cell "
        "starts as the most probable); needs a FLOPs budget"
    )
    distill: SearchDistillCfg = Field(default_factory=SearchDistillCfg)
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

    @property
    def scores_lr(self) -> float:
        """The importance scores' learning rate per 256 images (``score_lr``, else ``arch_lr``)."""
        return self.score_lr if self.score_lr is not None else self.arch_lr

    def learning_rates(self) -> dict[str, float]:
        return {"search weights": self.lr, "search scores": self.scores_lr, "search arch": self.arch_lr,
                "search decoder": self.decoder_lr}

    def warmup_steps(self, steps_per_epoch: int) -> int:
        """Optimiser steps of warm-up: ``warmup_epochs`` whole epochs when given, else the fraction of all."""
        if self.warmup_epochs is not None:
            return self.warmup_epochs * steps_per_epoch
        return round(self.warmup_fraction * self.epochs * steps_per_epoch)

    def searchable_options(self) -> dict[str, float]:
        return {"l1_attention": self.l1_attention, "l1_other": self.l1_other}

    @model_validator(mode="after")
    def _check(self) -> SearchCfg:
        if self.warmup_epochs is not None and self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) exceeds epochs ({self.epochs})")
        if self.logit_bias > 0 and self.target_flops_ratio is None and self.target_gflops is None:
            raise ValueError("logit_bias allocates at the FLOPs target: give target_flops_ratio or target_gflops")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        """Plain dumps leave the default method out, so the digests of run stages, resumable checkpoints and
        baselines made before there were methods still match, and so for the later keys at their defaults;
        the resolved recipe (dumped with the context ``{"resolved": True}``) names them all."""
        data = handler(self)
        if not (info.context or {}).get("resolved"):
            data.pop("method", None)
            for key in _LATER_KEYS:
                default = type(self).model_fields[key].get_default(call_default_factory=True)
                if getattr(self, key) == default:
                    data.pop(key, None)
        return data
