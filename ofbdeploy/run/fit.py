"""The ``fit`` stage: between materialisation and finetuning, the decided architecture is brought onto its
budgets from both sides (:mod:`ofbdeploy.prune.fit`).

- A FLOPs budget the search left under-filled is filled to within a grid step below it.
- A latency budget (``search.latency``) is closed on measurements: the fitted model and the dense one are
  exported and timed alternately on the target backend, precision and batch with the profile's protocol
  (medians of ``search.latency.repeats`` calls, three paired measurements a round), and the widths move
  until the measured ratio lies within ``search.latency.tolerance`` under the target, for at most
  ``search.latency.max_rounds`` rounds. Every measurement is added to the latency table, the table is
  fitted again and saved: in the run (``fit/lut.json``) and, when it describes this machine, in the cache
  under its key, so the next run on this device starts better. A measurement taken while the host was loaded
  is taken again (:data:`ofbdeploy.prune.fit.LOADED`); the reference before round 1 is the table's fastest
  dense measurement when the table was measured on this machine. The profile stage does the same against this stage's
  quiet dense latency (:func:`quiet_host`), so both report the quiet host's ratio.

The weights the search trained are kept: the model is resized (:mod:`ofbdeploy.models.resize`), units taken
from the teacher where a group grows; the finetune then trains the fitted model. ``fit.json`` records every
step and round; report.json carries it.
"""

from __future__ import annotations

import logging
import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ofbdeploy.arch import ArchSpec
from ofbdeploy.deploy.config import ExportCfg
from ofbdeploy.deploy.measure import QUIET_BLOCK_S, QuietHost, measure_group, wait_for_quiet
from ofbdeploy.deploy.runtimes import registry
from ofbdeploy.deploy.runtimes.errors import BackendError, BackendUnavailable
from ofbdeploy.families import load_arch
from ofbdeploy.latency.config import LatencyTargetCfg
from ofbdeploy.latency.lut import LatencyLUT, default_cache_dir, spec_runner
from ofbdeploy.models.pruned import load_pruned, save_pruned
from ofbdeploy.models.resize import resize, unit_importance
from ofbdeploy.prune.budget import resolve_target
from ofbdeploy.prune.fit import LOADED, LatencyFit, Measurement, WidthStep, fill_flops, latency_loop
from ofbdeploy.run.context import RunContext
from ofbdeploy.run.rundir import read_json, write_json
from ofbdeploy.train.data import calibration_batch

log = logging.getLogger("ofbdeploy.run")

PAIRS_PER_ROUND = 3  # paired measurements a round: their agreement is the round's stability
CALIBRATION_IMAGES = 64  # real images an int8 target's files are calibrated and checked on


def _steps(steps: list[WidthStep]) -> list[dict[str, Any]]:
    return [{"step": s.describe(), "importance": s.importance, "costs_after": list(s.costs_after)} for s in steps]


class _Bench:
    """Pruned (resized from the searched model) against dense on the latency target, measured as a profile
    measures: exported, checked, timed alternately; medians. Before each measurement the dense model is probed,
    and where the host is loaded (against its fastest measurement so far) the bench waits for a quiet spell."""

    def __init__(self, cfg: LatencyTargetCfg, model: nn.Module, spec: ArchSpec, teacher: nn.Module, tmp: Path,
                 threads: int | None, images: Tensor, export: ExportCfg | None, host: QuietHost) -> None:
        self.cfg, self.model, self.spec, self.teacher, self.tmp = cfg, model, spec, teacher, tmp
        self.threads, self.images, self.export = threads, images, export
        self.dense = spec_runner(ArchSpec.dense(spec.base), cfg.backend, cfg.precision, cfg.batch, tmp, threads,
                                 model=teacher, images=images, export=export)
        self.host = host  # the dense model's fastest measurement so far (the loop lowers it)

    def __call__(self, spec: ArchSpec) -> Measurement:
        c = self.cfg
        candidate = resize(self.model, self.spec, self.teacher, spec)
        runner = spec_runner(spec, c.backend, c.precision, c.batch, self.tmp, self.threads, model=candidate,
                             images=self.images, export=self.export)
        for r in (self.dense, runner):  # one session each serves the wait and the three paired timings
            r.prepare(c.batch)
        if math.isfinite(self.host.dense_ms):  # a spell of load outlasts measurements taken back to back: wait
            waited = wait_for_quiet(self.dense, c.batch, self.host)
            if waited > 2 * QUIET_BLOCK_S:
                log.info("fit: host loaded (dense above %.1f ms); waited %.0f s for a quiet spell",
                         self.host.dense_ms * (1 + self.host.margin), waited)
        pairs = [measure_group([self.dense, runner], c.batch, warmup=max(3, c.repeats // 5), repeats=c.repeats,
                               prepared=True) for _ in range(PAIRS_PER_ROUND)]
        return Measurement(tuple(p.median_ms / d.median_ms for d, p in pairs),
                           statistics.median(d.median_ms for d, _ in pairs),
                           statistics.median(p.median_ms for _, p in pairs))


def close_latency(cfg: LatencyTargetCfg, lut: LatencyLUT, model: nn.Module, spec: ArchSpec, teacher: nn.Module,
                  space: Any, *, images: Tensor, threads: int | None, flops: float | None = None,
                  export: ExportCfg | None = None) -> tuple[LatencyFit, float]:
    """The closed loop on a materialised ``model`` of ``spec``: measured against ``teacher`` on ``cfg``'s target
    until the ratio lies within the tolerance under the target (``lut`` predicts between measurements and learns
    from each). One function, so that a run's fit stage and a benchmark deliver a latency budget the same way.
    ``images`` calibrate an int8 target's files, laid out as ``export`` (the run's export section) says.
    Returns the fit and the target ratio."""
    dense_ms = lut.predict(ArchSpec.dense(spec.base))
    target = cfg.target_ratio if cfg.target_ratio is not None else cfg.target_ms / dense_ms
    others = [(ArchSpec.macs, flops)] if flops is not None else []
    importance = unit_importance(model, spec, teacher)

    def learn(measured: ArchSpec, fraction: float) -> None:
        if lut.learn(measured, fraction):
            log.info("fit: measured %.1f%% of dense; latency table fitted again on %d models (fit error median "
                     "%.1f%%)", 100 * fraction, lut.points, 100 * lut.fit_error["median_abs"])
        else:
            log.info("fit: measured %.1f%% of dense; the latency table has too few models to fit again (%d)",
                     100 * fraction, len(lut.probes))

    with tempfile.TemporaryDirectory() as tmp:
        host = QuietHost(LOADED * cfg.tolerance)
        if lut.quiet_dense_ms and lut.threads == threads and _measured_here(lut, cfg):  # this bench's dense
            host.see(lut.quiet_dense_ms)  # the quiet reference before round 1
        bench = _Bench(cfg, model, spec, teacher, Path(tmp), threads, images, export, host)
        fit = latency_loop(spec, importance, space, predict=lut.predict, measure=bench, target=target,
                           tolerance=cfg.tolerance, max_rounds=cfg.max_rounds, other_budgets=others, learn=learn,
                           host=host)
    for r in fit.rounds:
        log.info("fit round %d: predicted %.1f%%, measured %.1f%% of dense (%d repeats, spread %.1f%%, measured %d "
                 "time(s), dense %.1f ms%s); %s%s", r.round, 100 * r.predicted_ratio, 100 * r.measured_ratio,
                 r.repeats, 100 * r.spread, r.measurements, r.dense_ms, ", host loaded" if r.loaded else "", r.action,
                 f": {', '.join(r.steps)}" if r.steps else "")
    (log.info if fit.met else log.warning)(
        "fit: latency target %.1f%% %s after %d round(s); the architecture of round %d is kept", 100 * target,
        "met within tolerance" if fit.met else "not met", len(fit.rounds), fit.kept_round)
    return fit, target


def _latency(run: RunContext, cfg: LatencyTargetCfg, spec: ArchSpec, model: nn.Module, teacher: nn.Module,
             space: Any, flops: float | None) -> tuple[LatencyFit, LatencyLUT, float]:
    lut = LatencyLUT.load(run.paths.lut)
    train, val, _ = run.data()  # int8 files are calibrated as the export calibrates them, on real images
    images = calibration_batch(train, val, min(CALIBRATION_IMAGES, len(train)), run.recipe.seed)
    fit, target = close_latency(cfg, lut, model, spec, teacher, space, images=images,
                                threads=run.recipe.profile.threads, flops=flops, export=run.recipe.export)
    return fit, lut, target


def quiet_host(path: Path) -> dict[tuple[str, int, str], QuietHost]:
    """The fit stage's quiet dense latency (``fit.json`` at ``path``: its quietest round, or the latency table's
    fastest dense measured on this machine) by its backend, batch and precision, for the profile to tell a
    loaded host by: empty without a measured latency loop."""
    latency = read_json(path).get("latency") if path.is_file() else None
    if not latency or not latency["rounds"]:
        return {}
    fastest = latency.get("quiet_dense_ms") or min(r["dense_ms"] for r in latency["rounds"])  # older fit.json
    return _reference(latency["backend"], latency["batch"], latency["precision"], latency["tolerance"], fastest)


def quiet_reference(cfg: LatencyTargetCfg, fit: LatencyFit) -> dict[tuple[str, int, str], QuietHost]:
    """What :func:`quiet_host` reads back from ``fit.json``, straight from a loop just closed: a benchmark that
    closes a latency budget with :func:`close_latency` times its final model against it, as a run's profile does."""
    return _reference(cfg.backend, cfg.batch, cfg.precision, cfg.tolerance, fit.quiet_dense_ms)


def _reference(backend: str, batch: int, precision: str, tolerance: float,
               dense_ms: float) -> dict[tuple[str, int, str], QuietHost]:
    """The profile's quiet host for one latency target: loaded past :data:`LOADED` tolerances above ``dense_ms``."""
    return {(backend, batch, precision): QuietHost(LOADED * tolerance, dense_ms)}


def _measured_here(lut: LatencyLUT, cfg: LatencyTargetCfg) -> bool:
    """Whether ``lut`` was measured on this machine's ``cfg.backend`` device."""
    return lut.key.device == registry.get(cfg.backend).device_name()


def save_table(lut: LatencyLUT, cfg: LatencyTargetCfg, path: Path) -> str | None:
    """The learned table in the run, and in the cache when it describes this machine (the same key)."""
    lut.save(path)
    if not _measured_here(lut, cfg):
        return None
    cached = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    return str(lut.save(cached / lut.key.filename(lut.shape)))


def fit_stage(run: RunContext) -> None:
    """Budgets met from both sides; the fitted model is what the finetune trains. Rank 0's work alone."""
    if not run.dist.is_main:
        return
    paths = run.paths
    spec = load_arch(paths.pruned / "arch.json")
    model = load_pruned(paths.pruned)
    cfg = run.recipe.search
    latency = cfg.latency_target
    flops = resolve_target(cfg, spec.base)
    record: dict[str, Any] = {"flops_target": flops, "flops_before": spec.macs(), "flops_steps": [],
                              "latency": None, "skipped": None}
    final = spec
    teacher = run.load_dense().cpu()
    space = run.space(spec.base)
    if latency is not None and latency.max_rounds > 0:
        try:
            fit, lut, target = _latency(run, latency, spec, model, teacher, space, flops)
        except (BackendError, BackendUnavailable) as err:
            record["skipped"] = f"latency not measured on {latency.backend}: {err}"
            log.warning("fit: %s", record["skipped"])
        else:
            final = fit.spec
            record["latency"] = {"target_ratio": target, "backend": latency.backend,
                                 "precision": latency.precision, "batch": latency.batch,
                                 "tolerance": latency.tolerance, "max_rounds": latency.max_rounds,
                                 "met": fit.met, "kept_round": fit.kept_round,
                                 "quiet_dense_ms": fit.quiet_dense_ms,
                                 "rounds": [vars(r) for r in fit.rounds],
                                 "table": {"points": lut.points, "fit_error": lut.fit_error,
                                           "cache": save_table(lut, latency, paths.fit_lut)}}
    if record["latency"] is None and flops is not None:  # no closed loop: the FLOPs budget from below
        model, final, steps = fill_flops(model, spec, teacher, space, flops)
        record["flops_steps"] = _steps(steps)
        if steps:
            log.info("fit: %d widening step(s) toward the FLOPs budget: %s", len(steps),
                     ", ".join(s.describe() for s in steps))
    elif final != spec:
        model = resize(model, spec, teacher, final)
    record["flops_after"] = final.macs()
    if flops is not None:
        log.info("fit: FLOPs %.2f%% of the budget (%.2f%% before)", 100 * final.macs() / flops,
                 100 * spec.macs() / flops)
    save_pruned(model, final, paths.fitted)
    write_json(paths.fit, record)
