"""ONNX export of pruned ViTs: LayerNormalization graphs, dynamic batch, fp16, and a parity check that bites."""

import copy
import json
import random

import numpy as np
import onnx
import onnxslim
import pytest
import timm
import torch
from torch import nn

from ofbdeploy.deploy.onnx_export import ExportError, export_onnx, ort_session
from ofbdeploy.families.vit.searchable import SearchableViT
from ofbdeploy.models.materialize import materialize
from ofbdeploy.verify.exactness import decide_randomly, set_fused_attention

TOL = 1e-4
PICO = "ofb_vit_pico_patch4_32"


def _pruned(name: str, seed: int = 0) -> nn.Module:
    """A random decided architecture (uneven heads, head widths and MLP widths per block), materialised."""
    torch.manual_seed(seed)
    searchable = SearchableViT(timm.create_model(name), model_name=name)
    decide_randomly(searchable, random.Random(seed))
    model, _ = materialize(searchable)
    return model


@pytest.fixture(scope="module")
def pico() -> nn.Module:
    return _pruned(PICO)


def _ort_vs_torch(path, model: nn.Module, images: torch.Tensor) -> float:
    """An independent check of the written file, on inputs the export never saw."""
    got = ort_session(path, ["CPUExecutionProvider"]).run(["logits"], {"images": images.numpy()})[0]
    with torch.no_grad():
        want = model(images).numpy()
    assert got.shape == want.shape
    return float(np.abs(got - want).max())


@pytest.mark.parametrize("fused", [True, False])
def test_fp32_export_matches_torch_with_fused_attention_on_and_off(pico, tmp_path, fused):
    model = copy.deepcopy(pico)
    set_fused_attention(model, fused)
    check = torch.randn(6, 3, 32, 32)
    result = export_onnx(model, tmp_path / "pico.onnx", img_size=32, check_inputs=check)
    assert result.path.is_file() and result.opset == 17 and not result.fp16 and result.simplified
    assert result.check_images == 6
    assert result.max_abs_diff <= TOL and result.top1_agreement == 1.0
    assert _ort_vs_torch(result.path, model, torch.randn(3, 3, 32, 32)) <= TOL
    assert all(m.fused_attn is fused for m in model.modules() if hasattr(m, "fused_attn"))
    assert json.loads(json.dumps(result.to_dict()))["path"] == str(tmp_path / "pico.onnx")


@pytest.mark.parametrize("simplify", [True, False])
def test_graph_has_layernorm_ops_and_a_dynamic_batch(pico, tmp_path, simplify):
    result = export_onnx(pico, tmp_path / "pico.onnx", img_size=32, simplify=simplify)
    graph = onnx.load(result.path).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("LayerNormalization") == 2 * len(pico.blocks) + 1  # norm1, norm2 per block, final norm
    assert "ReduceMean" not in ops and "Pow" not in ops  # no decomposed LayerNorm
    assert [i.name for i in graph.input] == ["images"] and [o.name for o in graph.output] == ["logits"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    for batch in (1, 5):
        assert _ort_vs_torch(result.path, pico, torch.randn(batch, 3, 32, 32)) <= TOL


def test_opset_below_17_is_rejected(pico, tmp_path):
    with pytest.raises(ExportError, match=r"pico\.onnx: opset 16 .*LayerNormalization"):
        export_onnx(pico, tmp_path / "pico.onnx", img_size=32, opset=16)
    assert not (tmp_path / "pico.onnx").exists()


def test_fp16_export_is_an_fp16_graph_that_agrees_on_top1(pico, tmp_path):
    check = torch.randn(32, 3, 32, 32)
    result = export_onnx(pico, tmp_path / "pico16.onnx", img_size=32, fp16=True, check_inputs=check)
    graph = onnx.load(result.path).graph
    norms = [n for n in graph.node if n.op_type == "LayerNormalization"]
    norm_weights = {name for n in norms for name in n.input[1:]}
    types = {t.name: onnx.TensorProto.DataType.Name(t.data_type) for t in graph.initializer if t.data_type != 7}
    assert {types[n] for n in types if n not in norm_weights} == {"FLOAT16"}
    # LayerNorm stays fp32 (a strongly typed TensorRT build computes it in its input type): fp32 weights, and its
    # activation arrives through a Cast to float
    assert norms and {types[n] for n in norm_weights} == {"FLOAT"}
    casts = {n.output[0]: n for n in graph.node if n.op_type == "Cast"}
    assert all(casts[n.input[0]].attribute[0].i == onnx.TensorProto.FLOAT for n in norms)
    assert [v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)] == [onnx.TensorProto.FLOAT] * 2
    assert result.fp16 and 0.0 < result.max_abs_diff <= result.tolerance
    assert result.top1_agreement >= 0.99
    assert _ort_vs_torch(result.path, pico, torch.randn(4, 3, 32, 32)) <= result.tolerance


def test_failed_parity_check_raises_and_writes_nothing(pico, tmp_path):
    # fp16 rounding cannot reproduce fp32 logits exactly, so a zero tolerance must fail, honestly measured.
    with pytest.raises(ExportError, match=r"pico16\.onnx: ONNX Runtime disagrees .*max \|diff\| .*tolerance 0"):
        export_onnx(pico, tmp_path / "pico16.onnx", img_size=32, fp16=True, max_abs_diff=0.0)
    assert list(tmp_path.iterdir()) == []


def test_simplifier_failure_keeps_the_traced_graph(pico, tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("simplifier exploded")

    monkeypatch.setattr(onnxslim, "slim", broken)
    result = export_onnx(pico, tmp_path / "pico.onnx", img_size=32)
    assert not result.simplified and result.max_abs_diff <= TOL
    assert "not simplified" in caplog.text and "simplifier exploded" in caplog.text


def test_caller_model_is_left_as_it_was(tmp_path):
    model = _pruned(PICO, seed=3).train()
    set_fused_attention(model, False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path / "pico.onnx", img_size=32, fp16=True)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    assert all(m.fused_attn is False for m in model.modules() if hasattr(m, "fused_attn"))


def test_bad_check_inputs_and_missing_files_are_one_line_errors(pico, tmp_path):
    with pytest.raises(ExportError, match=r"check_inputs must be \(N>=1, 3, 32, 32\), got \(2, 3, 16, 16\)"):
        export_onnx(pico, tmp_path / "pico.onnx", img_size=32, check_inputs=torch.zeros(2, 3, 16, 16))
    with pytest.raises(ExportError, match=r"missing\.onnx: ONNX file not found"):
        ort_session(tmp_path / "missing.onnx")


@pytest.mark.slow
def test_deit_small_shaped_pruned_model_exports_and_matches(tmp_path):
    model = _pruned("deit_small_patch16_224")
    result = export_onnx(model, tmp_path / "deit_s.onnx", img_size=224, check_inputs=torch.randn(3, 3, 224, 224))
    assert result.max_abs_diff <= TOL and result.top1_agreement == 1.0 and result.simplified
    assert len({block.attn.num_heads for block in model.blocks}) > 1  # really uneven


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("deit_tiny_distilled_patch16_224", {"img_size": 32, "patch_size": 8, "num_classes": 10, "depth": 3}),
        (PICO, {"class_token": False, "reg_tokens": 2, "global_pool": "map"}),  # registers, attention pool
        (PICO, {"pre_norm": True, "act_layer": "quick_gelu", "embed_norm_layer": "layernorm"}),  # CLIP, patch norm
    ],
)
def test_every_family_and_variant_exports_with_parity(name, kwargs, tmp_path):
    """The distilled DeiT's two heads, registers with the attention pool, CLIP's pre-norm with a patch norm (a
    Swin is exported, and checked, by its end-to-end run in test_swin.py)."""
    from ofbdeploy.families import family_of, read_shape

    torch.manual_seed(0)
    dense = timm.create_model(name, **kwargs)
    shape = read_shape(dense, name)
    searchable = family_of(shape).searchable(dense, family_of(shape).space(shape), name)
    decide_randomly(searchable, random.Random(1))
    model, _ = materialize(searchable)
    images = torch.randn(4, 3, shape.img_size, shape.img_size)
    result = export_onnx(model, tmp_path / "m.onnx", img_size=shape.img_size, check_inputs=images)
    assert result.top1_agreement == 1.0
    assert _ort_vs_torch(tmp_path / "m.onnx", model, torch.randn(3, 3, shape.img_size, shape.img_size)) <= TOL


def _trained_like(model: nn.Module) -> nn.Module:
    """``model`` with every weight moved a little, as training moves it: no tensor left all zeros."""
    trained = copy.deepcopy(model)
    with torch.no_grad():
        for param in trained.parameters():
            param.add_(0.01 * torch.randn_like(param))
    return trained


def _ops(model: nn.Module, path) -> list[str]:
    return sorted(node.op_type for node in onnx.load(str(export_onnx(model, path, img_size=32).path)).graph.node)


@pytest.mark.parametrize("name", [PICO, "ofb_swin_pico_patch2_32"])
def test_a_random_weight_stand_in_exports_the_graph_of_a_trained_model(tmp_path, name) -> None:
    """Latency tables and random-weight profiles time ``with_random_weights`` models in place of trained ones, so
    their files must have every node a trained model's file has. timm's own init does not: its zero biases are
    folded away by the export (a timm-initialised DeiT-S file had 48 fewer additions and ran 3% faster)."""
    from ofbdeploy.arch import ArchSpec
    from ofbdeploy.deploy.workflow import with_random_weights
    from ofbdeploy.families import family_of_model, read_shape

    timm_init = timm.create_model(name).eval()
    assert len(_ops(timm_init, tmp_path / "timm.onnx")) < len(_ops(_trained_like(timm_init), tmp_path / "t1.onnx"))
    stand_in = with_random_weights(ArchSpec.dense(read_shape(timm_init, name)), family_of_model(timm_init).build_plain)
    assert _ops(stand_in, tmp_path / "stand_in.onnx") == _ops(_trained_like(stand_in), tmp_path / "t2.onnx")
