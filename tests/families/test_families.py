"""Model families: every timm ViT and Swin is sorted into prunable-and-exact or refused with a reason.

The census builds each registered model on the meta device (seconds for the whole registry); exactness is
checked on real random weights for one shrunken model of every variant the registry holds. The sweep over
the real widths of every supported model is opt-in (``pytest -m sweep``).
"""

import random

import pytest
import timm
from click.testing import CliRunner

from ofbdeploy.arch import ArchSpec, arch_to_dict
from ofbdeploy.cli import main
from ofbdeploy.errors import ModelError
from ofbdeploy.families import arch_from_dict, family_of, family_of_model, get_family, read_shape
from ofbdeploy.models.materialize import materialize
from ofbdeploy.verify.census import census, check_exactness, representatives
from ofbdeploy.verify.exactness import check_agreement, decide_randomly


@pytest.fixture(scope="module")
def verdicts():
    return census()


def test_every_registered_vit_and_swin_is_supported_or_refused_never_crashes(verdicts):
    crashed = [f"{v.name}: {v.crashed}" for v in verdicts if v.crashed]
    assert not crashed, crashed
    assert len(verdicts) > 100
    supported = {v.name: v.family for v in verdicts if v.family}
    refused = {v.name: v.refused for v in verdicts if v.refused}
    # the families the issue names, by one model each
    for name in ("deit_small_patch16_224", "deit3_small_patch16_224", "deit_small_distilled_patch16_224",
                 "vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2", "vit_base_patch16_clip_quickgelu_224",
                 "vit_base_patch16_siglip_224", "vit_base_patch16_siglip_gap_224", "vit_medium_patch16_gap_256"):
        assert supported.get(name) == "vit", (name, refused.get(name))
    assert all(supported.get(v.name) == "swin" for v in verdicts if v.name.startswith("swin_"))
    expected_refusals = {
        "vit_small_r26_s32_224": "hybrid CNN stem",
        "vit_base_patch16_xp_224": "parallel attention and MLP branches",
        "vit_small_patch16_18x2_224": "parallel attention and MLP branches",
        "aimv2_large_patch14_224": "gated MLP (SwiGLU)",
        "beit3_base_patch16_224": "attention output norm",
    }
    for name, reason in expected_refusals.items():
        assert reason in refused[name], (name, refused[name])
    assert all("\n" not in reason for reason in refused.values())


def test_every_variant_materialises_exactly(verdicts):
    """One shrunken model per variant (options of the family, sizes left out), at a small image size."""
    reps = representatives(verdicts)
    assert len({v.variant for v in reps}) == len(reps) >= 20
    failures = []
    for v in reps:
        agreement = check_exactness(v.name)
        if not agreement.ok:
            failures.append((v.name, agreement))
    assert not failures, failures


@pytest.mark.sweep
def test_every_supported_model_at_its_real_widths(verdicts):
    """Opt-in (``pytest -m sweep``): the real widths of every supported model, at a small image size."""
    failures = [(v.name, a) for v in verdicts if v.family for a in [check_exactness(v.name, shrink=False)] if not a.ok]
    assert not failures, failures


@pytest.mark.parametrize(
    ("name", "kwargs", "reason"),
    [
        ("ofb_vit_pico_patch4_32", {"qk_norm": True}, "q/k norm"),
        ("ofb_vit_pico_patch4_32", {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": "silu"}, "gated MLP"),
        ("ofb_vit_pico_patch4_32", {"global_pool": "prr"}, "global_pool 'prr'"),
        ("ofb_vit_pico_patch4_32", {"norm_layer": "rmsnorm"}, "RmsNorm"),
        ("ofb_vit_pico_patch4_32", {"act_layer": "silu"}, "MLP activation SiLU"),
        ("ofb_vit_pico_patch4_32", {"dynamic_img_pad": True}, "dynamic image padding"),
        ("ofb_swin_pico_patch2_32", {"always_partition": True}, "always_partition"),
        ("ofb_swin_pico_patch2_32", {"strict_img_size": False}, "dynamic"),
        ("test_resnet", {}, "ResNet models cannot be pruned"),
    ],
)
def test_refusals_name_the_part(name, kwargs, reason):
    with pytest.raises(ModelError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        read_shape(timm.create_model(name, **kwargs), name)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"embed_norm_layer": "layernorm"},  # a norm after the patch embedding
        {"pre_norm": True, "act_layer": "quick_gelu"},  # CLIP
        {"reg_tokens": 2, "no_embed_class": True, "init_values": 0.1},  # DINOv2 with registers
        {"class_token": False, "reg_tokens": 1, "global_pool": "avg", "fc_norm": True},
        {"global_pool": "max"},
        {"global_pool": "avgmax", "class_token": False, "pool_include_prefix": True, "reg_tokens": 1},
        {"pos_embed": "none"},
        {"dynamic_img_size": True},
        {"class_token": False, "global_pool": "map"},  # SigLIP's attention pool (kept dense)
        {"final_norm": False, "act_layer": "gelu_tanh"},
        {"proj_bias": False, "qkv_bias": False},
    ],
)
def test_vit_options_agree(kwargs):
    model = timm.create_model("ofb_vit_pico_patch4_32", **kwargs)
    shape = read_shape(model, "pico")
    searchable = family_of(shape).searchable(model, family_of(shape).space(shape), "pico")
    decide_randomly(searchable, random.Random(11))
    result = check_agreement(searchable)
    assert result.ok, result
    spec = searchable.arch_spec()
    assert arch_from_dict(arch_to_dict(spec)) == spec
    plain, _ = materialize(searchable)
    assert type(plain) is type(model)


def test_attention_pool_keeps_the_embedding_and_prunes_the_blocks():
    model = timm.create_model("ofb_vit_pico_patch4_32", class_token=False, global_pool="map")
    shape = read_shape(model)
    space = family_of(shape).space(shape)
    assert space.embedding == (shape.embed_dim,) and len(space.attention) > 1 and len(space.mlp) > 1
    searchable = family_of(shape).searchable(model, space)
    decide_randomly(searchable, random.Random(0), "narrowest")
    spec = searchable.arch_spec()
    assert spec.embed_dim == shape.embed_dim and spec.macs() < ArchSpec.dense(shape).macs()


def test_distilled_deit_keeps_both_heads():
    model = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, num_classes=10)
    shape = read_shape(model)
    assert shape.distilled and shape.num_prefix_tokens == 2
    searchable = family_of(shape).searchable(model, family_of(shape).space(shape))
    decide_randomly(searchable, random.Random(3), "narrowest")
    plain, spec = materialize(searchable)
    assert type(plain).__name__ == "VisionTransformerDistilled"
    assert plain.head_dist.in_features == spec.embed_dim < 192
    assert check_agreement(searchable).ok


def test_family_lookup_is_one_line_for_unknown_models_and_names():
    with pytest.raises(ModelError, match=r"supported timm classes: .*VisionTransformer"):
        family_of_model(timm.create_model("test_resnet"))
    with pytest.raises(Exception, match="unknown model family 'convnext'"):
        get_family("convnext")


@pytest.mark.parametrize(
    ("args", "family"),
    [
        (["--model", "deit_tiny_distilled_patch16_224", "--img-size", "32"], "vit"),
        (["--model", "ofb_swin_pico_patch2_32"], "swin"),
    ],
)
def test_selfcheck_gives_an_exactness_table(args, family):
    result = CliRunner().invoke(main, ["selfcheck", "--trials", "1", *args])
    assert result.exit_code == 0, result.output
    assert f"{family} family" in result.output and result.output.count(" ok") == 3 and "FAIL" not in result.output


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("vit_small_r26_s32_224", "hybrid CNN stem"),
        ("vit_small_patch16_18x2_224", "parallel attention"),
        ("resnet18", "ResNet models cannot be pruned"),
        ("deit_tiny_patch16_244", "unknown model"),
    ],
)
def test_selfcheck_refuses_in_one_line(name, reason):
    result = CliRunner().invoke(main, ["selfcheck", "--model", name])
    assert result.exit_code == 2, result.output
    assert result.output.strip().count("\n") == 0 and reason in result.output


def test_census_reports_a_traceback_as_a_crash(monkeypatch):
    """The registry test can fail: an exception other than a one-line refusal is counted as a crash."""
    import ofbdeploy.verify.census as census_module

    def broken(model, name=""):
        raise AttributeError("'HybridEmbed' object has no attribute 'norm'")

    monkeypatch.setattr(census_module, "read_shape", broken)
    verdict = census_module.judge("ofb_vit_pico_patch4_32")
    assert verdict.verdict == "crashed" and "AttributeError" in verdict.crashed
