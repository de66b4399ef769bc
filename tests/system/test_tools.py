"""Smoke runs of the benchmark tools on tiny models, so that they keep working."""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import timm
import torch

import ofbdeploy.models.zoo  # noqa: F401  (the pico config)
from ofbdeploy.arch import ArchSpec
from ofbdeploy.families.registry import family_of, read_shape

TOOLS = Path(__file__).parents[2] / "tools"
PICO = "ofb_vit_pico_patch4_32"


def _tool(script: str) -> Path:
    """The tool's file, in whichever of tools/'s kinds (benchmarks, scripts, qa) holds it."""
    (path,) = TOOLS.glob(f"*/{script}")
    return path


def _load_tool(script: str) -> ModuleType:
    """A tool's module, imported from its file (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), _tool(script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(script: str, *args: str, code: int = 0, stdout: bool = False) -> str:
    """Runs a tool, checks its exit code and returns its stderr (its stdout if asked)."""
    proc = subprocess.run([sys.executable, str(_tool(script)), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == code, proc.stderr[-2000:]
    return proc.stdout if stdout else proc.stderr


def test_bench_search_cost_smoke(tmp_path, synthetic_lut):
    out = tmp_path / "cost.json"
    _run("bench_search_cost.py", "--model", "ofb_vit_pico_patch4_32", "--img-size", "32", "--batch", "4",
         "--steps", "2", "--warmup", "1", "--latency-lut", str(synthetic_lut(PICO, 32).save(tmp_path / "lut.json")),
         "--distill", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["search_step_s"] > 0 and result["dense_step_s"] > 0 and result["ratio"] > 0
    assert result["latency_search_step_s"] > 0 and result["latency_ratio"] > 0
    assert result["distill_search_step_s"] > 0 and result["distill_ratio"] > 0


def test_bench_loader_smoke(tmp_path):
    out = tmp_path / "loader.json"
    _run("bench_loader.py", "--images", "8", "--classes", "2", "--img-size", "32", "--batch", "4", "--workers", "0,1",
         "--repeats", "1", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["workers"] for r in rows] == [0, 1]
    assert all(r["images_per_s_per_worker"] > 0 and r["images_per_cpu_s"] > 0 for r in rows)


def test_bench_latency_smoke(tmp_path, synthetic_lut):
    out = tmp_path / "lat.json"
    _run("bench_latency.py", "--model", "ofb_vit_pico_patch4_32", "--img-size", "32", "--ratio", "0.5",
         "--align", "none", "--backend", "ort-cpu", "--batch", "1", "--repeats", "5", "--warmup", "1",
         "--lut", str(synthetic_lut(PICO, 32).save(tmp_path / "lut.json")), "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["flops", "latency"] and all(r["speedup"] > 0 for r in rows)
    assert rows[0]["flops_ratio"] <= 0.5 and rows[0]["predicted_latency_fraction"] is None
    assert rows[1]["predicted_latency_fraction"] <= 0.5  # the budget is met on the table's prediction


def test_bench_accuracy_smoke(tmp_path):
    out, plot, table = tmp_path / "acc.json", tmp_path / "acc.png", tmp_path / "acc.md"
    log = _run("bench_accuracy.py", "--smoke", "--cache", str(tmp_path / "cache"), "--json", str(out), "--plot",
               str(plot), "--markdown", str(table), stdout=True)
    result = json.loads(out.read_text())
    rows = result["rows"]
    # a background run says what it is doing: the LUT build and each row as it finishes
    assert "latency table built" in log and all(f"row {i}/6 done" in log for i in range(1, 7)), log[-2000:]
    assert [r["method"] for r in rows] == ["ofb", "ofb-latency", "uniform", "l1", "random", "torch-pruning"]
    assert all(0 <= r["top1"] <= 100 and 0 <= r["top1_before_finetune"] <= 100 and r["speedup_ort_cpu_b32"] > 0
               and r["latency_ms_pruned_ort_cpu_b32"] > 0 and r["latency_ms_dense_ort_cpu_b32"] > 0 and r["seed"] == 0
               and r["params"] > 0 for r in rows)
    assert all(r["flops_ratio"] <= r["ratio"] for r in rows if r["budget"] == "flops")
    assert [r["method"] for r in rows if r["budget"] == "latency"] == ["ofb-latency"]
    tp_row = rows[-1]  # Torch-Pruning removes whole heads too (the pico ViT has 4 per block)
    assert tp_row["head_pruning"] and sum(heads for heads, _, _ in tp_row["blocks"]) < 4 * len(tp_row["blocks"])
    assert all(r["predicted_latency_ms"] <= r["target_latency_ms"] for r in rows if r["budget"] == "latency")
    # and, as in a run's fit stage, the latency budget is then closed on measurements of the searched model
    rounds = rows[1]["latency_fit_rounds"]
    assert rounds and all(r["measured_ratio"] > 0 and r["repeats"] > 0 for r in rounds)
    assert rows[1]["latency_fit_kept_round"] in [r["round"] for r in rounds]
    # ... and its profile after the finetune was told a loaded host by the loop's quiet dense latency, as a run's is
    assert rows[1]["latency_quiet_dense_ms"] > 0 and rows[1]["latency_measurements_ort_cpu_b32"] >= 1
    # every method trains on as many images: OFB's search epochs run plus its finetune = the others' finetune
    searched = {r["method"]: r["search_epochs_run"] + r["finetune_epochs"] for r in rows if "search_epochs_run" in r}
    assert set(searched) == {"ofb", "ofb-latency"}
    assert {r["finetune_epochs"] for r in rows if "search_epochs_run" not in r} == set(searched.values())
    assert {(s["method"], s["seeds"] == [0]) for s in result["summary"]} == {(r["method"], True) for r in rows}
    assert plot.stat().st_size > 0
    markdown = table.read_text()
    assert all(f"| {r['method']} " in markdown and f"{r['top1']:.2f}" in markdown for r in rows)
    # --render writes the table again from the JSON alone, the same
    table.unlink()
    _run("bench_accuracy.py", "--render", "--json", str(out), "--markdown", str(table))
    assert table.read_text() == markdown
    assert list((tmp_path / "cache").glob("teacher-*.safetensors"))  # the dense teacher is cached
    assert list((tmp_path / "cache" / "lut").glob("*.json"))  # and the latency table of ofb-latency
    # a rerun with the same --json resumes: nothing is left to do, the rows stay as they were
    _run("bench_accuracy.py", "--smoke", "--cache", str(tmp_path / "cache"), "--json", str(out))
    resumed = json.loads(out.read_text())
    assert resumed["rows"] == rows and len(resumed["meta"]["commands"]) == 2  # both commands are on record
    # rows distilled from another teacher (a lost cache re-made differently) are not mixed with this one's
    for row in resumed["rows"]:
        row["top1_dense"] = -1.0
    out.write_text(json.dumps(resumed))
    err = _run("bench_accuracy.py", "--smoke", "--cache", str(tmp_path / "cache"), "--json", str(out), code=2)
    assert "teacher" in err and len(err.strip().splitlines()) == 1
    # unless asked to: then every row keeps its own teacher's top-1, and "vs dense" is against that one
    _run("bench_accuracy.py", "--smoke", "--cache", str(tmp_path / "cache"), "--json", str(out), "--new-teacher")
    summary = json.loads(out.read_text())["summary"]
    assert all(s["top1_dense"] == [-1.0] and abs(s["vs_dense"] - s["top1"] - 1.0) < 1e-6 for s in summary)
    # the diagnostics run only when named: searched widths on the teacher's weights, finetuned as the
    # baselines are (ofb-arch) or for OFB's own finetune epochs (ofb-restart, as many images as OFB)
    _run("bench_accuracy.py", "--smoke", "--cache", str(tmp_path / "cache"), "--json", str(out), "--new-teacher",
         "--method", "ofb-arch", "--method", "ofb-restart")
    arch_row, restart_row = json.loads(out.read_text())["rows"][-2:]
    assert arch_row["method"] == "ofb-arch" and restart_row["method"] == "ofb-restart"
    assert all(r["flops_ratio"] <= r["ratio"] for r in (arch_row, restart_row))
    assert arch_row["finetune_epochs"] == rows[2]["finetune_epochs"]  # as many as uniform's, not OFB's
    assert restart_row["finetune_epochs"] == rows[0]["finetune_epochs"] < arch_row["finetune_epochs"]  # OFB's
    assert restart_row["blocks"] == arch_row["blocks"]  # the same seed's search: the same architecture


def test_bench_lut_smoke(tmp_path, synthetic_lut):
    out = tmp_path / "lut_accuracy.json"
    table = synthetic_lut(PICO, 32)
    _run("bench_lut.py", "--model", PICO, "--img-size", "32", "--samples", "2", "--repeats", "5",
         "--lut", str(table.save(tmp_path / "lut.json")), "--json", str(out))
    result = json.loads(out.read_text())
    assert len(result["rows"]) == 2 and result["meta"]["lut"]["coefficients"] == table.coefficients
    for row in result["rows"]:
        assert row["measured_ms"] > 0 and row["error"] == pytest.approx(row["predicted_ms"] / row["measured_ms"] - 1)
        assert row["ratio_error"] == pytest.approx(row["predicted_fraction"] / row["measured_fraction"] - 1)


def test_family_census_smoke(tmp_path):
    out = tmp_path / "census.json"
    _run("family_census.py", "--modules", "deit", "--exactness", "--json", str(out))
    rows = json.loads(out.read_text())
    assert rows["deit_tiny_distilled_patch16_224"]["family"] == "vit"
    assert rows["deit_tiny_patch16_224"]["verdict"] == "supported"
    assert all(r["verdict"] != "crashed" for r in rows.values())
    assert rows and all(r["exactness"]["ok"] for r in rows.values() if "exactness" in r)
    assert sum("exactness" in r for r in rows.values()) >= 3  # DeiT, DeiT-III, distilled DeiT


def test_bench_int8_smoke(tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"arch": {"embed_dim": 48, "blocks": [
        {"heads": 2, "head_dim": 16, "mlp_dim": 96}] * 4}}))
    out = tmp_path / "int8.json"
    _run("bench_int8.py", "--model", PICO, "--arch", str(report), "--batch", "1", "--repeats", "5", "--warmup", "1",
         "--calibration-images", "8", "--variants", "--backend", "ort-cpu", "--backend", "openvino",
         "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    files = [("dense", "fp32"), ("dense", "int8"), ("pruned", "fp32"), ("pruned", "int8"), ("pruned", "u8-asym"),
             ("pruned", "all-qdq"), ("pruned", "weights")]
    assert [(r["backend"], r["model"], r["file"]) for r in rows] == \
        [(backend, *f) for backend in ("ort-cpu", "openvino") for f in files]  # the study variants on both
    dense = [r for r in rows if r["model"] == "dense" and r["file"] == "fp32"]
    assert all(r["speedup_vs_dense_fp32"] == 1.0 for r in dense) and all(r["median_ms"] > 0 for r in rows)
    assert rows[2]["flops_limit"] > 1 and rows[0]["device"].startswith("cpu: ")


def test_search_start_smoke(tmp_path):
    """The diagnostic prints the step-0 accuracies and which loss dominates the sparsity logits' gradient."""
    proc = subprocess.run([sys.executable, str(_tool("search_start.py")), "--smoke", "--cache", str(tmp_path),
                           "--ratio", "0.5"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    norms = {line.split()[0]: float(line.split()[-1]) for line in proc.stdout.splitlines()
             if line.strip().startswith(("one-hot", "FLOPs"))}
    assert "search model at step 0" in proc.stdout and "task + PMIM loss" in proc.stdout
    assert norms["one-hot"] > norms["FLOPs"] > 0  # at the method's uniform start the one-hot loss leads
    # a budget the search would refuse is refused here too: one line, exit 2
    err = _run("search_start.py", "--smoke", "--cache", str(tmp_path), "--ratio", "0.01", code=2)
    assert "cannot be met" in err and len(err.strip().splitlines()) == 1


def test_hostile_suite_registers_every_category():
    """The suite split by category still holds every case, each under its category's module."""
    listing = _run("hostile_inputs.py", "--list", stdout=True)
    rows = [line.split("\t") for line in listing.splitlines()]
    categories = {row[0] for row in rows}
    assert {"recipe", "options", "paths", "models", "checkpoints", "data", "baselines", "luts", "arch", "rundir",
            "signals", "links"} <= categories
    assert len(rows) >= 129 and len({(row[0], row[1]) for row in rows}) == len(rows)  # no case registered twice


def test_hostile_suite_runs_a_case():
    """One cheap case end to end through the harness: the real CLI refuses an unknown command in one line."""
    out = _run("hostile_inputs.py", "--only", "options", "--case", "unknown command", stdout=True)
    assert "| options | unknown command | 2 | 2 | yes | yes |" in out and "1/1 handled" in out


@pytest.mark.parametrize("fraction", [0.0, 0.4, 1.0])
def test_remeasure_builds_a_swin_of_the_recorded_stage_widths(fraction):
    """The harness's hand-made Swin (every stage's width, heads with their bias-table columns) has the parameters
    ofbdeploy counts for the same widths."""
    remeasure = _load_tool("remeasure.py")
    name = "ofb_swin_pico_patch2_32"
    shape = read_shape(timm.create_model(name, num_classes=10), name)
    space = family_of(shape).space(shape)
    narrowest = ArchSpec.narrowest(shape, space)
    spec = narrowest if fraction == 0.0 else ArchSpec.dense(shape) if fraction == 1.0 else ArchSpec(
        shape, tuple(s.embedding[len(s.embedding) // 2] for s in space.stage_spaces), tuple(
            type(b)(b.heads, b.head_dim, b.mlp_dim + 8 * (i % 3)) for i, b in enumerate(narrowest.blocks)))
    arch = {"family": "swin", "embed_dims": list(spec.embed_dims),
            "blocks": [{"heads": b.heads, "head_dim": b.head_dim, "mlp_dim": b.mlp_dim} for b in spec.blocks]}
    plain = remeasure.plain_model(name, 32, 10, arch)
    assert sum(p.numel() for p in plain.parameters()) == spec.params()
    assert plain(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_remeasure_builds_the_recorded_widths_independently(tmp_path):
    """The independent harness's plain model has the parameters ofbdeploy counts for the same widths, and it
    times a run directory end to end."""
    remeasure = _load_tool("remeasure.py")
    shape = read_shape(timm.create_model(PICO, num_classes=10, img_size=32), PICO)
    widths = {"embedding": 40, **{f"blocks.{i}.attn": (2 + i % 2, 12) for i in range(shape.depth)},
              **{f"blocks.{i}.mlp": (96 + 32 * i,) for i in range(shape.depth)}}
    spec = shape.spec_from_widths(widths)
    arch = {"embed_dim": 40, "blocks": [{"heads": b.heads, "head_dim": b.head_dim, "mlp_dim": b.mlp_dim}
                                        for b in spec.blocks]}
    plain = remeasure.plain_model(PICO, 32, 10, arch)
    assert sum(p.numel() for p in plain.parameters()) == spec.params()
    assert plain(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    run = tmp_path / "run"
    (run / "finetuned").mkdir(parents=True)
    (run / "finetuned" / "arch.json").write_text(json.dumps({"base": {"model_name": PICO, "img_size": 32,
                                                                      "num_classes": 10}}))
    (run / "report.json").write_text(json.dumps({"arch": arch, "flops_ratio": 0.5, "latency": [
        {"backend": "ort-cpu", "batch": 1, "precision": "fp32", "latency_ms_dense": 2.0, "latency_ms_pruned": 1.0}]}))
    (run / "export").mkdir()
    remeasure.export(plain, run / "export" / "pruned.onnx", 32, 1)
    remeasure.export(timm.create_model(PICO, num_classes=10, img_size=32).eval(), run / "export" / "dense.onnx", 32, 1)
    out = tmp_path / "re.json"
    log = _run("remeasure.py", str(run), "--rounds", "2", "--repeats", "3", "--threads", "1", "--files",
               "--json", str(out), stdout=True)
    (result,) = json.loads(out.read_text())
    assert result["run_ratio"] == 0.5 and result["plain_export"]["ratio"] > 0 and "plain export" in log
    assert set(result["files"]) == {"ort:dense", "ort:pruned"}
    assert result["files"]["ort:dense"]["speedup_vs_dense_fp32"] == 1.0


def test_remeasure_gives_the_ratio_of_the_quiet_rounds_beside_that_of_all():
    """Rounds 2 and 3 run in a spell of load that adds 2 ms to every call (4 ms dense, 2 ms pruned when quiet):
    the ratio over all rounds moves toward 4/6, the quiet rounds' stays at 1/2."""
    remeasure = _load_tool("remeasure.py")
    counts = {"dense": 0, "pruned": 0}
    warmup, repeats = 3, 3

    def call(name: str, quiet_ms: float):
        def run(_x):
            spell = (counts[name] - warmup) // repeats in (1, 2)
            counts[name] += 1
            time.sleep((quiet_ms + 2 * spell) / 1000)
        return run

    timing = remeasure.paired_ratio(call("dense", 4), call("pruned", 2), (1, 1), rounds=4, repeats=repeats)
    assert counts == {"dense": warmup + 4 * repeats, "pruned": warmup + 4 * repeats}
    assert timing["quiet_rounds"] == 2 and timing["quiet_ratio"] == pytest.approx(0.5, abs=0.05)
    assert timing["ratio"] > 0.55 and len(timing["dense_ms_per_round"]) == 4


def test_host_spells_tells_quiet_trials_from_loaded_ones(tmp_path):
    """``spells`` splits trials at the margin over each model's fastest; the tool times two files end to end."""
    spells = _load_tool("host_spells.py").spells
    trials = [{"dense_ms": d, "pruned_ms": p, "ratio": p / d}
              for d, p in [(48.0, 32.0), (49.0, 32.5), (59.0, 45.0), (48.5, 44.0), (60.0, 46.0)]]
    summary = spells(trials, 0.075)
    assert [t["quiet"] for t in trials] == [True, True, False, False, False]  # the 4th: pruned alone loaded
    assert summary["quiet"]["trials"] == 2 and summary["loaded"]["trials"] == 3
    assert summary["quiet"]["ratio"] == pytest.approx((32 / 48 + 32.5 / 49) / 2)
    assert summary["loaded"]["ratio"] == pytest.approx(46 / 60)  # the median of 45/59, 44/48.5, 46/60
    remeasure = _load_tool("remeasure.py")
    model = timm.create_model(PICO, num_classes=10, img_size=32).eval()
    dense, pruned = tmp_path / "dense.onnx", tmp_path / "pruned.onnx"
    remeasure.export(model, dense, 32, 1)
    remeasure.export(remeasure.plain_model(PICO, 32, 10, {"embed_dim": 40, "blocks": [
        {"heads": 2, "head_dim": 12, "mlp_dim": 96}] * 4}), pruned, 32, 1)
    out = tmp_path / "spells.json"
    log = _run("host_spells.py", str(dense), str(pruned), "--trials", "3", "--rounds", "2", "--calls", "2",
               "--threads", "1", "--json", str(out), stdout=True)
    result = json.loads(out.read_text())
    summary = result["summary"]  # how many trials are quiet depends on this host's load: only the count adds up
    assert len(result["trials"]) == summary["quiet"]["trials"] + summary["loaded"]["trials"] == 3 and "quiet:" in log
    assert "expected an ONNX file" in _run("host_spells.py", str(tmp_path / "none.onnx"), str(pruned), code=2)


def test_remeasure_builds_a_layer_scale_vit_and_times_a_benchmarks_latency_rows(tmp_path):
    """A DINOv2 ViT (LayerScale on every residual branch) rebuilt at a benchmark row's widths has the parameters
    ofbdeploy counts; ``--rows`` times every latency-budget row of a bench_accuracy.py file, and only those."""
    remeasure = _load_tool("remeasure.py")
    name = "vit_small_patch14_dinov2"
    shape = read_shape(timm.create_model(name, num_classes=10, img_size=56), name)
    blocks = [(2 + i % 3, 32, 256 + 64 * (i % 2)) for i in range(shape.depth)]
    spec = shape.spec_from_widths({"embedding": 192,
                                   **{f"blocks.{i}.attn": (h, d) for i, (h, d, _) in enumerate(blocks)},
                                   **{f"blocks.{i}.mlp": (m,) for i, (_, _, m) in enumerate(blocks)}})
    row = {"budget": "latency", "method": "ofb-latency", "ratio": 0.5, "seed": 0, "embed_dim": 192, "blocks": blocks,
           "latency_ms_pruned_ort_cpu_b32": 1.0, "latency_ms_dense_ort_cpu_b32": 2.0}
    arch = {"embed_dim": 192, "blocks": [{"heads": h, "head_dim": d, "mlp_dim": m} for h, d, m in blocks]}
    plain = remeasure.plain_model(name, 56, 10, arch)
    assert sum(p.numel() for p in plain.parameters()) == spec.params()
    assert plain(torch.randn(2, 3, 56, 56)).shape == (2, 10)
    pico = {**row, "embed_dim": 40, "blocks": [(2, 12, 96)] * 4}
    rows = tmp_path / "acc.json"
    rows.write_text(json.dumps({"meta": {"settings": {"model": PICO, "img_size": 32}},
                                "rows": [pico, {**pico, "budget": "flops", "method": "ofb", "tag": "x"}]}))
    out = tmp_path / "re.json"
    log = _run("remeasure.py", str(rows), "--rows", "--rounds", "2", "--repeats", "3", "--threads", "1", "--json",
               str(out), stdout=True)
    (result,) = json.loads(out.read_text())
    assert result["run_ratio"] == 0.5 and result["batch"] == 32 and result["plain_export"]["ratio"] > 0
    assert "plain export" in log and result["row"]["budget"] == "latency"
    # the FLOPs-budget rows of a method and tag, to compare at the same measured speed
    _run("remeasure.py", str(rows), "--rows", "--row-method", "ofb", "--row-tag", "x", "--rounds", "1", "--repeats",
         "2", "--threads", "1", "--json", str(out))
    (result,) = json.loads(out.read_text())
    assert result["row"]["budget"] == "flops" and result["row"]["tag"] == "x"
