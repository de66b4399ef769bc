from pathlib import Path

import pytest
import timm
import yaml

from ofbdeploy.families import family_of, read_shape
from ofbdeploy.prune.budget import check_budget, resolve_target
from ofbdeploy.recipe import RecipeError, load_recipe, parse_recipe, safe_yaml

RECIPES = sorted((Path(__file__).parents[2] / "recipes").rglob("*.yaml"))
BASE = {"model": {"name": "ofb_vit_pico_patch4_32"}, "data": {"kind": "digits"}, "search": {"target_flops_ratio": 0.5}}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_parse_and_their_budgets_fit(path):
    recipe = load_recipe(path)
    shape = read_shape(timm.create_model(recipe.model.name, num_classes=recipe.model.num_classes or 10,
                                         img_size=recipe.model.img_size))
    space = family_of(shape).space(shape, recipe.search.align)
    check_budget(resolve_target(recipe.search, shape), space, shape)


def test_paper_budgets_are_absolute_gflops():
    assert [load_recipe(p).search.target_gflops for p in RECIPES if p.name.startswith("ofb_deit_")] == \
        [0.9, 1.1, 1.7, 3.6, 8.7]


def _write(tmp: Path, name: str, data: dict) -> Path:
    (tmp / name).write_text(yaml.safe_dump(data))
    return tmp / name


def test_extends_merges_section_by_section(tmp_path):
    _write(tmp_path, "base.yaml", {**BASE, "search": {"target_flops_ratio": 0.5, "epochs": 7}})
    child = _write(tmp_path, "child.yaml", {"extends": "base.yaml", "search": {"epochs": 9}})
    recipe = load_recipe(child)
    assert recipe.search.epochs == 9 and recipe.search.target_flops_ratio == 0.5


def test_extends_cycle_is_an_error(tmp_path):
    _write(tmp_path, "a.yaml", {"extends": "b.yaml"})
    _write(tmp_path, "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(RecipeError, match="extends itself"):
        load_recipe(tmp_path / "a.yaml")


def test_overrides_are_yaml_values(tmp_path):
    path = _write(tmp_path, "r.yaml", BASE)
    recipe = load_recipe(path, ["search.epochs=3", "search.align=16", "search.pmim.enabled=false", "data.root=/x"])
    assert recipe.search.epochs == 3 and recipe.search.warmup_epochs is None and recipe.search.align == 16
    assert not recipe.search.pmim.enabled
    assert recipe.data.root == "/x"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["search.epocs=3"], r"r\.yaml: search\.epocs: unknown field \(did you mean 'epochs'\?\)"),
        (["search.align=12"], r"search\.align: Input should be 8, 16, 32 or 64, got 12"),
        (["search.target_gflops=1.0"], "give one of target_flops_ratio and target_gflops, not both"),
        (["search.warmup_epochs=200"], r"warmup_epochs \(200\) exceeds epochs \(100\)"),
        (["search.epochs=3", "search.warmup_epochs=4"], r"warmup_epochs \(4\) exceeds epochs \(3\)"),
        (["data.batch_size=0"], r"data\.batch_size: Input should be greater than or equal to 1, got 0"),
        (["modle.name=x"], r"modle: unknown field \(did you mean 'model'\?\)"),
        (["search=3"], "search: Input should be"),
        (["search.latency={target_ratio: 0.5, backend: ort-cpu, batch: 8}"],
         "search.latency targets ort-cpu fp32 batch 8, which profile does not measure"),
    ],
)
def test_errors_are_one_line_naming_the_field(tmp_path, change, message):
    with pytest.raises(RecipeError, match=message) as err:
        load_recipe(_write(tmp_path, "r.yaml", BASE), change)
    assert "\n" not in str(err.value)


def test_resolved_recipe_round_trips(tmp_path):
    recipe = parse_recipe(BASE)
    recipe.save(tmp_path / "resolved.yaml")
    assert load_recipe(tmp_path / "resolved.yaml") == recipe


def test_a_duplicate_key_is_refused_naming_it_and_its_lines(tmp_path):
    """PyYAML would keep the second ``budget`` and silently drop the first, limit and all."""
    (tmp_path / "base.yaml").write_text("model: {name: ofb_vit_pico_patch4_32}\n")
    (tmp_path / "r.yaml").write_text("extends: base.yaml\nbudget:\n  max_gflops: 1.0\ndata: {kind: synthetic}\n"
                                     "budget:\n  speedup: []\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: line 5: duplicate key 'budget' \(first at line 2\)"):
        load_recipe(tmp_path / "r.yaml")
    (tmp_path / "r.yaml").write_text("extends: base.yaml\ndata: {kind: synthetic, kind: imagefolder}\n")
    with pytest.raises(RecipeError, match="line 2: duplicate key 'kind'"):
        load_recipe(tmp_path / "r.yaml")
    with pytest.raises(RecipeError, match="duplicate key 'a'"):
        load_recipe(tmp_path / "base.yaml", ["model.overrides={a: 1, a: 2}"])
    # a merge key and the keys beside it are not duplicates
    assert safe_yaml("x: &x {a: 1, b: 1}\ny: {<<: *x, a: 2}\n", "s") == {"x": {"a": 1, "b": 1}, "y": {"a": 2, "b": 1}}


def test_an_int8_export_is_profiled_unless_the_recipe_lists_its_precisions() -> None:
    base = {"model": {"name": "ofb_vit_pico_patch4_32"}, "data": {"kind": "digits"},
            "search": {"target_flops_ratio": 0.5}}
    assert parse_recipe({**base, "export": {"int8": True}}).profile.precisions == ["fp32", "int8"]
    assert parse_recipe(base).profile.precisions == ["fp32"]
    chosen = parse_recipe({**base, "export": {"int8": True}, "profile": {"precisions": ["fp32"]}})
    assert chosen.profile.precisions == ["fp32"]
    resolved = parse_recipe({**base, "export": {"int8": True}})
    assert parse_recipe(resolved.model_dump(mode="json")) == resolved  # the resolved recipe reads back the same


def test_int8_attention_names_the_files_and_reads_its_first_boolean_form(tmp_path) -> None:
    base = {"model": {"name": "ofb_vit_pico_patch4_32"}, "data": {"kind": "digits"},
            "search": {"target_flops_ratio": 0.5}}
    assert parse_recipe(base).export.int8_attention == "cpu"
    for given, read in ((True, "all"), (False, "none"), ("all", "all"), ("none", "none")):
        assert parse_recipe({**base, "export": {"int8_attention": given}}).export.int8_attention == read
    with pytest.raises(RecipeError, match=r"export\.int8_attention: Input should be 'cpu', 'all' or 'none'"):
        parse_recipe({**base, "export": {"int8_attention": "gpu"}})
