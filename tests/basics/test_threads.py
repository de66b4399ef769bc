"""Thread pools sized to the CPUs a process may use, and logs without progress bars where there is no terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ofbdeploy import threads
from ofbdeploy.cli import main
from ofbdeploy.errors import InputError
from ofbdeploy.threads import ENV, cgroup_cpu_quota, configure, plan_threads
from ofbdeploy.train.amp import step_all

ROOT = Path(__file__).parents[2]


# -- the decision ---------------------------------------------------------------------------------------------------
def test_the_share_is_the_allowed_cpus_divided_among_local_processes():
    assert plan_threads(env={}, cpus=(8, None)).intra_op == 8
    assert plan_threads(env={}, cpus=(8, 2.5)).intra_op == 2  # a quota of 2.5 CPUs: 2 whole ones
    assert plan_threads(env={}, cpus=(2, 4.0)).intra_op == 2  # affinity is tighter than the quota
    assert plan_threads(env={}, cpus=(8, 0.5)).intra_op == 1  # never below one
    ddp = plan_threads(env={"LOCAL_WORLD_SIZE": "4"}, cpus=(16, 6.0))
    assert (ddp.intra_op, ddp.inter_op, ddp.processes, ddp.allowed) == (1, 1, 4, 6)
    assert plan_threads(env={"LOCAL_WORLD_SIZE": "2"}, cpus=(16, None)).intra_op == 8
    assert plan_threads(env={"LOCAL_WORLD_SIZE": "3"}, cpus=(2, None)).intra_op == 1
    assert plan_threads(env={"LOCAL_WORLD_SIZE": "x"}, cpus=(4, None)).processes == 1


def test_what_the_user_says_wins_in_order():
    env = {ENV: "3", "OMP_NUM_THREADS": "5", "LOCAL_WORLD_SIZE": "2"}
    assert (plan_threads(7, env, cpus=(2, None)).intra_op, plan_threads(7, env, cpus=(2, None)).source) == \
        (7, "--threads")
    assert plan_threads(None, env, cpus=(2, None)).source == ENV and plan_threads(None, env, (2, None)).intra_op == 3
    env.pop(ENV)
    assert plan_threads(None, env, cpus=(2, None)).intra_op == 5  # torch honours it; so do we
    env["OMP_NUM_THREADS"] = "4,2"  # OpenMP's per-level list: the outer level
    assert plan_threads(None, env, cpus=(2, None)).intra_op == 4
    env["OMP_NUM_THREADS"] = ""
    assert plan_threads(None, env, cpus=(8, None)).source == "auto"


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_a_bad_thread_count_in_the_environment_is_refused(value):
    with pytest.raises(InputError, match=f"{ENV}='{value}': expected a whole number of threads"):
        plan_threads(env={ENV: value}, cpus=(2, None))


def test_the_decision_is_logged_in_one_line():
    assert plan_threads(env={}, cpus=(2, None)).describe() == \
        "threads: 2 CPUs allowed (affinity 2, cgroup quota none), 1 process -> 2 intra-op threads"
    assert plan_threads(env={"LOCAL_WORLD_SIZE": "2"}, cpus=(8, 4.0)).describe() == \
        "threads: 4 CPUs allowed (affinity 8, cgroup quota 4 CPUs), 2 processes -> 2 intra-op threads"
    assert plan_threads(3, {}, cpus=(2, None)).describe().startswith("threads: 3 intra-op threads (--threads); 2 CPUs")


# -- cgroup quotas, from fake /proc files -----------------------------------------------------------------------------
def _fake_cgroups(tmp: Path, mounts: list[str], groups: list[str]) -> tuple[Path, Path]:
    (tmp / "mountinfo").write_text("\n".join(mounts) + "\n")
    (tmp / "cgroup").write_text("\n".join(groups) + "\n")
    return tmp / "mountinfo", tmp / "cgroup"


def test_cgroup_v2_quota_of_the_tightest_ancestor(tmp_path):
    fs = tmp_path / "fs"
    (fs / "ci" / "job").mkdir(parents=True)
    (fs / "cpu.max").write_text("max 100000\n")
    (fs / "ci" / "cpu.max").write_text("150000 100000\n")  # the parent limits to 1.5 CPUs
    (fs / "ci" / "job" / "cpu.max").write_text("400000 100000\n")
    files = _fake_cgroups(tmp_path, [f"30 23 0:27 / {fs} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate"], ["0::/ci/job"])
    assert cgroup_cpu_quota(*files) == 1.5
    (fs / "ci" / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(*files) == 4.0
    (fs / "ci" / "job" / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(*files) is None


def test_cgroup_v1_cfs_quota(tmp_path):
    cpu = tmp_path / "cpu"
    (cpu / "docker" / "abc").mkdir(parents=True)
    (cpu / "docker" / "abc" / "cpu.cfs_quota_us").write_text("50000\n")
    (cpu / "docker" / "abc" / "cpu.cfs_period_us").write_text("100000\n")
    mounts = [f"32 31 0:29 / {cpu} rw,relatime - cgroup cgroup rw,cpu,cpuacct",
              f"35 31 0:32 / {tmp_path / 'memory'} rw,relatime - cgroup cgroup rw,memory"]
    files = _fake_cgroups(tmp_path, mounts, ["4:memory:/docker/abc", "2:cpu,cpuacct:/docker/abc", "0::/"])
    assert cgroup_cpu_quota(*files) == 0.5
    (cpu / "docker" / "abc" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(*files) is None


def test_no_cgroup_files_means_no_quota(tmp_path):
    assert cgroup_cpu_quota(tmp_path / "missing", tmp_path / "missing2") is None


# -- applying it ------------------------------------------------------------------------------------------------------
def test_configure_sets_the_environment_and_a_loaded_torch(monkeypatch):
    monkeypatch.setattr(threads, "_configured", None)
    before = torch.get_num_threads()
    env = {"OMP_WAIT_POLICY": "ACTIVE", "MKL_NUM_THREADS": "9"}
    try:
        plan = configure(1, env)
        assert torch.get_num_threads() == 1 and threads.current() is plan
    finally:
        torch.set_num_threads(before)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the user's policy
    env = {"MKL_NUM_THREADS": "9"}
    monkeypatch.setattr(threads, "plan_threads", lambda requested, env: plan_threads(requested, env, (4, 2.0)))
    try:
        configure(None, env)
    finally:
        torch.set_num_threads(before)
    assert env == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "9"}  # fills gaps only; OpenMP's wait is left alone
    env = {}
    monkeypatch.setattr(threads, "plan_threads", lambda requested, env: plan_threads(requested, env, (2, None)))
    try:
        configure(None, env)
    finally:
        torch.set_num_threads(before)
    assert env == {}  # alone on its CPUs: the libraries' own default, untouched
    assert threads._governor is not None and threads._governor.full == 2  # an automatic count adapts ...
    configure(None, {"OMP_NUM_THREADS": "2"})
    assert threads._governor is None and threads.tick() is None  # ... one the user set does not


def test_the_launcher_gives_each_worker_its_share(monkeypatch):
    """torchrun would set OMP_NUM_THREADS=1 for every worker; the project's launcher sets each worker's share."""
    monkeypatch.setattr(threads, "affinity_cpus", lambda: 8)
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: 6.0)
    env: dict[str, str] = {}
    threads.share_for_workers(2, env)
    assert env == {"OMP_NUM_THREADS": "3"}
    env = {"OMP_NUM_THREADS": "5"}
    threads.share_for_workers(2, env)
    assert env == {"OMP_NUM_THREADS": "5"}  # the user's choice stays


def _cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", ENV)}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def test_the_cli_applies_it_before_torch_loads():
    """``--threads`` reaches torch's OpenMP, whose wait stays the library's own (libgomp prints its settings when it
    loads)."""
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True,
                           env=_cli_env(OMP_DISPLAY_ENV="VERBOSE"))
    if "GOMP_SPINCOUNT" not in probe.stderr:
        pytest.skip("torch's OpenMP runtime is not libgomp here; it does not display its wait settings")
    proc = subprocess.run([sys.executable, "-m", "ofbdeploy", "--threads", "1", "selfcheck", "--trials", "0"],
                          capture_output=True, text=True, env=_cli_env(OMP_DISPLAY_ENV="VERBOSE"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "OMP_NUM_THREADS = '1'" in proc.stderr and "GOMP_SPINCOUNT = '0'" not in proc.stderr
    user_policy = subprocess.run([sys.executable, "-m", "ofbdeploy", "selfcheck", "--trials", "0"],
                                 capture_output=True, text=True, timeout=300,
                                 env=_cli_env(OMP_DISPLAY_ENV="VERBOSE", OMP_WAIT_POLICY="ACTIVE"))
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in user_policy.stderr  # a policy the user chose stays


def test_a_bad_threads_value_is_exit_2_in_one_line(monkeypatch):
    monkeypatch.setenv(ENV, "lots")
    result = CliRunner().invoke(main, ["info", "nowhere"])
    assert result.exit_code == 2 and "OFBDEPLOY_THREADS='lots'" in result.output
    monkeypatch.delenv(ENV)
    result = CliRunner().invoke(main, ["--threads", "0", "info", "nowhere"])
    assert result.exit_code == 2 and "--threads" in result.output


# -- logs CI can read -------------------------------------------------------------------------------------------------
def test_a_run_without_a_terminal_logs_lines_not_progress_bars(tmp_path, tiny_recipe):
    """stderr redirected to a file (as CI runs it, without --no-progress): no carriage-return bar updates, the same
    per-epoch lines as --no-progress, and the thread decision in run.log."""
    tiny_recipe("tty", limit_train=64)
    with (tmp_path / "stderr.txt").open("w") as err:
        proc = subprocess.run([sys.executable, "-m", "ofbdeploy", "--threads", "1", "run", str(tmp_path / "r.yaml")],
                              stdout=subprocess.DEVNULL, stderr=err, env=_cli_env(), timeout=600)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 0, stderr[-2000:]
    assert "\r" not in stderr and "it/s" not in stderr
    assert "search epoch 1/1" in stderr and "finetune epoch 1/1" in stderr
    log = (tmp_path / "run" / "run.log").read_text()
    assert "threads: 1 intra-op threads (--threads)" in log and "\r" not in log
    assert json.loads((tmp_path / "run" / "report.json").read_text())["flops_ratio"] <= 0.5


# -- the governor -----------------------------------------------------------------------------------------------------
class _Machine:
    """A clock, this process's CPU use and preemptions, and the machine's runnable threads, all made up."""

    def __init__(self) -> None:
        self.now, self.cpu, self.switches, self.running = 0.0, 0.0, 0.0, 1
        self.applied: list[int] = []

    def second(self, busy: float, preempted: float, running: int = 1) -> None:
        self.now += 1.0
        self.cpu += busy
        self.switches += preempted
        self.running = running

    def governor(self, full: int = 2, allowed: int = 2) -> threads.Governor:
        return threads.Governor(full, allowed, clock=lambda: self.now, usage=lambda: (self.cpu, self.switches),
                                running=lambda: self.running, apply=self.applied.append)


def test_the_governor_gives_up_threads_while_others_compete_and_takes_them_back():
    m = _Machine()
    gov = m.governor()
    m.second(busy=1.98, preempted=60)  # alone: every thread busy, few preemptions
    assert gov.tick() == 2
    m.now += 0.5
    assert gov.tick() == 2  # between looks: nothing read
    m.second(busy=1.1, preempted=400, running=4)  # another run started: half the CPU time, preempted all along
    assert gov.tick() == 1 and m.applied == [1]
    m.second(busy=1.0, preempted=5, running=2)  # the other run is still there
    assert gov.tick() == 1
    for _ in range(threads.FREE_CHECKS - 1):
        m.second(busy=1.0, preempted=5, running=1)  # it finished: a CPU is free
        assert gov.tick() == 1
    m.second(busy=1.0, preempted=5, running=1)
    assert gov.tick() == 2 and m.applied == [1, 2]
    assert [why.split(" ")[0] for _, why in gov.changes] == ["other", "the"]


def test_a_process_waiting_on_data_keeps_its_threads():
    """Low CPU use without preemptions is this process waiting (data, a GPU), not others competing."""
    m = _Machine()
    gov = m.governor(full=4, allowed=4)
    for _ in range(5):
        m.second(busy=1.5, preempted=20)
        assert gov.tick() == 4
    assert m.applied == [] and gov.changes == []


def test_a_free_cpu_must_be_seen_in_a_row():
    m = _Machine()
    gov = m.governor(full=4, allowed=4)
    m.second(busy=2.2, preempted=900, running=8)
    assert gov.tick() == 2  # the CPUs it got
    for running in (1, 1, 5, 1, 1):  # one busy look resets the count
        m.second(busy=2.0, preempted=10, running=running)
        assert gov.tick() == 2
    m.second(busy=2.0, preempted=10, running=1)
    assert gov.tick() == 4


def test_the_governor_reads_this_machine():
    cpu, switches = threads._usage()
    running = threads._procs_running()
    assert cpu > 0 and switches >= 0
    assert running is None or running >= 1  # this thread is running while it reads


def test_every_training_step_reaches_the_governor(monkeypatch):
    """The loops step through ``step_all``; a governed process looks at the CPUs there."""
    looks: list[int] = []
    monkeypatch.setattr(threads, "_governor", type("G", (), {"tick": lambda self: looks.append(1) or 2})())
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.ones(1, 2)).sum().backward()
    step_all([opt], None)
    assert looks == [1]
