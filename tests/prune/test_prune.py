"""Pruning methods as plug-ins: each registered method decides within its budget from the teacher's weights, the
recipe's ``search`` section is a union told apart by ``method``, a missing optional package is refused at the
door, and ``ofbdeploy compare`` puts finished runs side by side."""

import copy
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from ofbdeploy.arch import ArchSpec
from ofbdeploy.cli import main
from ofbdeploy.errors import OfbError
from ofbdeploy.families.vit.searchable import SearchableViT
from ofbdeploy.models.dense import build_dense
from ofbdeploy.models.materialize import materialize
from ofbdeploy.prune import torch_pruning
from ofbdeploy.prune.config import L1Cfg
from ofbdeploy.prune.method import Job
from ofbdeploy.prune.ofb.config import SearchCfg
from ofbdeploy.prune.registry import METHODS, get_method
from ofbdeploy.recipe import RecipeError, load_recipe, parse_recipe
from ofbdeploy.verify.exactness import set_fused_attention

PICO = "ofb_vit_pico_patch4_32"
ONE_SHOT = ["l1", "random", "uniform", "torch-pruning"]
RECIPES = Path(__file__).parents[2] / "recipes"


def _teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_dense(PICO, num_classes=10, img_size=32).eval()


def _decide(method: str, teacher: torch.nn.Module, ratio: float) -> tuple[SearchableViT, object]:
    model = SearchableViT(copy.deepcopy(teacher), model_name=PICO)
    cfg = METHODS[method].config(target_flops_ratio=ratio)
    result = get_method(method).decide(model, cfg, Job(teacher=lambda: copy.deepcopy(teacher),
                                                       log=logging.getLogger("test")))
    return model, result


@pytest.mark.parametrize("method", ONE_SHOT)
@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_one_shot_method_decides_every_group_within_its_budget(method, ratio):
    teacher = _teacher()
    model, result = _decide(method, teacher, ratio)
    assert model.all_decided and result.method == method
    dense = ArchSpec.dense(model.shape).macs()
    assert result.spec == model.arch_spec() and result.achieved_macs == result.spec.macs() <= ratio * dense
    assert result.achieved_macs > 0.5 * ratio * dense  # cut to the budget, not far below it
    pruned, spec = materialize(model.eval())
    assert spec.macs() == result.achieved_macs
    assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("method", ["uniform", "l1", "random"])
def test_scored_methods_start_from_the_teacher_weights(method):
    """Their scores rank units and must not scale the weights: at full width the pruned model is the teacher."""
    teacher = _teacher()
    model, _ = _decide(method, teacher, 1.0)
    pruned = materialize(model.eval())[0].eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pruned(images), teacher(images), rtol=1e-4, atol=1e-5)


def test_torch_pruning_units_are_read_back_exactly():
    """The searchable model cut to the units Torch-Pruning kept computes what Torch-Pruning's own model does
    (its unfused attention keeps the dense softmax temperature, as the cut model does)."""
    teacher = _teacher()
    ratio = 0.5
    plain = torch_pruning.prune_plain(copy.deepcopy(teacher), ratio, 32, 0.05, heads=True)
    set_fused_attention(plain, False)
    model = SearchableViT(copy.deepcopy(teacher), model_name=PICO)
    model.set_mix(0.0)
    model.apply_arch(torch_pruning.kept_spec(teacher, plain, model.shape))
    model.decide_widest()
    pruned = materialize(model.eval())[0].eval()
    assert sum(b.heads for b in model.arch_spec().blocks) < 4 * model.shape.depth  # whole heads went too
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pruned(images), plain(images), rtol=1e-4, atol=1e-5)


def test_a_method_without_its_package_or_for_another_family_is_refused(monkeypatch):
    get_method("torch-pruning").check("vit")  # installed in the dev environment
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # hidden: the import fails
    with pytest.raises(OfbError, match=r"needs the torch_pruning package: pip install 'ofbdeploy\[bench\]'"):
        get_method("torch-pruning").check("vit")
    with pytest.raises(OfbError, match="prunes vit models, not swin"):
        get_method("l1").check("swin")
    get_method("ofb").check("swin")


# -- the recipe's search section ---------------------------------------------------------------------------
BASE = {"model": {"name": PICO}, "data": {"kind": "digits"}}


def _parse(search: dict):
    return parse_recipe({**BASE, "search": search}, "r.yaml")


def test_search_section_is_the_methods_own_config():
    recipe = _parse({"target_flops_ratio": 0.5})  # no method: the OFB search, as every recipe before
    assert isinstance(recipe.search, SearchCfg) and recipe.search.method == "ofb"
    assert yaml.safe_load(recipe.to_yaml())["search"]["method"] == "ofb"  # the resolved recipe names it
    # digests of runs, checkpoints and baselines made before methods existed are unchanged
    assert "method" not in recipe.model_dump(mode="json")["search"]
    recipe = _parse({"method": "l1", "target_flops_ratio": 0.5})
    assert isinstance(recipe.search, L1Cfg) and recipe.search.model_dump() == {
        "method": "l1", "target_flops_ratio": 0.5, "target_gflops": None, "align": None}
    assert yaml.safe_load(recipe.to_yaml())["search"]["method"] == "l1"
    assert parse_recipe(yaml.safe_load(recipe.to_yaml())).search == recipe.search  # the resolved recipe reloads
    assert _parse({"method": "torch-pruning", "target_gflops": 0.01}).search.prune_step == 0.01


@pytest.mark.parametrize("search, message", [
    ({"method": "l1", "target_flops_ratio": 0.5, "epochs": 3}, "r.yaml: search.epochs: unknown field"),
    ({"method": "l1", "target_flops_ratio": 0.5, "latency": {"target_ratio": 0.5}}, "search.latency: unknown field"),
    ({"method": "torch-pruning", "target_flops_ratio": 0.5, "prune_stp": 0.1},
     "search.prune_stp: unknown field under search.method torch-pruning (did you mean 'prune_step'?)"),
    ({"target_flops_ratio": 0.5, "prune_step": 0.1}, "search.prune_step: unknown field"),
    ({"target_flops_ratio": 0.5, "pmim": {"enabld": True}}, "search.pmim.enabld: unknown field (did you mean"),
    ({"method": "magnitude", "target_flops_ratio": 0.5},
     "search.method: expected one of ofb, uniform, l1, random, torch-pruning, got 'magnitude'"),
    ({"method": "l1"}, "search: give a budget: target_flops_ratio or target_gflops"),
    ({"method": "torch-pruning", "target_flops_ratio": 0.5, "align": 16}, "not grid steps: drop search.align"),
    ({}, "search: give a budget: target_flops_ratio, target_gflops or latency"),
])
def test_search_section_errors_are_one_line(search, message):
    with pytest.raises(RecipeError) as err:
        _parse(search)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load_as_the_ofb_search(path):
    assert isinstance(load_recipe(path).search, SearchCfg)


# -- whole runs through the CLI ------------------------------------------------------------------------------
TINY = {
    "name": "tiny", "seed": 1, "device": "cpu",
    "model": {"name": PICO, "img_size": 16},
    "data": {"kind": "synthetic", "limit_train": 128, "limit_val": 64, "batch_size": 32, "eval_batch_size": 64},
    "pretrain": {"epochs": 1, "lr": 4e-3, "warmup_epochs": 0},
    "finetune": {"epochs": 1, "lr": 2e-3, "warmup_epochs": 0},
    "export": {"check_images": 8},
    "profile": {"batches": [1], "repeats": 5, "warmup": 1},
}


def _run(tmp: Path, name: str, search: dict) -> tuple[Path, object]:
    recipe = tmp / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp / name), "search": search}))
    return tmp / name, CliRunner().invoke(main, ["run", str(recipe), "--no-progress"])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path]:
    """An l1 run and a Torch-Pruning run of the same recipe, through the CLI as a user runs them."""
    tmp = tmp_path_factory.mktemp("methods")
    runs = []
    for method in ("l1", "torch-pruning"):
        run, result = _run(tmp, method, {"method": method, "target_flops_ratio": 0.5})
        assert result.exit_code == 0, result.output
        runs.append(run)
    return runs[0], runs[1]


def test_torch_pruning_run_end_to_end(two_runs):
    _, run = two_runs
    report = json.loads((run / "report.json").read_text())
    assert report["method"] == "torch-pruning"
    assert report["flops_pruned"] <= report["flops_target"] == 0.5 * report["flops_dense"]
    assert report["materialize_max_abs_diff"] <= 1e-4 and report["latency"]
    assert yaml.safe_load((run / "recipe.yaml").read_text())["search"]["method"] == "torch-pruning"
    result = json.loads((run / "search/result.json").read_text())
    assert result["method"] == "torch-pruning" and "head_pruning" in result["state"]
    log = (run / "run.log").read_text()
    assert "torch-pruning decided" in log and "stage finetune: finished" in log


def test_compare_prints_one_table_and_writes_the_plot(two_runs, tmp_path):
    l1, tp = two_runs
    plot, table_md, rows_json = tmp_path / "cmp.png", tmp_path / "cmp.md", tmp_path / "cmp.json"
    result = CliRunner().invoke(main, ["compare", str(l1), str(tp), "--plot", str(plot), "--markdown",
                                       str(table_md), "--json", str(rows_json)])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert "FLOPs % of dense" in lines[0] and "ort-cpu fp32 b1 (pruned, speedup)" in lines[0]
    reports = [json.loads((run / "report.json").read_text()) for run in (l1, tp)]
    for line, run, report, method in zip(lines[2:], (l1, tp), reports, ("l1", "torch-pruning"), strict=True):
        row = report["latency"][0]
        assert line.startswith(str(run)) and f" {method} " in line
        assert f"{100 * report['flops_ratio']:.1f}" in line and f"{report['top1_pruned']:.2f}" in line
        assert f"{report['params_pruned'] / 1e6:.3f}" in line
        assert f"{row['latency_ms_pruned']:.3f} ms, {row['speedup']:.2f}x" in line
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert table_md.read_text().startswith("| run ")
    assert [r["method"] for r in json.loads(rows_json.read_text())["runs"]] == ["l1", "torch-pruning"]
    again = CliRunner().invoke(main, ["compare", str(l1), "--plot", str(plot)])  # no overwrite without --force
    assert again.exit_code == 2 and "--force" in again.output
    again = CliRunner().invoke(main, ["compare", str(l1), "--plot", str(plot), "--force"])
    assert again.exit_code == 0, again.output


def test_compare_refuses_bad_input_in_one_line(two_runs, tmp_path):
    l1, _ = two_runs
    (tmp_path / "empty").mkdir()
    bad_report = tmp_path / "bad"
    bad_report.mkdir()
    (bad_report / "report.json").write_text('{"model": "x"}')
    for args, message in [([str(tmp_path / "nope")], "does not exist"), ([str(tmp_path / "empty")], "no report.json"),
                          ([str(bad_report)], "not a run report"), ([], "Missing argument")]:
        result = CliRunner().invoke(main, ["compare", str(l1), *args] if args else ["compare"])
        assert result.exit_code == 2 and message in result.output, result.output
    help_text = CliRunner().invoke(main, ["compare", "--help"]).output
    assert all(option in help_text for option in ("--plot", "--json", "--markdown", "--force"))


def test_torch_pruning_without_the_package_is_refused_before_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    run, result = _run(tmp_path, "tp", {"method": "torch-pruning", "target_flops_ratio": 0.5})
    assert result.exit_code == 2 and not run.exists()
    assert "pip install 'ofbdeploy[bench]'" in result.output and len(result.output.strip().splitlines()) == 1
