"""Shared fixtures: tiny ViTs so that the suite runs in minutes on two CPU cores."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
import yaml

import ofbdeploy.models.zoo  # noqa: F401  (registers the small test ViTs)
from ofbdeploy import threads
from ofbdeploy.arch import ArchSpec
from ofbdeploy.families import family_of, read_shape
from ofbdeploy.families.vit.support import read_vit_shape
from ofbdeploy.latency.lut import LatencyLUT, LutKey, arch_features
from ofbdeploy.models.materialize import materialize

SYNTHETIC_COEFFICIENTS = [0.05, 2e-4, 1e-6, 3e-5, 4e-3, 8e-7, 2e-5]  # made up, one per latency-model feature

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_thread_state_between_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CLI invoked in-process configures the process's threads (and may start a governor that changes torch's
    thread count from the training step); that state ends with the test that made it."""
    monkeypatch.setattr(threads, "_configured", None)
    monkeypatch.setattr(threads, "_governor", None)


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


@pytest.fixture
def cut_model() -> Callable[..., tuple]:
    """A teacher and a plain model cut from it by a random decision (every embedding kept whole unless
    ``embedding``), untrained: with ``multipliers`` the decided multipliers are random (a trained-like fold), else
    1 (the teacher's own units). Any family: ``name`` is a timm model (a ViT by default)."""
    def make(seed: int, multipliers: bool = False, name: str = "ofb_vit_pico_patch4_32", embedding: bool = False):
        torch.manual_seed(seed)
        teacher = timm.create_model(name).eval()
        shape = read_shape(teacher, name)
        family = family_of(shape)
        searchable = family.searchable(copy.deepcopy(teacher), family.space(shape), name)
        rng = random.Random(seed)
        for group_name, group in searchable.groups():
            if not group_name.endswith("embedding"):
                searchable.force_cell(group_name, rng.randrange(len(group.cells)))
            elif embedding:  # any cell but the widest
                searchable.force_cell(group_name, rng.choice([k for k in range(len(group.cells))
                                                              if k != group.widest_cell()]))
            else:
                searchable.force_cell(group_name, group.widest_cell())
            group.multiplier.data.uniform_(0.25, 1.75) if multipliers else group.multiplier.data.fill_(1.0)
        pruned, spec = materialize(searchable.eval())
        return teacher, pruned, spec

    return make



def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that start several processes (DDP workers, torchrun, data loader workers) run first, in their usual
    order: started early, their workers share the least state with the rest of the suite.

    The suite's process used to die by SIGSEGV, with no traceback, while it waited on child processes late in
    the session. The cause (found in the fifth session) was OpenVINO's CPU plugin: it gives the thread that
    loads it a signal stack and freed that stack when the last ``Core`` was released from another thread, and
    the next SIGCHLD handled on the main thread (torch's data loader installs a handler) then faulted. The
    runtime now keeps one ``Core`` per process; ``test_a_runner_released_on_another_thread_leaves_the_process_
    able_to_handle_signals`` replays the crash in a child process.
    """
    items.sort(key=lambda item: item.get_closest_marker("multiprocess") is None)


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Callable[..., Path]:
    """Writes ``tmp_path/r.yaml``: the pico ViT on synthetic data, one search and one finetune epoch, no export or
    profile, output in ``tmp_path/run``; ``name`` and ``limit_train`` vary between the tests that use it."""
    def write(name: str, limit_train: int) -> Path:
        recipe = {"name": name, "seed": 1, "device": "cpu", "output_dir": str(tmp_path / "run"),
                  "model": {"name": "ofb_vit_pico_patch4_32", "img_size": 16},
                  "data": {"kind": "synthetic", "limit_train": limit_train, "limit_val": 32, "batch_size": 32,
                           "eval_batch_size": 32},
                  "search": {"target_flops_ratio": 0.5, "epochs": 1, "warmup_epochs": 0},
                  "finetune": {"epochs": 1, "warmup_epochs": 0}, "export": {"enabled": False},
                  "profile": {"enabled": False}}
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return path
    return write
