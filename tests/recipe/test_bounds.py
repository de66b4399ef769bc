"""Every recipe value is bounded where it is declared, so what the CLI would refuse is refused at the door (exit 2)
instead of failing mid-run; and a latency table is never fitted from fewer models than it has coefficients."""

from __future__ import annotations

import pytest
import timm

from ofbdeploy.errors import OfbError
from ofbdeploy.families import family_of
from ofbdeploy.families.vit.support import read_vit_shape
from ofbdeploy.latency.lut import build_lut, probe_set
from ofbdeploy.recipe import RecipeError, parse_recipe

PICO = "ofb_vit_pico_patch4_32"
BASE = {"model": {"name": PICO}, "data": {"kind": "digits"}, "search": {"target_flops_ratio": 0.5}}


@pytest.mark.parametrize(("patch", "field"), [
    ({"profile": {"batches": [0]}}, "profile.batches.0"),
    ({"profile": {"batches": [-4]}}, "profile.batches.0"),
    ({"profile": {"batches": []}}, "profile.batches"),
    ({"profile": {"batches": [1 << 20]}}, "profile.batches.0"),
    ({"profile": {"repeats": 10**9}}, "profile.repeats"),
    ({"profile": {"threads": 100_000}}, "profile.threads"),
    ({"export": {"batch_range": [8, 4, 16]}}, "batch_range"),
    ({"export": {"batch_range": [0, 4, 16]}}, "export.batch_range.0"),
    ({"export": {"opset": 99}}, "export.opset"),
    ({"dist_timeout_min": 1e12}, "dist_timeout_min"),
    ({"finetune": {"epochs": 10**9}}, "finetune.epochs"),
    ({"data": {"kind": "digits", "workers": 10_000}}, "data.workers"),
    ({"model": {"name": PICO, "overrides": {"drop_rate": float("nan")}}}, "drop_rate"),
    ({"model": {"name": PICO, "overrides": {"drop_rate": float("inf")}}}, "drop_rate"),
    ({"model": {"name": PICO, "overrides": {"not a name": 1}}}, "not a constructor argument name"),
    ({"model": {"name": PICO, "overrides": {"mlp_ratio": [1.0, float("nan")]}}}, "mlp_ratio[1]"),
])
def test_out_of_range_values_are_refused_naming_the_field(patch: dict, field: str) -> None:
    with pytest.raises(RecipeError, match=r"^recipe: ") as err:
        parse_recipe({**BASE, **patch})
    assert field in str(err.value) and "\n" not in str(err.value)


def test_sane_values_still_load() -> None:
    recipe = parse_recipe({**BASE, "profile": {"batches": [1, 64], "threads": 2},
                           "export": {"batch_range": [1, 8, 64]},
                           "model": {"name": PICO, "overrides": {"drop_rate": 0.1, "mlp_ratio": 2.0}}})
    assert recipe.profile.batches == [1, 64] and recipe.model.overrides["drop_rate"] == 0.1


def test_a_table_with_fewer_models_than_coefficients_is_refused_before_measuring() -> None:
    shape = read_vit_shape(timm.create_model(PICO, img_size=16), PICO)
    space = family_of(shape).space(shape)
    features = len(shape.latency_feature_names)
    assert len(probe_set(shape, space, 1, 1, 0)) + 1 < features  # the configuration under test is too small
    with pytest.raises(OfbError, match=f"cannot fit {features} coefficients"):
        build_lut(shape, space, backend="ort-cpu", precision="fp32", batch=1, embed_points=1, width_points=1,
                  random_points=0)


def test_a_record_of_a_model_too_big_for_this_machine_is_refused_before_it_is_built(tmp_path) -> None:
    from ofbdeploy.arch import ArchSpec
    from ofbdeploy.errors import InputError
    from ofbdeploy.run.target import _check_fits_memory
    from ofbdeploy.verify.exactness import meta_device

    with meta_device():  # the shape is read without allocating anything
        huge = timm.create_model("vit_huge_patch14_224", depth=512)
    spec = ArchSpec.dense(read_vit_shape(huge, "vit_huge_patch14_224"))
    with pytest.raises(InputError, match=r"arch\.json: its dense model needs .* GiB"):
        _check_fits_memory(spec, tmp_path / "arch.json")
    _check_fits_memory(ArchSpec.dense(read_vit_shape(timm.create_model(PICO), PICO)), tmp_path / "arch.json")


@pytest.mark.parametrize("command", [["check"], ["info"], ["export"], ["profile"]])
def test_a_path_name_too_long_is_bad_input_in_one_line(tmp_path, command: list[str]) -> None:
    from click.testing import CliRunner

    from ofbdeploy.cli import main

    long = tmp_path / ("x" * 300)
    result = CliRunner().invoke(main, [*command, str(long)])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "internal error" not in result.output
