"""Latency backends and the measurement protocol: real torch and ONNX Runtime CPU runs, fakes for the protocol.

CUDA, ONNX Runtime GPU providers and TensorRT are exercised only where they exist; elsewhere those tests skip
and say what is missing.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
from torch import nn

from ofbdeploy.arch.cost import measure_macs
from ofbdeploy.deploy.measure import QuietHost, measure, measure_pair, quiet_rounds, speedup, wait_for_quiet
from ofbdeploy.deploy.onnx_export import export_onnx
from ofbdeploy.deploy.runtimes.base import Runner, StreamTimer, Timer
from ofbdeploy.deploy.runtimes.registry import BackendError, BackendUnavailable, available_backends, create_runner

PICO = "ofb_vit_pico_patch4_32"
SMALLER_PICO = {"embed_dim": 32, "num_heads": 2}
HALF_DEIT_S = {"embed_dim": 192, "num_heads": 3}  # half the embedding and MLP width of DeiT-S, head width kept
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def _export(model: nn.Module, path: Path, img_size: int) -> Path:
    """ONNX with the deployment conventions (opset 17, images -> logits, dynamic batch), checked in ORT."""
    return export_onnx(model.eval(), path, img_size=img_size, simplify=False).path


def _forward_once(runner: Runner, batch: int) -> np.ndarray:
    """One untimed forward, for parity checks."""
    runner.prepare(batch)
    runner.run()
    return runner.outputs()


class _ScriptedTimer(Timer):
    """Returns prepared durations, so statistics can be checked exactly."""

    def __init__(self, durations: list[float]) -> None:
        self._durations = iter(durations)

    def start(self) -> None:
        pass

    def stop(self) -> float:
        return next(self._durations)


class _FakeRunner(Runner):
    """Records every call into a shared log, so the order of dense and pruned calls can be checked."""

    def __init__(self, name: str, log: list[str], durations: list[float] | None = None) -> None:
        self.backend, self.device_name, self.precision = name, "fake", "fp32"
        self._log = log
        self._durations = durations

    def prepare(self, batch: int, images: np.ndarray | None = None) -> None:
        self._log.append(f"prepare {self.backend}")

    def run(self) -> None:
        self._log.append(self.backend)

    def synchronize(self) -> None:
        pass

    def timer(self) -> Timer:
        return _ScriptedTimer(self._durations) if self._durations is not None else super().timer()

    def outputs(self) -> np.ndarray:
        return np.zeros(1, dtype=np.float32)


@pytest.mark.parametrize("widths", [{}, SMALLER_PICO], ids=["dense", "smaller"])
def test_ort_cpu_matches_torch(tmp_path: Path, widths: dict[str, int]) -> None:
    model = timm.create_model(PICO, **widths).eval()
    onnx_path = _export(model, tmp_path / "model.onnx", 32)
    eager = _forward_once(create_runner("torch", model=model, device="cpu"), 3)
    ort_out = _forward_once(create_runner("ort-cpu", onnx_path=onnx_path, threads=2), 3)
    assert eager.shape == ort_out.shape == (3, 10)
    np.testing.assert_allclose(ort_out, eager, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", ["ort-cpu", "torch"])
def test_run_on_given_images_matches_torch(tmp_path: Path, backend: str) -> None:
    model = timm.create_model(PICO).eval()
    images = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    kwargs = {"onnx_path": _export(model, tmp_path / "m.onnx", 32)} if backend == "ort-cpu" else {"model": model}
    got = create_runner(backend, **kwargs).run_on(images)
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    with pytest.raises(BackendError, match="images: expected shape"):
        create_runner(backend, **kwargs).prepare(2, images)


def test_ort_precision_comes_from_the_graph(tmp_path: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = timm.create_model(PICO).eval()
    fp32_path = _export(model, tmp_path / "fp32.onnx", 32)
    fp16_path = tmp_path / "fp16.onnx"
    onnx.save(convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True), str(fp16_path))
    with pytest.raises(BackendError, match=r"\(a fp16 graph\) supports fp16, not fp32"):
        create_runner("ort-cpu", onnx_path=fp16_path)
    half = create_runner("ort-cpu", onnx_path=fp16_path, precision="fp16", threads=2)
    assert half.precision == "fp16"
    reference = _forward_once(create_runner("torch", model=model, device="cpu"), 3)
    np.testing.assert_allclose(_forward_once(half, 3), reference, atol=1e-2)


def test_measure_records_sane_stats() -> None:
    runner = create_runner("torch", model=timm.create_model(PICO), device="cpu")
    stats = measure(runner, 2, warmup=1, repeats=6)
    assert (stats.backend, stats.precision, stats.batch, stats.repeats) == ("torch", "fp32", 2, 6)
    assert stats.device.startswith("cpu: ")
    assert stats.p99_ms >= stats.p90_ms >= stats.median_ms >= stats.min_ms > 0
    assert stats.throughput == pytest.approx(2 * 1000 / stats.median_ms)
    assert stats.peak_memory_mb is None
    assert set(stats.to_dict()) >= {"median_ms", "p90_ms", "p99_ms", "throughput"}


def test_statistics_are_numpy_percentiles_of_timed_calls_only() -> None:
    log: list[str] = []
    durations = [float(ms) for ms in np.random.default_rng(0).permutation(np.arange(1, 101))]
    stats = measure(_FakeRunner("fake", log, durations), 4, warmup=3, repeats=100)
    assert log.count("fake") == 103  # warm-up calls ran but were not recorded
    assert (stats.min_ms, stats.median_ms, stats.mean_ms) == (1.0, 50.5, 50.5)
    assert stats.p90_ms == pytest.approx(90.1)
    assert stats.p99_ms == pytest.approx(99.01)
    assert stats.throughput == pytest.approx(4 * 1000 / 50.5)


def test_min_seconds_extends_the_measurement() -> None:
    stats = measure(_FakeRunner("fake", []), 1, warmup=0, repeats=1, min_seconds=0.05)
    assert stats.repeats > 10


def test_measure_pair_alternates_blocks() -> None:
    log: list[str] = []
    dense, pruned = _FakeRunner("D", log, [2.0] * 6), _FakeRunner("P", log, [1.0] * 6)
    stats_dense, stats_pruned = measure_pair(dense, pruned, 8, warmup=1, repeats=6, rounds=3)
    warm = ["prepare D", "D", "prepare P", "P"]
    # who goes first alternates by round; each block opens with an untimed call (the switch settles)
    abba = ["D"] * 3 + ["P"] * 3 + ["P"] * 3 + ["D"] * 3 + ["D"] * 3 + ["P"] * 3
    assert log == [*warm, *abba]
    assert (stats_dense.backend, stats_pruned.backend) == ("D", "P")
    assert stats_dense.repeats == stats_pruned.repeats == 6


def test_rounds_a_spell_of_load_hit_are_left_out() -> None:
    """The pruned model's second block ran in a spell that added 1.5 ms a call (3.5 ms where it ran 2 ms): that
    round is left out of both models' statistics. Blocks within the margin of their fastest stay."""
    dense = _FakeRunner("D", [], [4.0, 4.1, 4.0, 4.2, 4.1, 4.0])
    pruned = _FakeRunner("P", [], [2.0, 2.0, 3.5, 3.5, 2.1, 2.0])
    d, p = measure_pair(dense, pruned, 1, warmup=0, repeats=6, rounds=3)
    assert (d.rounds, d.quiet_rounds, p.rounds, p.quiet_rounds) == (3, 2, 3, 2)
    assert p.repeats == d.repeats == 4 and p.median_ms == 2.0 and p.p99_ms < 2.2
    assert d.median_ms == pytest.approx(4.05)
    assert quiet_rounds([[[1.0], [5.0]], [[5.0], [1.0]]]) == [0, 1]  # no round quiet for both: every round



def test_waits_for_a_quiet_spell_stop_when_the_hosts_budget_is_spent() -> None:
    """A host loaded for longer than any wait (its dense model runs 6 ms against a quiet 4): each wait ends after
    ``max_wait_s``, and once the waits add up to the host's budget the next one does not probe at all."""
    calls: list[str] = []
    dense = _FakeRunner("D", calls, [6.0] * 10**8)
    host = QuietHost(margin=0.075, dense_ms=4.0, max_wait_s=0.6, budget_s=1.2)
    first = wait_for_quiet(dense, 1, host)
    assert 0.6 <= first < 1.2 and host.budget_s == pytest.approx(1.2 - first)
    wait_for_quiet(dense, 1, host)  # ends at what is left of the budget
    assert host.budget_s <= 0
    probed = len(calls)
    assert wait_for_quiet(dense, 1, host) == 0.0 and len(calls) == probed
    quiet = QuietHost(margin=0.075, dense_ms=6.0, max_wait_s=0.6, budget_s=1.2)
    assert wait_for_quiet(dense, 1, quiet) < 0.6 and quiet.budget_s > 0.6  # quiet at once: one probe


@pytest.fixture(scope="module")
def deit_s_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float]:
    """DeiT-S at 64 px and a copy with half its width, as ONNX, with their MACs ratio."""
    folder = tmp_path_factory.mktemp("deit")
    dense = timm.create_model("deit_small_patch16_224", img_size=64).eval()
    smaller = timm.create_model("deit_small_patch16_224", img_size=64, **HALF_DEIT_S).eval()
    ratio = measure_macs(dense, 64) / measure_macs(smaller, 64)
    return _export(dense, folder / "dense.onnx", 64), _export(smaller, folder / "smaller.onnx", 64), ratio


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 32])
def test_smaller_deit_s_is_faster_on_ort_cpu(deit_s_pair: tuple[Path, Path, float], batch: int) -> None:
    dense_path, smaller_path, macs_ratio = deit_s_pair
    dense = create_runner("ort-cpu", onnx_path=dense_path, threads=2)
    smaller = create_runner("ort-cpu", onnx_path=smaller_path, threads=2)
    # batch 1 calls take milliseconds: 10 of them per round measured 1.04-4.77x on the shared 2-core VM, so 30.
    # A spell of other tenants' load can cover a whole measurement and slows the smaller model more (1.16x was seen
    # in one): up to three are taken, the first above the bar ends it.
    measured: list[float] = []
    while len(measured) < 3 and not any(m > 1.2 for m in measured):
        stats_dense, stats_smaller = measure_pair(dense, smaller, batch, warmup=2, repeats=30 if batch == 1 else 10,
                                                  rounds=5)
        measured.append(speedup(stats_dense, stats_smaller))
    print(f"ort-cpu batch {batch}: speedups {[round(m, 2) for m in measured]} at {macs_ratio:.2f}x fewer MACs")
    # Measured here between 2.2x and 3.1x (2 shared cores), so 1.2x leaves room for a noisy machine.
    assert max(measured) > 1.2


def test_available_backends_here() -> None:
    found = available_backends()
    assert {"torch", "torch-compile", "ort-cpu"} <= set(found)
    if not torch.cuda.is_available():
        assert not {"ort-cuda", "ort-trt", "tensorrt"} & set(found)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_tensorrt_without_package_points_to_docker(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable, match=r"TensorRT is not installed: run inside the Docker image"):
        create_runner("tensorrt", engine_path=tmp_path / "model.engine")


def test_unknown_backend_lists_known_ones() -> None:
    with pytest.raises(BackendError) as caught:
        create_runner("onnx-gpu")
    message = str(caught.value)
    assert "\n" not in message
    assert all(name in message for name in ("torch", "torch-compile", "ort-cpu", "ort-cuda", "ort-trt", "tensorrt"))


@pytest.mark.parametrize(
    ("backend", "kwargs", "match"),
    [
        ("torch", {}, "needs model"),
        ("torch", {"model": PICO, "device": "cpu", "precision": "fp16"}, "supports fp32, not fp16"),
        ("torch", {"model": PICO, "precision": "fp8"}, "unknown precision"),
        ("ort-cpu", {"onnx_path": Path("missing.onnx")}, "does not exist"),
        ("ort-cpu", {"onnx_path": Path("missing.onnx"), "device": "cuda"}, "runs on cpu"),
    ],
)
def test_requests_that_cannot_work_fail_early(backend: str, kwargs: dict[str, object], match: str) -> None:
    built = {key: timm.create_model(value) if key == "model" else value for key, value in kwargs.items()}
    with pytest.raises(BackendError, match=match):
        create_runner(backend, **built)


@pytest.mark.skipif(
    os.environ.get("OFB_TEST_TORCH_COMPILE") != "1",
    reason="torch.compile of pico took 26-42 s cold on 2 CPU cores (> 30 s budget); OFB_TEST_TORCH_COMPILE=1 runs it",
)
def test_torch_compile_on_cpu_matches_eager() -> None:
    model = timm.create_model(PICO).eval()
    compiled = create_runner("torch-compile", model=model, device="cpu")
    np.testing.assert_allclose(
        _forward_once(compiled, 2), _forward_once(create_runner("torch", model=model, device="cpu"), 2), atol=1e-4
    )
    assert measure(compiled, 2, warmup=1, repeats=3).backend == "torch-compile"


@needs_cuda
@pytest.mark.parametrize("backend", ["torch", "torch-compile", "ort-cuda", "ort-trt"])
def test_cuda_backends_match_cpu(tmp_path: Path, backend: str) -> None:
    if backend not in available_backends():
        pytest.skip(f"{backend} is not available on this machine")
    model = timm.create_model(PICO).eval()
    source = {"model": model} if backend.startswith("torch") else {"onnx_path": _export(model, tmp_path / "m.onnx", 32)}
    runner = create_runner(backend, device="cuda", **source)
    reference = _forward_once(create_runner("torch", model=model, device="cpu"), 4)
    np.testing.assert_allclose(_forward_once(runner, 4), reference, atol=5e-3)  # TF32 convolutions on GPU
    stats = measure(runner, 4, warmup=3, repeats=10)
    assert stats.device.startswith("cuda: ") and stats.median_ms > 0
    if backend.startswith("torch"):
        assert isinstance(runner.timer(), StreamTimer)
        assert stats.peak_memory_mb is not None and stats.peak_memory_mb > 0


def test_cuda_graph_off_is_for_torch_backends_only() -> None:
    """Eager launches (no graph) are a torch choice; ONNX Runtime and TensorRT runners refuse to pretend."""
    model = timm.create_model(PICO).eval()
    eager = create_runner("torch", model=model, device="cpu", cuda_graph=False)
    np.testing.assert_allclose(_forward_once(eager, 2), _forward_once(create_runner("torch", model=model,
                                                                                    device="cpu"), 2))
    assert eager.cuda_graph is None  # nothing is captured on CPU either way
    with pytest.raises(BackendError, match="cuda_graph=False is for torch backends"):
        create_runner("ort-cpu", onnx_path=Path("unused.onnx"), cuda_graph=False)


@needs_cuda
def test_torch_on_cuda_without_graph_matches_the_graph_replay() -> None:
    model = timm.create_model(PICO).eval()
    graph = create_runner("torch", model=model, device="cuda")
    eager = create_runner("torch", model=model, device="cuda", cuda_graph=False)
    np.testing.assert_allclose(_forward_once(eager, 4), _forward_once(graph, 4), atol=1e-5)
    assert (graph.cuda_graph, eager.cuda_graph) == (True, False)
    assert measure(eager, 4, warmup=2, repeats=5).cuda_graph is False


@needs_cuda
def test_torch_fp16_on_cuda_is_close(tmp_path: Path) -> None:
    model = timm.create_model(PICO).eval()
    half = _forward_once(create_runner("torch", model=model, device="cuda", precision="fp16"), 4)
    full = _forward_once(create_runner("torch", model=model, device="cpu"), 4)
    np.testing.assert_allclose(half, full, atol=2e-2)


def _build_engine(onnx_path: Path, engine_path: Path) -> Path:
    """A TensorRT 10 engine for batches 1-8 (fp32), built with the plain builder API."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(onnx_path)), [parser.get_error(i) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("images", (1, 3, 32, 32), (4, 3, 32, 32), (8, 3, 32, 32))
    config.add_optimization_profile(profile)
    engine_path.write_bytes(builder.build_serialized_network(network, config))
    return engine_path


@needs_cuda
def test_tensorrt_engine_matches_cpu(tmp_path: Path) -> None:
    if "tensorrt" not in available_backends():
        pytest.skip("TensorRT Python package not installed")
    model = timm.create_model(PICO).eval()
    engine = _build_engine(_export(model, tmp_path / "m.onnx", 32), tmp_path / "m.engine")
    runner = create_runner("tensorrt", engine_path=engine)
    reference = _forward_once(create_runner("torch", model=model, device="cpu"), 4)
    np.testing.assert_allclose(_forward_once(runner, 4), reference, atol=5e-3)
    assert measure(runner, 4, warmup=3, repeats=10).median_ms > 0
