"""TensorRT engines: cache keys, the missing-TensorRT message, the parity gate; real builds where a GPU exists."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch

from ofbdeploy.deploy.onnx_export import export_onnx
from ofbdeploy.deploy.tensorrt_engine import (
    EngineSpec,
    TensorRTUnavailable,
    build_engine,
    check_engine_parity,
    engine_cache_key,
    require_tensorrt,
)
from ofbdeploy.errors import OfbError


def _tensorrt_gpu_missing() -> str:
    """Why the real-engine tests cannot run here ('' when they can)."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT not installed (runs in the Docker image)"
    return "" if torch.cuda.is_available() else "no CUDA GPU (docker run --gpus all ...)"


_MISSING = _tensorrt_gpu_missing()
requires_tensorrt_gpu = pytest.mark.skipif(bool(_MISSING), reason=_MISSING)
SPEC = EngineSpec(precision="fp16", min_batch=1, opt_batch=8, max_batch=32, img_size=32)


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pico ViT exported like the pipeline does: opset 17 (LayerNormalization op), dynamic batch."""
    torch.manual_seed(0)
    model = timm.create_model("ofb_vit_pico_patch4_32").eval()
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return export_onnx(model, path, img_size=32, simplify=False).path


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)


def _ort_logits(onnx_path: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images})[0]


class _FakeRunner:
    """Stands in for the TensorRT runner: ONNX Runtime's logits plus a chosen perturbation."""

    def __init__(self, onnx_path: Path, perturb: Any) -> None:
        self.onnx_path, self.perturb = onnx_path, perturb

    def run_on(self, images: np.ndarray) -> np.ndarray:
        return self.perturb(_ort_logits(self.onnx_path, images))


def _factory(onnx_path: Path, perturb: Any, calls: list[tuple[str, dict[str, Any]]] | None = None) -> Any:
    def create(kind: str, **kwargs: Any) -> _FakeRunner:
        if calls is not None:
            calls.append((kind, kwargs))
        return _FakeRunner(onnx_path, perturb)

    return create


def test_cache_key_is_stable_and_tracks_everything_that_changes_an_engine(tmp_path: Path) -> None:
    onnx_a, onnx_b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx_a.write_bytes(b"model bytes" * 1000)
    onnx_b.write_bytes(b"model bytes" * 999 + b"other bytes")
    calibration = np.zeros((4, 3, 32, 32), np.float32)
    key = engine_cache_key(onnx_a, SPEC, "10.11.0.33", "NVIDIA H100 80GB HBM3")
    assert len(key) == 64 and int(key, 16) >= 0
    assert key == engine_cache_key(Path(str(onnx_a)), EngineSpec("fp16", 1, 8, 32, 32), "10.11.0.33",
                                   "NVIDIA H100 80GB HBM3")
    variants = [
        engine_cache_key(onnx_b, SPEC, "10.11.0.33", "NVIDIA H100 80GB HBM3"),
        engine_cache_key(onnx_a, EngineSpec("fp32", 1, 8, 32, 32), "10.11.0.33", "NVIDIA H100 80GB HBM3"),
        engine_cache_key(onnx_a, EngineSpec("fp16", 2, 8, 32, 32), "10.11.0.33", "NVIDIA H100 80GB HBM3"),
        engine_cache_key(onnx_a, EngineSpec("fp16", 1, 16, 32, 32), "10.11.0.33", "NVIDIA H100 80GB HBM3"),
        engine_cache_key(onnx_a, EngineSpec("fp16", 1, 8, 64, 32), "10.11.0.33", "NVIDIA H100 80GB HBM3"),
        engine_cache_key(onnx_a, SPEC, "10.13.3.9", "NVIDIA H100 80GB HBM3"),
        engine_cache_key(onnx_a, SPEC, "10.11.0.33", "NVIDIA A100-SXM4-40GB"),
        engine_cache_key(onnx_a, SPEC, "10.11.0.33", "NVIDIA H100 80GB HBM3", calibration=calibration),
        engine_cache_key(onnx_a, SPEC, "10.11.0.33", "NVIDIA H100 80GB HBM3", calibration=calibration + 1),
    ]
    assert len({key, *variants}) == len(variants) + 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"precision": "bf16"}, "precision"),
        ({"min_batch": 0}, "batch range"),
        ({"opt_batch": 64}, "batch range"),
        ({"img_size": 0}, "img_size"),
    ],
)
def test_engine_spec_rejects_bad_settings(kwargs: dict[str, Any], match: str) -> None:
    settings = {"precision": "fp16", "min_batch": 1, "opt_batch": 8, "max_batch": 32, "img_size": 32, **kwargs}
    with pytest.raises(OfbError, match=match):
        EngineSpec(**settings)


def test_build_engine_without_tensorrt_points_to_the_docker_image(
    onnx_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails, as on any machine without TensorRT
    with pytest.raises(TensorRTUnavailable, match=r"docker build -t ofbdeploy \. ; docker run --gpus all"):
        build_engine(onnx_model, SPEC, tmp_path / "engines")
    with pytest.raises(OfbError, match=r"pip install '\.\[trt\]'"):
        require_tensorrt()
    assert not (tmp_path / "engines").exists()


def test_build_engine_checks_its_inputs_before_needing_tensorrt(onnx_model: Path, tmp_path: Path) -> None:
    int8 = EngineSpec("int8", 1, 8, 32, 32)
    with pytest.raises(OfbError, match="calibration_images are required"):
        build_engine(onnx_model, int8, tmp_path)
    with pytest.raises(OfbError, match=r"calibration_images: expected shape \(N, 3, 32, 32\)"):
        build_engine(onnx_model, int8, tmp_path, calibration_images=np.zeros((4, 1, 32, 32), np.float32))
    with pytest.raises(OfbError, match=r"missing\.onnx: ONNX model not found"):
        build_engine(tmp_path / "missing.onnx", SPEC, tmp_path)


def test_parity_passes_within_tolerance_and_reports(onnx_model: Path, images: np.ndarray) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []
    factory = _factory(onnx_model, lambda logits: logits + 1e-4, calls)
    result = check_engine_parity(Path("e.engine"), onnx_model, images, runner_factory=factory, max_abs_diff=1e-3,
                                 precision="fp16")
    assert result["images"] == 8 and result["top1_agreement"] == 1.0
    assert result["max_abs_diff"] == pytest.approx(1e-4, rel=1e-2)
    assert calls == [("tensorrt", {"engine_path": Path("e.engine"), "precision": "fp16"})]


def test_parity_fails_beyond_tolerance_naming_the_engine(onnx_model: Path, images: np.ndarray) -> None:
    factory = _factory(onnx_model, lambda logits: logits + 0.05)
    with pytest.raises(OfbError, match=r"runs/x/abc\.engine: TensorRT outputs disagree .*max \|diff\| 0\.05"):
        check_engine_parity(Path("runs/x/abc.engine"), onnx_model, images, runner_factory=factory, max_abs_diff=1e-3)


def test_parity_fails_on_changed_predictions_even_with_small_differences(
    onnx_model: Path, images: np.ndarray
) -> None:
    def swap_top1(logits: np.ndarray) -> np.ndarray:
        out = logits.copy()
        rows = np.arange(len(out))
        out[rows, out.argmax(axis=1)] = out.min(axis=1) - 1.0
        return out

    factory = _factory(onnx_model, swap_top1)
    with pytest.raises(OfbError, match=r"top-1 agreement 0\.0%, required 99\.0%"):
        check_engine_parity(Path("a.engine"), onnx_model, images, runner_factory=factory, max_abs_diff=100.0)


def test_parity_fails_on_non_finite_outputs(onnx_model: Path, images: np.ndarray) -> None:
    def nan_row(logits: np.ndarray) -> np.ndarray:
        out = logits.copy()
        out[3] = np.nan
        return out

    factory = _factory(onnx_model, nan_row)
    with pytest.raises(OfbError, match=r"a\.engine: TensorRT outputs disagree"):
        check_engine_parity(Path("a.engine"), onnx_model, images, runner_factory=factory,
                            max_abs_diff=float("inf"), min_top1_agreement=0.0)


def test_parity_rejects_a_wrong_output_shape(onnx_model: Path, images: np.ndarray) -> None:
    factory = _factory(onnx_model, lambda logits: logits[:, :5])
    with pytest.raises(OfbError, match=r"a\.engine: engine output shape \(8, 5\)"):
        check_engine_parity(Path("a.engine"), onnx_model, images, runner_factory=factory, max_abs_diff=1.0)


@requires_tensorrt_gpu
@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 1e-3), ("fp16", 2e-2)])
def test_real_engine_builds_matches_onnxruntime_and_is_cached(
    onnx_model: Path, images: np.ndarray, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    precision: str, tolerance: float,
) -> None:
    spec = EngineSpec(precision, min_batch=1, opt_batch=8, max_batch=16, img_size=32, workspace_gb=1.0)
    engine = build_engine(onnx_model, spec, tmp_path)
    assert engine.parent == tmp_path and engine.suffix == ".engine" and engine.stat().st_size > 0
    assert list(tmp_path.glob("timing-*.cache"))
    result = check_engine_parity(engine, onnx_model, images, max_abs_diff=tolerance, precision=precision)
    assert result["top1_agreement"] == 1.0

    caplog.set_level(logging.INFO, logger="ofbdeploy.deploy.tensorrt")
    assert build_engine(onnx_model, spec, tmp_path) == engine
    assert "engine cache hit" in caplog.text


@requires_tensorrt_gpu
def test_real_int8_engine_keeps_its_calibration_cache(onnx_model: Path, tmp_path: Path) -> None:
    calibration = np.random.default_rng(1).standard_normal((32, 3, 32, 32)).astype(np.float32)
    spec = EngineSpec("int8", min_batch=1, opt_batch=8, max_batch=16, img_size=32, workspace_gb=1.0)
    engine = build_engine(onnx_model, spec, tmp_path, calibration_images=calibration)
    calib_cache = engine.with_suffix(".calib")
    assert calib_cache.stat().st_size > 0
    engine.unlink()
    assert build_engine(onnx_model, spec, tmp_path, calibration_images=calibration) == engine
    # a smoke check of the int8 path: finite logits of the right shape (random weights give no accuracy to keep)
    check_engine_parity(engine, onnx_model, calibration[:8], max_abs_diff=1.0, min_top1_agreement=0.0,
                        precision="int8")
