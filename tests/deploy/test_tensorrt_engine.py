"""TensorRT engines: cache keys, the missing-TensorRT message, the precision gate, the parity gate with its batching;
real strongly typed builds (fp32, fp16, int8 Q/DQ) where a GPU and TensorRT exist."""

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
from ofbdeploy.deploy.parity import Tolerance
from ofbdeploy.deploy.quantize import quantize_int8
from ofbdeploy.deploy.tensorrt_engine import (
    EngineSpec,
    TensorRTUnavailable,
    build_engine,
    check_engine_parity,
    engine_cache_key,
    parity_batches,
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
        engine_cache_key(onnx_a, EngineSpec("fp16", 1, 8, 32, 32, tf32=False), "10.11.0.33", "NVIDIA H100 80GB HBM3"),
        engine_cache_key(onnx_a, SPEC, "11.4.0.106", "NVIDIA H100 80GB HBM3"),
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
        build_engine(onnx_model, EngineSpec("fp32", 1, 8, 32, 32), tmp_path / "engines")
    with pytest.raises(OfbError, match=r"pip install '\.\[trt\]'"):
        require_tensorrt()
    assert not (tmp_path / "engines").exists()


def test_build_engine_checks_its_inputs_before_needing_tensorrt(onnx_model: Path, tmp_path: Path) -> None:
    # strongly typed: the graph decides the precision, so an fp32 graph cannot make an int8 or fp16 engine
    with pytest.raises(OfbError, match=r"a fp32 graph cannot make a int8 engine .*export the int8 ONNX"):
        build_engine(onnx_model, EngineSpec("int8", 1, 8, 32, 32), tmp_path)
    with pytest.raises(OfbError, match=r"a fp32 graph cannot make a fp16 engine"):
        build_engine(onnx_model, SPEC, tmp_path)
    with pytest.raises(OfbError, match=r"missing\.onnx: ONNX model not found"):
        build_engine(tmp_path / "missing.onnx", SPEC, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("count", "low", "high", "sizes"), [
    (8, 1, 32, [8]),  # all in one batch
    (8, 1, 3, [3, 3, 2]),  # split at the profile's maximum
    (8, 3, 3, [3, 3, 3]),  # a tail under the profile's minimum is topped up from the start
    (3, 8, 16, [8]),  # fewer images than the profile's minimum: repeated to fill it
    (20, 4, 8, [8, 8, 4]),
])
def test_parity_batches_fit_the_engine_profile(count: int, low: int, high: int, sizes: list[int]) -> None:
    images = np.arange(count, dtype=np.float32).reshape(count, 1, 1, 1)
    batches = parity_batches(images, low, high)
    assert [len(b) for b in batches] == sizes
    assert set(np.concatenate(batches).ravel()) == set(range(count))  # every image checked


def test_parity_passes_within_tolerance_and_reports(onnx_model: Path, images: np.ndarray) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []
    factory = _factory(onnx_model, lambda logits: logits + 1e-4, calls)
    result = check_engine_parity(Path("e.engine"), onnx_model, images, runner_factory=factory, precision="fp16")
    assert result["images"] == 8 and result["top1_agreement"] == 1.0
    assert result["max_abs_diff"] == pytest.approx(1e-4, rel=1e-2)
    assert calls == [("tensorrt", {"engine_path": Path("e.engine"), "precision": "fp16"})]
    # the default tolerance is the precision's, relative to the logit scale
    scale = float(np.abs(_ort_logits(onnx_model, images)).max())
    assert result["tolerance"] == pytest.approx(5e-2 * max(1.0, scale))


def test_parity_tolerance_is_relative_to_the_logit_scale(onnx_model: Path, images: np.ndarray) -> None:
    """The same relative error passes at any logit scale; fp32 is held tighter than a TF32 fp32 engine."""
    scale = max(1.0, float(np.abs(_ort_logits(onnx_model, images)).max()))
    off = _factory(onnx_model, lambda logits: logits + 5e-3 * scale)
    with pytest.raises(OfbError, match=r"\(fp32\): max \|diff\|"):
        check_engine_parity(Path("a.engine"), onnx_model, images, runner_factory=off, precision="fp32")
    assert check_engine_parity(Path("a.engine"), onnx_model, images, runner_factory=off, precision="fp32",
                               tf32=True)["top1_agreement"] == 1.0


def test_parity_fails_beyond_tolerance_naming_the_engine(onnx_model: Path, images: np.ndarray) -> None:
    factory = _factory(onnx_model, lambda logits: logits + 0.05)
    with pytest.raises(OfbError, match=r"runs/x/abc\.engine: TensorRT outputs disagree .*max \|diff\| 0\.05"):
        check_engine_parity(Path("runs/x/abc.engine"), onnx_model, images, runner_factory=factory, precision="fp32")


def test_parity_fails_on_changed_predictions_even_with_small_differences(
    onnx_model: Path, images: np.ndarray
) -> None:
    def swap_top1(logits: np.ndarray) -> np.ndarray:
        out = logits.copy()
        rows = np.arange(len(out))
        out[rows, out.argmax(axis=1)] = out.min(axis=1) - 1.0
        return out

    factory = _factory(onnx_model, swap_top1)
    with pytest.raises(OfbError, match=r"top-1 agreement 0\.000 \(minimum 0\.990\)"):
        check_engine_parity(Path("a.engine"), onnx_model, images, runner_factory=factory, precision="fp32",
                            tolerance=Tolerance(rtol=100.0, min_top1_agreement=0.99))


def test_parity_fails_on_non_finite_outputs(onnx_model: Path, images: np.ndarray) -> None:
    def nan_row(logits: np.ndarray) -> np.ndarray:
        out = logits.copy()
        out[3] = np.nan
        return out

    factory = _factory(onnx_model, nan_row)
    with pytest.raises(OfbError, match=r"a\.engine: TensorRT outputs disagree"):
        check_engine_parity(Path("a.engine"), onnx_model, images, runner_factory=factory, precision="int8",
                            tolerance=Tolerance(rtol=float("inf"), min_top1_agreement=0.0))


def test_parity_rejects_a_wrong_output_shape(onnx_model: Path, images: np.ndarray) -> None:
    factory = _factory(onnx_model, lambda logits: logits[:, :5])
    with pytest.raises(OfbError, match=r"a\.engine: engine output shape \(8, 5\)"):
        check_engine_parity(Path("a.engine"), onnx_model, images, runner_factory=factory, precision="fp32")


@pytest.fixture(scope="module")
def graphs(onnx_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The pico model's three graphs, as the export writes them: fp32, fp16 (LayerNorm in fp32), int8 Q/DQ."""
    torch.manual_seed(0)
    model = timm.create_model("ofb_vit_pico_patch4_32").eval()
    directory = tmp_path_factory.mktemp("graphs")
    fp16 = export_onnx(model, directory / "fp16.onnx", img_size=32, fp16=True, simplify=False).path
    calibration = np.random.default_rng(1).standard_normal((32, 3, 32, 32)).astype(np.float32)
    int8 = quantize_int8(onnx_model, directory / "int8.onnx", calibration).path
    return {"fp32": onnx_model, "fp16": fp16, "int8": int8}


@requires_tensorrt_gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_real_strongly_typed_engine_matches_onnxruntime_and_is_cached(
    graphs: dict[str, Path], images: np.ndarray, tmp_path: Path, caplog: pytest.LogCaptureFixture, precision: str,
) -> None:
    spec = EngineSpec(precision, min_batch=2, opt_batch=8, max_batch=16, img_size=32, workspace_gb=1.0, tf32=False)
    engine = build_engine(graphs[precision], spec, tmp_path)
    assert engine.parent == tmp_path and engine.suffix == ".engine" and engine.stat().st_size > 0
    assert list(tmp_path.glob("timing-*.cache"))
    result = check_engine_parity(engine, graphs[precision], images[:1], precision=precision, batch_range=(2, 16))
    assert result["images"] == 2  # one image, repeated to the profile's minimum batch

    caplog.set_level(logging.INFO, logger="ofbdeploy.deploy.tensorrt")
    assert build_engine(graphs[precision], spec, tmp_path) == engine
    assert "engine cache hit" in caplog.text
