"""Property test: random and mutated recipes, arch.json files, baselines and latency tables given to the
parsers give a valid object or one clear error (an OfbError subclass), never any other exception."""

import copy
import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ofbdeploy.arch import ArchSpec, arch_to_dict
from ofbdeploy.errors import OfbError
from ofbdeploy.families import arch_from_dict
from ofbdeploy.families.vit.shape import ViTShape
from ofbdeploy.latency.lut import LatencyLUT, LutKey
from ofbdeploy.recipe import Recipe, load_recipe, parse_recipe
from ofbdeploy.report.checks import BASELINE_FORMAT, parse_baseline

SHAPE = ViTShape(img_size=16, patch_size=4, in_chans=3, num_classes=10, embed_dim=64, depth=2, num_heads=4,
                 head_dim=16, mlp_dim=256, model_name="ofb_vit_pico_patch4_32")
ARCH = arch_to_dict(ArchSpec.dense(SHAPE))
RECIPE = {
    "name": "p", "model": {"name": "ofb_vit_pico_patch4_32", "img_size": 16},
    "data": {"kind": "synthetic", "batch_size": 8},
    "search": {"target_flops_ratio": 0.5, "epochs": 2},
    "budget": {"speedup": [{"backend": "ort-cpu", "batch": 1, "min": 1.1}]},
}
BASELINE = {"format": BASELINE_FORMAT, "model": "m", "recipe": "r", "identity": "abc",
            "rows": [{"backend": "ort-cpu", "batch": 1, "precision": "fp32", "device": "cpu", "speedup": 1.5,
                      "latency_ms_dense": 2.0, "latency_ms_pruned": 1.3}]}
LUT = LatencyLUT(LutKey("cpu", "ort-cpu", "fp32", 1, 16, "m"), SHAPE, [0.1] * 7, 3.0).to_dict()

# Anything JSON or YAML can hold, including the awkward values (NaN, huge ints, empty and odd strings).
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["", "\x00", "ort-cpu", "fp32", "token", "auto", "-1"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)


def _paths(data, prefix=()):
    """Every (path to a value) in a nested dict/list document."""
    yield prefix
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _paths(value, (*prefix, i))


@st.composite
def mutated(draw, base):
    """``base`` with a few of its values replaced, deleted, or given a new sibling key."""
    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(data) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        node = data
        for part in path[:-1]:
            node = node[part]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            node[path[-1]] = draw(values)
        elif action == "delete":
            del node[path[-1]]
        elif isinstance(node, dict):
            node[draw(st.text(max_size=8))] = draw(values)
    return data


def _parses_or_refuses(parse, data):
    try:
        parse(data)
    except OfbError as err:
        assert str(err) and "\n" not in str(err)


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.one_of(mutated(RECIPE), values))
def test_recipes(data):
    _parses_or_refuses(lambda d: parse_recipe(d, "recipe"), data)


@FAST
@given(st.one_of(mutated(ARCH), values))
def test_arch_records(data):
    _parses_or_refuses(arch_from_dict, data)


@FAST
@given(st.one_of(mutated(BASELINE), values))
def test_baselines(data):
    _parses_or_refuses(parse_baseline, data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(mutated(LUT), values))
def test_latency_tables(tmp_path, data):
    path = tmp_path / "lut.json"
    path.write_text(json.dumps(data))
    _parses_or_refuses(LatencyLUT.load, path)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(mutated(RECIPE).map(lambda d: yaml.safe_dump(d).encode()), st.binary(max_size=200),
                 st.text(max_size=200).map(str.encode)))
def test_recipe_files(tmp_path, raw):
    """Raw bytes as a recipe file: text, YAML of mutated recipes, or noise (encodings, tabs, tags...)."""
    path = tmp_path / "r.yaml"
    path.write_bytes(raw)
    _parses_or_refuses(load_recipe, path)


def test_the_unmutated_documents_are_valid(tmp_path):
    assert isinstance(parse_recipe(RECIPE), Recipe)
    assert arch_from_dict(ARCH) == ArchSpec.dense(SHAPE)
    assert parse_baseline(BASELINE).rows[0].speedup == 1.5
    (tmp_path / "lut.json").write_text(json.dumps(LUT))
    assert LatencyLUT.load(tmp_path / "lut.json").dense_ms == 3.0


@pytest.mark.parametrize("aliases", [9, 30])
def test_an_alias_bomb_is_refused_without_expanding_it(tmp_path, aliases):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, aliases)]
    lines.append(f"model: {{name: *a{aliases - 1}}}")
    (tmp_path / "bomb.yaml").write_text("\n".join(lines))
    with pytest.raises(OfbError, match="more than 100000 values once its aliases") as err:
        load_recipe(tmp_path / "bomb.yaml")
    assert len(str(err.value)) < 300
