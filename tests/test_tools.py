"""Smoke runs of the benchmark tools on tiny models, so that they keep working."""

import json
import subprocess
import sys
from pathlib import Path

TOOLS = Path(__file__).parent.parent / "tools"


def _run(script: str, *args: str) -> None:
    proc = subprocess.run([sys.executable, str(TOOLS / script), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_bench_search_cost_smoke(tmp_path):
    out = tmp_path / "cost.json"
    _run("bench_search_cost.py", "--model", "ofb_vit_pico_patch4_32", "--img-size", "32", "--batch", "4",
         "--steps", "2", "--warmup", "1", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["search_step_s"] > 0 and result["dense_step_s"] > 0 and result["ratio"] > 0


def test_bench_latency_smoke(tmp_path):
    out = tmp_path / "lat.json"
    _run("bench_latency.py", "--model", "ofb_vit_pico_patch4_32", "--img-size", "32", "--ratio", "0.5",
         "--align", "none", "--backend", "ort-cpu", "--batch", "1", "--repeats", "5", "--warmup", "1",
         "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1 and rows[0]["flops_ratio"] <= 0.5 and rows[0]["speedup"] > 0


def test_bench_accuracy_smoke(tmp_path):
    out = tmp_path / "acc.json"
    _run("bench_accuracy.py", "--smoke", "--cache", str(tmp_path / "cache"), "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["ofb", "uniform", "l1", "random"]
    assert all(r["flops_ratio"] <= 0.5 and 0 <= r["top1"] <= 100 and r["speedup_ort_cpu_b32"] > 0 for r in rows)
    assert list((tmp_path / "cache").glob("teacher-*.safetensors"))  # the dense teacher is cached
