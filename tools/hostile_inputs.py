"""Hostile inputs and faults against the real `ofbdeploy` CLI (one subprocess each), with what happened.

Each case builds its input in a scratch workspace, runs the command, and records the exit code against
the one the contract asks for (0 ok, 1 limit missed, 2 bad input, 3 internal error, 130 interrupted),
whether stderr ended with exactly one error line and no traceback, and whether the run directory it
touched is intact (unchanged when the command was refused; consistent and complete when it ran).

    python tools/hostile_inputs.py --json hostile.json           # every case (about 10 minutes on 2 cores)
    python tools/hostile_inputs.py --only recipe --only paths    # some categories

Prints a markdown table; exits 1 when any case is not handled as expected.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
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


# -- recipes ---------------------------------------------------------------------------------------------
BOMB = "\n".join(['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
                 + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
                 + ["model: {name: *a9}", "data: {kind: synthetic}", "search: {target_flops_ratio: 0.5}"])
for _name, _content in [
    ("non-UTF-8 bytes", b"name: \xff\xfe\nmodel: {name: x}\n"),
    ("alias bomb used as a value", BOMB.encode()),
    ("recursive alias", b"a: &a [*a]\n"),
    ("2 MiB file", b"# " + b"x" * (2 << 20)),
    ("nesting 5000 deep", b"[" * 5000),
    ("empty file", b""),
    ("a list, not a mapping", b"- a\n- b\n"),
    ("python object tag", b"model: !!python/object/apply:os.system ['touch /tmp/pwned']\n"),
    ("two YAML documents", b"name: a\n---\nname: b\n"),
    ("tab indentation", b"model:\n\tname: x\n"),
]:
    case("recipe", _name, 2)(lambda ws, n=_name, c=_content: bad_recipe_file(ws, n.replace(" ", "-"), c))

case("recipe", "unknown key (typo)", 2)(lambda ws: recipe_with(ws, "typo", search={**TINY["search"], "epocs": 3}))
case("recipe", "wrong type", 2)(lambda ws: recipe_with(ws, "type", search={**TINY["search"], "epochs": "many"}))
case("recipe", "NaN learning rate", 2)(lambda ws: recipe_with(ws, "nan", search={**TINY["search"], "lr": float("nan")}))
case("recipe", "infinite learning rate", 2)(
    lambda ws: recipe_with(ws, "inf", finetune={**TINY["finetune"], "lr": float("inf")}))
case("recipe", "NUL in the model name", 2)(lambda ws: recipe_with(ws, "nul", model={"name": "ofb\x00vit"}))
case("recipe", "negative seed", 2)(lambda ws: recipe_with(ws, "seed", seed=-1))
case("recipe", "budget that cannot be met", 2)(
    lambda ws: recipe_with(ws, "budget", search={**TINY["search"], "target_flops_ratio": 0.001}))


@case("recipe", "extends itself", 2)
def _extends_itself(ws):
    where = ws.new_dir("extends")
    (where / "r.yaml").write_text("extends: r.yaml\nname: x\n")
    return ws.cli("run", where / "r.yaml"), True, ""


@case("recipe", "extends a missing file", 2)
def _extends_missing(ws):
    where = ws.new_dir("extends-missing")
    (where / "r.yaml").write_text("extends: nowhere.yaml\nname: x\n")
    return ws.cli("run", where / "r.yaml"), True, ""


@case("recipe", "recipe path is a directory", 2)
def _recipe_dir(ws):
    return ws.cli("run", ws.new_dir("dir")), True, ""


@case("recipe", "--set without '='", 2)
def _set_no_eq(ws):
    where = ws.new_dir("set")
    return ws.cli("run", ws.recipe(where), "--set", "search.epochs"), not (where / "run").exists(), ""


@case("recipe", "--set into a value that is not a section", 2)
def _set_not_section(ws):
    where = ws.new_dir("set2")
    return ws.cli("run", ws.recipe(where), "--set", "model.name.x=1"), not (where / "run").exists(), ""


@case("recipe", "--set alias bomb", 2)
def _set_bomb(ws):
    where = ws.new_dir("set3")
    nested = "&b [" + ",".join(["*a"] * 10) + "]"
    value = f"[&a [1,1,1,1,1,1,1,1,1,1], {nested}, &c [{','.join(['*b'] * 10)}], &d [{','.join(['*c'] * 10)}], " \
            f"&e [{','.join(['*d'] * 10)}], [{','.join(['*e'] * 10)}]]"
    return ws.cli("run", ws.recipe(where), "--set", f"model.overrides.x={value}"), not (where / "run").exists(), ""


# -- CLI options ---------------------------------------------------------------------------------------------
for _name, _args in [
    ("export --opset 11", ["export", ".", "--opset", "11"]),
    ("profile --repeats 0", ["profile", ".", "--repeats", "0"]),
    ("lut build --batch 0", ["lut", "build", "--model", PICO, "--batch", "0"]),
    ("lut build --img-size 0", ["lut", "build", "--model", PICO, "--img-size", "0"]),
    ("profile --batch 0,1", ["profile", ".", "--batch", "0,1"]),
    ("profile --batch 1,x", ["profile", ".", "--batch", "1,x"]),
    ("export --batch-range 64,16,1", ["export", ".", "--batch-range", "64,16,1"]),
    ("selfcheck --trials -1", ["selfcheck", "--trials", "-1"]),
    ("unknown command", ["frobnicate"]),
    ("unknown option", ["run", "r.yaml", "--frobnicate"]),
    ("profile --backend ort-cuda on a CPU machine (lut build)", ["lut", "build", "--model", PICO, "--backend",
                                                                  "ort-cuda"]),
]:
    case("options", _name, 2)(lambda ws, a=_args: (ws.cli(*a), True, ""))


# -- output paths ------------------------------------------------------------------------------------------
@case("paths", "run --output naming an existing file", 2)
def _out_file(ws):
    where = ws.new_dir("outfile")
    (where / "f").write_text("mine")
    result = ws.cli("run", ws.recipe(where), "--output", where / "f")
    return result, (where / "f").read_text() == "mine", "file untouched"


@case("paths", "run --output below a file", 2)
def _out_below_file(ws):
    where = ws.new_dir("outbelow")
    (where / "f").write_text("mine")
    return ws.cli("run", ws.recipe(where), "--output", where / "f" / "run"), True, ""


@case("paths", "run --output in /proc (unwritable)", 2)
def _out_proc(ws):
    return ws.cli("run", ws.recipe(ws.new_dir("outproc")), "--output", "/proc/ofbdeploy-run"), True, ""


@case("paths", "run --output a non-empty foreign directory", 2)
def _out_foreign(ws):
    where = ws.new_dir("outforeign")
    (where / "home").mkdir()
    (where / "home" / "notes.txt").write_text("mine")
    result = ws.cli("run", ws.recipe(where), "--output", where / "home")
    return result, [p.name for p in (where / "home").iterdir()] == ["notes.txt"], "directory untouched"


@case("options", "check --tolerance 150%", 2)
def _tolerance(ws):
    run = ws.finished()
    return refused_untouched(ws, run, "check", run, "--tolerance", "150%")


@case("paths", "check --write-baseline into a directory", 2)
def _wb_dir(ws):
    run = ws.finished()
    return refused_untouched(ws, run, "check", run, "--write-baseline", run.parent)


@case("paths", "check --write-baseline in /proc", 2)
def _wb_proc(ws):
    run = ws.finished()
    return refused_untouched(ws, run, "check", run, "--write-baseline", "/proc/ofb-baseline.json")


@case("paths", "selfcheck --save naming a file", 2)
def _save_file(ws):
    where = ws.new_dir("savefile")
    (where / "f").write_text("mine")
    return ws.cli("selfcheck", "--trials", "0", "--save", where / "f"), (where / "f").read_text() == "mine", ""


@case("paths", "lut build --cache-dir naming a file", 2)
def _cache_file(ws):
    where = ws.new_dir("cachefile")
    (where / "f").write_text("mine")
    return ws.cli("lut", "build", "--model", PICO, "--cache-dir", where / "f"), True, ""


@case("paths", "info on a missing path", 2)
def _info_missing(ws):
    return ws.cli("info", ws.root / "nowhere"), True, ""


@case("paths", "export on a directory that is neither a run nor a model", 2)
def _export_other(ws):
    return ws.cli("export", ws.new_dir("empty")), True, ""


# -- models and constructor overrides --------------------------------------------------------------------------
for _name, _model in [
    ("overrides: unknown argument", {"name": PICO, "overrides": {"no_such_argument": 1}}),
    ("overrides: impossible argument (3 heads of 64)", {"name": PICO, "overrides": {"num_heads": 3}}),
    ("overrides: a model that cannot be allocated", {"name": PICO, "overrides": {"embed_dim": 100000, "depth": 48}}),
    ("overrides: pretrained=true (hub)", {"name": PICO, "overrides": {"pretrained": True}}),
    ("overrides: depth 0", {"name": PICO, "overrides": {"depth": 0}}),
    ("a CNN name (resnet18)", {"name": "resnet18"}),
    ("a hybrid ViT with a CNN stem", {"name": "vit_tiny_r_s16_p8_224", "img_size": 32}),
    ("a misspelt model name", {"name": "deit_smal_patch16_224"}),
    ("a hub model name", {"name": "hf-hub:timm/deit_small_patch16_224"}),
    ("a distilled DeiT (two heads)", {"name": "deit_tiny_distilled_patch16_224", "img_size": 32}),
    ("a ViT with register tokens", {"name": "vit_little_patch16_reg4_gap_256", "img_size": 32}),
    ("a ViT with a pre-norm (CLIP)", {"name": "vit_base_patch32_clip_224", "img_size": 32}),
    ("model.img_size 10**6", {"name": PICO, "img_size": 1000000}),
]:
    case("models", _name, 2)(lambda ws, m=_model, n=_name: recipe_with(ws, "model", model=m))

case("models", "selfcheck --model resnet18", 2)(lambda ws: (ws.cli("selfcheck", "--model", "resnet18"), True, ""))
case("models", "lut build --model with a CNN stem", 2)(
    lambda ws: (ws.cli("lut", "build", "--model", "vit_tiny_r_s16_p8_224", "--img-size", "32"), True, ""))


# -- checkpoints -------------------------------------------------------------------------------------------------
def checkpoint_into_finished_run(ws: Workspace, name: str, make: Callable[[Path], None]) -> tuple[Proc, bool, str]:
    """The issue's case: a run of a finished directory rejected for its checkpoint must leave it (and the
    gate on it) as it was."""
    run = ws.finished()
    bad = run.parent / name
    make(bad)
    before = snapshot(run)
    result = ws.rerun(run, "--set", f"model.checkpoint={bad}", "--set", "budget.max_gflops=0.0000001")
    gate = ws.cli("check", run)
    same = snapshot(run) == before
    return result, same and gate.code == 0, f"run unchanged: {same}; check afterwards exits {gate.code}"


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {tempfile.gettempdir()}/ofbdeploy-pwned",))


for _name, _file, _make in [
    ("a text file named .pth", "text.pth", lambda p: p.write_text("not a checkpoint\n")),
    ("an empty .pth", "empty.pth", lambda p: p.write_bytes(b"")),
    ("random bytes named .safetensors", "rand.safetensors", lambda p: p.write_bytes(os.urandom(4096))),
    ("a pickle that runs a command", "evil.pth", lambda p: p.write_bytes(pickle.dumps({"model": _Evil()}))),
    ("a directory named .pth", "dir.pth", lambda p: p.mkdir()),
    ("a .txt checkpoint", "w.txt", lambda p: p.write_text("x")),
]:
    case("checkpoints", _name, 2)(lambda ws, f=_file, m=_make: checkpoint_into_finished_run(ws, f, m))


@case("checkpoints", "weights of another model (shapes differ)", 2)
def _other_weights(ws):
    import timm
    import torch

    def make(path):
        torch.save(timm.create_model("vit_tiny_patch16_224", img_size=32).state_dict(), path)

    return checkpoint_into_finished_run(ws, "other.pth", make)


@case("checkpoints", "weights holding NaN", 2)
def _nan_weights(ws):
    from safetensors.torch import load_file, save_file

    def make(path):
        state = load_file(str(ws.root / "base" / "w.safetensors"))
        state["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
        save_file(state, str(path))

    return checkpoint_into_finished_run(ws, "nan.safetensors", make)


# -- data ------------------------------------------------------------------------------------------------------
def imagefolder(ws: Workspace, name: str, classes: int, corrupt: bool = False) -> Path:
    import numpy as np
    from PIL import Image

    root = ws.new_dir(name) / "images"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(12):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
                    root / split / f"class{c}" / f"{i}.jpg")
    if corrupt:
        (root / "train" / "class0" / "3.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def data_case(ws: Workspace, name: str, data: dict) -> tuple[Proc, bool, str]:
    where = ws.new_dir(name)
    out = where / "run"
    result = ws.cli("run", ws.recipe(where, data=data, export={"enabled": False}, profile={"enabled": False},
                                     budget={}))
    ok, note = consistent(out) if out.exists() else (True, "nothing written")
    report = out / "report.json"
    if report.is_file():
        top1 = json.loads(report.read_text()).get("top1_pruned")
        note += f"; finished with top-1 {top1}"
    return result, ok, note


case("data", "fashion_mnist root missing", 2)(
    lambda ws: data_case(ws, "fmnist", {"kind": "fashion_mnist", "root": "/nonexistent/fmnist"}))
case("data", "imagefolder root missing", 2)(
    lambda ws: data_case(ws, "if-missing", {"kind": "imagefolder", "root": "/nonexistent/images"}))
case("data", "imagefolder with one class (issue 10 refuses it)", 2)(
    lambda ws: data_case(ws, "if-one", {"kind": "imagefolder", "root": str(imagefolder(ws, "one", 1)),
                                        "batch_size": 4, "eval_batch_size": 4}))
case("data", "imagefolder with a corrupt JPEG (issue 10: skipped and counted, or refused)", (0, 2))(
    lambda ws: data_case(ws, "if-corrupt", {"kind": "imagefolder", "root": str(imagefolder(ws, "bad", 2, True)),
                                            "batch_size": 4, "eval_batch_size": 4}))
case("data", "imagefolder that is empty", 2)(
    lambda ws: data_case(ws, "if-empty", {"kind": "imagefolder", "root": str(ws.new_dir("emptyimgs"))}))
case("data", "batch_size larger than the training split", 2)(
    lambda ws: data_case(ws, "bigbatch", {**TINY["data"], "batch_size": 4096}))


# -- baselines and the CI gate --------------------------------------------------------------------------------
def baseline_case(ws: Workspace, edit: Callable[[dict], object], raw: bool = False) -> tuple[Proc, bool, str]:
    run = ws.finished()
    base = run.parent / "baseline.json"
    made = ws.cli("check", run, "--write-baseline", base)
    if made.code != 0:
        return made, False, "could not write the baseline"
    data = json.loads(base.read_text())
    new = edit(data)
    base.write_bytes(new if raw else json.dumps(new).encode())
    return refused_untouched(ws, run, "check", run, "--baseline", base)


def _rows(data, **change):
    return {**data, "rows": [{**data["rows"][0], **change}]}


for _name, _code, _edit, _raw in [
    ("baseline {'foo': 1}", 2, lambda d: {"foo": 1}, False),
    ("baseline with no rows", 2, lambda d: {**d, "rows": []}, False),
    ("baseline of another model", 2, lambda d: {**d, "model": "deit_small_patch16_224"}, False),
    ("baseline of another recipe", 2, lambda d: {**d, "identity": "0" * 64}, False),
    ("baseline of an older format", 2, lambda d: {**d, "format": "ofbdeploy.baseline/1"}, False),
    ("baseline that is not JSON", 2, lambda d: b"{rows: [", True),
    ("baseline that is a JSON list", 2, lambda d: [d], False),
    ("baseline with a NaN speedup", 2, lambda d: json.dumps(_rows(d, speedup=1.0)).replace(
        '"speedup": 1.0', '"speedup": NaN').encode(), True),
    ("baseline row with a string speedup", 2, lambda d: _rows(d, speedup="fast"), False),
    ("baseline row with an unknown backend", 2, lambda d: _rows(d, backend="tpu"), False),
    ("baseline naming a measurement the run lacks", 1, lambda d: _rows(d, batch=999), False),
    ("baseline twice as fast (a regression)", 1, lambda d: _rows(d, speedup=d["rows"][0]["speedup"] * 2), False),
]:
    case("baselines", _name, _code)(lambda ws, e=_edit, r=_raw: baseline_case(ws, e, r))


@case("baselines", "report.json edited by hand", 2)
def _edited_report(ws):
    run = ws.finished()
    report = json.loads((run / "report.json").read_text())
    report["latency"][0]["speedup"] = 99.0
    (run / "report.json").write_text(json.dumps(report))
    return refused_untouched(ws, run, "check", run)


@case("baselines", "a budget limit the run did not measure", 1)
def _unmeasured_limit(ws):
    run = ws.finished()
    result = ws.rerun(run, "--set", "budget.latency=[{backend: ort-cpu, batch: 64, max_ms: 100}]")
    ok, note = consistent(run)
    gate = ws.cli("check", run)
    return result, ok and gate.code == 1, f"{note}; check exits {gate.code}: {gate.last_line[:80]}"


@case("baselines", "check with no limit and no baseline", 2)
def _nothing_to_check(ws):
    run = ws.finished()
    result = ws.rerun(run, "--set", "budget={}")
    return ws.cli("check", run), result.code == 0, f"run exits {result.code}"


@case("baselines", "check on a directory that is not a run", 2)
def _check_not_run(ws):
    return ws.cli("check", ws.new_dir("notrun")), True, ""


# -- latency tables -------------------------------------------------------------------------------------------
def lut_case(ws: Workspace, name: str, make: Callable[[dict], object]) -> tuple[Proc, bool, str]:
    import timm

    from ofbdeploy.arch import ArchSpec, ViTShape
    from ofbdeploy.latency.lut import LatencyLUT, LutKey, arch_features

    shape = ViTShape.from_model(timm.create_model(PICO, img_size=16), PICO)
    coefficients = [0.05, 2e-4, 1e-6, 3e-5, 4e-3, 8e-7, 2e-5]
    dense = float(arch_features(ArchSpec.dense(shape)) @ coefficients)
    good = LatencyLUT(LutKey("cpu", "ort-cpu", "fp32", 1, 16, PICO), shape, coefficients, dense).to_dict()
    where = ws.new_dir(name)
    content = make(good)
    (where / "lut.json").write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    search = {**TINY["search"], "target_flops_ratio": None,
              "latency": {"target_ratio": 0.6, "lut": str(where / "lut.json"), "backend": "ort-cpu", "batch": 1}}
    result = ws.cli("run", ws.recipe(where, search=search))
    return result, not (where / "run").exists(), "nothing written" if not (where / "run").exists() else "run dir made"


case("luts", "LUT file that is not JSON", 2)(lambda ws: lut_case(ws, "lut-json", lambda d: b"\x00\x01 not json"))
case("luts", "LUT of another model", 2)(
    lambda ws: lut_case(ws, "lut-model", lambda d: {**d, "shape": {**d["shape"], "embed_dim": 128}}))
case("luts", "LUT with negative coefficients", 2)(
    lambda ws: lut_case(ws, "lut-neg", lambda d: {**d, "coefficients": [-1.0] * 7}))
case("luts", "LUT of an older format", 2)(lambda ws: lut_case(ws, "lut-fmt", lambda d: {**d, "format": "x/1"}))
case("luts", "LUT of another batch", 2)(lambda ws: lut_case(ws, "lut-batch", lambda d: {**d, "key": {**d["key"],
                                                                                                    "batch": 8}}))
case("luts", "LUT missing its coefficients", 2)(
    lambda ws: lut_case(ws, "lut-missing", lambda d: {k: v for k, v in d.items() if k != "coefficients"}))


# -- arch.json and weights ---------------------------------------------------------------------------------------
def model_dir(ws: Workspace, name: str) -> Path:
    where = ws.new_dir(name) / "model"
    result = ws.cli("selfcheck", "--trials", "0", "--save", where)
    if result.code != 0:
        raise SystemExit(result.stderr)
    return where


def arch_case(ws: Workspace, name: str, edit: Callable[[Path], None], *command: str) -> tuple[Proc, bool, str]:
    where = model_dir(ws, name)
    edit(where)
    args = [a if a != "{dir}" else str(where) for a in command] or ["info", str(where)]
    return ws.cli(*args), True, ""


def _edit_arch(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads((path / "arch.json").read_text())
    change(data)
    (path / "arch.json").write_text(json.dumps(data))


def _heads_same_qkv(data: dict) -> None:
    """Another head count at the same qkv width (4 x 8 <-> 2 x 16 ...), which loads without a shape error."""
    block = data["blocks"][0]
    width = block["heads"] * block["head_dim"]
    for heads in range(1, data["base"]["num_heads"] + 1):
        if heads != block["heads"] and width % heads == 0 and width // heads <= data["base"]["head_dim"]:
            block.update(heads=heads, head_dim=width // heads, kept_heads=[], kept_channels=[])
            return
    block.update(kept_heads=list(reversed(block["kept_heads"])))


case("arch", "arch.json with heads out of range", 2)(
    lambda ws: arch_case(ws, "arch-range", lambda p: _edit_arch(p, lambda d: d["blocks"][0].update(heads=99))))
case("arch", "arch.json with other heads, same qkv shape", 2)(
    lambda ws: arch_case(ws, "arch-heads", lambda p: _edit_arch(p, _heads_same_qkv), "profile", "{dir}",
                         "--backend", "torch", "--batch", "1", "--repeats", "5"))
case("arch", "arch.json not UTF-8", 2)(
    lambda ws: arch_case(ws, "arch-utf", lambda p: (p / "arch.json").write_bytes(b"\xff\xfe{}")))
case("arch", "arch.json nested 100000 deep", 2)(
    lambda ws: arch_case(ws, "arch-deep", lambda p: (p / "arch.json").write_text("[" * 100000)))
case("arch", "arch.json with a float head count", 2)(
    lambda ws: arch_case(ws, "arch-float", lambda p: _edit_arch(p, lambda d: d["blocks"][0].update(heads=2.5))))
case("arch", "arch.json with patch larger than the image", 2)(
    lambda ws: arch_case(ws, "arch-patch", lambda p: _edit_arch(p, lambda d: d["base"].update(patch_size=4096))))
case("arch", "weights file truncated", 2)(
    lambda ws: arch_case(ws, "w-trunc", lambda p: (p / "model.safetensors").write_bytes(
        (p / "model.safetensors").read_bytes()[:1000]), "export", "{dir}"))
case("arch", "weights file missing", 2)(
    lambda ws: arch_case(ws, "w-missing", lambda p: (p / "model.safetensors").unlink(), "export", "{dir}"))


# -- run-directory faults --------------------------------------------------------------------------------------
@case("rundir", "pruned/model.safetensors deleted", 0)
def _deleted(ws):
    run = ws.finished()
    (run / "pruned" / "model.safetensors").unlink()
    result = ws.rerun(run)
    ok, note = consistent(run)
    said = "artifact pruned/model.safetensors missing" in (run / "run.log").read_text()
    return result, ok and said and (run / "pruned" / "model.safetensors").is_file(), f"{note}; log says why: {said}"


@case("rundir", "finetuned weights corrupted in place (same size)", 0)
def _corrupted(ws):
    run = ws.finished()
    path = run / "finetuned" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    result = ws.rerun(run)
    ok, note = consistent(run)
    said = "artifact finetuned/model.safetensors changed (content)" in (run / "run.log").read_text()
    return result, ok and said, f"{note}; log says why: {said}"


@case("rundir", "checkpoint replaced at the same path", 0)
def _replaced_checkpoint(ws):
    run = ws.finished()
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    ckpt = run.parent / "w2.safetensors"
    shutil.copy(recipe["model"]["checkpoint"], ckpt)
    first = ws.rerun(run, "--set", f"model.checkpoint={ckpt}")
    ws.checkpoint(ckpt, seed=9)
    result = ws.rerun(run, "--set", f"model.checkpoint={ckpt}")
    ok, note = consistent(run)
    said = "stage dense: running (input changed: model.checkpoint)" in (run / "run.log").read_text()
    return result, ok and said and first.code == 0, f"{note}; log says why: {said}"


@case("rundir", "stages.json corrupted", 0)
def _stages_corrupt(ws):
    run = ws.finished()
    (run / "stages.json").write_text("{half a fi")
    result = ws.rerun(run)
    ok, note = consistent(run)
    said = "stages.json is unreadable" in (run / "run.log").read_text()
    return result, ok and said, f"{note}; log says why: {said}"


@case("rundir", "stages.json deleted", 0)
def _stages_deleted(ws):
    run = ws.finished()
    (run / "stages.json").unlink()
    result = ws.rerun(run)
    ok, note = consistent(run)
    return result, ok, note


@case("rundir", "leftover temporary file of a killed write", 0)
def _leftover(ws):
    run = ws.finished()
    (run / "pruned" / ".model.safetensors.x1y2.tmp").write_bytes(b"half")
    result = ws.rerun(run)
    ok, note = consistent(run)
    gone = not (run / "pruned" / ".model.safetensors.x1y2.tmp").exists()
    return result, ok and gone, f"{note}; leftover removed: {gone}"


@case("rundir", "lock file holding garbage (no live holder)", 0)
def _garbage_lock(ws):
    run = ws.finished()
    (run / "run.lock").write_bytes(os.urandom(64))
    result = ws.rerun(run)
    ok, note = consistent(run)
    return result, ok, note


@case("rundir", "recipe.yaml edited by hand after the run, then check", 2)
def _recipe_edited(ws):
    run = ws.finished()
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["budget"]["max_gflops"] = 123.0
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return refused_untouched(ws, run, "check", run)


@case("rundir", "--resume after the dense checkpoint changed", 2)
def _resume_upstream(ws):
    run = ws.finished()
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    ckpt = run.parent / "w2.safetensors"
    shutil.copy(recipe["model"]["checkpoint"], ckpt)
    first = ws.rerun(run, "--set", f"model.checkpoint={ckpt}")
    ws.checkpoint(ckpt, seed=11)
    result = ws.rerun(run, "--resume", "--set", f"model.checkpoint={ckpt}")
    ok, note = consistent(run)
    return result, ok and first.code == 0, note


@case("rundir", "two runs started together into one new directory", 2)
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


@case("rundir", "a second run into a busy directory", 2)
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


@case("rundir", "stale lock of a SIGKILLed run taken over", 0)
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


case("rundir", "Ctrl-C (SIGINT) during the search", 130)(
    lambda ws: interrupt_case(ws, signal.SIGINT, "search epoch 2/", {"search": {**TINY["search"], "epochs": 3000}}))
case("rundir", "SIGTERM during the finetune", 130)(
    lambda ws: interrupt_case(ws, signal.SIGTERM, "finetune epoch 2/", {"finetune": {**TINY["finetune"],
                                                                                     "epochs": 3000}}))


@case("rundir", "SIGKILL mid-search, then --resume with fewer (but enough) epochs", 0)
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


@case("rundir", "--resume after search.align changed", 2)
def _resume_align(ws):
    run = ws.finished()
    return refused_untouched(ws, run, "run", run / "recipe.yaml", "--output", run, "--resume", "--set",
                             "search.align=16")


@case("rundir", "--resume with fewer epochs than the checkpoint holds", 2)
def _resume_fewer(ws):
    run = ws.finished()
    return refused_untouched(ws, run, "run", run / "recipe.yaml", "--output", run, "--resume", "--set",
                             "finetune.epochs=1")


@case("rundir", "--resume with more epochs", 0)
def _resume_more(ws):
    run = ws.finished()
    result = ws.rerun(run, "--resume", "--set", "finetune.epochs=3")
    log = (run / "run.log").read_text()
    ok, note = consistent(run)
    said = "schedule rebuilt" in log and "at epoch 2/3" in log
    return result, ok and said, f"{note}; log: schedule rebuilt, resumed at 2/3: {said}"


@case("rundir", "selfcheck --save into a run's finetuned/", 2)
def _save_into_run(ws):
    run = ws.finished()
    return refused_untouched(ws, run, "selfcheck", "--trials", "0", "--save", run / "finetuned")


@case("rundir", "export into a run whose export/ exists", 2)
def _export_exists(ws):
    run = ws.finished()
    return refused_untouched(ws, run, "export", run)


@case("rundir", "profile --backend ort-cuda on a CPU machine", 2)
def _profile_cuda(ws):
    run = ws.finished()
    return refused_untouched(ws, run, "profile", run, "--backend", "ort-cuda")


@case("rundir", "export from a run whose finetuned model was deleted", 2)
def _export_unfinished(ws):
    run = ws.finished()
    (run / "finetuned" / "model.safetensors").unlink()
    return refused_untouched(ws, run, "export", run, "--force")


@case("rundir", "an internal error (a bug) mid-command", 3)
def _internal(ws):
    where = model_dir(ws, "internal")
    code = ("import sys, ofbdeploy.report.describe as d; d.describe = lambda *a, **k: 1 / 0; "
            "from ofbdeploy.cli import main; sys.argv = ['ofbdeploy', 'info', sys.argv[1]]; main()")
    proc = subprocess.run([sys.executable, "-c", code, str(where)], capture_output=True, text=True, env=ws.env)
    result = Proc(proc.returncode, proc.stdout, proc.stderr, 0.0)
    path = result.last_line.rsplit("full traceback in ", 1)[-1].rstrip(")")
    found = Path(path).is_file() and "ZeroDivisionError" in Path(path).read_text()
    return result, found, f"traceback file {path}: {found}"


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


case("rundir", "Ctrl-C under python -m ofbdeploy.torchrun (2 processes)", 130)(
    lambda ws: torchrun_interrupt(ws, ["ofbdeploy.torchrun"]))
case("rundir", "bad recipe under python -m ofbdeploy.torchrun", 2)(
    lambda ws: (subprocess_proc(ws, ["-m", "ofbdeploy.torchrun", "--standalone", "--nproc_per_node", "2", "-m",
                                     "ofbdeploy", "run", str(ws.root / "missing.yaml")]), True, ""))


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


def _codes(expected: int | tuple[int, ...]) -> str:
    return " or ".join(map(str, expected)) if isinstance(expected, tuple) else str(expected)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=[], help="categories to run (repeatable)")
    parser.add_argument("--json", type=Path, default=None, help="write the outcomes here")
    parser.add_argument("--keep", action="store_true", help="keep the scratch workspace")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    root = Path(tempfile.mkdtemp(prefix="ofbdeploy-hostile-"))
    ws = Workspace(root)
    outcomes = []
    try:
        for category, name, expected, fn in CASES:
            if args.only and category not in args.only:
                continue
            outcome = run_case(ws, category, name, expected, fn)
            outcomes.append(outcome)
            print(f"{'ok  ' if outcome.ok else 'FAIL'} [{category}] {name}: expected {_codes(expected)}, "
                  f"got {outcome.got} ({outcome.seconds:.1f} s)", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print("| category | input or fault | expected | got | one line, no traceback | intact | what it said |")
    print("|---|---|---|---|---|---|---|")
    for o in outcomes:
        clean = "yes" if o.one_line and not o.traceback else "NO"
        print(f"| {o.category} | {o.case} | {_codes(o.expected)} | {o.got} | {clean} | {'yes' if o.intact else 'NO'} | "
              f"{o.note.replace('|', '/')} |")
    passed = sum(o.ok for o in outcomes)
    print(f"\n{passed}/{len(outcomes)} handled as the contract asks")
    if args.json:
        args.json.write_text(json.dumps([{**asdict(o), "ok": o.ok} for o in outcomes], indent=1) + "\n")
    sys.exit(0 if passed == len(outcomes) else 1)


if __name__ == "__main__":
    main()
