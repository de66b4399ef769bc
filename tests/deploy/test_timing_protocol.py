"""The timing protocol, not the runner, decides what one timed call contains (issue 23, defect 4).

A fake CUDA-like device on the CPU: a host clock, a stream whose queued work finishes at a known time, events that
are stamped when the stream reaches them, and a host wake-up cost whenever the host waits for unfinished work.
ONNX Runtime's CUDA-graph replay waits for its stream before ``run()`` returns; torch's and TensorRT's replays
return at once. Timed by the protocol, both spans hold the same launch, device work and one host wake-up.
"""

from __future__ import annotations

import numpy as np
import pytest

from ofbdeploy.deploy.measure import measure, measure_group
from ofbdeploy.deploy.runtimes import base
from ofbdeploy.deploy.runtimes.base import Runner, StreamTimer, WallTimer
from ofbdeploy.deploy.runtimes.ort import OrtRunner
from ofbdeploy.deploy.runtimes.tensorrt import TensorRTRunner
from ofbdeploy.deploy.runtimes.torch import TorchRunner

LAUNCH, WORK, WAKE = 0.01, 0.5, 0.08  # milliseconds: host launch cost, device work, host wake-up after a wait


class FakeDevice:
    """Host time and the time the stream's queued work is done, in milliseconds."""

    def __init__(self) -> None:
        self.host = 0.0
        self.done = 0.0


class FakeStream:
    def __init__(self, device: FakeDevice) -> None:
        self.device = device

    def enqueue(self, ms: float) -> None:
        self.device.done = max(self.device.done, self.device.host) + ms

    def synchronize(self) -> None:
        if self.device.done > self.device.host:  # the host sleeps until the work is done, then wakes up
            self.device.host = self.device.done + WAKE


class FakeEvent:
    """Stamped when the stream reaches it: after the queued work, and not before the host enqueued it."""

    def __init__(self) -> None:
        self.stamp: float | None = None
        self.stream: FakeStream | None = None

    def record(self, stream: FakeStream) -> None:
        self.stream = stream
        self.stamp = max(stream.device.done, stream.device.host)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def elapsed_time(self, end: FakeEvent) -> float:
        return end.stamp - self.stamp


class FakeGpuRunner(Runner):
    """``blocking``: run() waits for its stream before returning, as ONNX Runtime's graph replay does."""

    def __init__(self, device: FakeDevice, blocking: bool) -> None:
        self.backend, self.device_name, self.precision = "fake-gpu", "cuda: fake", "fp32"
        self.stream = FakeStream(device)
        self.blocking = blocking
        self._device = device

    def prepare(self, batch: int, images: np.ndarray | None = None) -> None:
        pass

    def run(self) -> None:
        self._device.host += LAUNCH
        self.stream.enqueue(WORK)
        if self.blocking:
            self.stream.synchronize()

    def synchronize(self) -> None:
        self.stream.synchronize()

    def outputs(self) -> np.ndarray:
        return np.zeros((1, 1), np.float32)


@pytest.fixture()
def device(monkeypatch: pytest.MonkeyPatch) -> FakeDevice:
    monkeypatch.setattr(base, "cuda_event", FakeEvent)
    return FakeDevice()


def test_a_runner_that_waits_and_one_that_does_not_are_timed_alike(device: FakeDevice) -> None:
    returns_at_once, waits = FakeGpuRunner(device, blocking=False), FakeGpuRunner(device, blocking=True)
    spans = [measure(runner, 1, warmup=2, repeats=5) for runner in (returns_at_once, waits)]
    for stats in spans:  # launch, device work and one host wake-up: the call as the host that wants the result sees it
        assert stats.min_ms == pytest.approx(LAUNCH + WORK + WAKE) and stats.median_ms == pytest.approx(stats.min_ms)
    d, p = measure_group([returns_at_once, waits], 1, warmup=1, repeats=4, rounds=2)
    assert d.median_ms == pytest.approx(p.median_ms)


def test_the_protocol_builds_every_timer() -> None:
    """Runners say where their work runs (``stream``); none of the real ones picks its own timer."""
    for runner in (TorchRunner, OrtRunner, TensorRTRunner):
        assert runner.timer is Runner.timer, f"{runner.__name__} overrides the timing protocol"
    assert isinstance(base.span_timer(None, lambda: None), WallTimer)
    assert isinstance(base.span_timer(object(), lambda: None, FakeEvent), StreamTimer)
