"""The latency protocol, written once: warm up untimed, time single calls, summarise in ``LatencyStats``.

Dense and pruned models (and their precisions) are compared with ``measure_group``, which times them in
alternating blocks in the same process, so thermal drift or a frequency change hits all alike instead of
showing up as a fake speedup (or slowdown). Blocks alternate in ABBA order (forward in even rounds, reversed in
odd ones), which also cancels a steady drift across the measurement. A noisy neighbour does not hit all alike:
on a shared host its spells of work add a similar time to every call, which slows a small model more than a
large one, so the statistics are taken over the rounds no spell hit (``quiet_rounds``), and a caller that knows
the quiet host's dense latency (``QuietHost``) waits a spell out (``wait_for_quiet``) before measuring again,
pooling the rounds of its measurements (``time_rounds``, ``summarise_rounds``). ``measure_pair`` is the two-runner
case.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from ofbdeploy.deploy.runtimes.base import Runner, Timer

Blocks = list[list[list[float]]]  # the calls' times (ms), per runner, per round


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one runner at one batch size, in milliseconds per call; the record every report uses."""

    backend: str
    device: str
    precision: str
    batch: int
    repeats: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    throughput: float  # images/s at the median latency
    peak_memory_mb: float | None
    tf32: bool | None = None  # fp32 math allowed to use TF32 (GPU runners; None on CPU)
    cuda_graph: bool | None = None  # each call replayed a CUDA graph (GPU runners; None on CPU)
    rounds: int | None = None  # alternating rounds timed (measure_group)
    quiet_rounds: int | None = None  # ... of which the statistics are taken (see quiet_rounds)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields."""
        return asdict(self)


QUIET_ROUND = 0.075  # measure_group keeps the rounds in which every runner ran within this of its fastest block
QUIET_BLOCK_S = 0.5  # how long each probe of wait_for_quiet times the dense model
QUIET_WAIT_S = 60.0  # the longest wait_for_quiet waits: spells of load seen on the 2-vCPU VM lasted 5-60 s
# What every wait on one host adds up to at most: the same VM was also seen loaded for over ten minutes on end,
# and a latency loop that waited a minute before each of its 12 measurements took 11 minutes; past this, the
# measurements are taken loaded and said to be.
QUIET_BUDGET_S = 180.0


@dataclass
class QuietHost:
    """The dense model's latency with the host at its quietest: the fastest measurement seen (:meth:`see`). A
    measurement whose dense model runs more than ``margin`` slower was taken in a spell of other work, which on a
    shared host slows a small model more than a large one and so moves the ratio; :func:`wait_for_quiet` waits
    up to ``max_wait_s`` for such a spell to pass, and all its waits on this host up to ``budget_s``."""

    margin: float
    dense_ms: float = math.inf
    max_wait_s: float = QUIET_WAIT_S
    budget_s: float = QUIET_BUDGET_S  # left for the waits to come

    def see(self, dense_ms: float) -> None:
        self.dense_ms = min(self.dense_ms, dense_ms)

    def loaded(self, dense_ms: float) -> bool:
        return dense_ms > self.dense_ms * (1 + self.margin)


def wait_for_quiet(runner: Runner, batch: int, host: QuietHost) -> float:
    """Time ``runner`` (the dense model, prepared at ``batch``) in probes of about :data:`QUIET_BLOCK_S` until a
    probe's median says the host is quiet again, or ``host.max_wait_s`` have passed, or the host's wait budget is
    spent; the seconds waited. A spell of load outlasts a few measurements taken back to back, so measuring again
    at once measures the spell again."""
    if host.budget_s <= 0:
        return 0.0
    timer, start = runner.timer(), time.perf_counter()
    while True:
        probe = _timed_calls(runner, timer, 1, QUIET_BLOCK_S)
        waited = time.perf_counter() - start
        if not host.loaded(float(np.median(probe))) or waited >= min(host.max_wait_s, host.budget_s):
            host.budget_s -= waited
            return waited


def speedup(dense: LatencyStats, pruned: LatencyStats) -> float:
    """How many times faster the pruned model is, by median latency (robust to the odd slow call)."""
    return dense.median_ms / pruned.median_ms


def measure(
    runner: Runner, batch: int, *, warmup: int = 10, repeats: int = 50, min_seconds: float = 0.0
) -> LatencyStats:
    """Time ``runner`` at ``batch``: at least ``repeats`` calls, and more until ``min_seconds`` have passed."""
    _check_counts(batch, repeats, 1)
    _warm_up(runner, batch, warmup)
    return _summarise(runner, batch, _timed_calls(runner, runner.timer(), repeats, min_seconds))


def measure_pair(
    dense: Runner, pruned: Runner, batch: int, *, warmup: int = 10, repeats: int = 50, rounds: int = 5
) -> tuple[LatencyStats, LatencyStats]:
    """Time both runners in ``rounds`` alternating blocks; each gets ``ceil(repeats / rounds)`` calls a block."""
    d, p = measure_group([dense, pruned], batch, warmup=warmup, repeats=repeats, rounds=rounds)
    return d, p


def measure_group(
    runners: list[Runner], batch: int, *, warmup: int = 10, repeats: int = 50, rounds: int = 5,
    prepared: bool = False,
) -> list[LatencyStats]:
    """Time every runner in alternating rounds (:func:`time_rounds`) and summarise each over the
    :func:`quiet_rounds` (:func:`summarise_rounds`)."""
    blocks = time_rounds(runners, batch, warmup=warmup, repeats=repeats, rounds=rounds, prepared=prepared)
    return summarise_rounds(runners, batch, blocks)


def time_rounds(
    runners: list[Runner], batch: int, *, warmup: int = 10, repeats: int = 50, rounds: int = 5,
    prepared: bool = False,
) -> Blocks:
    """Time every runner in ``rounds`` blocks, forward order in even rounds and reversed in odd ones; each gets
    ``ceil(repeats / rounds)`` calls a block, after one untimed call (the switch between runtimes settles: the
    previous one's idle threads stop spinning, caches refill). Every runner is prepared (unless ``prepared``: the
    caller did it at ``batch``) and warmed up before any is timed. The calls' times, per runner, per round."""
    _check_counts(batch, repeats, rounds)
    for runner in runners:
        _warm_up(runner, batch, warmup, prepare=not prepared)
    timers = [runner.timer() for runner in runners]
    blocks: Blocks = [[] for _ in runners]
    block = -(-repeats // rounds)
    order = list(range(len(runners)))
    for index in range(rounds):
        for k in order if index % 2 == 0 else order[::-1]:
            _warm_up(runners[k], batch, 1, prepare=False)
            blocks[k].append(_timed_calls(runners[k], timers[k], block, 0.0))
    return blocks


def summarise_rounds(runners: list[Runner], batch: int, blocks: Blocks) -> list[LatencyStats]:
    """Each runner's statistics over the calls of the :func:`quiet_rounds` of ``blocks`` (per runner, per round;
    the rounds of several measurements may be pooled)."""
    kept = quiet_rounds(blocks)
    return [replace(_summarise(runner, batch, [t for r in kept for t in b[r]]), rounds=len(b), quiet_rounds=len(kept))
            for runner, b in zip(runners, blocks, strict=True)]


def quiet_rounds(blocks: Blocks, margin: float = QUIET_ROUND) -> list[int]:
    """The rounds (of ``blocks``: per runner, per round, the calls' times) in which every runner's block median lies
    within ``margin`` of that runner's fastest block; every round where none does. On a shared host a spell of
    other work that hits part of a measurement slows a small model more than a large one, so the rounds it hit are
    left out rather than pooled into the medians."""
    medians = [[float(np.median(b)) for b in runner] for runner in blocks]
    fastest = [min(m) for m in medians]
    count = len(medians[0])
    kept = [r for r in range(count) if all(m[r] <= f * (1 + margin) for m, f in zip(medians, fastest, strict=True))]
    return kept or list(range(count))


def _check_counts(batch: int, repeats: int, rounds: int) -> None:
    """Refuse counts that would leave nothing to summarise."""
    if min(batch, repeats, rounds) < 1:
        raise ValueError(f"batch, repeats and rounds must be >= 1, got {batch}, {repeats}, {rounds}")


def _warm_up(runner: Runner, batch: int, warmup: int, prepare: bool = True) -> None:
    """Allocate the input and run untimed calls, so compilation, autotuning and caches settle first."""
    if prepare:
        runner.prepare(batch)
    for _ in range(warmup):
        runner.run()
    runner.synchronize()


def _timed_calls(runner: Runner, timer: Timer, count: int, min_seconds: float) -> list[float]:
    """The one timing loop: single calls, each timed to completion, with the garbage collector paused."""
    times: list[float] = []
    collecting = gc.isenabled()
    gc.disable()
    try:
        deadline = time.perf_counter() + min_seconds
        while len(times) < count or time.perf_counter() < deadline:
            timer.start()
            runner.run()
            times.append(timer.stop())
    finally:
        if collecting:
            gc.enable()
    return times


def _summarise(runner: Runner, batch: int, times_ms: list[float]) -> LatencyStats:
    """Percentiles of the recorded calls plus what the runner says about itself."""
    samples = np.asarray(times_ms, dtype=np.float64)
    median = float(np.median(samples))
    return LatencyStats(
        backend=runner.backend,
        device=runner.device_name,
        precision=runner.precision,
        batch=batch,
        repeats=len(samples),
        median_ms=median,
        p90_ms=float(np.percentile(samples, 90)),
        p99_ms=float(np.percentile(samples, 99)),
        mean_ms=float(samples.mean()),
        min_ms=float(samples.min()),
        throughput=batch * 1e3 / median,
        peak_memory_mb=runner.peak_memory_mb(),
        tf32=runner.tf32,
        cuda_graph=runner.cuda_graph,
    )
