"""Faults inside a run directory (deleted, corrupted or replaced artifacts, a broken stages.json, leftovers)
and reruns or commands that must leave a finished run as it was."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from .arch import model_dir
from .harness import Proc, case, consistent, refused_untouched


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
