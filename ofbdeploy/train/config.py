"""Sections the training loops read: distillation from the dense teacher (finetune, and optionally the search)."""

from __future__ import annotations

from pydantic import Field

from ofbdeploy.config import Strict


class DistillCfg(Strict):
    """(1 - alpha) cross-entropy on the labels + alpha T^2 KL against the teacher's logits at temperature T."""

    enabled: bool = True
    temperature: float = Field(1.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the distillation term (1 - alpha on labels)")
