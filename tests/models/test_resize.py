"""Resizing a materialised ViT's or Swin's groups with the teacher's units (models/resize.py)."""

import pytest
import torch

from ofbdeploy.arch import ArchSpec
from ofbdeploy.errors import ArchError
from ofbdeploy.models.resize import resize, resized_spec, unit_importance

VIT = "ofb_vit_pico_patch4_32"


SWIN = "ofb_swin_pico_patch2_32"


@pytest.mark.parametrize(("seed", "name"), [(0, VIT), (1, VIT), (2, VIT), (3, VIT), (0, SWIN), (1, SWIN)])
def test_growing_an_untrained_cut_to_dense_gives_the_teacher_back(seed, name, cut_model):
    teacher, pruned, spec = cut_model(seed, name=name)
    assert spec.macs() < ArchSpec.dense(spec.base).macs()
    assert any(b.heads < spec.base.block_dims(i)[0] for i, b in enumerate(spec.blocks))  # heads come back too
    dense = ArchSpec.dense(spec.base)
    grown = resize(pruned, spec, teacher, resized_spec(spec, unit_importance(pruned, spec, teacher),
                                                       [spec.base.block_dims(i) for i in range(spec.base.depth)]))
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (grown(images) - teacher(images)).abs().max() <= 1e-5
    assert sum(p.numel() for p in grown.parameters()) == dense.params()


@pytest.mark.parametrize("name", [VIT, SWIN])
def test_narrowing_keeps_the_most_important_units_and_resizing_to_itself_is_the_identity(name, cut_model):
    teacher, pruned, spec = cut_model(5, multipliers=True, name=name)
    importance = unit_importance(pruned, spec, teacher)
    same = resize(pruned, spec, teacher, resized_spec(spec, importance, [(b.heads, b.head_dim, b.mlp_dim)
                                                                         for b in spec.blocks]))
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (same(images) - pruned(images)).abs().max() <= 1e-6
    widths = [(b.heads, b.head_dim, max(1, b.mlp_dim // 2)) for b in spec.blocks]
    narrow = resized_spec(spec, importance, widths)
    for blk, small, scores in zip(spec.blocks, narrow.blocks, importance.mlp, strict=True):
        dropped = set(blk.kept_mlp) - set(small.kept_mlp)
        assert set(small.kept_mlp) <= set(blk.kept_mlp)
        assert min(float(scores[k]) for k in small.kept_mlp) >= max(float(scores[k]) for k in dropped)
    model = resize(pruned, spec, teacher, narrow)
    assert sum(p.numel() for p in model.parameters()) == narrow.params()


def test_the_embedding_stays(cut_model):
    teacher, pruned, spec = cut_model(1)
    other = ArchSpec(spec.base, spec.embed_dims, spec.blocks, (tuple(reversed(spec.kept_embed)),))
    with pytest.raises(ArchError, match="embedding must stay"):
        resize(pruned, spec, teacher, other)
