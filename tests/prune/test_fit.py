"""Budgets met from both sides after the search (prune/fit.py): FLOPs filled, latency fitted to measurements."""

import collections
import dataclasses
import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from ofbdeploy.arch import ArchSpec
from ofbdeploy.deploy.config import ExportCfg
from ofbdeploy.deploy.measure import QuietHost, measure_group, measure_pair
from ofbdeploy.deploy.runtimes import registry
from ofbdeploy.deploy.runtimes.ort import OrtRunner
from ofbdeploy.families import family_of
from ofbdeploy.latency.config import LatencyTargetCfg
from ofbdeploy.latency.lut import LatencyLUT, LutKey, arch_features, fit_coefficients, probe_set, spec_runner
from ofbdeploy.models.resize import resize, resized_spec, unit_importance
from ofbdeploy.prune import fit as fit_module
from ofbdeploy.prune.fit import Measurement, fill, latency_loop
from ofbdeploy.run import fit as run_fit
from ofbdeploy.run.fit import close_latency, quiet_host, save_table


def _setup(cut_model, seed=0, name="ofb_vit_tiny3_patch4_32"):
    teacher, pruned, spec = cut_model(seed, name=name)
    return spec, unit_importance(pruned, spec, teacher), family_of(spec.base).space(spec.base)


@pytest.mark.parametrize("seed", range(3))
def test_a_flops_budget_under_filled_ends_within_one_percent_below(cut_model, seed):
    spec, importance, space = _setup(cut_model, seed)
    target = min(1.4 * spec.macs(), 0.95 * ArchSpec.dense(spec.base).macs())
    filled, steps = fill(spec, importance, space, [(lambda s: s.macs(), target)])
    assert steps and 0.99 * target <= filled.macs() <= target
    assert steps[-1].costs_after[0] == filled.macs()
    assert all(s.importance > 0 for s in steps)
    for before, after in zip(spec.blocks, filled.blocks, strict=True):  # nothing narrowed, kept units stay
        assert set(before.kept_mlp) <= set(after.kept_mlp) and after.mlp_dim >= before.mlp_dim


def _ceil64(width: float) -> float:
    return math.ceil(width / 64) * 64


def fake_ms(spec: ArchSpec) -> float:
    """A backend with per-op overheads and a width cliff at multiples of 64 (what a GEMM tiling does)."""
    total = 0.3 + 0.002 * spec.embed_dim
    for b in spec.blocks:
        total += 0.04 + 0.015 * b.heads + 0.0015 * _ceil64(b.heads * b.head_dim) + 0.0008 * _ceil64(b.mlp_dim)
    return total


def _table(spec: ArchSpec, space):
    """The latency table fitted on the fake backend's probe models, as `lut build` fits it: smooth, so it
    knows nothing of the cliff."""
    specs = probe_set(spec.base, space, random_points=8)
    coefficients, _ = fit_coefficients(specs, [fake_ms(s) for s in specs])
    return lambda s: float(arch_features(s) @ np.asarray(coefficients))


@pytest.mark.parametrize("skew", [1.0, 1.6])  # 1.6: a table whose slope is wrong across the range
@pytest.mark.parametrize("target", [0.5, 0.6, 0.7, 0.8])
def test_the_loop_converges_on_a_nonlinear_backend_in_bounded_rounds(cut_model, target, skew):
    spec, importance, space = _setup(cut_model, 1, "ofb_vit_micro_patch4_32")
    dense = fake_ms(ArchSpec.dense(spec.base))
    rng = random.Random(0)
    calls = []

    def measure(s: ArchSpec) -> Measurement:
        calls.append(s)
        ratios = tuple(fake_ms(s) / dense * (1 + rng.uniform(-0.004, 0.004)) for _ in range(3))
        return Measurement(ratios, dense, fake_ms(s))

    table = _table(spec, space)
    fit = latency_loop(spec, importance, space, predict=lambda s: table(s) ** skew, measure=measure, target=target,
                       tolerance=0.03, max_rounds=4)
    assert fit.met and len(fit.rounds) <= 4
    final = fake_ms(fit.spec) / dense
    assert target * 0.97 - 0.005 <= final <= target + 0.005
    assert all(r.action in ("narrowed", "widened", "met", "stuck", "again, host loaded", "last round")
               for r in fit.rounds)
    assert fit.spec == list(dict.fromkeys(calls))[fit.kept_round - 1]  # the answer is an architecture that was measured
    kept = fit.rounds[fit.kept_round - 1]
    assert target * 0.97 <= kept.measured_ratio <= target  # ... inside the band


def fake_swin_ms(spec: ArchSpec) -> float:
    """A Swin backend: per-token work of each stage (4x fewer tokens a stage), per-op and per-head overheads,
    cliffs at multiples of 16 channels."""
    base = spec.base
    total = 0.3
    for i, b in enumerate(spec.blocks):
        stage = base.stage_of(i)
        tokens, embed = base.grid(stage) ** 2, spec.embed_dims[stage]
        total += 0.04 + 0.01 * b.heads + 2e-7 * tokens * embed * (math.ceil(b.heads * b.head_dim / 16) * 16
                                                               + math.ceil(b.mlp_dim / 16) * 16)
    return total


@pytest.mark.parametrize("target", [0.6, 0.75])
def test_the_loop_converges_on_a_swin_with_its_stage_grids(cut_model, target):
    spec, importance, space = _setup(cut_model, 1, "ofb_swin_pico_patch2_32")
    dense = fake_swin_ms(ArchSpec.dense(spec.base))
    specs = probe_set(spec.base, space, random_points=8)
    coefficients, _ = fit_coefficients(specs, [fake_swin_ms(s) for s in specs])
    calls = []

    def measure(s: ArchSpec) -> Measurement:
        calls.append(s)
        return Measurement((fake_swin_ms(s) / dense,) * 3, dense, fake_swin_ms(s))

    fit = latency_loop(spec, importance, space, predict=lambda s: float(arch_features(s) @ np.asarray(coefficients)),
                       measure=measure, target=target, tolerance=0.03, max_rounds=4)
    assert fit.met and len(fit.rounds) <= 4 and fit.spec == list(dict.fromkeys(calls))[fit.kept_round - 1]
    assert target * 0.97 <= fake_swin_ms(fit.spec) / dense <= target
    moved = {step.split(":")[0] for r in fit.rounds for step in r.steps}
    assert moved  # the loop changed widths (the cut starts far from the target)


def test_a_round_at_the_edge_of_the_band_moves_toward_its_middle(cut_model):
    """Measured just under the target, a model is inside the band but one noisy re-measurement from missing
    it: the loop spends a round moving toward the middle, and keeps whichever measured model is nearest it."""
    spec, importance, space = _setup(cut_model, 1, "ofb_vit_micro_patch4_32")
    dense = fake_ms(ArchSpec.dense(spec.base))
    target = fake_ms(spec) / dense / 0.998  # the searched model measures 0.2% under the target
    measured: list[float] = []

    def measure(s: ArchSpec) -> Measurement:
        measured.append(fake_ms(s) / dense)
        return Measurement((measured[-1],) * 3, dense, fake_ms(s))

    fit = latency_loop(spec, importance, space, predict=_table(spec, space), measure=measure, target=target,
                       tolerance=0.03, max_rounds=4)
    assert fit.met and len(fit.rounds) >= 2  # the edge did not stop the loop
    assert fit.rounds[0].action == "narrowed" and fit.rounds[0].steps
    chosen = measured[fit.kept_round - 1]
    assert abs(chosen - target * 0.985) <= abs(measured[0] - target * 0.985)  # nearer the middle than the start


def test_a_plan_the_backend_does_not_feel_is_pushed_further_instead_of_stopping(cut_model):
    """A round's narrowing that the backend does not feel (the table is wrong about what those steps cost) makes
    the next plan come back to the same model: the loop moves its aim by the measured miss and plans further,
    rather than stopping with the budget missed."""
    spec, importance, space = _setup(cut_model, 1, "ofb_vit_micro_patch4_32")
    table = _table(spec, space)
    dense = table(ArchSpec.dense(spec.base))
    measured: list[ArchSpec] = []

    def measure(s: ArchSpec) -> Measurement:  # every model measures the same: nothing the loop does shows
        measured.append(s)
        return Measurement((0.8,) * 3, dense, 0.8 * dense)

    fit = latency_loop(spec, importance, space, predict=table, measure=measure, target=0.6, tolerance=0.03,
                       max_rounds=3)
    assert [r.action for r in fit.rounds] == ["narrowed", "narrowed", "last round"]
    assert len(set(measured)) == 3  # three different models measured
    predicted = [r.predicted_ratio for r in fit.rounds]
    assert predicted[0] > predicted[1] > predicted[2]


def test_a_flat_secant_from_noise_does_not_throw_the_next_plan_far(cut_model):
    """Two rounds that measure almost alike (noise hid the first move) give a nearly flat secant that asks for a
    far larger move than the miss (seen at a 0.7 target: 0.704 then a plan predicted at 0.543). The aim stays
    within MOVE_LIMIT times the miss of the round nearest the goal."""
    spec, importance, space = _setup(cut_model, 1, "ofb_vit_micro_patch4_32")
    table = _table(spec, space)
    dense = table(ArchSpec.dense(spec.base))
    answers = iter([0.7058, 0.7042])

    def measure(s: ArchSpec) -> Measurement:
        ratio = next(answers, table(s) / dense)
        return Measurement((ratio,) * 3, dense, ratio * dense)

    fit = latency_loop(spec, importance, space, predict=table, measure=measure, target=0.7, tolerance=0.03,
                       max_rounds=3)
    first, second, third = fit.rounds
    assert first.predicted_ratio - second.predicted_ratio > 0.005  # the first move was real, the backend hid it
    limit = fit_module.MOVE_LIMIT * (second.measured_ratio - 0.7 * 0.985)
    assert third.predicted_ratio >= second.predicted_ratio - limit - 0.01  # one grid step of slack below the aim
    assert third.predicted_ratio < second.predicted_ratio  # ... and it still moved toward the goal
    assert third.predicted_ratio > 0.7 * 0.97 - 0.02  # not far below the band (without the limit: 0.55)


def test_with_every_round_over_the_target_the_fastest_measured_model_is_kept(cut_model):
    """A narrower plan can measure slower (a backend cliff the table does not know): with no round under the
    target, the loop keeps the model measured fastest, not the last one."""
    spec, importance, space = _setup(cut_model, 1, "ofb_vit_micro_patch4_32")
    table = _table(spec, space)
    dense = table(ArchSpec.dense(spec.base))
    answers = iter([0.65, 0.70, 0.72])
    ratios: dict[ArchSpec, float] = {}  # one answer per model, however often it is measured

    def measure(s: ArchSpec) -> Measurement:
        if s not in ratios:
            ratios[s] = next(answers)
        ratio = ratios[s]
        return Measurement((ratio,) * 3, dense, ratio * dense)

    fit = latency_loop(spec, importance, space, predict=table, measure=measure, target=0.6, tolerance=0.03,
                       max_rounds=3)
    assert [r.measured_ratio for r in fit.rounds] == [0.65, 0.70, 0.72]
    assert not fit.met and fit.kept_round == 1 and fit.spec == spec


def test_a_noisy_round_measures_again_before_acting(cut_model):
    spec, importance, space = _setup(cut_model, 2)
    dense = fake_ms(ArchSpec.dense(spec.base))
    r = fake_ms(spec) / dense  # the table below is the backend itself: nothing surprises it
    answers = iter([(0.5 * r, 1.5 * r, r), (r, r, r)])

    def measure(s: ArchSpec) -> Measurement:
        ratios = next(answers)
        return Measurement(ratios, dense, dense * ratios[0])

    fit = latency_loop(spec, importance, space, predict=fake_ms, measure=measure, target=r / 0.985, tolerance=0.03,
                       max_rounds=1)
    first = fit.rounds[0]
    assert first.measurements == 2 and first.repeats == 3 and first.measured_ratio == pytest.approx(r)
    assert first.spreads[0] == pytest.approx(1.0) and first.spread == 0
    assert fit.met


@pytest.mark.parametrize("burst", [True, False])
def test_a_round_that_surprises_the_table_is_measured_again(cut_model, burst):
    """A burst of other work can move a whole measurement by 10-20% with its repeats still agreeing. A round that
    far from the table's prediction is measured again: a burst passes (the next measurement is kept), a cliff
    the table does not know stays (the measurements agree, their pooled median is kept)."""
    spec, importance, space = _setup(cut_model, 2)
    dense = fake_ms(ArchSpec.dense(spec.base))
    r = fake_ms(spec) / dense
    answers = iter([1.15 * r, r, r] if burst else [1.15 * r] * 3)

    def measure(s: ArchSpec) -> Measurement:
        ratio = next(answers)
        return Measurement((ratio,) * 3, dense, dense * ratio)

    fit = latency_loop(spec, importance, space, predict=fake_ms, measure=measure, target=r / 0.985, tolerance=0.03,
                       max_rounds=1)
    first = fit.rounds[0]
    assert first.measurements == (2 if burst else 3)
    assert first.measured_ratio == pytest.approx(r if burst else 1.15 * r)
    assert fit.met == burst


def _loaded(ratio: float, dense: float, extra: float) -> Measurement:
    """A measurement in a spell of other tenants' load: ``extra`` of the dense latency added to every call of both
    models (as measured on the 2-vCPU VM: a loaded host does not slow them alike, so the ratio moves too)."""
    added = extra * dense
    loaded = (ratio * dense + added) / (dense + added)
    return Measurement((loaded,) * 3, dense + added, ratio * dense + added)


def test_a_measurement_taken_while_the_host_is_loaded_is_taken_again(cut_model):
    spec, importance, space = _setup(cut_model, 2)
    dense = fake_ms(ArchSpec.dense(spec.base))
    truth = lambda s: fake_ms(s) / dense  # noqa: E731
    answers = iter(["quiet", "loaded", "quiet"])
    calls = []

    def measure(s: ArchSpec) -> Measurement:
        calls.append(s)
        if next(answers) == "loaded":  # 9% of dense added: loaded, yet within SURPRISE of the table
            return _loaded(truth(s), dense, 0.09)
        return Measurement((truth(s),) * 3, dense, fake_ms(s))

    target = truth(spec) * 0.9  # over the band: round 1 narrows, round 2 is measured loaded first
    fit = latency_loop(spec, importance, space, predict=fake_ms, measure=measure, target=target, tolerance=0.03,
                       max_rounds=2)
    second = fit.rounds[1]
    assert second.measurements == 2 and not second.loaded  # the loaded measurement was not acted on ...
    assert calls[1] == calls[2] != spec and second.measured_ratio == pytest.approx(truth(calls[2]))
    assert second.dense_ms == pytest.approx(dense)  # ... the quiet one was


@pytest.mark.parametrize("target", [0.55, 0.7])
def test_rounds_measured_before_a_quieter_spell_neither_steer_nor_are_kept(cut_model, target):
    """The first measurement of a loop is its own reference: taken in a loaded spell, it looks quiet until a
    quieter spell comes. Then its round is marked loaded; the plan and the answer use the quiet rounds only, and
    the loop still delivers the quiet host's ratio."""
    spec, importance, space = _setup(cut_model, 1, "ofb_vit_micro_patch4_32")
    dense = fake_ms(ArchSpec.dense(spec.base))
    calls = []

    def measure(s: ArchSpec) -> Measurement:
        calls.append(s)
        ratio = fake_ms(s) / dense
        # the load adds 9% of the dense latency: loaded by LOADED tolerances, yet within SURPRISE of the table
        return _loaded(ratio, dense, 0.09) if len(calls) == 1 else Measurement((ratio,) * 3, dense, fake_ms(s))

    fit = latency_loop(spec, importance, space, predict=fake_ms, measure=measure, target=target, tolerance=0.03,
                       max_rounds=4)
    assert fit.rounds[0].measurements == 1 and fit.rounds[0].loaded  # acted on, then found loaded
    assert fit.rounds[0].measured_ratio > fake_ms(spec) / dense
    assert len(fit.rounds) > 1 and not any(r.loaded for r in fit.rounds[1:])
    assert fit.met and fit.kept_round > 1
    assert target * 0.97 - 0.005 <= fake_ms(fit.spec) / dense <= target + 0.005


def test_with_no_quiet_round_under_the_target_a_loaded_one_under_it_is_kept(cut_model):
    """Seen on Swin-T at a 0.5 target: round 1 measured quiet at 51.1%, then the narrower plan measured three times
    under the target (48.9-49.9%) but loaded, so none counted, and the loop kept round 1: over its budget. A loaded
    reading overstates the ratio (load slows the smaller model more), so a model read under the target while
    loaded is under it quiet too: that one is kept (not met). Here round 1 reads 10% over the truth (a cliff the
    table does not know), so the loop narrows well past the band."""
    spec, importance, space = _setup(cut_model, 2)
    dense = fake_ms(ArchSpec.dense(spec.base))
    truth = lambda s: fake_ms(s) / dense  # noqa: E731
    calls = []

    def measure(s: ArchSpec) -> Measurement:
        calls.append(s)
        if len(calls) == 1:
            return Measurement((1.1 * truth(s),) * 3, dense, 1.1 * fake_ms(s))
        return _loaded(truth(s), dense, 0.09)

    target = truth(spec)
    fit = latency_loop(spec, importance, space, predict=fake_ms, measure=measure, target=target, tolerance=0.03,
                       max_rounds=3)
    assert not fit.rounds[0].loaded and all(r.loaded for r in fit.rounds[1:])
    # a loaded round leaves the plan as it was: it is measured again, and the record says so
    assert [r.action for r in fit.rounds[1:]] == ["again, host loaded", "last round"] and not fit.rounds[1].steps
    assert fit.rounds[2].measured_ratio == pytest.approx(fit.rounds[1].measured_ratio)  # the same model again
    later = calls[fit.rounds[0].measurements:]  # every measurement of rounds 2 and 3
    assert len(later) == fit.rounds[1].measurements + fit.rounds[2].measurements and len(set(later)) == 1
    assert later[0] != spec
    under = [r for r in fit.rounds[1:] if r.measured_ratio <= target]
    assert under and not fit.met  # read under the target, but loaded: not a delivery, yet within the budget
    assert fit.spec != spec and fit.rounds[fit.kept_round - 1].measured_ratio == max(r.measured_ratio for r in under)
    assert truth(fit.spec) < target

@pytest.mark.parametrize("prior", [False, True])
def test_a_first_round_measured_loaded_is_told_by_a_quiet_reference_given_before_it(cut_model, prior):
    """A loop whose first measurement falls inside a spell of load, and reads inside the band, stops there: with
    no reference before it, nothing says the round was loaded (seen on DeiT-S at a 0.7 target: met at 68.9% in
    round 1, 63.9% measured quiet). Given the quiet dense latency before round 1 (the fit stage gives the latency
    table's, measured on this machine), the loaded measurement is taken again and the quiet ratio delivered."""
    spec, importance, space = _setup(cut_model, 1, "ofb_vit_micro_patch4_32")
    dense = fake_ms(ArchSpec.dense(spec.base))
    quiet_ratio = fake_ms(spec) / dense
    loaded_ratio = _loaded(quiet_ratio, dense, 0.12).ratio
    target = loaded_ratio / (1 - 0.03 / 2)  # the loaded reading lies in the middle of the band
    assert quiet_ratio < target * 0.97  # ... and the quiet truth under it
    calls = []

    def measure(s: ArchSpec) -> Measurement:
        calls.append(s)
        ratio = fake_ms(s) / dense
        return _loaded(ratio, dense, 0.12) if len(calls) == 1 else Measurement((ratio,) * 3, dense, fake_ms(s))

    host = QuietHost(fit_module.LOADED * 0.03, dense) if prior else None
    fit = latency_loop(spec, importance, space, predict=fake_ms, measure=measure, target=target, tolerance=0.03,
                       max_rounds=4, host=host)
    delivered = fake_ms(fit.spec) / dense
    if not prior:  # the trap, as it was
        assert fit.met and len(fit.rounds) == 1 and delivered == pytest.approx(quiet_ratio)
        return
    first = fit.rounds[0]
    assert first.measurements == 2 and not first.loaded and first.measured_ratio == pytest.approx(quiet_ratio)
    assert first.action == "widened" and fit.met and target * 0.97 <= delivered <= target


@pytest.mark.parametrize("spell", [3, math.inf])
def test_a_plan_read_only_loaded_is_measured_again_not_given_up(cut_model, spell):
    """Seen on DeiT-S at a 0.7 target: round 1 was measured loaded all three times and read 68.2%, inside the band;
    the plan stood, and the loop stopped there, "stuck" and met. The profile, quiet, read 64.4%: under the band.
    A plan that stands but was read only loaded is measured again while rounds remain; read quiet, it steers into
    the band. On a host loaded throughout the answer was read loaded only, which is not met."""
    spec, importance, space = _setup(cut_model, 1, "ofb_vit_micro_patch4_32")
    table = _table(spec, space)  # smooth: every step costs, so a plan with no miss to move by stands
    dense = fake_ms(ArchSpec.dense(spec.base))
    quiet_ratio = fake_ms(spec) / dense
    target = _loaded(quiet_ratio, dense, 0.12).ratio / (1 - 0.03 / 2)  # the loaded reading: the band's middle
    assert quiet_ratio < target * 0.97
    calls = []

    def measure(s: ArchSpec) -> Measurement:
        calls.append(s)
        ratio = fake_ms(s) / dense
        return _loaded(ratio, dense, 0.12) if len(calls) <= spell else Measurement((ratio,) * 3, dense, fake_ms(s))

    fit = latency_loop(spec, importance, space, predict=table, measure=measure, target=target, tolerance=0.03,
                       max_rounds=4, host=QuietHost(fit_module.LOADED * 0.03, dense))
    first = fit.rounds[0]
    assert first.measurements == 3 and first.loaded and first.action == "again, host loaded" and not first.steps
    if spell == math.inf:
        assert [r.action for r in fit.rounds] == ["again, host loaded"] * 3 + ["last round"]
        assert fit.spec == spec and not fit.met
        return
    second = fit.rounds[1]
    assert calls[3] == spec and not second.loaded and second.measured_ratio == pytest.approx(quiet_ratio)
    assert second.action == "widened" and fit.met
    assert target * 0.97 <= fake_ms(fit.spec) / dense <= target


def test_the_profile_tells_a_loaded_host_by_the_fit_stages_quietest_dense_round(tmp_path):
    path = tmp_path / "fit.json"
    assert quiet_host(path) == {}
    path.write_text(json.dumps({"latency": None}))
    assert quiet_host(path) == {}
    rounds = [{"dense_ms": ms} for ms in (50.0, 48.0, 60.0)]
    path.write_text(json.dumps({"latency": {"backend": "ort-cpu", "batch": 32, "precision": "int8",
                                            "tolerance": 0.02, "rounds": rounds}}))
    ((target, host),) = quiet_host(path).items()
    assert (*target, host.dense_ms) == ("ort-cpu", 32, "int8", 48.0)
    assert host.margin == pytest.approx(fit_module.LOADED * 0.02)
    assert host.loaded(48.0 * (1 + host.margin) + 0.1) and not host.loaded(48.0 * (1 + host.margin))
    latency = json.loads(path.read_text())["latency"]
    path.write_text(json.dumps({"latency": {**latency, "quiet_dense_ms": 45.0}}))  # the table's, before round 1
    assert quiet_host(path)[("ort-cpu", 32, "int8")].dense_ms == 45.0


def test_a_benchmark_times_its_final_model_against_the_loops_quiet_reference(cut_model, tmp_path):
    """A benchmark that closes a latency budget with close_latency hands its profile the same reference a run's
    profile stage reads back from fit.json."""
    spec, _, _ = _setup(cut_model, 1, "ofb_vit_micro_patch4_32")
    cfg = LatencyTargetCfg(target_ratio=0.5, batch=32, precision="int8", tolerance=0.02)
    fit = fit_module.LatencyFit(spec, True, [], 1, quiet_dense_ms=45.0)
    path = tmp_path / "fit.json"
    path.write_text(json.dumps({"latency": {"backend": "ort-cpu", "batch": 32, "precision": "int8", "tolerance": 0.02,
                                            "rounds": [{"dense_ms": 50.0}], "quiet_dense_ms": 45.0}}))
    assert run_fit.quiet_reference(cfg, fit) == quiet_host(path)


def test_the_table_learns_each_measurement_and_is_saved_under_its_key(cut_model, tmp_path):
    spec, _, space = _setup(cut_model, 1, "ofb_vit_micro_patch4_32")
    probes = probe_set(spec.base, space, random_points=8)
    measured = [fake_ms(s) for s in probes]
    coefficients, _ = fit_coefficients(probes, measured)
    dense = fake_ms(ArchSpec.dense(spec.base))
    key = LutKey(registry.get("ort-cpu").device_name(), "ort-cpu", "fp32", 1, 32, spec.base.model_name)
    records = [{"embed": s.embed_dim, "blocks": [[b.heads, b.head_dim, b.mlp_dim] for b in s.blocks], "ms": ms}
               for s, ms in zip(probes, measured, strict=True)]
    lut = LatencyLUT(key, spec.base, coefficients, dense, records, points=len(probes))
    slow = 1.3 * fake_ms(spec) / dense  # the backend turns out slower on this model than the table says
    before = abs(lut.predict(spec) / dense - slow)
    for _ in range(3):
        assert lut.learn(spec, slow)
    assert abs(lut.predict(spec) / dense - slow) < before and lut.points == len(probes) + 3
    assert lut.probes[-1]["source"] == "fit" and "fit_error" in lut.probes[-1]
    cfg = LatencyTargetCfg(target_ratio=0.5, cache_dir=str(tmp_path / "cache"))
    cached = save_table(lut, cfg, tmp_path / "run" / "lut.json")  # this machine's table: the cache learns too
    assert cached == str(tmp_path / "cache" / lut.key.filename(spec.base))
    again = LatencyLUT.load(Path(cached))
    assert again.key == lut.key and again.predict(spec) == pytest.approx(lut.predict(spec))
    assert LatencyLUT.load(tmp_path / "run" / "lut.json").points == lut.points
    lut.key = dataclasses.replace(lut.key, device="another machine")
    assert save_table(lut, cfg, tmp_path / "run" / "lut.json") is None


@pytest.mark.parametrize(("attention", "products"), [("cpu", "weights and attention"), ("none", "weights only")])
def test_an_int8_target_measures_the_int8_file_laid_out_as_the_run_exports_it(cut_model, tmp_path, attention,
                                                                                products):
    pytest.importorskip("onnxruntime")
    _, pruned, spec = cut_model(3)
    images = torch.rand(16, 3, 32, 32)
    runner = spec_runner(spec, "ort-cpu", "int8", 1, tmp_path, threads=1, model=pruned, images=images,
                         export=ExportCfg(int8_attention=attention))
    assert runner._path.name == "probe-int8.onnx" and runner.precision == "int8"
    record = json.loads(runner._path.with_name("probe-int8.onnx.quant.json").read_text())
    assert record["settings"]["products"] == products
    _, measured = measure_pair(runner, runner, 1, warmup=1, repeats=5)
    assert measured.median_ms > 0


@pytest.mark.parametrize("wider", [True, False])
def test_with_no_block_left_to_move_the_loop_moves_the_embedding(cut_model, wider):
    """A search can cut the embedding and keep every block whole (seen at a 0.7 target on DeiT-S: 216 of 384
    channels) and measure under the target; or leave every block at its narrowest and measure over it. Then the
    embedding is what the loop moves, and the resized model holds the teacher's channels it grew."""
    teacher, pruned, spec = cut_model(3, name="ofb_vit_micro_patch4_32", embedding=True)
    importance = unit_importance(pruned, spec, teacher)
    space = family_of(spec.base).space(spec.base)
    widths = [spec.base.block_dims(i) if wider else (1, min(c for _, c in space.attention), min(space.mlp))
              for i in range(spec.base.depth)]
    start = resized_spec(spec, importance, widths)
    dense = ArchSpec.dense(spec.base).macs()

    def measure(s: ArchSpec) -> Measurement:  # the backend's time is its MACs
        return Measurement((s.macs() / dense,) * 3, dense, s.macs())

    target = start.macs() / dense * (1.15 if wider else 0.85)
    fit = latency_loop(start, importance, space, predict=ArchSpec.macs, measure=measure, target=target,
                       tolerance=0.03, max_rounds=4)
    assert fit.met and target * 0.97 <= fit.spec.macs() / dense <= target
    assert fit.rounds[0].action == ("widened" if wider else "narrowed")
    assert {step.split(":")[0] for r in fit.rounds for step in r.steps} == {"stages.0.embedding"}
    assert fit.spec.blocks == start.blocks
    assert (fit.spec.embed_dim > start.embed_dim) == wider and fit.spec.embed_dim != start.embed_dim
    model = resize(pruned, spec, teacher, fit.spec)
    assert sum(p.numel() for p in model.parameters()) == fit.spec.params()


@pytest.mark.parametrize(("table_here", "table_threads"), [(False, 1), (True, 1), (True, None)])
def test_the_fit_stage_bench_exports_and_times_a_grown_embedding_on_onnx_runtime(cut_model, synthetic_lut,
                                                                                monkeypatch, table_here, table_threads):
    """The run's own loop (close_latency: resize, export, check, time against dense on ORT CPU) on a model whose
    search cut the embedding and kept every block whole, asked for nearly dense latency: it grows the embedding
    with the teacher's channels, and the grown model is measured in the next round. Before each measurement
    the dense model is probed against the fastest dense measurement so far; before the first, against the
    latency table's fastest dense measurement where the table was measured on this machine with the bench's
    thread count (else there is none)."""
    pytest.importorskip("onnxruntime")
    teacher, pruned, spec = cut_model(2, embedding=True)
    assert spec.embed_dim <= 0.75 * spec.base.embed_dim
    importance = unit_importance(pruned, spec, teacher)
    whole = resized_spec(spec, importance, [spec.base.block_dims(i) for i in range(spec.base.depth)])
    model = resize(pruned, spec, teacher, whole)
    space = family_of(spec.base).space(spec.base)
    cfg = LatencyTargetCfg(target_ratio=0.99, batch=32, max_rounds=2, repeats=5)
    probes = []
    monkeypatch.setattr(run_fit, "wait_for_quiet",
                        lambda runner, batch, host: probes.append((host.dense_ms, host.margin)) or 0.0)
    opened, prepare = [], OrtRunner.prepare  # runners a timing session was opened for (kept alive: ids stay unique)
    monkeypatch.setattr(run_fit, "measure_group", lambda runners, batch, **kw: measure_group(runners, batch, **kw)
                        if kw["prepared"] else pytest.fail("the bench's measurements must reuse its sessions"))
    monkeypatch.setattr(OrtRunner, "prepare", lambda runner, batch, images=None:
                        (opened.append(runner) if batch == cfg.batch else None) or prepare(runner, batch, images))
    lut = synthetic_lut(spec.base.model_name, 32)
    if table_here:
        lut.key, lut.quiet_dense_ms = dataclasses.replace(lut.key, device=registry.get("ort-cpu").device_name()), 1e6
    lut.threads = table_threads
    fit, _ = close_latency(cfg, lut, model, whole, teacher, space, images=torch.rand(8, 3, 32, 32), threads=1)
    first, second = fit.rounds
    measurements = first.measurements + second.measurements
    # one session a candidate, and the dense model's opened once a measurement (not once a paired timing)
    assert sorted(collections.Counter(map(id, opened)).values()) == [1] * measurements + [measurements]
    if table_here and table_threads == 1:
        assert probes.pop(0)[0] == 1e6  # before round 1: the table's fastest dense
    assert len(probes) == measurements - 1 and 0 < probes[0][0] < 1e6  # the fastest so far: never rises
    assert all(a[0] >= b[0] for a, b in itertools.pairwise(probes))
    assert probes[0][1] == pytest.approx(fit_module.LOADED * cfg.tolerance)
    assert first.action == "widened" and first.steps
    assert all(step.startswith("stages.0.embedding:") for step in first.steps)
    assert second.measured_ratio > 0 and second.dense_ms > 0
