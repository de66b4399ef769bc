"""Resizing a materialised ViT's groups with the teacher's units (models/resize.py)."""

import pytest
import torch

from ofbdeploy.arch import ArchSpec
from ofbdeploy.errors import ArchError
from ofbdeploy.models.resize import resize, resized_spec, unit_importance


@pytest.mark.parametrize("seed", range(4))
def test_growing_an_untrained_cut_to_dense_gives_the_teacher_back(seed, cut_vit):
    teacher, pruned, spec = cut_vit(seed)
    assert spec.macs() < ArchSpec.dense(spec.base).macs()
    dense = ArchSpec.dense(spec.base)
    grown = resize(pruned, spec, teacher, resized_spec(spec, unit_importance(pruned, spec, teacher),
                                                       [spec.base.block_dims(i) for i in range(spec.base.depth)]))
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (grown(images) - teacher(images)).abs().max() <= 1e-5
    assert sum(p.numel() for p in grown.parameters()) == dense.params()


def test_narrowing_keeps_the_most_important_units_and_resizing_to_itself_is_the_identity(cut_vit):
    teacher, pruned, spec = cut_vit(5, multipliers=True)
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


def test_the_embedding_stays(cut_vit):
    teacher, pruned, spec = cut_vit(1)
    other = ArchSpec(spec.base, spec.embed_dims, spec.blocks, (tuple(reversed(spec.kept_embed)),))
    with pytest.raises(ArchError, match="embedding must stay"):
        resize(pruned, spec, teacher, other)
