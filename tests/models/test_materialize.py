"""Masked model (eval) vs the plain timm model materialised from it: the core promise of ofbdeploy."""

import random

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.layers import Attention, Mlp

from ofbdeploy import load_pruned
from ofbdeploy.arch import ArchSpec
from ofbdeploy.arch.cost import count_params, measure_macs
from ofbdeploy.errors import ArchError, CheckpointError
from ofbdeploy.families import load_arch
from ofbdeploy.families.vit.searchable import SearchableViT
from ofbdeploy.families.vit.space import space_for
from ofbdeploy.families.vit.support import read_vit_shape
from ofbdeploy.models.materialize import materialize
from ofbdeploy.models.pruned import save_pruned
from ofbdeploy.verify.exactness import check_agreement, decide_randomly

TOL = 1e-4


def _searchable(name: str, align: int | None = None, **kwargs) -> SearchableViT:
    vit = timm.create_model(name, **kwargs)
    shape = read_vit_shape(vit)
    space = space_for(shape, align)
    return SearchableViT(vit, space, name)


def _assert_agrees(searchable: SearchableViT) -> None:
    result = check_agreement(searchable)
    assert result.max_abs_diff <= TOL
    assert result.params_counted == result.params_spec
    assert abs(result.macs_counted - result.macs_spec) <= 0.01 * result.macs_spec


@pytest.mark.parametrize("seed", range(12))
def test_random_architectures_agree(seed):
    name = ["ofb_vit_pico_patch4_32", "ofb_vit_tiny3_patch4_32"][seed % 2]
    searchable = _searchable(name, align=[None, 8][seed % 3 == 0] if name.endswith("pico_patch4_32") else None)
    decide_randomly(searchable, random.Random(seed))
    _assert_agrees(searchable)


@pytest.mark.parametrize("extreme", ["narrowest", "widest"])
@pytest.mark.parametrize("name", ["ofb_vit_pico_patch4_32", "ofb_vit_tiny3_patch4_32"])
def test_extreme_architectures_agree(name, extreme):
    searchable = _searchable(name)
    decide_randomly(searchable, random.Random(1), extreme)
    _assert_agrees(searchable)
    spec = searchable.arch_spec()
    if extreme == "widest":
        assert spec.macs() == ArchSpec.dense(spec.base).macs()
    else:
        assert all(b.heads == min(int(c[0]) for c in searchable.attn_groups[0].cells) for b in spec.blocks)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"init_values": 1e-2},  # layer scale (DINOv2-style)
        {"global_pool": "avg", "class_token": False},
        {"qkv_bias": False},
    ],
)
def test_variants_agree(kwargs):
    searchable = _searchable("ofb_vit_pico_patch4_32", **kwargs)
    decide_randomly(searchable, random.Random(7))
    _assert_agrees(searchable)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"])
def test_deit_shapes_agree(name):
    """Real DeiT widths (heads, head width, MLP, embedding) at a small image size to keep CPU time low."""
    searchable = _searchable(name, img_size=64, num_classes=10)
    decide_randomly(searchable, random.Random(3))
    _assert_agrees(searchable)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"])
def test_pruned_deit_cost_matches_torch_counter_at_224(name):
    searchable = _searchable(name)
    decide_randomly(searchable, random.Random(5))
    model, spec = materialize(searchable)
    counted = measure_macs(model, 224)
    assert abs(spec.macs() - counted) <= 0.01 * counted
    assert spec.params() == count_params(model)
    assert spec.macs() < ArchSpec.dense(spec.base).macs()


def test_materialised_model_is_plain_timm():
    searchable = _searchable("ofb_vit_pico_patch4_32")
    decide_randomly(searchable, random.Random(0))
    model, spec = materialize(searchable)
    assert type(model) is timm.models.vision_transformer.VisionTransformer
    for block, blk in zip(model.blocks, spec.blocks, strict=True):
        assert type(block.attn) is Attention and type(block.mlp) is Mlp
        assert (block.attn.num_heads, block.attn.head_dim) == (blk.heads, blk.head_dim)
        assert not block.attn.qkv._forward_hooks and not block.mlp.fc1._forward_hooks
    assert not any(m.__module__.startswith("ofbdeploy") for m in model.modules())


def test_undecided_model_cannot_be_materialised():
    searchable = _searchable("ofb_vit_pico_patch4_32")
    with pytest.raises(ArchError, match="still undecided"):
        materialize(searchable)


def test_save_and_load_pruned_round_trip(tmp_path):
    searchable = _searchable("ofb_vit_tiny3_patch4_32")
    decide_randomly(searchable, random.Random(2))
    model, spec = materialize(searchable)
    save_pruned(model, spec, tmp_path / "pruned")
    assert sorted(p.name for p in (tmp_path / "pruned").iterdir()) == ["arch.json", "model.safetensors"]
    load_file(str(tmp_path / "pruned" / "model.safetensors"))  # plain tensors, no pickle
    loaded = load_pruned(tmp_path / "pruned")
    assert not loaded.training
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(images), loaded(images))
    assert load_arch(tmp_path / "pruned" / "arch.json") == spec


def test_load_pruned_errors_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_pruned(tmp_path / "nothing")
    searchable = _searchable("ofb_vit_pico_patch4_32")
    decide_randomly(searchable, random.Random(4))
    model, spec = materialize(searchable)
    save_pruned(model, spec, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
        load_pruned(tmp_path / "m")
    other = _searchable("ofb_vit_pico_patch4_32")
    decide_randomly(other, random.Random(99))
    save_pruned(materialize(other)[0], spec, tmp_path / "m")  # weights of another architecture
    with pytest.raises(ArchError, match="do not fit"):
        load_pruned(tmp_path / "m")
