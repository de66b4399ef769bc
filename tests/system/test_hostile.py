"""Hostile inputs and faults against the CLI: each ends with the exit-code contract (0/1/2/3/130), one line
on stderr, no traceback, and a run directory that still tells the truth."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

from ofbdeploy.arch import ArchSpec
from ofbdeploy.cli import main
from ofbdeploy.errors import ArchError
from ofbdeploy.families.vit.support import read_vit_shape
from ofbdeploy.models.pruned import build_plain, load_pruned, save_pruned
from ofbdeploy.recipe import load_recipe
from ofbdeploy.run import stages
from ofbdeploy.run.rundir import RunLock, StageBook
from ofbdeploy.run.stages import stage_sections

TINY = {
    "name": "tiny", "seed": 1, "device": "cpu",
    "model": {"name": "ofb_vit_pico_patch4_32", "img_size": 16},
    "data": {"kind": "synthetic", "limit_train": 64, "limit_val": 32, "batch_size": 32, "eval_batch_size": 32},
    "search": {"target_flops_ratio": 0.5, "epochs": 2, "warmup_epochs": 0, "arch_lr": 0.3,
               "loss_weights": {"flops": 50.0}},
    "finetune": {"epochs": 2, "warmup_epochs": 0},
    "export": {"enabled": False}, "profile": {"enabled": False},
    "budget": {"max_gflops": 1.0},
}


def _cli(*args: str):
    """Invoke the CLI in-process; stderr is kept apart so the one-line contract can be checked."""
    return CliRunner().invoke(main, list(args))


def _one_error_line(result, code: int, *needles: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _write_recipe(tmp: Path, out: Path, **sections) -> Path:
    data = json.loads(json.dumps(TINY))
    data.update(sections)
    data["output_dir"] = str(out)
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished run of the tiny recipe (dense weights from a checkpoint file), shared read-only."""
    tmp = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(3)
    save_file(timm.create_model("ofb_vit_pico_patch4_32", img_size=16).state_dict(), str(tmp / "w.safetensors"))
    recipe = _write_recipe(tmp, tmp / "run", model={**TINY["model"], "checkpoint": str(tmp / "w.safetensors")})
    result = _cli("run", str(recipe), "--no-progress")
    assert result.exit_code == 0, result.output
    return tmp / "run"


def _copy(run: Path, tmp: Path) -> Path:
    shutil.copytree(run, tmp / "run")
    return tmp / "run"


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()
            and p.name != "run.log"}


def _rerun(run: Path, *args: str):
    """Run a copied run directory's own recipe again, into that directory."""
    return _cli("run", str(run / "recipe.yaml"), "--output", str(run), "--no-progress", *args)


def _last_run_log(run: Path) -> str:
    return (run / "run.log").read_text().split(" run tiny in ")[-1]


# -- run directory integrity -------------------------------------------------------------------------
def test_deleted_and_corrupted_artifacts_rerun_their_stage_and_every_later_one(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    (run / "pruned" / "model.safetensors").unlink()
    weights = run / "finetuned" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, other content
    weights.write_bytes(bytes(data))
    assert _rerun(run).exit_code == 0
    log = _last_run_log(run)
    assert "stage search: done already, skipped" in log
    assert "stage materialize: running (artifact pruned/model.safetensors missing)" in log
    assert "stage finetune: running (after materialize)" in log and "stage report: running" in log
    assert (run / "pruned" / "model.safetensors").is_file()
    data = bytearray((run / "search" / "result.json").read_bytes())
    (run / "search" / "result.json").write_bytes(bytes(data[:-2]) + b" \n")
    assert _rerun(run).exit_code == 0
    assert "stage search: running (artifact search/result.json changed (content))" in _last_run_log(run)


def test_a_replaced_checkpoint_reruns_from_the_dense_stage(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    checkpoint = Path(load_recipe(run / "recipe.yaml").model.checkpoint)
    original = checkpoint.read_bytes()
    torch.manual_seed(4)
    save_file(timm.create_model("ofb_vit_pico_patch4_32", img_size=16).state_dict(), str(checkpoint))
    try:
        assert _rerun(run).exit_code == 0
        assert "stage dense: running (input changed: model.checkpoint)" in _last_run_log(run)
    finally:
        checkpoint.write_bytes(original)  # the shared finished run's input


def test_a_rejected_run_leaves_a_finished_run_and_its_gate_untouched(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    before = _snapshot(run)
    (tmp_path / "text.pth").write_text("this is not a checkpoint\n")
    result = _rerun(run, "--set", f"model.checkpoint={tmp_path / 'text.pth'}", "--set", "budget.max_gflops=0.0000001")
    _one_error_line(result, 2, "text.pth", "not a readable PyTorch checkpoint")
    assert _snapshot(run) == before
    ok = _cli("check", str(run))
    assert ok.exit_code == 0 and "GFLOPs" in ok.output


def test_a_second_run_into_a_busy_directory_is_refused(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    before = _snapshot(run)
    with RunLock(run):
        who = f"in use by pid {os.getpid()}"
        _one_error_line(_rerun(run), 2, who)
        _one_error_line(_cli("check", str(run)), 2, "a run is in progress")
        _one_error_line(_cli("profile", str(run), "--backend", "torch"), 2, who)
    assert _snapshot(run) == before


def test_resume_continues_with_more_epochs_and_refuses_other_changes(tiny_run, tmp_path, caplog):
    run = _copy(tiny_run, tmp_path)
    result = _rerun(run, "--resume", "--set", "finetune.epochs=3")
    assert result.exit_code == 0, result.output
    log = _last_run_log(run)
    assert "finetune.epochs changed from 2 to 3" in log and "schedule rebuilt" in log
    assert "finetune: resumed from" in log and "at epoch 2/3" in log and "finetune epoch 3/3" in log
    assert json.loads((run / "finetuned" / "train.json").read_text())["epochs_run"] == 1
    before = _snapshot(run)
    _one_error_line(_rerun(run, "--resume", "--set", "finetune.epochs=1"), 2,
                    "finetune.epochs is now 1, but finetune/train.ckpt already holds 3 epochs")
    _one_error_line(_rerun(run, "--resume", "--set", "search.align=16"), 2,
                    "search.align changed from null to 16", "run without --resume")
    assert _snapshot(run) == before  # recipe.yaml and stages.json as they were


def _replace_body(monkeypatch, name: str, body) -> None:
    """Put ``body`` in place of stage ``name``'s in the stage table the driver reads."""
    table = tuple(dataclasses.replace(s, body=body) if s.name == name else s for s in stages.STAGES)
    monkeypatch.setattr(stages, "STAGES", table)


def test_an_internal_error_is_exit_3_with_the_traceback_in_the_run_log(tiny_run, tmp_path, monkeypatch):
    run = _copy(tiny_run, tmp_path)
    (run / "metrics.json").unlink()

    def broken(_run):
        raise ZeroDivisionError("a bug")

    _replace_body(monkeypatch, "evaluate", broken)
    line = _one_error_line(_rerun(run), 3,
                           "internal error: ZeroDivisionError: a bug", str(run / "run.log"))
    assert line.endswith(")")
    assert "Traceback" in (run / "run.log").read_text() and not (run / "run.lock").exists()
    assert "evaluate" not in StageBook(run).load()[0]


def test_interrupt_is_exit_130_and_releases_the_lock(tiny_run, tmp_path, monkeypatch):
    run = _copy(tiny_run, tmp_path)
    (run / "metrics.json").unlink()

    def interrupted(_run):
        raise KeyboardInterrupt

    _replace_body(monkeypatch, "evaluate", interrupted)
    _one_error_line(_rerun(run), 130, "interrupted")
    assert not (run / "run.lock").exists() and "interrupted during evaluate" in (run / "run.log").read_text()


def _as_from_a_terminal() -> None:
    """The run starts with the stop signals a terminal gives it, whatever pytest inherited (under ``nohup`` or as a
    background job of a script both are ignored, and a run honours an ignored signal by ignoring it)."""
    for stop in (signal.SIGINT, signal.SIGHUP):
        signal.signal(stop, signal.SIG_DFL)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGHUP], ids=["SIGINT", "SIGHUP"])
def test_a_stop_signal_to_a_real_run_exits_130_and_keeps_the_directory(tmp_path, stop):
    """Ctrl-C, or the terminal that started the run going away (SIGHUP): exit 130, lock released, done stages
    kept."""
    recipe = _write_recipe(tmp_path, tmp_path / "run", search={**TINY["search"], "epochs": 200})
    proc = subprocess.Popen([sys.executable, "-m", "ofbdeploy", "run", str(recipe), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=_as_from_a_terminal)
    log = tmp_path / "run" / "run.log"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and "search epoch 2/200" in log.read_text()):
        time.sleep(0.2)
    proc.send_signal(stop)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert [line for line in stderr.splitlines() if line.strip()][-1].startswith("interrupted")
    assert "Traceback" not in stderr and not (tmp_path / "run" / "run.lock").exists()
    assert list(StageBook(tmp_path / "run").load()[0]) == ["dense"]


@pytest.mark.multiprocess
def test_the_torchrun_launcher_keeps_the_exit_codes(tmp_path):
    from ofbdeploy.torchrun import worker_exit_code

    assert [worker_exit_code(c) for c in (1, 2, 3, 130, -signal.SIGINT, -signal.SIGTERM, -signal.SIGKILL, 7)] == \
        [1, 2, 3, 130, 130, 130, 3, 3]
    proc = subprocess.run([sys.executable, "-m", "ofbdeploy.torchrun", "--standalone", "--nproc_per_node", "2",
                           "-m", "ofbdeploy", "run", str(tmp_path / "missing.yaml")], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]  # plain torchrun would exit 1, the code of a missed budget
    assert "Traceback" not in proc.stderr and "recipe not found" in proc.stderr


def test_a_sigterm_after_the_outcome_keeps_its_code_and_prints_no_traceback(tmp_path):
    """torchrun SIGTERMs the other workers once one failed; one already exiting keeps its code, quietly.

    The race (SIGTERM arriving during interpreter shutdown) is forced: the signal is sent after the
    outcome line is printed and before the process ends.
    """
    script = tmp_path / "late_sigterm.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "from ofbdeploy import cli\n"
        "from ofbdeploy.errors import InputError\n"
        "cli._interrupt_on_sigterm()\n"
        "assert signal.getsignal(signal.SIGTERM) is cli._sigterm_interrupts\n"
        "try:\n"
        "    cli._finish(InputError('recipe not found: x.yaml'))\n"
        "except SystemExit:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(5)\n"
        "sys.exit(0)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip() == "error: recipe not found: x.yaml"


# -- check: a gate that cannot be fooled -------------------------------------------------------------
@pytest.fixture
def checked_run(tmp_path) -> Path:
    """A run directory holding only what `check` reads: recipe.yaml, report.json, stages.json."""
    run = tmp_path / "run"
    run.mkdir()
    recipe = load_recipe(_write_recipe(tmp_path, run, budget={"speedup": [{"backend": "ort-cpu", "batch": 1,
                                                                           "min": 1.2}]}))
    recipe.save(run / "recipe.yaml")
    row = {"backend": "ort-cpu", "batch": 1, "precision": "fp32", "device": "cpu: test", "speedup": 1.5,
           "latency_ms_dense": 3.0, "latency_ms_pruned": 2.0}
    report = {"model": recipe.model.name, "flops_pruned": 1e6, "params_pruned": 1e5, "top1_pruned": 50.0,
              "latency": [row]}
    (run / "report.json").write_text(json.dumps(report))
    for stage in stages.STAGES:  # every stage finished; a placeholder stands for each earlier stage's files
        made = run / f"{stage.name}.out"
        if stage.name != "report":
            made.write_text(stage.name)
        StageBook(run).record(stage.name, stage_sections(recipe, stage.name), {},
                              [run / "report.json" if stage.name == "report" else made])
    return run


def test_check_passes_a_good_run_and_baseline(checked_run, tmp_path):
    base = tmp_path / "base.json"
    assert _cli("check", str(checked_run), "--write-baseline", str(base)).exit_code == 0
    result = _cli("check", str(checked_run), "--baseline", str(base))
    assert result.exit_code == 0 and "speedup ort-cpu fp32 batch 1" in result.output


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda b: {"foo": 1}, "not an ofbdeploy baseline"),
    (lambda b: {**b, "rows": []}, "rows"),
    (lambda b: {**b, "model": "deit_small_patch16_224"}, "baseline is for model 'deit_small_patch16_224'"),
    (lambda b: {**b, "identity": "0" * 64}, "other model/data/search settings"),
    (lambda b: {**b, "rows": [{**b["rows"][0], "speedup": "fast"}]}, "rows.0.speedup"),
    (lambda b: {**b, "rows": [{**b["rows"][0], "speedup": -1}]}, "rows.0.speedup"),
])
def test_an_empty_foreign_or_malformed_baseline_is_exit_2(checked_run, tmp_path, edit, needle):
    base = tmp_path / "base.json"
    assert _cli("check", str(checked_run), "--write-baseline", str(base)).exit_code == 0
    base.write_text(json.dumps(edit(json.loads(base.read_text()))))
    _one_error_line(_cli("check", str(checked_run), "--baseline", str(base)), 2, needle)


def test_check_refuses_what_it_cannot_trust(checked_run, tmp_path):
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe{")
    _one_error_line(_cli("check", str(checked_run), "--baseline", str(tmp_path / "bad.json")), 2, "not UTF-8")
    _one_error_line(_cli("check", str(checked_run), "--write-baseline", str(tmp_path)), 2, "is a directory")
    _one_error_line(_cli("check", str(checked_run), "--tolerance", "lots"), 2, "--tolerance")
    report = json.loads((checked_run / "report.json").read_text())
    report["latency"][0]["speedup"] = 9.0  # a hand-edited report does not pass the gate
    (checked_run / "report.json").write_text(json.dumps(report))
    _one_error_line(_cli("check", str(checked_run)), 2, "report.json changed")
    recipe = load_recipe(checked_run / "recipe.yaml")
    recipe.budget.max_gflops = 5.0
    recipe.save(checked_run / "recipe.yaml")  # what a rejected run used to do: a new recipe, old artifacts
    _one_error_line(_cli("check", str(checked_run)), 2, "recipe.yaml changed (budget)")


def _raise_speedup_limit(run: Path, minimum: float) -> None:
    recipe = load_recipe(run / "recipe.yaml")
    recipe.budget.speedup[0].min = minimum
    recipe.save(run / "recipe.yaml")
    StageBook(run).record("report", stage_sections(recipe, "report"), {}, [run / "report.json"])


def test_write_baseline_after_a_failed_check_writes_nothing_and_says_so(checked_run, tmp_path):
    _raise_speedup_limit(checked_run, 5.0)  # measured 1.5x: the check fails
    base = tmp_path / "base.json"
    result = _cli("check", str(checked_run), "--write-baseline", str(base))
    _one_error_line(result, 1, "speedup ort-cpu fp32 batch 1 (1.500x)")
    assert not base.exists() and "baseline not written: the check failed" in result.output


def test_a_regressed_run_cannot_move_its_own_goalposts(checked_run, tmp_path):
    base = tmp_path / "base.json"
    assert _cli("check", str(checked_run), "--write-baseline", str(base)).exit_code == 0
    data = json.loads(base.read_text())
    data["rows"][0]["speedup"] = 3.0  # the run is now a regression against its baseline
    base.write_text(json.dumps(data))
    before = base.read_bytes()
    _one_error_line(_cli("check", str(checked_run), "--baseline", str(base), "--write-baseline", str(base)), 2,
                    "already exists; pass --force")
    result = _cli("check", str(checked_run), "--baseline", str(base), "--write-baseline", str(base), "--force")
    _one_error_line(result, 1, "speedup ort-cpu fp32 batch 1")
    assert base.read_bytes() == before


def test_write_baseline_replaces_a_file_only_with_force_and_never_a_special_file(checked_run, tmp_path):
    base = tmp_path / "base.json"
    base.write_text("mine")
    _one_error_line(_cli("check", str(checked_run), "--write-baseline", str(base)), 2,
                    f"{base} already exists; pass --force to replace it")
    assert base.read_text() == "mine"
    assert _cli("check", str(checked_run), "--write-baseline", str(base), "--force").exit_code == 0
    assert json.loads(base.read_text())["rows"][0]["speedup"] == 1.5
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for special in (fifo, Path(os.devnull)):  # refused at once: no hang on the FIFO, /dev/null stays a device
        _one_error_line(_cli("check", str(checked_run), "--write-baseline", str(special), "--force"), 2,
                        "not a regular file")
    assert Path(os.devnull).is_char_device()
    _one_error_line(_cli("check", str(checked_run), "--write-baseline", str(checked_run / "report.json"), "--force"),
                    2, "is a file of the run")


def test_check_verifies_every_file_the_report_was_made_from(checked_run):
    (checked_run / "export.out").write_text("replaced")  # stands for export/pruned.onnx in a real run
    _one_error_line(_cli("check", str(checked_run)), 2, "artifact export.out changed", "export stage")


def test_a_limit_without_a_measurement_is_exit_1_naming_it(checked_run):
    recipe = load_recipe(checked_run / "recipe.yaml")
    recipe.budget.speedup[0].batch = 64
    recipe.save(checked_run / "recipe.yaml")
    StageBook(checked_run).record("report", stage_sections(recipe, "report"), {}, [checked_run / "report.json"])
    result = _cli("check", str(checked_run))
    _one_error_line(result, 1, "speedup ort-cpu fp32 batch 64 (not measured)")
    recipe.budget.speedup = []
    recipe.save(checked_run / "recipe.yaml")
    StageBook(checked_run).record("report", stage_sections(recipe, "report"), {}, [checked_run / "report.json"])
    _one_error_line(_cli("check", str(checked_run)), 2, "nothing to check")


# -- export / profile / selfcheck outputs -------------------------------------------------------------
@pytest.fixture
def model_dir(tmp_path) -> Path:
    shape = read_vit_shape(timm.create_model("ofb_vit_pico_patch4_32", img_size=16), "ofb_vit_pico_patch4_32")
    spec = ArchSpec.uniform(shape, 64, 4, 8, 128)  # 4 heads of 8: the same qkv shape as 2 heads of 16
    model = build_plain(spec)
    model.init_weights()
    return save_pruned(model, spec, tmp_path / "model")


def test_weights_and_an_edited_arch_json_are_never_paired(model_dir):
    load_pruned(model_dir)
    arch = json.loads((model_dir / "arch.json").read_text())
    arch["blocks"][0].update(heads=2, head_dim=16)  # qkv keeps its shape: loading would "work"
    (model_dir / "arch.json").write_text(json.dumps(arch))
    with pytest.raises(ArchError, match=r"saved with another arch\.json"):
        load_pruned(model_dir)
    _one_error_line(_cli("profile", str(model_dir), "--backend", "torch", "--repeats", "5", "--batch", "1"), 2,
                    "saved with another arch.json")


def test_profile_on_a_backend_this_machine_lacks_keeps_the_last_profile(model_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: ort-cuda may run here")
    (model_dir / "profile.json").write_text('{"latency": [{"backend": "ort-cpu"}], "skipped": []}')
    before = (model_dir / "profile.json").read_bytes()
    _one_error_line(_cli("profile", str(model_dir), "--backend", "ort-cuda"), 2, "--backend ort-cuda",
                    "cannot run on this machine")
    assert (model_dir / "profile.json").read_bytes() == before


def test_model_directories_are_overwritten_only_with_force(model_dir, tmp_path):
    (model_dir / "export").mkdir()
    (model_dir / "export" / "export.json").write_text("{}")
    _one_error_line(_cli("export", str(model_dir)), 2, "already holds files", "--force")
    _one_error_line(_cli("selfcheck", "--trials", "0", "--save", str(model_dir)), 2, "--save", "--force")
    (tmp_path / "file").write_text("x")
    _one_error_line(_cli("selfcheck", "--trials", "0", "--save", str(tmp_path / "file")), 2, "is a file")


# -- options, outputs, recipes and models at the door -----------------------------------------------------
@pytest.mark.parametrize(("args", "needle"), [
    (["export", ".", "--opset", "11"], "--opset"),
    (["profile", ".", "--repeats", "0"], "--repeats"),
    (["lut", "build", "--model", "ofb_vit_pico_patch4_32", "--batch", "0"], "--batch"),
    (["profile", ".", "--batch", "1,x"], "--batch"),
    (["export", ".", "--batch-range", "64,16,1"], "--batch-range"),
    (["lut", "build", "--model", "ofb_vit_pico_patch4_32", "--backend", "ort-cuda"], "ort-cuda"),
    (["info", "/nonexistent/arch.json"], "not found"),
    (["run", "/nonexistent/recipe.yaml"], "recipe not found"),
])
def test_bad_options_are_one_line_and_exit_2(args, needle):
    if "ort-cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _one_error_line(_cli(*args), 2, needle)


def test_bad_outputs_are_refused_before_anything_is_written(tmp_path):
    recipe = _write_recipe(tmp_path, tmp_path / "run")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    _one_error_line(_cli("run", str(recipe), "--output", str(tmp_path / "afile")), 2, "is a file")
    _one_error_line(_cli("run", str(recipe), "--output", str(tmp_path / "afile" / "run")), 2, "cannot be created")
    _one_error_line(_cli("run", str(recipe), "--output", str(tmp_path / "home")), 2, "not an ofbdeploy run directory")
    assert sorted(p.name for p in (tmp_path / "home").iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(("model", "needle"), [
    ({"name": "resnet18"}, "ResNet models cannot be pruned by ofbdeploy"),
    ({"name": "vit_tiny_r_s16_p8_224", "img_size": 32}, "HybridEmbed"),
    ({"name": "ofb_vit_pico_patch4_32", "overrides": {"no_such_argument": 1}}, "no_such_argument"),
    ({"name": "ofb_vit_pico_patch4_32", "overrides": {"num_heads": 3}}, "divisible by num_heads"),
    ({"name": "ofb_vit_pico_patch4_32", "overrides": {"pretrained": True}}, "model.overrides.pretrained"),
    ({"name": "ofb_vit_pico_patch4_32", "img_size": 16, "checkpoint": "/dev/null/w.pth"}, "checkpoint not found"),
])
def test_bad_models_are_refused_before_the_run_directory_exists(tmp_path, model, needle):
    recipe = _write_recipe(tmp_path, tmp_path / "run", model=model)
    _one_error_line(_cli("run", str(recipe)), 2, needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("text", "needle"), [
    (b"name: \xff\xfe\n", "not UTF-8"),
    (b"a: &a [*a]\n", "recursive"),
    (b"name: \"a\\0b\"\n", "NUL"),
    (b"[" * 1500, "nested more than 64 levels"),
    (b"x" * (2 << 20), "too large"),
])
def test_hostile_recipe_files_are_one_line(tmp_path, text, needle):
    (tmp_path / "r.yaml").write_bytes(text)
    _one_error_line(_cli("run", str(tmp_path / "r.yaml")), 2, needle)


def test_help_states_the_exit_codes():
    for args in (["--help"], ["run", "--help"], ["check", "--help"], ["lut", "build", "--help"]):
        result = _cli(*args)
        assert result.exit_code == 0 and "130 interrupted" in result.output.replace("\n", " ")
