"""The harness every hostile case shares: the scratch workspace, one CLI subprocess per case, the contract's
checks on what came back (exit code, one error line, no traceback, run directory intact) and the case registry."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[3]
PICO = "ofb_vit_pico_patch4_32"
TINY = {
    "name": "tiny", "seed": 1, "device": "cpu",
    "model": {"name": PICO, "img_size": 16},
    "data": {"kind": "synthetic", "limit_train": 64, "limit_val": 32, "batch_size": 32, "eval_batch_size": 32},
    "search": {"target_flops_ratio": 0.5, "epochs": 2, "warmup_epochs": 0, "arch_lr": 0.3,
               "loss_weights": {"flops": 50.0}},
    "finetune": {"epochs": 2, "warmup_epochs": 0},
    "export": {"check_images": 8},
    "profile": {"batches": [1], "repeats": 5, "warmup": 1},
    "budget": {"max_gflops": 1.0, "speedup": [{"backend": "ort-cpu", "batch": 1, "min": 0.01}]},
}


@dataclass
class Outcome:
    category: str
    case: str
    expected: int | tuple[int, ...]  # a tuple where the contract allows a documented choice
    got: int | None
    one_line: bool
    traceback: bool
    intact: bool
    note: str
    seconds: float

    @property
    def ok(self) -> bool:
        allowed = self.expected if isinstance(self.expected, tuple) else (self.expected,)
        return self.got in allowed and self.one_line and not self.traceback and self.intact


@dataclass
class Proc:
    code: int
    stdout: str
    stderr: str
    peak_rss_mb: float

    @property
    def last_line(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ""


class Workspace:
    """Scratch files and a finished tiny run shared (copied) by the cases."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        self.counter = 0

    def new_dir(self, name: str) -> Path:
        self.counter += 1
        path = self.root / f"{self.counter:03d}-{name}"
        path.mkdir()
        return path

    def cli(self, *args: str) -> Proc:
        """Run ``python -m ofbdeploy ARGS``; the peak memory is this child's own (wait4's rusage)."""
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen([sys.executable, "-m", "ofbdeploy", *map(str, args)], stdout=out, stderr=err,
                                    text=True, env=self.env)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0)
            err.seek(0)
            return Proc(proc.returncode, out.read(), err.read(), usage.ru_maxrss / 1024)

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "ofbdeploy", *map(str, args)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=self.env)

    def recipe(self, where: Path, out: Path | None = None, **sections) -> Path:
        data = json.loads(json.dumps(TINY))
        data.update(sections)
        data["output_dir"] = str(out or where / "run")
        path = where / "recipe.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    def checkpoint(self, path: Path, seed: int = 3) -> Path:
        import timm
        import torch
        from safetensors.torch import save_file

        import ofbdeploy.models.zoo  # noqa: F401

        torch.manual_seed(seed)
        save_file(timm.create_model(PICO, img_size=16).state_dict(), str(path))
        return path

    def finished(self) -> Path:
        """A copy of the finished run (built once)."""
        base = self.root / "base"
        if not (base / "run" / "report.json").is_file():
            base.mkdir(exist_ok=True)
            ckpt = self.checkpoint(base / "w.safetensors")
            recipe = self.recipe(base, model={**TINY["model"], "checkpoint": str(ckpt)})
            result = self.cli("run", recipe, "--no-progress")
            if result.code != 0:
                raise SystemExit(f"the base run failed:\n{result.stderr[-3000:]}")
        copy = self.new_dir("run") / "run"
        shutil.copytree(base / "run", copy)
        recipe = yaml.safe_load((copy / "recipe.yaml").read_text())
        recipe["output_dir"] = str(copy)
        (copy / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))  # output_dir is not recorded
        return copy

    def rerun(self, run: Path, *args: str) -> Proc:
        return self.cli("run", run / "recipe.yaml", "--output", run, "--no-progress", *args)


def snapshot(path: Path) -> dict[str, bytes]:
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != "run.log"}


def consistent(run: Path) -> tuple[bool, str]:
    """Every stage recorded done has its artifacts intact, no lock or half-written file is left."""
    from ofbdeploy.run.rundir import StageBook

    book = StageBook(run)
    records, problem = book.load()
    if problem:
        return False, problem
    for stage, record in records.items():
        bad = book._artifact_problem(record.get("artifacts"))
        if bad:
            return False, f"{stage}: {bad}"
    leftovers = [p.name for p in run.rglob(".*.tmp")]
    if (run / "run.lock").exists() or leftovers:
        return False, f"left behind: {'run.lock' if (run / 'run.lock').exists() else ''} {leftovers}"
    return True, f"{len(records)} stages recorded, all intact"


CASES: list[tuple[str, str, int | tuple[int, ...], Callable[[Workspace], tuple[Proc, bool, str]]]] = []


def case(category: str, name: str, expected: int | tuple[int, ...]):
    def register(fn):
        CASES.append((category, name, expected, fn))
        return fn
    return register


def refused_untouched(ws: Workspace, run: Path, *args: str) -> tuple[Proc, bool, str]:
    before = snapshot(run)
    result = ws.cli(*args)
    same = snapshot(run) == before
    return result, same, "run directory unchanged" if same else "run directory CHANGED"


def bad_recipe_file(ws: Workspace, name: str, content: bytes) -> tuple[Proc, bool, str]:
    where = ws.new_dir(name)
    (where / "r.yaml").write_bytes(content)
    result = ws.cli("run", where / "r.yaml")
    return result, not (where / "run").exists(), f"peak RSS {result.peak_rss_mb:.0f} MB"


def recipe_with(ws: Workspace, name: str, **sections) -> tuple[Proc, bool, str]:
    where = ws.new_dir(name)
    result = ws.cli("run", ws.recipe(where, **sections))
    return result, not (where / "run").exists(), "nothing written" if not (where / "run").exists() else "run dir made"


def subprocess_proc(ws: Workspace, args: list[str]) -> Proc:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ws.env, timeout=600)
    return Proc(proc.returncode, proc.stdout, proc.stderr, 0.0)


def run_case(ws: Workspace, category: str, name: str, expected: int | tuple[int, ...], fn) -> Outcome:
    t0 = time.perf_counter()
    try:
        result, intact, note = fn(ws)
    except Exception as err:  # the harness itself failed: record it as not handled
        return Outcome(category, name, expected, None, False, False, False, f"harness: {err!r}"[:200],
                       time.perf_counter() - t0)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith(("error:", "limit missed:", "internal error:",
                                                              "interrupted"))]
    one = result.code == 0 or (bool(error_lines) and lines[-1] == error_lines[-1]
                               and len(set(error_lines)) == 1)  # under torchrun: the same line from each worker
    shown = (result.last_line or "(no stderr)")[:160]
    return Outcome(category, name, expected, result.code, one, "Traceback" in result.stderr, intact,
                   f"{shown} | {note}" if note else shown, time.perf_counter() - t0)
