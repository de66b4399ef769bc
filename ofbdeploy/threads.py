"""How many CPU threads this process uses, so that runs sharing a machine do not fight over its cores.

A process sizes its thread pools for the CPUs it may actually use: its CPU affinity, capped by a cgroup CPU quota
(v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``; a container's ``--cpus``), divided among the local processes of a DDP
run (``LOCAL_WORLD_SIZE``). What a user says wins: ``ofbdeploy --threads N``, then ``OFBDEPLOY_THREADS``, then
``OMP_NUM_THREADS`` (which torch itself honours, and which plain ``torchrun`` sets to 1).

Two runs on one machine must not burn each other's cores. A process alone keeps OpenMP's spinning wait (a
passive wait costs a small model about a fifth of its speed), so instead the automatic count adapts while it
trains (:class:`Governor`, fed by :func:`tick` once per optimiser step): when this process gets clearly less CPU
time than its threads ask for and is preempted often, other processes want these CPUs, and it drops to the CPUs
it actually gets (one thread each for two runs on two cores: no OpenMP barrier left to spin at); once the CPUs
are free again for a few seconds running, it takes them back. A count the user set is never changed.

torch reads ``OMP_NUM_THREADS`` when it is loaded, so :func:`configure` runs before the first ``import torch``
(the CLI calls it first thing) and only touches torch directly when it is already loaded. Nothing here imports
torch: the CLI answers ``--help`` and refuses bad input without loading it.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from ofbdeploy.errors import InputError

log = logging.getLogger(__name__)

ENV = "OFBDEPLOY_THREADS"
_MOUNTINFO = Path("/proc/self/mountinfo")
_CGROUP = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class ThreadPlan:
    """The decision and what it was made from, so the log can say why."""

    intra_op: int
    inter_op: int
    source: str  # "--threads", OFBDEPLOY_THREADS, OMP_NUM_THREADS or "auto"
    affinity: int
    quota: float | None  # CPUs of the cgroup quota; None without one
    processes: int  # local processes of the run sharing these CPUs

    @property
    def allowed(self) -> int:
        return allowed_cpus(self.affinity, self.quota)

    def describe(self) -> str:
        quota = "none" if self.quota is None else f"{self.quota:g} CPUs"
        where = (f"{self.allowed} CPUs allowed (affinity {self.affinity}, cgroup quota {quota}), "
                 f"{self.processes} process{'es' if self.processes > 1 else ''}")
        if self.source == "auto":
            return f"threads: {where} -> {self.intra_op} intra-op threads"
        return f"threads: {self.intra_op} intra-op threads ({self.source}); {where}"


def allowed_cpus(affinity: int, quota: float | None) -> int:
    """CPUs a process may use: its affinity, capped by the quota in whole CPUs (at least one)."""
    return affinity if quota is None else max(1, min(affinity, math.floor(quota)))


def affinity_cpus() -> int:
    """CPUs the scheduler lets this process run on (``taskset``, ``docker --cpuset-cpus``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _quota_file_cpus(directory: Path, version: int) -> float | None:
    """The quota in ``directory`` (in CPUs), or None where there is none or it cannot be read."""
    try:
        if version == 2:
            quota, _, period = (directory / "cpu.max").read_text().strip().partition(" ")
        else:
            quota = (directory / "cpu.cfs_quota_us").read_text().strip()
            period = (directory / "cpu.cfs_period_us").read_text().strip()
        if quota == "max" or int(quota) <= 0:
            return None
        return int(quota) / int(period or 100_000)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def cgroup_cpu_quota(mountinfo: Path = _MOUNTINFO, cgroup: Path = _CGROUP) -> float | None:
    """The tightest CPU quota on this process's cgroup and its ancestors, in CPUs; None without a quota.

    The cgroup's directory is its mount point plus its path in ``/proc/self/cgroup`` relative to the mount's
    root (inside a container both are usually "/").
    """
    try:
        mounts = mountinfo.read_text().splitlines()
        groups = cgroup.read_text().splitlines()
    except OSError:
        return None
    paths: dict[str, str] = {}  # "2" for the unified hierarchy, "1" for v1's cpu controller
    for line in groups:
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        if controllers == "" and line.startswith("0::"):
            paths["2"] = path
        elif "cpu" in controllers.split(","):
            paths["1"] = path
    quotas = []
    for line in mounts:
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        fstype, *rest = line.split(" - ", 1)[1].split()
        version = "2" if fstype == "cgroup2" else "1" if fstype == "cgroup" and "cpu" in rest[-1].split(",") else ""
        if version not in paths:
            continue
        root, mount = fields[3], Path(fields[4])
        relative = os.path.relpath(paths[version], root) if paths[version].startswith(root) else "."
        directory = Path(os.path.normpath(mount / relative))
        while True:
            quota = _quota_file_cpus(directory, int(version))
            if quota is not None:
                quotas.append(quota)
            if directory == mount or mount not in directory.parents:
                break
            directory = directory.parent
    return min(quotas, default=None)


def _whole(value: str | None, name: str, strict: bool) -> int | None:
    """A thread count from the environment: None where unset; a bad value is refused (``strict``) or ignored."""
    if value is None or not value.strip():
        return None
    text = value.split(",")[0].strip()  # OpenMP allows a list per nesting level; the first is the outer one
    if text.isdigit() and int(text) >= 1:
        return int(text)
    if strict:
        raise InputError(f"{name}={value!r}: expected a whole number of threads, 1 or more")
    return None


def local_processes(env: Mapping[str, str]) -> int:
    """Processes of this run on this machine (torchrun's ``LOCAL_WORLD_SIZE``; 1 outside DDP)."""
    return _whole(env.get("LOCAL_WORLD_SIZE"), "LOCAL_WORLD_SIZE", strict=False) or 1


def plan_threads(requested: int | None = None, env: Mapping[str, str] = os.environ,
                 cpus: tuple[int, float | None] | None = None) -> ThreadPlan:
    """Decide the thread counts: ``requested`` (the CLI option), the environment, or this process's share of
    its CPUs. ``cpus`` is (affinity, quota), read from this process unless given."""
    affinity, quota = cpus if cpus is not None else (affinity_cpus(), cgroup_cpu_quota())
    processes = local_processes(env)
    for source, value in (("--threads", requested), (ENV, _whole(env.get(ENV), ENV, strict=True)),
                          ("OMP_NUM_THREADS", _whole(env.get("OMP_NUM_THREADS"), "OMP_NUM_THREADS", strict=False))):
        if value is not None:
            return ThreadPlan(value, value, source, affinity, quota, processes)
    share = max(1, allowed_cpus(affinity, quota) // processes)
    return ThreadPlan(share, share, "auto", affinity, quota, processes)


def share_for_workers(nproc: int, env: MutableMapping[str, str] = os.environ) -> None:
    """Before a launcher starts ``nproc`` local workers: each one's share in ``OMP_NUM_THREADS`` where the user
    set none, since torchrun would otherwise set 1 for every worker whatever the CPUs (the workers honour it)."""
    if not env.get("OMP_NUM_THREADS"):
        env["OMP_NUM_THREADS"] = str(plan_threads(None, {**env, "LOCAL_WORLD_SIZE": str(nproc)}).intra_op)


CHECK_EVERY_S = 1.0  # the governor's look at the CPUs: no more often than this
BUSY_SHARE = 0.8  # CPU seconds a second per thread under which this process is not getting its CPUs ...
PREEMPTED_PER_THREAD_S = 50.0  # ... and involuntary context switches a second per thread over which others want them
FREE_CHECKS = 3  # consecutive looks with a CPU free before the threads are taken back


def _usage() -> tuple[float, float]:
    """This process's CPU seconds (all threads) and its involuntary context switches so far."""
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime, float(use.ru_nivcsw)


def _procs_running(stat: Path = Path("/proc/stat")) -> int | None:
    """Threads running or runnable on the machine now (this one included); None where unknown (not Linux)."""
    try:
        for line in stat.read_text().splitlines():
            if line.startswith("procs_running "):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _set_torch_threads(count: int) -> None:
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(count)


class Governor:
    """The automatic thread count, adapted to what other processes leave of the CPUs.

    At ``full`` threads: a look that finds this process using under :data:`BUSY_SHARE` of its threads' CPU time
    while preempted more than :data:`PREEMPTED_PER_THREAD_S` times a second per thread means others compete (a
    process waiting on data or a GPU uses less CPU but is not preempted); it drops to the CPUs it got. Below
    ``full``: when :data:`FREE_CHECKS` looks in a row find a CPU with nothing runnable on it, it goes back.
    """

    def __init__(self, full: int, allowed: int, *, clock: Callable[[], float] = time.perf_counter,
                 usage: Callable[[], tuple[float, float]] = _usage,
                 running: Callable[[], int | None] = _procs_running,
                 apply: Callable[[int], None] = _set_torch_threads) -> None:
        self.full, self.allowed, self.threads = full, allowed, full
        self._clock, self._usage, self._running, self._apply = clock, usage, running, apply
        self._at = clock()
        self._cpu, self._switches = usage()
        self._free = 0
        self.changes: list[tuple[int, str]] = []  # (threads, why), in order

    def tick(self) -> int:
        """Look at the CPUs when :data:`CHECK_EVERY_S` has passed since the last look; the thread count now."""
        now = self._clock()
        elapsed = now - self._at
        if elapsed < CHECK_EVERY_S:
            return self.threads
        cpu, switches = self._usage()
        busy, preempted = (cpu - self._cpu) / elapsed, (switches - self._switches) / elapsed
        self._at, self._cpu, self._switches = now, cpu, switches
        if self.threads == self.full:
            if busy < BUSY_SHARE * self.full and preempted > PREEMPTED_PER_THREAD_S * self.full:
                self._change(max(1, min(self.full - 1, round(busy))),
                             f"other processes compete for these CPUs: this one got {busy:.1f} CPUs of {self.full} "
                             f"and was preempted {preempted:.0f} times a second")
            return self.threads
        running = self._running()
        free = running is not None and self.allowed - running >= 1  # ``running`` counts this thread
        self._free = self._free + 1 if free else 0
        if self._free >= FREE_CHECKS:
            self._change(self.full, f"the CPUs are free again ({FREE_CHECKS} looks in a row)")
        return self.threads

    def _change(self, threads: int, why: str) -> None:
        self.threads, self._free = threads, 0
        self._apply(threads)
        self.changes.append((threads, why))
        log.info("threads: %s: %d thread%s", why, threads, "s" if threads > 1 else "")


_configured: ThreadPlan | None = None
_governor: Governor | None = None


def configure(requested: int | None = None, env: MutableMapping[str, str] = os.environ) -> ThreadPlan:
    """Decide once per process, before torch loads: sets the environment torch, OpenMP, MKL and child processes
    read, and torch's pools if it is already loaded. An automatic count of more than one thread gets a
    :class:`Governor`."""
    global _configured, _governor
    plan = plan_threads(requested, env)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        # what the user said replaces; the automatic share only fills gaps, and only where the libraries' own
        # default (one thread per CPU of the affinity) would be wrong: a quota, a DDP share. A process alone on
        # its CPUs starts exactly as it did before any of this (measured: solo speed).
        if plan.source in ("--threads", ENV) or (plan.source == "auto" and not env.get(name)
                                                 and plan.intra_op != plan.affinity):
            env[name] = str(plan.intra_op)
    torch = sys.modules.get("torch")  # loaded already (a caller in Python): the environment is read, so set it
    if torch is not None:
        torch.set_num_threads(plan.intra_op)
        try:
            torch.set_num_interop_threads(plan.inter_op)
        except RuntimeError:  # its pool already started; torch allows sizing it only once
            log.debug("threads: torch's inter-op pool had started; left at %d", torch.get_num_interop_threads())
    _configured = plan
    _governor = Governor(plan.intra_op, plan.allowed) if plan.source == "auto" and plan.intra_op > 1 else None
    log.debug("%s", plan.describe())
    return plan


def tick() -> int | None:
    """Once per optimiser step: the governor's chance to look at the CPUs (cheap between looks); the thread
    count it chose, None where the count is fixed."""
    return _governor.tick() if _governor is not None else None


def current() -> ThreadPlan:
    """The plan :func:`configure` made, or the environment's own decision where nothing configured it (a library
    caller): what thread pools this process creates later (ONNX Runtime sessions) are sized by."""
    return _configured or plan_threads()
