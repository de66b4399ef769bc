"""Runs that meet each other or a signal: two runs into one directory, a busy or stale lock, Ctrl-C, SIGTERM
and SIGKILL with a later resume, and the same under ``python -m ofbdeploy.torchrun``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from .harness import TINY, Proc, Workspace, case, consistent, subprocess_proc


@case("signals", "two runs started together into one new directory", 2)
def _two_new(ws):
    where = ws.new_dir("race")
    recipe = ws.recipe(where)
    procs = [ws.popen("run", recipe, "--no-progress") for _ in range(2)]
    outcomes = [(p, p.communicate(timeout=600)[1]) for p in procs]
    codes = sorted(p.returncode for p, _ in outcomes)
    loser = next((err for p, err in outcomes if p.returncode != 0), "")
    ok, note = consistent(where / "run")
    result = Proc(codes[-1], "", loser, 0.0)
    return result, ok and codes == [0, 2], f"exit codes {codes}; {note}"


@case("signals", "a second run into a busy directory", 2)
def _busy(ws):
    run = ws.finished()
    (run / "metrics.json").unlink()
    slow = ws.popen("run", run / "recipe.yaml", "--output", run, "--no-progress", "--set", "finetune.epochs=400")
    deadline = time.time() + 120
    while time.time() < deadline and "finetune epoch 1/400" not in (run / "run.log").read_text():
        time.sleep(0.3)
    second = ws.rerun(run)
    slow.send_signal(signal.SIGINT)
    slow.communicate(timeout=120)
    ok, note = consistent(run)
    return second, ok and "in use by pid" in second.last_line, f"first run stopped with {slow.returncode}; {note}"


@case("signals", "stale lock of a SIGKILLed run taken over", 0)
def _stale_lock(ws):
    run = ws.finished()
    (run / "metrics.json").unlink()
    victim = ws.popen("run", run / "recipe.yaml", "--output", run, "--no-progress", "--set", "finetune.epochs=400")
    deadline = time.time() + 120
    while time.time() < deadline and "finetune epoch 1/400" not in (run / "run.log").read_text():
        time.sleep(0.3)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    lock_left = (run / "run.lock").exists()
    result = ws.rerun(run)
    ok, note = consistent(run)
    return result, ok and lock_left, f"lock file left by the killed run: {lock_left}; {note}"


def interrupt_case(ws: Workspace, sig: int, marker: str, epochs: dict) -> tuple[Proc, bool, str]:
    """Stop a real run with ``sig``; the directory must be consistent and a later run must finish it."""
    where = ws.new_dir("interrupt")
    recipe = ws.recipe(where, **epochs)
    proc = ws.popen("run", recipe, "--no-progress")
    log = where / "run" / "run.log"
    deadline = time.time() + 180
    while time.time() < deadline and not (log.is_file() and marker in log.read_text()):
        time.sleep(0.2)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    ok, note = consistent(where / "run")
    again = ws.cli("run", recipe, "--no-progress", "--set", "search.epochs=3", "--set", "finetune.epochs=3")
    ok2, note2 = consistent(where / "run")
    return Proc(proc.returncode, "", stderr, 0.0), ok and ok2 and again.code == 0, \
        f"after the signal: {note}; a later run exits {again.code} ({note2})"


case("signals", "Ctrl-C (SIGINT) during the search", 130)(
    lambda ws: interrupt_case(ws, signal.SIGINT, "search epoch 2/", {"search": {**TINY["search"], "epochs": 3000}}))
case("signals", "SIGTERM during the finetune", 130)(
    lambda ws: interrupt_case(ws, signal.SIGTERM, "finetune epoch 2/", {"finetune": {**TINY["finetune"],
                                                                                     "epochs": 3000}}))


@case("signals", "SIGKILL mid-search, then --resume with fewer (but enough) epochs", 0)
def _killed(ws):
    where = ws.new_dir("killed")
    recipe = ws.recipe(where, search={**TINY["search"], "epochs": 3000})
    proc = ws.popen("run", recipe, "--no-progress")
    log = where / "run" / "run.log"
    deadline = time.time() + 180
    while time.time() < deadline and not (log.is_file() and "search epoch 3/" in log.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = ws.cli("run", recipe, "--resume", "--no-progress", "--set", "search.epochs=12")
    ok, note = consistent(where / "run")
    return result, ok, note



def torchrun_interrupt(ws: Workspace, launcher: list[str]) -> tuple[Proc, bool, str]:
    where = ws.new_dir("torchrun")
    recipe = ws.recipe(where, search={**TINY["search"], "epochs": 3000})
    proc = subprocess.Popen([sys.executable, "-m", *launcher, "--standalone", "--nproc_per_node", "2",
                             "-m", "ofbdeploy", "run", str(recipe), "--no-progress"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=ws.env, start_new_session=True)
    log = where / "run" / "run.log"
    deadline = time.time() + 240
    while time.time() < deadline and not (log.is_file() and "search epoch 2/" in log.read_text()):
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    _, stderr = proc.communicate(timeout=180)
    ok, note = consistent(where / "run")
    workers = stderr.count("interrupted: finished stages")
    return Proc(proc.returncode, "", stderr, 0.0), ok, f"{note}; {workers} worker(s) said 'interrupted'"


case("signals", "Ctrl-C under python -m ofbdeploy.torchrun (2 processes)", 130)(
    lambda ws: torchrun_interrupt(ws, ["ofbdeploy.torchrun"]))
case("signals", "bad recipe under python -m ofbdeploy.torchrun", 2)(
    lambda ws: (subprocess_proc(ws, ["-m", "ofbdeploy.torchrun", "--standalone", "--nproc_per_node", "2", "-m",
                                     "ofbdeploy", "run", str(ws.root / "missing.yaml")]), True, ""))
