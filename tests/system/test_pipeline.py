"""`ofbdeploy run` end to end on a tiny recipe: artifacts, skipping, resume, errors, torchrun."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

import ofbdeploy.prune.ofb.engine as engine
import ofbdeploy.run.context as context
from ofbdeploy import load_pruned
from ofbdeploy.cli import main
from ofbdeploy.deploy.workflow import DeployArtifacts
from ofbdeploy.families import load_arch
from ofbdeploy.recipe import load_recipe
from ofbdeploy.run import stages
from ofbdeploy.run.context import RunContext
from ofbdeploy.run.driver import Run
from ofbdeploy.run.rundir import StageBook, read_json, write_json
from ofbdeploy.run.stages import Stage, stage_sections

TINY = {
    "name": "tiny",
    "seed": 1,
    "device": "cpu",
    "model": {"name": "ofb_vit_pico_patch4_32", "img_size": 16},
    "data": {"kind": "synthetic", "limit_train": 192, "limit_val": 64, "batch_size": 32, "eval_batch_size": 64},
    "pretrain": {"epochs": 2, "lr": 4e-3, "warmup_epochs": 0},
    "search": {"target_flops_ratio": 0.5, "epochs": 4, "warmup_epochs": 1, "lr": 1e-3, "arch_lr": 0.3,
               "loss_weights": {"flops": 50.0}},
    "finetune": {"epochs": 3, "lr": 2e-3, "warmup_epochs": 0, "distill": {"temperature": 2.0}},
}
REPORT_KEYS = {"flops_dense", "flops_pruned", "params_dense", "params_pruned", "top1_dense", "top1_pruned",
               "search_seconds", "finetune_seconds"}


def _recipe(tmp: Path, name: str = "recipe.yaml", **changes) -> Path:
    data = json.loads(json.dumps(TINY))
    data["output_dir"] = str(tmp / "run")
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node[part]
        node[leaf] = value
    path = tmp / name
    path.write_text(yaml.safe_dump(data))
    return path


def _invoke(*args: str):
    return CliRunner().invoke(main, ["run", *args, "--no-progress"])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as env:  # one thread count: a resumed run is compared to it bit for bit
        env.setenv("OFBDEPLOY_THREADS", "2")
        result = _invoke(str(_recipe(tmp)))
    assert result.exit_code == 0, result.output
    return tmp / "run"


def test_run_writes_every_artifact(finished_run):
    for rel in ["recipe.yaml", "run.log", "stages.json", "dense/model.safetensors", "search/search.ckpt",
                "search/result.json", "pruned/arch.json", "pruned/model.safetensors", "finetuned/model.safetensors",
                "finetuned/arch.json", "metrics.json", "export/dense.onnx", "export/pruned.onnx",
                "export/export.json", "profile.json", "report.json", "report.md", "report.png"]:
        assert (finished_run / rel).is_file(), rel
    report = json.loads((finished_run / "report.json").read_text())
    assert set(report) >= REPORT_KEYS
    assert 0.99 * report["flops_target"] <= report["flops_pruned"] <= report["flops_target"] < report["flops_dense"]
    fit = report["fit"]  # the fit stage filled what the search left under the budget, from the teacher
    assert fit["flops_after"] == report["flops_pruned"] and fit["flops_before"] <= fit["flops_after"]
    assert load_arch(finished_run / "fitted" / "arch.json") == load_arch(finished_run / "finetuned" / "arch.json")
    assert report["params_pruned"] < report["params_dense"]
    assert report["materialize_max_abs_diff"] <= 1e-4
    assert 0 <= report["top1_pruned"] <= 100
    assert {(row["backend"], row["batch"]) for row in report["latency"]} == {("ort-cpu", 1), ("ort-cpu", 32)}
    assert all(row["speedup"] > 0 and row["latency_ms_pruned"] > 0 for row in report["latency"])
    assert [c["model"] for c in report["export"]] == ["dense", "pruned"]
    assert all(c["max_abs_diff"] <= 1e-4 and c["top1_agreement"] == 1.0 for c in report["export"])
    assert report["budget"] == [] and report["budget_met"]
    model = load_pruned(finished_run / "finetuned")
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    log = (finished_run / "run.log").read_text()
    assert "search epoch 1/4" in log and "stage report: finished" in log
    rates = next(line for line in log.splitlines() if "learning rates per 256 images" in line)
    assert all(f"search {group} " in rates for group in ("weights", "scores 0.3 ->", "arch", "decoder"))
    decisions = json.loads((finished_run / "search/result.json").read_text())["state"]["decisions"]
    assert len(decisions) == 9 and all("spearman" in g and "outside_start" in g for g in decisions.values())
    resolved = yaml.safe_load((finished_run / "recipe.yaml").read_text())
    assert resolved["search"]["epochs"] == 4 and resolved["search"]["shrinks_per_epoch"] == 3


def test_a_run_from_before_the_fit_stage_is_refused_by_check_and_finished_by_run(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    book = read_json(run / "stages.json")  # as an older ofbdeploy left it: no fit stage, no fitted/
    book["stages"].pop("fit")
    write_json(run / "stages.json", book)
    shutil.rmtree(run / "fitted")
    shutil.rmtree(run / "fit")
    result = CliRunner().invoke(main, ["check", str(run)])
    assert result.exit_code == 2 and "the fit stage has not finished" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = _invoke(str(run / "recipe.yaml"), "--output", str(run))
    assert result.exit_code == 0, result.output
    log = (run / "run.log").read_text().split("stage report: finished")[-2]
    assert "stage search: done already, skipped" in log and "stage fit: running (not run yet)" in log
    assert "stage finetune: running (after fit)" in log and (run / "fitted" / "arch.json").is_file()


def test_rerun_skips_what_is_done_and_redoes_what_changed(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)  # leave the shared finished run untouched
    recipe, out = str(run / "recipe.yaml"), ("--output", str(run))
    before = load_file(str(run / "finetuned/model.safetensors"))
    result = _invoke(recipe, *out)
    assert result.exit_code == 0, result.output
    log = (run / "run.log").read_text().split("stage report: finished")[-1]
    assert all(f"stage {s}: done already, skipped" in log for s in ("dense", "search", "finetune", "report"))
    result = _invoke(recipe, *out, "--set", "finetune.epochs=4")
    assert result.exit_code == 0, result.output
    log = (run / "run.log").read_text().split("stage report: finished")[-2]
    assert "stage search: done already, skipped" in log and "stage finetune: running" in log
    after = load_file(str(run / "finetuned/model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_a_new_stage_is_one_record_in_the_table(finished_run, tmp_path, monkeypatch):
    """The driver, skipping, stages.json and run.log take a stage from its record alone."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)

    def summary(context: RunContext) -> None:
        write_json(context.paths.root / "summary.json", {"top1": read_json(context.paths.report)["top1_pruned"]})

    extra = Stage("summary", (), lambda p: [p.root / "summary.json"], summary, collective=False)
    monkeypatch.setattr(stages, "STAGES", (*stages.STAGES, extra))
    Run(load_recipe(run / "recipe.yaml", [f"output_dir={run}"]), progress=False).execute()
    log = (run / "run.log").read_text().split("stage report: finished")[-1]
    assert "stage report: done already, skipped" in log and "stage summary: running (not run yet)" in log
    assert StageBook(run).why_not_done("summary", stage_sections(load_recipe(run / "recipe.yaml"), "summary",
                                                                 stages.STAGES), {}) is None
    assert (run / "summary.json").is_file()


def test_stopped_run_resumes_to_the_same_result(finished_run, tmp_path, monkeypatch):
    """Bit for bit at one thread count (the fixture's): on a loaded machine an automatic count adapts, and another
    count sums floats in another order."""
    monkeypatch.setenv("OFBDEPLOY_THREADS", "2")
    recipe = load_recipe(_recipe(tmp_path))
    calls = {"n": 0}
    real_save = engine.save_checkpoint

    def dying_save(path, state):
        real_save(path, state)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed after the second search epoch")

    monkeypatch.setattr(engine, "save_checkpoint", dying_save)
    with pytest.raises(KeyboardInterrupt):
        Run(recipe, progress=False).execute()
    monkeypatch.setattr(engine, "save_checkpoint", real_save)
    Run(recipe, resume=True, progress=False).execute()
    ours = load_file(str(tmp_path / "run/finetuned/model.safetensors"))
    reference = load_file(str(finished_run / "finetuned/model.safetensors"))
    assert json.loads((tmp_path / "run/pruned/arch.json").read_text())["blocks"] == \
        json.loads((finished_run / "pruned/arch.json").read_text())["blocks"]
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"search__epocs": 3}, "search.epocs: unknown field (did you mean 'epochs'?)"),
        ({"data__kind": "fashion_mnist", "data__root": "/nonexistent/fmnist"}, "/nonexistent/fmnist"),
        ({"search__target_flops_ratio": 0.01}, "cannot be met"),
        ({"model__name": "deit_smal_patch16_224"}, "unknown model 'deit_smal_patch16_224'"),
        ({"model__checkpoint": "/nonexistent/w.pth"}, "checkpoint not found: /nonexistent/w.pth"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_any_training(tmp_path, changes, message):
    result = _invoke(str(_recipe(tmp_path, **changes)))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "run" / "dense").exists()


def test_missing_recipe_and_bad_override(tmp_path):
    result = _invoke(str(tmp_path / "none.yaml"))
    assert result.exit_code == 2 and "recipe not found" in result.output
    result = _invoke(str(_recipe(tmp_path)), "--set", "search.epochs")
    assert result.exit_code == 2 and "expected section.key=value" in result.output


def test_budget_and_check_gate_the_exit_code(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    result = _invoke(str(run / "recipe.yaml"), "--output", str(run), "--set", "budget.max_gflops=0.000001",
                     "--set", "budget.speedup=[{backend: ort-cpu, batch: 32, min: 0.01}]")
    assert result.exit_code == 1, result.output
    report = json.loads((run / "report.json").read_text())
    assert not report["budget_met"] and [c["ok"] for c in report["budget"]] == [False, True]
    assert "MISSED" in (run / "report.md").read_text()
    runner = CliRunner()
    assert runner.invoke(main, ["check", str(run)]).exit_code == 1
    baseline = tmp_path / "baseline.json"
    assert runner.invoke(main, ["check", str(finished_run), "--write-baseline", str(baseline)]).exit_code == 0
    ok = runner.invoke(main, ["check", str(finished_run), "--baseline", str(baseline), "--tolerance", "10%"])
    assert ok.exit_code == 0 and "speedup ort-cpu fp32 batch 32" in ok.output
    data = json.loads(baseline.read_text())
    for row in data["rows"]:
        row["speedup"] *= 2  # a baseline twice as fast: the current run is a regression
    baseline.write_text(json.dumps(data))
    regressed = runner.invoke(main, ["check", str(finished_run), "--baseline", str(baseline)])
    assert regressed.exit_code == 1 and "MISSED" in regressed.output


def test_check_fails_on_an_onnx_file_replaced_after_the_run(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    baseline = tmp_path / "baseline.json"
    shutil.copyfile(run / "export" / "dense.onnx", run / "export" / "pruned.onnx")  # the report's figures stay
    result = CliRunner().invoke(main, ["check", str(run), "--write-baseline", str(baseline)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "artifact export/pruned.onnx changed" in errors[0], result.output
    assert not baseline.exists()


def test_a_copied_or_moved_run_profiles_its_own_files(finished_run, tmp_path):
    original, moved = tmp_path / "original", tmp_path / "moved"
    shutil.copytree(finished_run, original)
    record = json.loads((original / "export" / "export.json").read_text())
    assert record["onnx"] == {"dense": "dense.onnx", "pruned": "pruned.onnx"}  # relative to export/
    shutil.copytree(original, moved)
    shutil.rmtree(original)  # a moved run: nothing is left where it was made
    profile = ["profile", str(moved), "--backend", "ort-cpu", "--batch", "1", "--repeats", "5", "--warmup", "1"]
    result = CliRunner().invoke(main, profile)
    assert result.exit_code == 0, result.output
    assert json.loads((moved / "profile.json").read_text())["latency"][0]["backend"] == "ort-cpu"
    # an export.json of an older ofbdeploy: no format, paths as its writer reached them (absolute, or from
    # its working directory) into the directory it was written in
    del record["format"]
    for written_in in (original / "export", Path("runs/original/export")):
        old = {**record, "onnx": {k: str(written_in / v) for k, v in record["onnx"].items()},
               "checks": [{**c, "path": str(written_in / c["path"])} for c in record["checks"]]}
        (moved / "export" / "export.json").write_text(json.dumps(old))
        artifacts = DeployArtifacts.load(moved / "export")
        assert artifacts.onnx == {k: str(moved / "export" / f"{k}.onnx") for k in ("dense", "pruned")}
        assert {c["path"] for c in artifacts.checks} == set(artifacts.onnx.values())
    result = CliRunner().invoke(main, profile)
    assert result.exit_code == 0, result.output


def test_int8_attention_reaches_the_runs_int8_files(finished_run, tmp_path):
    """By default a run's CPU int8 files quantise the attention products; ``false`` (the option's first form)
    re-exports them with the weight products only."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    for flag, products in ((None, "weights and attention"), ("false", "weights only")):
        extra = ["--set", f"export.int8_attention={flag}"] if flag else []
        result = _invoke(str(run / "recipe.yaml"), "--output", str(run), "--set", "export.int8=true", *extra,
                         "--set", "export.calibration_images=16", "--set", "profile.enabled=false")
        assert result.exit_code == 0, result.output
        for name in ("dense", "pruned"):
            record = json.loads((run / "export" / f"{name}-int8.onnx.quant.json").read_text())
            assert record["settings"]["products"] == products


def test_int8_run_reports_accuracy_int8_rows_and_skips_a_missing_backend(finished_run, tmp_path):
    """export.int8 on a finished run: a calibrated Q/DQ file per model, their ORT CPU accuracy next to fp32, int8
    latency rows (with the pruned int8 model against dense fp32 from the same run); a backend this machine lacks
    is skipped with its reason, the rest measured, and a budget on it fails the run (exit 1) naming the reason."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    missing = "ort-trt"  # no TensorRT provider in the CPU onnxruntime
    result = _invoke(str(run / "recipe.yaml"), "--output", str(run), "--set", "export.int8=true",
                     "--set", "export.calibration_images=64", "--set", "profile.precisions=[fp32, int8]",
                     "--set", f"profile.backends=[ort-cpu, {missing}]", "--set", "profile.batches=[1, 8]",
                     "--set", "profile.repeats=5",
                     "--set", f"budget.speedup=[{{backend: {missing}, batch: 1, min: 1}}]")
    assert result.exit_code == 1, result.output
    assert (run / "export" / "pruned-int8.onnx").is_file() and (run / "export" / "dense-int8.onnx").is_file()
    record = json.loads((run / "export" / "pruned-int8.onnx.quant.json").read_text())
    assert record["calibration_images"] == 64 and record["settings"]["activations"] == "int8 symmetric"
    report = json.loads((run / "report.json").read_text())
    accuracy = {(e["model"], e["precision"]): e for e in report["accuracy"]}
    assert set(accuracy) == {("dense", "fp32"), ("pruned", "fp32"), ("dense", "int8"), ("pruned", "int8")}
    assert all(e["runtime"] == "ort-cpu" and e["images"] == 64 and 0 <= e["top5"] <= 100 for e in accuracy.values())
    # the fp32 file's accuracy is the torch model's (same weights, same val split)
    assert accuracy[("pruned", "fp32")]["top1"] == pytest.approx(report["top1_pruned"], abs=1e-6)
    assert {(r["backend"], r["precision"], r["batch"]) for r in report["latency"]} == {
        ("ort-cpu", p, b) for p in ("fp32", "int8") for b in (1, 8)}
    int8 = next(r for r in report["latency"] if (r["precision"], r["batch"]) == ("int8", 1))
    fp32 = next(r for r in report["latency"] if (r["precision"], r["batch"]) == ("fp32", 1))
    assert int8["speedup_vs_dense_fp32"] > 0 and fp32["speedup_vs_dense_fp32"] == pytest.approx(fp32["speedup"])
    assert {(s["backend"], s["precision"], s["batch"]) for s in report["profile_skipped"]} == {
        (missing, "fp32", None), (missing, "int8", None)}
    assert all("TensorrtExecutionProvider" in s["reason"] for s in report["profile_skipped"])
    [check] = report["budget"]
    assert not check["ok"] and check["measured"].startswith("not measured: ") and "Tensorrt" in check["measured"]
    markdown = (run / "report.md").read_text()
    assert "## Accuracy of the exported files" in markdown and f"{missing} int8 every batch:" in markdown
    # `ofbdeploy export --precision int8` on the run: the calibrated files are reused, the accuracy recorded again
    result = CliRunner().invoke(main, ["export", str(run), "--precision", "int8", "--check-images", "16",
                                       "--force"])
    assert result.exit_code == 0, result.output
    assert "pruned-int8" in result.output
    again = json.loads((run / "export" / "export.json").read_text())["accuracy"]
    assert [{k: e[k] for k in report["accuracy"][0]} for e in again] == report["accuracy"]


def test_latency_budget_run_reports_the_prediction_and_checks_the_measurement(tmp_path, synthetic_lut):
    table = synthetic_lut(TINY["model"]["name"], 16)
    dense_ms = table.dense_ms
    lut = table.save(tmp_path / "lut.json")
    recipe = _recipe(tmp_path, search__target_flops_ratio=None, pretrain__epochs=1, finetune__epochs=1,
                     search__latency={"target_ratio": 0.6, "lut": str(lut), "backend": "ort-cpu", "batch": 1})
    result = _invoke(str(recipe))
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    prediction = report["latency_prediction"]
    spec = load_arch(tmp_path / "run" / "finetuned" / "arch.json")
    assert prediction["predicted_ms_pruned"] == pytest.approx(table.predict(spec))
    searched = load_arch(tmp_path / "run" / "pruned" / "arch.json")
    assert table.predict(searched) <= 0.6 * dense_ms + 1e-9  # the search met its budget on the table
    fit = report["fit"]["latency"]  # then the fit stage measured on ORT CPU, in bounded rounds
    assert 1 <= len(fit["rounds"]) <= 4 and fit["tolerance"] == 0.03
    for r in fit["rounds"]:
        assert r["measured_ratio"] > 0 and r["repeats"] >= 3 and r["measurements"] == len(r["spreads"]) >= 1
        assert r["predicted_ratio"] > 0 and r["action"] in ("met", "narrowed", "widened", "stuck", "again, host loaded",
                                                              "last round")
    # met: the kept round (a "met" round ends the loop; else the best one inside the band) measured in the band
    kept = fit["rounds"][fit["kept_round"] - 1]["measured_ratio"]
    assert fit["met"] == (0.6 * (1 - 0.03) <= kept <= 0.6)
    assert fit["rounds"][-1]["action"] != "met" or fit["kept_round"] == len(fit["rounds"])
    log = (tmp_path / "run" / "run.log").read_text()
    assert "fit round 1: predicted" in log
    assert "- round 1: predicted" in (tmp_path / "run" / "report.md").read_text()
    row = next(r for r in report["latency"] if r["batch"] == 1)
    measured = row["latency_ms_pruned"] / row["latency_ms_dense"]
    predicted = prediction["predicted_ms_pruned"] / prediction["dense_ms_at_build"]
    assert prediction["rel_error_fraction"] == pytest.approx(predicted / measured - 1)
    check = next(c for c in report["budget"] if c["name"].startswith("search latency target"))
    assert check["ok"] == (measured <= 0.6) and check["measured"] == f"{measured:.1%}"  # measured, not predicted
    assert result.exit_code == (0 if check["ok"] else 1), result.output


def test_export_without_tensorrt_says_how_to_get_it(finished_run, tmp_path):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed here: the missing-TensorRT path cannot be shown")
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    shutil.rmtree(run / "export")
    result = CliRunner().invoke(main, ["export", str(run), "--trt"])
    assert result.exit_code == 2 and "Docker" in result.output
    assert not (run / "export").exists()


def test_export_and_profile_a_bare_model_directory(finished_run, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(finished_run / "finetuned", model_dir)
    runner = CliRunner()
    result = runner.invoke(main, ["export", str(model_dir), "--check-images", "8"])
    assert result.exit_code == 0, result.output
    assert (model_dir / "export" / "pruned.onnx").is_file() and "top-1 agreement 100.0%" in result.output
    result = runner.invoke(main, ["profile", str(model_dir), "--backend", "ort-cpu", "--backend", "torch",
                                  "--batch", "1,4", "--repeats", "10"])
    assert result.exit_code == 0, result.output
    rows = json.loads((model_dir / "profile.json").read_text())["latency"]
    assert {(r["backend"], r["batch"]) for r in rows} == {("ort-cpu", 1), ("ort-cpu", 4), ("torch", 1), ("torch", 4)}


QUICKSTART = Path(__file__).parents[2] / "recipes" / "quickstart.yaml"


@pytest.mark.multiprocess
def test_torchrun_quickstart_cuts_mid_search_and_finishes_with_a_report(tmp_path):
    """The README's multi-process command on the bundled recipe, shortened: the search cuts layers while it
    trains under DDP, the other rank leaves after the last collective stage, rank 0 reports."""
    run = tmp_path / "run"
    short = ["pretrain.epochs=3", "search.epochs=3", "finetune.epochs=1", "data.limit_train=512",
             "export.check_images=16", "profile.repeats=5", "profile.batches=[1]", f"output_dir={run}",
             "search.shrink_threshold=0.9"]  # weak cells die at the first shrinks: cuts while training
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
         "ofbdeploy", "run", str(QUICKSTART), "--no-progress", *(a for item in short for a in ("--set", item))],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    search = json.loads((run / "search" / "result.json").read_text())
    assert search["cut_steps"] and min(search["cut_steps"]) < search["steps_run"] - 1  # cut, then trained on
    assert search["ddp_builds"] > 1 and search["global_batch"] == 64
    report = json.loads((run / "report.json").read_text())
    assert report["flops_pruned"] <= report["flops_target"] and report["amp"] == "off"
    log = (run / "run.log").read_text()
    assert "2 process(es)" in log and "global batch 64 = 2 process(es) x 1 accumulation step(s) x 32" in log
    assert "processes part after stage evaluate" in log and "stage report: finished" in log


def test_the_process_group_timeout_comes_from_the_recipe(tmp_path, monkeypatch):
    seen = {}

    def fake_init(device, timeout_min):
        seen.update(device=device, timeout_min=timeout_min)
        return context.Dist()

    monkeypatch.setattr(context, "init_distributed", fake_init)
    Run(load_recipe(_recipe(tmp_path, dist_timeout_min=240)))
    assert seen == {"device": "cpu", "timeout_min": 240}


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_run_under_cpu_mixed_precision_meets_the_budget_with_a_working_model(tmp_path, amp):
    result = _invoke(str(_recipe(tmp_path, amp=amp, export={"enabled": False}, profile={"enabled": False})))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["amp"] == amp and report["fp32_matmul"] == "ieee (cpu)"
    assert report["flops_pruned"] <= report["flops_target"]
    assert report["top1_pruned"] > 50 and report["top1_dense"] > 50, report  # chance is 10%
    run = tmp_path / "run"
    assert json.loads((run / "search" / "result.json").read_text())["amp"] == amp
    assert json.loads((run / "finetuned" / "train.json").read_text())["amp"] == amp
