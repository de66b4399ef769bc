"""Resizing a materialised ViT's groups with the teacher's units (models/resize.py)."""

import copy
import random

import pytest
import timm
import torch

from ofbdeploy.arch import ArchSpec
from ofbdeploy.errors import ArchError
from ofbdeploy.families.vit.searchable import SearchableViT
from ofbdeploy.families.vit.space import space_for
from ofbdeploy.families.vit.support import read_vit_shape
from ofbdeploy.models.materialize import materialize
from ofbdeploy.models.resize import resize, resized_spec, unit_importance

NAME = "ofb_vit_pico_patch4_32"


def _cut(seed: int, multipliers: bool = False):
    """The teacher and a model cut from it by a random decision (embedding kept whole), untrained."""
    torch.manual_seed(seed)
    teacher = timm.create_model(NAME).eval()
    searchable = SearchableViT(copy.deepcopy(teacher), space_for(read_vit_shape(teacher)), NAME)
    rng = random.Random(seed)
    for name, group in searchable.groups():
        searchable.force_cell(name, group.widest_cell() if name == "embedding" else rng.randrange(len(group.cells)))
        group.multiplier.data.uniform_(0.25, 1.75) if multipliers else group.multiplier.data.fill_(1.0)
    pruned, spec = materialize(searchable.eval())
    return teacher, pruned, spec


@pytest.mark.parametrize("seed", range(4))
def test_growing_an_untrained_cut_to_dense_gives_the_teacher_back(seed):
    teacher, pruned, spec = _cut(seed)
    assert spec.macs() < ArchSpec.dense(spec.base).macs()
    dense = ArchSpec.dense(spec.base)
    grown = resize(pruned, spec, teacher, resized_spec(spec, unit_importance(pruned, spec, teacher),
                                                       [spec.base.block_dims(i) for i in range(spec.base.depth)]))
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (grown(images) - teacher(images)).abs().max() <= 1e-5
    assert sum(p.numel() for p in grown.parameters()) == dense.params()


def test_narrowing_keeps_the_most_important_units_and_resizing_to_itself_is_the_identity():
    teacher, pruned, spec = _cut(5, multipliers=True)
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


def test_the_embedding_stays():
    teacher, pruned, spec = _cut(1)
    other = ArchSpec(spec.base, spec.embed_dims, spec.blocks, (tuple(reversed(spec.kept_embed)),))
    with pytest.raises(ArchError, match="embedding must stay"):
        resize(pruned, spec, teacher, other)
