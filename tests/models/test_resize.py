"""Resizing a materialised ViT's or Swin's groups with the teacher's units (models/resize.py)."""

import pytest
import torch

from ofbdeploy.arch import ArchSpec
from ofbdeploy.errors import ArchError
from ofbdeploy.models.resize import resize, resize_embedding, resized_spec, unit_importance

VIT = "ofb_vit_pico_patch4_32"


SWIN = "ofb_swin_pico_patch2_32"


def _grown_to_dense(spec, importance):
    """``spec`` resized to the dense widths of every block and every stage's embedding."""
    grown = resized_spec(spec, importance, [spec.base.block_dims(i) for i in range(spec.base.depth)])
    for s, width in enumerate(spec.base.embed_dims):
        grown = resize_embedding(grown, importance, s, width)
    return grown


@pytest.mark.parametrize(("seed", "name", "embedding"),
                         [(0, VIT, False), (1, VIT, False), (2, VIT, True), (3, VIT, True), (0, SWIN, False),
                          (1, SWIN, True)])
def test_growing_an_untrained_cut_to_dense_gives_the_teacher_back(seed, name, embedding, cut_model):
    teacher, pruned, spec = cut_model(seed, name=name, embedding=embedding)
    assert spec.macs() < ArchSpec.dense(spec.base).macs()
    assert any(b.heads < spec.base.block_dims(i)[0] for i, b in enumerate(spec.blocks))  # heads come back too
    assert (spec.embed_dims != spec.base.embed_dims) == embedding  # and the embedding
    dense = ArchSpec.dense(spec.base)
    grown = resize(pruned, spec, teacher, _grown_to_dense(spec, unit_importance(pruned, spec, teacher)))
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (grown(images) - teacher(images)).abs().max() <= 1e-5
    assert sum(p.numel() for p in grown.parameters()) == dense.params()


@pytest.mark.parametrize(("seed", "name"), [(2, VIT), (3, VIT), (1, SWIN), (4, SWIN)])
def test_cutting_the_teacher_to_a_searched_architecture_gives_the_materialised_cut(seed, name, cut_model):
    """The other direction: every block and embedding narrowed (kept units chosen by the record, not by
    importance), entries of the teacher only."""
    teacher, pruned, spec = cut_model(seed, name=name, embedding=True)
    cut = resize(teacher, ArchSpec.dense(spec.base), teacher, spec)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (cut(images) - pruned(images)).abs().max() <= 1e-5
    assert sum(p.numel() for p in cut.parameters()) == spec.params()


@pytest.mark.parametrize("name", [VIT, SWIN])
def test_an_embedding_moves_by_importance_and_mixes_kept_and_teacher_entries(name, cut_model):
    teacher, pruned, spec = cut_model(6, multipliers=True, name=name, embedding=True)
    importance = unit_importance(pruned, spec, teacher)
    stage = max(range(len(spec.embed_dims)), key=lambda s: spec.base.embed_dims[s] - spec.embed_dims[s])
    narrow = resize_embedding(spec, importance, stage, spec.embed_dims[stage] // 2)
    kept, scores = spec.kept_embeds[stage], importance.embeds[stage]
    dropped = set(kept) - set(narrow.kept_embeds[stage])
    assert set(narrow.kept_embeds[stage]) <= set(kept) and dropped
    assert min(float(scores[k]) for k in narrow.kept_embeds[stage]) >= max(float(scores[k]) for k in dropped)
    wide = resize_embedding(spec, importance, stage, spec.base.embed_dims[stage])
    assert wide.kept_embeds[stage][: len(kept)] == kept  # kept channels keep their places, the new ones follow
    images = torch.randn(4, 3, 32, 32)
    for new in (narrow, wide, resize_embedding(narrow, importance, stage, spec.embed_dims[stage])):
        model = resize(pruned, spec, teacher, new)
        assert sum(p.numel() for p in model.parameters()) == new.params()
        with torch.no_grad():
            assert torch.isfinite(model(images)).all()
    # grown and narrowed back: the searched model again, entry for entry
    back = resize(resize(pruned, spec, teacher, wide), wide, teacher, spec)
    with torch.no_grad():
        assert (back(images) - pruned(images)).abs().max() <= 1e-6


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


def test_resizing_keeps_the_base_model(cut_model):
    teacher, pruned, spec = cut_model(1)
    _, _, other = cut_model(1, name="ofb_vit_tiny3_patch4_32")
    with pytest.raises(ArchError, match="keeps the base model"):
        resize(pruned, spec, teacher, other)
