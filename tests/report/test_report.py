import pytest

from ofbdeploy.errors import OfbError
from ofbdeploy.recipe import BudgetCfg, parse_recipe
from ofbdeploy.report.checks import (
    budget_checks,
    format_checks,
    make_baseline,
    parse_baseline,
    parse_tolerance,
    regression_checks,
)
from ofbdeploy.report.render import plot_report, write_markdown
from ofbdeploy.run.gate import recipe_identity


def _report(speedup: float = 1.8, pruned_ms: float = 2.0, device: str = "cpu: test") -> dict:
    return {
        "model": "m", "flops_dense": 4.6e9, "flops_pruned": 2.3e9, "flops_target": 2.3e9, "flops_ratio": 0.5,
        "params_dense": 22e6, "params_pruned": 11e6, "top1_dense": 80.0, "top5_dense": 95.0,
        "top1_pruned_before_finetune": 60.0, "top1_pruned": 78.0, "top5_pruned": 94.0, "search_seconds": 1.0,
        "finetune_seconds": 2.0, "materialize_max_abs_diff": 1e-6, "search_budget_steps": [],
        "search_forced_groups": [],
        "latency": [{"backend": "ort-cpu", "batch": 1, "precision": "fp32", "device": device,
                     "latency_ms_dense": pruned_ms * speedup, "latency_ms_pruned": pruned_ms, "speedup": speedup,
                     "throughput_dense": 1000 / (pruned_ms * speedup), "throughput_pruned": 1000 / pruned_ms}],
    }


def test_budget_checks_pass_and_miss():
    budget = BudgetCfg(max_gflops=2.4, max_params_m=10, min_top1=77,
                       latency=[{"backend": "ort-cpu", "batch": 1, "max_ms": 2.5},
                                {"backend": "ort-cuda", "batch": 1, "max_ms": 1.0}],
                       speedup=[{"backend": "ort-cpu", "batch": 1, "min": 1.5}])
    checks = budget_checks(_report(), budget)
    results = {c.name: (c.ok, c.measured) for c in checks}
    assert results["GFLOPs (MACs)"] == (True, "2.3000")
    assert results["params (M)"] == (False, "11.000")
    assert results["top-1 %"][0]
    assert results["latency ms ort-cpu fp32 batch 1"] == (True, "2.000")
    assert results["latency ms ort-cuda fp32 batch 1"] == (False, "not measured")
    assert results["speedup ort-cpu fp32 batch 1"] == (True, "1.800x")
    assert "MISSED" in format_checks(checks)


def test_regression_compares_speedup_everywhere_and_latency_on_the_same_device():
    recipe = parse_recipe({"model": {"name": "m"}, "data": {"kind": "synthetic"},
                           "search": {"target_flops_ratio": 0.5}})
    baseline = parse_baseline(make_baseline(_report(speedup=2.0, pruned_ms=2.0), recipe.name, recipe_identity(recipe)))
    assert all(c.ok for c in regression_checks(_report(speedup=1.85, pruned_ms=2.1), baseline, 0.10))
    slower = regression_checks(_report(speedup=1.7, pruned_ms=2.0), baseline, 0.10)
    assert [c.ok for c in slower] == [False, True]
    elsewhere = regression_checks(_report(speedup=1.9, pruned_ms=9.0, device="cpu: other"), baseline, 0.10)
    assert len(elsewhere) == 1 and elsewhere[0].ok  # absolute times are not compared across devices
    same_device_slow = regression_checks(_report(speedup=1.9, pruned_ms=2.5), baseline, 0.10)
    assert [c.ok for c in same_device_slow] == [True, False]


@pytest.mark.parametrize(("text", "value"), [("10%", 0.10), ("0.05", 0.05), ("0", 0.0)])
def test_tolerance_parsing(text, value):
    assert parse_tolerance(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["ten", "150%", "-1"])
def test_bad_tolerance_is_an_error(text):
    with pytest.raises(OfbError, match="--tolerance"):
        parse_tolerance(text)


def test_markdown_and_plot_are_written(tmp_path):
    report = _report()
    plot = plot_report(report, tmp_path / "report.png")
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"
    checks = budget_checks(report, BudgetCfg(max_gflops=2.0))
    md = write_markdown(report, checks, tmp_path / "report.md", plot).read_text()
    assert "| ort-cpu" in md and "1.80x" in md and "MISSED" in md and "![accuracy and latency" in md
