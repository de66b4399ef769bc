"""Runtimes as plug-ins: one registry that the CLI, the recipe, the profile workflow and the latency table read, and
a new runtime is one module plus one registry row (shown here with a stand-in module that runs ONNX files)."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import timm

import ofbdeploy.models.zoo  # noqa: F401  (registers the pico ViT)
from ofbdeploy import cli
from ofbdeploy.deploy import workflow
from ofbdeploy.deploy.config import ProfileCfg
from ofbdeploy.deploy.onnx_export import export_onnx
from ofbdeploy.deploy.runtimes import registry
from ofbdeploy.deploy.runtimes.base import Runtime
from ofbdeploy.deploy.runtimes.errors import BackendError
from ofbdeploy.deploy.runtimes.ort import RUNTIMES as ORT
from ofbdeploy.latency import lut

ROOT = Path(__file__).parents[2]


def test_every_registered_runtime_is_found_in_its_module() -> None:
    assert registry.names() == ["torch", "torch-compile", "ort-cpu", "ort-cuda", "ort-trt", "tensorrt", "openvino"]
    assert registry.names() == cli.BACKENDS
    for name in registry.names():
        runtime = registry.get(name)
        assert runtime.artifact in ("module", "onnx", "engine") and set(runtime.precisions) <= set(registry.PRECISIONS)
    with pytest.raises(BackendError, match="unknown backend 'nope'; known: torch, torch-compile"):
        registry.get("nope")


def test_naming_runtimes_loads_no_runtime() -> None:
    """The CLI and the recipe validator read the registry without importing torch or ONNX Runtime."""
    code = ("import sys; import ofbdeploy.cli, ofbdeploy.recipe; "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'tensorrt') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert out.stdout.strip() == "[]"


@pytest.fixture()
def new_runtime(monkeypatch: pytest.MonkeyPatch) -> str:
    """A runtime added the documented way: a module with RUNTIMES, and a row naming it (here ONNX Runtime's CPU
    runner under a new name, standing in for e.g. OpenVINO)."""
    module = types.ModuleType(f"{registry.__package__}.standin")
    module.RUNTIMES = {"standin": Runtime(ORT["ort-cpu"].build, lambda: None, ("cpu",), "onnx", ("fp32",))}
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(registry._ROWS, "standin", "standin")
    return "standin"


def test_a_new_runtime_is_one_module_and_one_row(new_runtime: str, tmp_path: Path) -> None:
    assert ProfileCfg(backends=[new_runtime]).backends == [new_runtime]  # the recipe validator
    with pytest.raises(ValueError, match="'openvino' or 'standin'"):
        ProfileCfg(backends=["nope"])
    assert lut._this_device(new_runtime).startswith("cpu: ")  # the latency table's key
    model = timm.create_model("ofb_vit_pico_patch4_32", img_size=16).eval()
    artifacts = workflow.DeployArtifacts(onnx={"m": str(export_onnx(model, tmp_path / "m.onnx", img_size=16,
                                                                    simplify=False).path)})
    runner = workflow.make_runner(new_runtime, "m", {"m": model}, artifacts, ProfileCfg(backends=[new_runtime]))
    assert runner.run_on(np.zeros((2, 3, 16, 16), np.float32)).shape == (2, 10)  # the profile workflow
