"""The profile degrades instead of dying, times groups alternately, and configures GPU backends as documented
(checked here with fakes: there is no GPU on CI)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

import ofbdeploy.deploy.runtimes.ort as ort_runtime
import ofbdeploy.deploy.runtimes.tensorrt as tensorrt_runtime
import ofbdeploy.deploy.workflow as workflow
from ofbdeploy.deploy.measure import QuietHost, measure_group
from ofbdeploy.deploy.provider_check import main as provider_check
from ofbdeploy.deploy.runtimes.base import Request, Runner, Timer
from ofbdeploy.deploy.runtimes.errors import BackendUnavailable
from ofbdeploy.numerics import set_tf32
from ofbdeploy.recipe import ProfileCfg, RecipeError, parse_recipe
from ofbdeploy.report.render import accuracy_table, latency_table, skipped_lines


class _Clock(Timer):
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    def start(self) -> None:
        self.log.append(self.name)

    def stop(self) -> float:
        return 1.0


class _FakeRunner(Runner):
    """A runner that records its calls; ``refuse`` is a batch whose prepare fails as an engine profile would."""

    def __init__(self, name: str, precision: str, log: list[str], refuse: int | None = None, ms: float = 1.0):
        self.backend, self.device_name, self.precision = "fake", "cpu: fake", precision
        self.name, self.log, self.refuse, self.ms = name, log, refuse, ms

    def prepare(self, batch: int, images: np.ndarray | None = None) -> None:
        if batch == self.refuse:
            raise BackendUnavailable(f"fake: batch {batch} is outside the engine's profile")
        self.log.append(f"prepare {self.name} {batch}")

    def run(self) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def outputs(self) -> np.ndarray:
        return np.zeros((1, 1), np.float32)

    def timer(self) -> Timer:
        ms = self.ms

        class Fixed(_Clock):
            def stop(self) -> float:
                return ms

        return Fixed(self.log, self.name)


def test_measure_group_alternates_forward_and_reversed() -> None:
    log: list[str] = []
    runners = [_FakeRunner(n, "fp32", log) for n in "abc"]
    stats = measure_group(runners, 2, warmup=0, repeats=4, rounds=2)
    timed = [entry for entry in log if not entry.startswith("prepare")]
    assert timed == ["a", "a", "b", "b", "c", "c", "c", "c", "b", "b", "a", "a"]
    assert [s.repeats for s in stats] == [4, 4, 4]


def test_profile_skips_what_cannot_run_and_measures_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend that cannot start is skipped for every batch; a batch outside an engine profile only there; the
    rest is measured, and int8 rows carry the pruned int8 model against dense fp32 timed in the same group."""
    log: list[str] = []
    latency = {("dense", "fp32"): 4.0, ("pruned", "fp32"): 2.0, ("dense", "int8"): 2.0, ("pruned", "int8"): 1.0}

    def fake_make_runner(backend, name, models, artifacts, cfg, precision=None):
        if backend == "ort-cuda":
            raise BackendUnavailable("gone: ONNX Runtime could not start GoneExecutionProvider")
        refuse = 8 if precision == "int8" else None
        return _FakeRunner(f"{name}-{precision}", precision, log, refuse, latency[(name, precision)])

    monkeypatch.setattr(workflow, "make_runner", fake_make_runner)
    cfg = ProfileCfg(backends=["ort-cpu", "ort-cuda"], precisions=["fp32", "int8"], batches=[1, 8], warmup=0, repeats=5)
    rows, skipped = workflow.profile_models({}, workflow.DeployArtifacts(), cfg, flops_ratio=0.5)
    assert [(r["precision"], r["batch"]) for r in rows] == [("fp32", 1), ("int8", 1), ("fp32", 8)]
    int8 = rows[1]
    assert int8["speedup"] == pytest.approx(2.0) and int8["speedup_vs_dense_fp32"] == pytest.approx(4.0)
    assert rows[0]["speedup_vs_dense_fp32"] == pytest.approx(rows[0]["speedup"])
    assert [(s["backend"], s["batch"], s["precision"]) for s in skipped] == [
        ("ort-cpu", 8, "int8"), ("ort-cuda", None, "fp32"), ("ort-cuda", None, "int8")]
    assert "outside the engine's profile" in skipped[0]["reason"] and "could not start" in skipped[1]["reason"]
    report = {"latency": rows, "flops_ratio": 0.5, "profile_skipped": skipped}
    assert skipped_lines(report)[1] == "ort-cuda fp32 every batch: gone: ONNX Runtime could not start " \
                                       "GoneExecutionProvider"
    assert "4.00x" in latency_table(report)


class _SpellRunner(_FakeRunner):
    """A runner on a shared host: its first ``spell`` timed calls come in a spell of other work that adds 2 ms."""

    def __init__(self, name: str, ms: float, spell: int) -> None:
        super().__init__(name, "fp32", [], ms=ms)
        self.calls, self.spell = 0, spell

    def timer(self) -> Timer:
        runner = self

        class Spell(_Clock):
            def stop(self) -> float:
                runner.calls += 1
                return runner.ms + (2.0 if runner.calls <= runner.spell else 0.0)

        return Spell(self.log, self.name)


FOREVER = 10**12


@pytest.mark.parametrize("spell", [0, 5, FOREVER])
def test_a_profile_taken_while_the_host_is_loaded_is_taken_again(monkeypatch: pytest.MonkeyPatch, spell) -> None:
    """Against the fit stage's quiet dense latency (4 ms), a measurement whose dense model ran 6 ms is taken again
    once a probe of the dense model says the spell has passed; the measurement with the fastest dense model is
    kept, and the row says how many were taken. A spell that outlasts every wait keeps the last of three loaded
    measurements; none, one measurement."""
    runners = {"dense": _SpellRunner("dense", 4.0, spell), "pruned": _SpellRunner("pruned", 2.0, spell)}
    monkeypatch.setattr(workflow, "make_runner", lambda backend, name, *args, **kw: runners[name])
    cfg = ProfileCfg(backends=["ort-cpu"], batches=[1], warmup=0, repeats=5)
    host = QuietHost(margin=0.075, dense_ms=4.0, max_wait_s=0.2)
    (row,), _ = workflow.profile_models({}, workflow.DeployArtifacts(), cfg, 0.5, {("ort-cpu", 1, "fp32"): host})
    assert row["measurements"] == {0: 1, 5: 2, FOREVER: 3}[spell]
    assert row["latency_ms_dense"] == (6.0 if spell == FOREVER else 4.0)
    assert row["speedup"] == pytest.approx(1.5 if spell == FOREVER else 2.0)
    if spell == 5:  # the probes timed the dense model alone until it ran quiet, the pruned model not at all
        assert runners["dense"].calls > runners["pruned"].calls == 2 * 5
    other = {("ort-cpu", 32, "fp32"): host}  # another target's reference: one measurement, loaded or not
    for r in runners.values():
        r.calls = 0
    (row,), _ = workflow.profile_models({}, workflow.DeployArtifacts(), cfg, 0.5, other)
    assert row["measurements"] == 1 and row["latency_ms_dense"] == (4.0 if spell == 0 else 6.0)


class _PhaseRunner(_FakeRunner):
    """A runner on a host whose state follows the pruned model's timed calls (the dense model's quiet probes do not
    move it): the pruned model's calls 1-4 come in a spell, so the first measurement has one quiet round, in which
    the pruned model ran 2.4 ms against 2.0 ms in every quiet call after."""

    def __init__(self, name: str, clock: list[int]) -> None:
        super().__init__(name, "fp32", [])
        self.clock = clock

    def timer(self) -> Timer:
        runner = self

        class Phase(_Clock):
            def stop(self) -> float:
                calls = runner.clock[0]
                if runner.name == "dense":
                    return 6.0 if 1 <= calls <= 4 else 4.0
                runner.clock[0] += 1
                return 3.6 if 1 <= calls <= 4 else 2.4 if calls == 0 else 2.0

        return Phase(self.log, self.name)


def test_a_profile_left_with_few_quiet_rounds_measures_again_and_pools_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """A measurement in which a spell left one quiet round of five rests on one call a model, though its dense
    median looks quiet: it is taken again, and the quiet rounds of both measurements pooled (seen on DeiT-S: the
    profile read 30.9% on one quiet round where the loop and a plain harness read 29.3-29.6%)."""
    clock = [0]
    runners = {name: _PhaseRunner(name, clock) for name in ("dense", "pruned")}
    monkeypatch.setattr(workflow, "make_runner", lambda backend, name, *args, **kw: runners[name])
    cfg = ProfileCfg(backends=["ort-cpu"], batches=[1], warmup=0, repeats=5)
    host = QuietHost(margin=0.075, dense_ms=4.0, max_wait_s=0.2)
    (row,), _ = workflow.profile_models({}, workflow.DeployArtifacts(), cfg, 0.5, {("ort-cpu", 1, "fp32"): host})
    assert row["measurements"] == 2 and (row["rounds"], row["quiet_rounds"]) == (10, 5)
    assert row["latency_ms_dense"] == 4.0 and row["latency_ms_pruned"] == 2.0 and row["speedup"] == 2.0


def test_profile_precision_is_read_as_a_list() -> None:
    assert ProfileCfg(precision="int8").precisions == ["int8"]
    assert ProfileCfg().precisions == ["fp32"] and ProfileCfg().tf32
    with pytest.raises(ValueError, match="one of precision and precisions"):
        ProfileCfg(precision="fp32", precisions=["int8"])
    base = {"model": {"name": "ofb_vit_pico_patch4_32"}, "data": {"kind": "digits"},
            "search": {"latency": {"target_ratio": 0.5, "precision": "int8"}}}
    assert parse_recipe({**base, "profile": {"precisions": ["fp32", "int8"]}}).profile.precisions == ["fp32", "int8"]
    with pytest.raises(RecipeError, match=r"add it to profile\.backends/batches/precisions"):
        parse_recipe({**base, "profile": {"precisions": ["fp32"]}})


def test_export_cfg_writes_the_graph_each_engine_needs() -> None:
    from ofbdeploy.deploy.config import ExportCfg

    assert ExportCfg().onnx_precisions() == ["fp32"]
    assert ExportCfg(int8=True).onnx_precisions() == ["fp32", "int8"]
    assert ExportCfg(trt=True, trt_precisions=["fp16", "int8"]).onnx_precisions() == ["fp32", "fp16", "int8"]
    assert ExportCfg(trt=False, trt_precisions=["int8"]).onnx_precisions() == ["fp32"]


def _capture_providers(monkeypatch: pytest.MonkeyPatch, factory, **request: Any) -> tuple[list, dict[str, Any]]:
    """The provider list a GPU ORT backend would hand ONNX Runtime, for a fake stream, without a GPU."""
    seen: dict[str, Any] = {}

    def fake_runner(req, device, providers, provider_precisions=(), tf32=None, cuda_graph=None):
        seen.update(tf32=tf32, cuda_graph=cuda_graph)
        return providers(SimpleNamespace(cuda_stream=123456))

    monkeypatch.setattr(ort_runtime, "OrtRunner", fake_runner)
    monkeypatch.setattr(ort_runtime, "resolve_device", lambda req, allowed: torch.device("cuda", 0))
    defaults = {"backend": "x", "model": None, "onnx_path": None, "engine_path": None, "precision": "fp32",
                "device": "auto", "threads": None}
    return factory(Request(**{**defaults, **request})), seen


def test_ort_cuda_runs_on_the_runner_stream_with_the_tf32_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    providers, seen = _capture_providers(monkeypatch, ort_runtime._ort_cuda, tf32=False)
    [(name, options)] = providers
    assert name == "CUDAExecutionProvider" and options["use_tf32"] == "0" and options["enable_cuda_graph"] == "1"
    assert options["has_user_compute_stream"] == "1" and options["user_compute_stream"] == "123456"
    assert seen == {"tf32": False, "cuda_graph": True}


def test_ort_trt_keeps_engine_and_timing_caches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    providers, seen = _capture_providers(monkeypatch, ort_runtime._ort_trt, precision="int8",
                                         cache_dir=tmp_path)
    (trt_name, trt), (cuda_name, cuda) = providers
    assert (trt_name, cuda_name) == ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    assert trt["trt_engine_cache_enable"] == trt["trt_timing_cache_enable"] == "True"
    assert trt["trt_engine_cache_path"] == trt["trt_timing_cache_path"] == str(tmp_path) and tmp_path.is_dir()
    assert trt["trt_int8_enable"] == "True" and trt["trt_fp16_enable"] == "False"
    assert trt["user_compute_stream"] == cuda["user_compute_stream"] == "123456"
    assert seen["tf32"] is True  # the provider has no TF32 switch: recorded as it runs


@pytest.mark.parametrize("backend", ["ort-cuda", "ort-trt"])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("tf32", [True, False])
def test_every_provider_option_key_is_one_the_gpu_wheel_knows(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                               backend: str, precision: str, tf32: bool) -> None:
    """Every key the runtimes hand the CUDA and TensorRT providers is in that provider's table read from the
    onnxruntime-gpu wheel (tools/scripts/ort_provider_keys.py): the binding throws on any other, and the session is then
    reported as a skip (issue 23, defect 1: ``has_user_compute_stream`` given to TensorRT)."""
    tables = json.loads((Path(__file__).parents[1] / "data" / "ort_provider_keys.json").read_text())
    factory = {"ort-cuda": ort_runtime._ort_cuda, "ort-trt": ort_runtime._ort_trt}[backend]
    providers, _ = _capture_providers(monkeypatch, factory, precision=precision, tf32=tf32, cache_dir=tmp_path)
    for name, options in providers:
        unknown = sorted(set(options) - set(tables[name]))
        assert not unknown, f"{backend}: {name} does not know {unknown} ({tables['wheel']})"


def test_one_tf32_policy_sets_matmul_and_cudnn() -> None:
    """Training (the recipe's strict_fp32) and deployment (profile.tf32) flip the same switches, and torch can still
    read its cuDNN flags afterwards: torch.export and inductor call ``allow_tf32``, ``flags()`` and ``set_flags()``,
    which raise once the legacy and the newer spelling disagree (issue 23, defect 5; reproduced on CPU)."""
    cudnn = torch.backends.cudnn
    before = torch.get_float32_matmul_precision()
    try:
        if hasattr(cudnn, "fp32_precision"):
            cudnn.fp32_precision = "ieee"  # someone used the newer spelling first
        for enabled in (False, True, False):
            assert set_tf32(enabled) == ("tf32" if enabled else "ieee")
            assert torch.get_float32_matmul_precision() == ("high" if enabled else "highest")
            assert cudnn.allow_tf32 is enabled
            with cudnn.flags(enabled=cudnn.enabled, allow_tf32=enabled):
                pass
            assert cudnn.allow_tf32 is enabled
            cudnn.set_flags(_enabled=cudnn.enabled)
    finally:
        set_tf32(before != "highest")


def test_provider_check_proves_providers_by_running_them(capsys: pytest.CaptureFixture[str]) -> None:
    assert provider_check(["--provider", "CPUExecutionProvider"]) == 0
    assert "CPUExecutionProvider: ok: ran" in capsys.readouterr().out
    assert provider_check(["--provider", "CUDAExecutionProvider"]) == 1  # this machine has no CUDA provider
    assert "CUDAExecutionProvider: FAILED" in capsys.readouterr().out


def test_accuracy_table_compares_each_precision_with_fp32() -> None:
    report = {"accuracy": [
        {"model": "pruned", "precision": "fp32", "runtime": "ort-cpu", "top1": 90.0, "top5": 99.0},
        {"model": "pruned", "precision": "int8", "runtime": "ort-cpu", "top1": 89.25, "top5": 99.0},
    ]}
    lines = accuracy_table(report).splitlines()
    assert "-0.75" in lines[-1] and "int8" in lines[-1]


def test_engines_are_built_from_the_graph_of_their_precision(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With TensorRT faked: each engine comes from the ONNX file of its precision (strongly typed builds), is
    checked against that file inside the engine profile, and remembers the TF32 flag it was built with."""
    import timm

    import ofbdeploy.deploy.tensorrt_engine as engine_module
    from ofbdeploy.deploy import parity
    from ofbdeploy.deploy.config import ExportCfg

    built: list[tuple[str, str, bool]] = []

    def fake_build(onnx_path, spec, cache_dir, log=None):
        built.append((Path(onnx_path).name, spec.precision, spec.tf32))
        return Path(cache_dir) / f"{spec.precision}.engine"

    def fake_parity(engine, onnx_path, images, *, precision, batch_range, tf32):
        assert batch_range == (2, 8) and Path(onnx_path).name.endswith({"int8": "int8-fp16"}.get(precision, precision)
                                                                      + ".onnx")
        return {"max_abs_diff": 0.0, "top1_agreement": 1.0, "tolerance": 1.0, "min_top1_agreement": 0.9,
                "images": len(images)}

    # random weights have near-tied logits: the int8 gate (tested in test_quantize) is not what this test is about
    monkeypatch.setitem(parity.TOLERANCES, "int8", parity.Tolerance(rtol=1.0, min_top1_agreement=0.0))
    monkeypatch.setattr(engine_module, "require_tensorrt", lambda: None)
    monkeypatch.setattr(engine_module, "build_engine", fake_build)
    monkeypatch.setattr(engine_module, "check_engine_parity", fake_parity)
    model = timm.create_model("ofb_vit_pico_patch4_32", img_size=16).eval()
    cfg = ExportCfg(trt=True, trt_precisions=["fp16", "int8"], batch_range=(2, 4, 8), simplify=False)
    calibration = np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32)
    images = torch.from_numpy(np.random.default_rng(1).standard_normal((16, 3, 16, 16)).astype(np.float32))
    artifacts = workflow.export_models({"pruned": model}, tmp_path, cfg, img_size=16, check_images=images,
                                       calibration=calibration, tf32=False)
    assert built == [("pruned-fp16.onnx", "fp16", False), ("pruned-int8-fp16.onnx", "int8", False)]
    assert set(artifacts.onnx) == {"pruned", "pruned-fp16", "pruned-int8", "pruned-int8-fp16"}
    assert artifacts.engine_tf32 == {"pruned-fp16": False, "pruned-int8": False}
    cfg_on = ProfileCfg(backends=["tensorrt"], precisions=["int8"])
    runtime = tensorrt_runtime.RUNTIMES["tensorrt"]  # as if TensorRT and a GPU were here
    monkeypatch.setitem(tensorrt_runtime.RUNTIMES, "tensorrt", dataclasses.replace(runtime, missing=lambda: None))
    with pytest.raises(BackendUnavailable, match="built with TF32 off, the profile's policy is on"):
        workflow.make_runner("tensorrt", "pruned", {}, artifacts, cfg_on, "int8")
