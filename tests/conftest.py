"""Shared fixtures: tiny ViTs so that the suite runs in minutes on two CPU cores."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import timm
import torch

import ofbdeploy.models.zoo  # noqa: F401  (registers the small test ViTs)
from ofbdeploy.arch import ArchSpec
from ofbdeploy.families.vit.support import read_vit_shape
from ofbdeploy.latency.lut import LatencyLUT, LutKey, arch_features

SYNTHETIC_COEFFICIENTS = [0.05, 2e-4, 1e-6, 3e-5, 4e-3, 8e-7, 2e-5]  # made up, one per latency-model feature

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def synthetic_lut() -> Callable[[str, int], LatencyLUT]:
    """A latency table of a model at an image size with made-up positive coefficients: search, budget and
    report logic tested without measuring (and without its noise)."""
    def make(model_name: str, img_size: int) -> LatencyLUT:
        shape = read_vit_shape(timm.create_model(model_name, img_size=img_size), model_name)
        dense = float(arch_features(ArchSpec.dense(shape)) @ SYNTHETIC_COEFFICIENTS)
        key = LutKey("cpu: synthetic", "ort-cpu", "fp32", 1, img_size, model_name)
        return LatencyLUT(key, shape, list(SYNTHETIC_COEFFICIENTS), dense)

    return make
