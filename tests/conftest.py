"""Shared fixtures: tiny ViTs so that the suite runs in minutes on two CPU cores."""

from __future__ import annotations

import pytest
import torch

import ofbdeploy.models.zoo  # noqa: F401  (registers the small test ViTs)

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
