"""The OpenVINO runtime: the same files as ONNX Runtime, outputs that agree with torch, the profile's protocol, the
exported files' accuracy, and a clear reason where the package is missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from ofbdeploy.deploy.accuracy import file_accuracy
from ofbdeploy.deploy.config import ProfileCfg
from ofbdeploy.deploy.onnx_export import export_onnx
from ofbdeploy.deploy.quantize import quantize_int8
from ofbdeploy.deploy.runtimes import openvino as ov_runtime
from ofbdeploy.deploy.runtimes.registry import BackendError, BackendUnavailable, create_runner, names
from ofbdeploy.deploy.workflow import DeployArtifacts, onnx_key, profile_models

pytest.importorskip("openvino", reason="the openvino extra is not installed")  # the dev extra installs it

PICO = "ofb_vit_pico_patch4_32"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    torch.manual_seed(0)
    model = timm.create_model(PICO).eval()
    small = timm.create_model(PICO, embed_dim=32, num_heads=2).eval()
    root = tmp_path_factory.mktemp("ov")
    calibration = np.random.default_rng(1).standard_normal((16, 3, 32, 32)).astype(np.float32)
    dense = export_onnx(model, root / "dense.onnx", img_size=32).path
    pruned = export_onnx(small, root / "pruned.onnx", img_size=32).path
    return {"model": model, "small": small, "dense": dense, "pruned": pruned,
            "dense-int8": quantize_int8(dense, root / "dense-int8.onnx", calibration).path,
            "pruned-int8": quantize_int8(pruned, root / "pruned-int8.onnx", calibration).path}


@pytest.mark.parametrize("batch", [1, 6])
def test_fp32_agrees_with_torch_at_batch_one_and_split_over_streams(files, batch: int) -> None:
    images = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    runner = create_runner("openvino", onnx_path=files["dense"], threads=2)
    got = runner.run_on(images)
    with torch.no_grad():
        want = files["model"](torch.from_numpy(images)).numpy()
    assert np.abs(got - want).max() < 1e-4  # fp32 everywhere: no silent bf16 on CPUs that have it
    assert runner.device_name.startswith("cpu")


def test_the_int8_file_runs_as_int8_and_stays_close(files) -> None:
    images = np.random.default_rng(7).standard_normal((4, 3, 32, 32)).astype(np.float32)
    ov = create_runner("openvino", onnx_path=files["dense-int8"], precision="int8").run_on(images)
    ort = create_runner("ort-cpu", onnx_path=files["dense-int8"], precision="int8").run_on(images)
    scale = np.abs(ort).max()
    assert np.abs(ov - ort).max() < 0.1 * scale


def test_a_precision_the_file_is_not_in_is_refused(files) -> None:
    with pytest.raises(BackendError, match=r"openvino .* supports fp32, not int8"):
        create_runner("openvino", onnx_path=files["dense"], precision="int8")


def test_profile_rows_on_openvino_next_to_onnx_runtime(files) -> None:
    artifacts = DeployArtifacts()
    for name in ("dense", "pruned"):
        artifacts.onnx[onnx_key(name, "fp32")] = str(files[name])
        artifacts.onnx[onnx_key(name, "int8")] = str(files[f"{name}-int8"])
    cfg = ProfileCfg(backends=["ort-cpu", "openvino"], precisions=["fp32", "int8"], batches=[1, 4], warmup=1,
                     repeats=5, threads=1)
    rows, skipped = profile_models({"dense": files["model"], "pruned": files["small"]}, artifacts, cfg, 0.5)
    assert not skipped
    got = {(r["backend"], r["precision"], r["batch"]) for r in rows}
    assert got == {(b, p, n) for b in ("ort-cpu", "openvino") for p in ("fp32", "int8") for n in (1, 4)}
    assert all(r["latency_ms_dense"] > 0 and r["speedup_vs_dense_fp32"] > 0 for r in rows)


def test_accuracy_of_a_file_on_openvino_matches_onnx_runtime(files) -> None:
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(5, 3, 32, 32, generator=generator), torch.randint(0, 10, (5,), generator=generator))
               for _ in range(3)]
    ov = file_accuracy(Path(files["dense"]), batches, "openvino")
    ort = file_accuracy(Path(files["dense"]), batches, "ort-cpu")
    assert ov == ort and ov["images"] == 15


def test_without_the_package_the_reason_is_given(monkeypatch: pytest.MonkeyPatch, files) -> None:
    assert "openvino" in names()
    monkeypatch.setattr(ov_runtime.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BackendUnavailable, match=r"OpenVINO is not installed: pip install"):
        create_runner("openvino", onnx_path=files["dense"])


_RELEASED_ON_ANOTHER_THREAD = """
import gc, signal, subprocess, sys, threading
from ofbdeploy.deploy.runtimes.registry import create_runner

runner = create_runner("openvino", onnx_path=sys.argv[1])
runner.prepare(1)
runner.run()
holder = [runner]
del runner
thread = threading.Thread(target=lambda: (holder.clear(), gc.collect()))  # released off the main thread
thread.start()
thread.join()
signal.signal(signal.SIGCHLD, lambda *_: None)  # what torch's data loader installs in the main process
subprocess.run(["true"], check=True)  # a child exits: SIGCHLD is handled on the main thread's signal stack
print("alive")
"""


@pytest.mark.multiprocess
def test_a_runner_released_on_another_thread_leaves_the_process_able_to_handle_signals(files, tmp_path) -> None:
    """OpenVINO's CPU plugin gives the thread that loads it a signal stack and frees it with the last Core, from
    whichever thread releases that: the next signal handled on the loading thread then killed the process with
    SIGSEGV and no traceback (the test suite died this way several times). One Core per process keeps it valid."""
    script = tmp_path / "released.py"
    script.write_text(_RELEASED_ON_ANOTHER_THREAD)
    done = subprocess.run([sys.executable, str(script), str(files["dense"])], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "alive" in done.stdout, (done.returncode, done.stderr[-2000:])
