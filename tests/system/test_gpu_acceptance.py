"""tools/gpu_acceptance.py in its smoke mode: every part runs its real code on tiny models and records
numbers, so the one prepared GPU command cannot rot between the rare runs on a GPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "tools" / "gpu_acceptance.py"


def _acceptance(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--smoke", "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    return proc, json.loads((out / "acceptance.json").read_text())


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("acceptance")
    proc, result = _acceptance(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, result


def test_every_part_records_real_numbers(smoke):
    out, result = smoke
    parts = result["parts"]
    assert list(parts) == ["env", "exactness", "training", "latency"]
    assert all(p["status"] == "ok" and p["seconds"] > 0 for p in parts.values())
    assert parts["env"]["torch"] and parts["env"]["timm"] and parts["env"]["device"].startswith("cpu: ")

    exact = parts["exactness"]
    assert [(r["fp32"], r["fused_attn"]) for r in exact["masked_vs_materialised"]] == [("ieee", True), ("ieee", False)]
    for row in exact["masked_vs_materialised"]:  # materialisation is exact up to float rounding
        assert _number(row["max_abs_diff"]) and row["max_abs_diff"] <= 1e-4 * max(1e-2, row["output_max_abs"])
        assert row["within_selfcheck_tolerance"] is True
    assert {(r["model"], r["precision"]) for r in exact["half_vs_fp32"]} == {
        (m, p) for m in ("dense", "materialised") for p in ("fp16", "bf16")}
    for row in exact["half_vs_fp32"]:  # rounded, not broken: close to fp32 but not identical
        assert 0 < row["max_abs_diff"] < 0.05 * max(1.0, row["output_max_abs"]) and 0 <= row["top1_agreement"] <= 1
    # every exported file, and the TensorRT int8 file with the attention products too, checked against torch
    assert [r["file"] for r in exact["onnx_graphs"]] == ["fp32", "fp16", "int8", "int8-fp16", "int8-fp16 attention"]
    assert all(_number(r["max_abs_diff"]) and r["runtime"] == "ort-cpu" for r in exact["onnx_graphs"])

    train = parts["training"]
    quickstart = train["quickstart"]
    assert quickstart["status"] == "ok" and quickstart["amp"] == "bf16" and "amp=bf16" in quickstart["overrides"]
    assert 0 < quickstart["flops_ratio"] <= 0.5 + 1e-9 and _number(quickstart["top1_pruned"])
    assert quickstart["wall_s"] > 0 and quickstart["search_images_per_second"] > 0
    assert [r["amp"] for r in train["search_step"]] == ["off", "bf16"]
    assert all(r["dense_images_per_s"] > 0 and r["search_images_per_s"] > 0 and r["ratio"] > 0
               for r in train["search_step"])

    latency = parts["latency"]
    (lut,) = latency["luts"]
    assert lut["probes"] > 3 and lut["build_s"] > 0 and (out / lut["file"]).is_file()
    rows = latency["rows"]
    archs = ["dense", "flops50", "latency50", "flops50_align8", "flops50_align64"]
    assert [(r["arch"], r["batch"]) for r in rows] == [(a, b) for b in (1, 2) for a in archs]
    assert all(r["median_ms"] > 0 and r["speedup"] > 0 and 0 < r["flops_ratio"] <= 1 for r in rows)
    assert all(r["flops_ratio"] <= 0.5 + 1e-9 for r in rows if r["arch"].startswith("flops50"))
    assert all(_number(r["lut_predicted_ms"]) for r in rows if r["batch"] == 1)  # the table's own batch
    shapes = latency["archs"][0]
    assert all(w % 64 == 0 or w == full for (h, c, m), (_, fc, fm) in zip(
        shapes["flops50_align64"]["blocks"], shapes["dense"]["blocks"], strict=True) for w, full in ((c, fc), (m, fm)))

    skipped = {(s["item"], s["reason"]) for p in parts.values() for s in p.get("skipped", [])}
    assert ("masked vs materialised under TF32", "no CUDA") in skipped  # recorded, not faked
    assert "int8 attention products on ort-trt" in {item for item, _ in skipped}
    assert any(item.startswith("fp16/bf16 latency, CUDA graphs") for item, _ in skipped)
    assert len(list(out.iterdir())) <= 8  # what the GPU machine can send back
    table = (out / "acceptance.md").read_text()
    assert "| latency" in table and "flops50_align64" in table and "Quickstart with amp=bf16" in table


def test_a_failing_part_is_recorded_and_the_next_part_still_runs(tmp_path):
    """A recipe that is not there fails the training part; the latency part then runs, and a budget it cannot
    meet cuts it after its first item (the table), which is kept."""
    missing = tmp_path / "no_such_recipe.yaml"
    proc, result = _acceptance(tmp_path / "out", "--parts", "training,latency", "--recipe", str(missing),
                               "--budget-s", "0.5")
    assert proc.returncode == 3
    assert "a part failed; its traceback is in" in proc.stderr
    training, latency = result["parts"]["training"], result["parts"]["latency"]
    assert training["status"] == "error" and str(missing) in training["note"]
    assert "FileNotFoundError" in training["traceback"]
    assert latency["status"] == "cut by budget" and latency["note"].startswith("cut by budget before")
    assert latency["luts"][0]["build_s"] > 0 and "rows" not in latency
    lines = (tmp_path / "out" / "acceptance.md").read_text().splitlines()
    assert any(line.startswith("| training ") and "| error " in line for line in lines)


def test_bad_parts_are_refused_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--parts", "env,warp"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: --parts: unknown part(s) warp; known: env, exactness, training, latency")


def test_what_the_image_lacks_is_a_skip_with_its_reason(monkeypatch, tmp_path):
    """No matplotlib: the quickstart (its report draws a plot) is skipped, not failed; no Triton on CUDA, or no
    C compiler anywhere: torch.compile is skipped, each with the reason."""
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    import gpu_acceptance as acceptance

    found = acceptance.util.find_spec
    monkeypatch.setattr(acceptance.util, "find_spec",
                        lambda name: None if name in ("matplotlib", "triton") else found(name))
    assert "no triton" in acceptance.compile_unavailable(torch.device("cuda"))
    monkeypatch.setattr(acceptance.shutil, "which", lambda name: None)
    assert "no C compiler" in acceptance.compile_unavailable(torch.device("cpu"))
    part = acceptance.Part("training", deadline=float("inf"), save=lambda: None)
    setup = acceptance.Setup(acceptance.SMOKE, torch.device("cpu"), True, tmp_path, tmp_path / "recipe.yaml")
    setup.recipe.write_text("")
    monkeypatch.setattr(acceptance, "_search_cost", lambda *args: None)
    acceptance.part_training(setup, part)
    assert part.record["skipped"] == [{"item": "the quickstart",
                                       "reason": "no matplotlib on this machine: its report stage draws the report's "
                                                 "plot"}]
