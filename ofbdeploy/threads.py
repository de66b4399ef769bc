"""How many CPU threads this process uses, so that runs sharing a machine do not fight over its cores.

A process sizes its thread pools for the CPUs it may actually use: its CPU affinity, capped by a cgroup CPU quota
(v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``; a container's ``--cpus``), divided among the local processes of a DDP
run (``LOCAL_WORLD_SIZE``). What a user says wins: ``ofbdeploy --threads N``, then ``OFBDEPLOY_THREADS``, then
``OMP_NUM_THREADS`` (which torch itself honours, and which plain ``torchrun`` sets to 1).

Idle OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE`` unless the user set a policy): two
runs on one machine otherwise burn each other's cores while waiting. OpenMP reads that policy, and torch reads
``OMP_NUM_THREADS``, when torch is loaded, so :func:`configure` runs before the first ``import torch`` (the CLI
calls it first thing) and only touches torch directly when it is already loaded. Nothing here imports torch: the
CLI answers ``--help`` and refuses bad input without loading it.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Mapping, MutableMapping
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


_configured: ThreadPlan | None = None


def configure(requested: int | None = None, env: MutableMapping[str, str] = os.environ) -> ThreadPlan:
    """Decide once per process, before torch loads: sets the environment torch, OpenMP, MKL and child processes
    read (the passive wait policy only where the user chose none), and torch's pools if it is already loaded."""
    global _configured
    plan = plan_threads(requested, env)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if plan.source in ("--threads", ENV) or (plan.source == "auto" and not env.get(name)):
            env[name] = str(plan.intra_op)  # what the user said replaces; the automatic share only fills gaps
    torch = sys.modules.get("torch")  # loaded already (a caller in Python): the environment is read, so set it
    if torch is not None:
        torch.set_num_threads(plan.intra_op)
        try:
            torch.set_num_interop_threads(plan.inter_op)
        except RuntimeError:  # its pool already started; torch allows sizing it only once
            log.debug("threads: torch's inter-op pool had started; left at %d", torch.get_num_interop_threads())
    _configured = plan
    log.debug("%s; OMP_WAIT_POLICY=%s", plan.describe(), env["OMP_WAIT_POLICY"])
    return plan


def current() -> ThreadPlan:
    """The plan :func:`configure` made, or the environment's own decision where nothing configured it (a library
    caller): what thread pools this process creates later (ONNX Runtime sessions) are sized by."""
    return _configured or plan_threads()
