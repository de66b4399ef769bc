import pytest
import timm
import torch

from ofbdeploy.arch import ArchSpec
from ofbdeploy.families.vit.searchable import SearchableViT
from ofbdeploy.search.groups import HeadGroup, VectorGroup, ranks


def _vector(size=16, widths=(4, 8, 12, 16)) -> VectorGroup:
    return VectorGroup("mlp", size, widths, l1=1e-4)


def test_ranks_put_the_largest_first():
    assert ranks(torch.tensor([0.1, 0.9, 0.5])).tolist() == [2, 0, 1]


def test_rank_mask_is_survival_probability():
    group = _vector()
    probs = group.probs().detach()
    mask = group.rank_mask(probs)
    expected = torch.tensor([sum(float(p) for p, w in zip(probs, (4, 8, 12, 16), strict=True) if r < w)
                             for r in range(16)])
    torch.testing.assert_close(mask, expected)
    assert torch.all(mask[:-1] >= mask[1:]) and mask[0] == pytest.approx(1.0)


def test_restore_gives_most_important_unit_rank_zero():
    group = _vector()
    mask = torch.linspace(1.0, 0.0, 16)
    restored = group.restore(mask)
    best = int(torch.argmax(group.score))
    worst = int(torch.argmin(group.score))
    assert restored[best] == 1.0 and restored[worst] == 0.0


def test_head_restore_ranks_heads_then_channels():
    group = HeadGroup(3, 4, [(1, 2), (2, 4), (3, 4)], l1=4e-4)
    with torch.no_grad():
        group.score.copy_(torch.tensor([[0.0, 0.1, 0.2, 0.3], [5.0, 4.0, 3.0, 2.0], [1.0, 1.0, 1.0, 1.1]]))
    rank_mask = torch.arange(12, dtype=torch.float).reshape(3, 4)  # value = 4 * head rank + channel rank
    restored = group.restore(rank_mask)
    assert restored[1].tolist() == [0, 1, 2, 3]  # most important head, channels already in order
    assert restored[2].tolist() == [5, 6, 7, 4]  # second head; its last channel is its best
    assert restored[0].tolist() == [11, 10, 9, 8]


def test_mask_mixes_importance_and_sparsity_and_has_gradients():
    group = _vector()
    group.mix.fill_(0.3)
    mask = group.mask()
    manual = 0.7 * group.restore(group.rank_mask(group.probs())) + 0.3 * torch.sigmoid(group.score)
    torch.testing.assert_close(mask, manual)
    mask.sum().backward()
    assert group.alpha.grad is not None and group.score.grad is not None


def test_expected_units_is_the_mean_width():
    group = HeadGroup(4, 8, [(2, 2), (2, 8), (4, 4), (4, 8)], l1=4e-4)
    probs = group.probs().detach()
    expected = sum(float(p) * n * c for p, (n, c) in zip(probs, [(2, 2), (2, 8), (4, 4), (4, 8)], strict=True))
    assert float(group.expected_units().detach()) == pytest.approx(expected, rel=1e-5)


def test_switch_off_zeroes_logits_and_moments():
    group = _vector()
    opt = torch.optim.AdamW([group.alpha], lr=0.1)
    group.mask().sum().backward()
    opt.step()
    dead = torch.tensor([True, False, True, False])
    assert group.switch_off(dead, [opt]) == 2
    assert group.probs()[dead].sum() == 0 and group.alpha[dead].abs().sum() == 0
    assert opt.state[group.alpha]["exp_avg"][dead].abs().sum() == 0
    with pytest.raises(ValueError, match="every live cell"):
        group.switch_off(torch.ones(4, dtype=torch.bool))


def test_weak_cells_threshold():
    group = _vector()
    with torch.no_grad():
        group.alpha.copy_(torch.tensor([5.0, 5.0, -5.0, 0.0]))
    assert group.weak_cells(0.2).tolist() == [False, False, True, True]


def _searchable(name="ofb_vit_pico_patch4_32") -> SearchableViT:
    return SearchableViT(timm.create_model(name), model_name=name)


def test_cut_slices_weights_scores_and_optimizer_state():
    model = _searchable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    group = model.mlp_groups[1]
    fc1, fc2 = model.vit.blocks[1].mlp.fc1, model.vit.blocks[1].mlp.fc2
    before_w, before_m = fc1.weight.detach().clone(), opt.state[fc1.weight]["exp_avg"].clone()
    before_fc2 = fc2.weight.detach().clone()
    best = torch.argsort(group.score.detach(), descending=True)[:128].sort().values
    assert group.cells[:, 0].tolist() == [64, 96, 128, 160, 192, 224, 256]
    with torch.no_grad():
        group.alpha.copy_(torch.tensor([-9.0, -9.0, 9.0, -9.0, -9.0, -9.0, -9.0]))
    events = model.shrink(0.2, [opt])
    mlp_event = next(e for e in events if e.group == "blocks.1.mlp")
    assert mlp_event.shape == (128,) and mlp_event.decided and mlp_event.switched_off == 6
    assert group.kept.tolist() == best.tolist()  # the most important units survive
    torch.testing.assert_close(fc1.weight, before_w[best])
    torch.testing.assert_close(fc2.weight, before_fc2[:, best])
    torch.testing.assert_close(opt.state[fc1.weight]["exp_avg"], before_m[best])
    assert opt.state[fc2.weight]["exp_avg"].shape == (64, 128)
    assert fc1.out_features == 128 and fc2.in_features == 128
    model(torch.randn(2, 3, 32, 32)).sum().backward()  # still trains after the cut
    opt.step()


def test_decision_keeps_the_mask_continuous():
    model = _searchable()
    group = model.attn_groups[0]
    widest = group.widest_cell()
    group.mix.fill_(0.4)
    with torch.no_grad():  # all probability on the widest cell: the decision must not change the mask
        group.alpha.fill_(-50.0)
        group.alpha[widest] = 50.0
    before = group.mask().detach().clone()
    model.force_cell("blocks.0.attn", widest)
    assert group.is_decided and not group.alpha.requires_grad
    torch.testing.assert_close(group.mask(), 0.4 * torch.sigmoid(group.score) + 0.6)
    torch.testing.assert_close(group.mask(), before)


def test_odd_head_model_can_keep_every_head():
    model = _searchable("ofb_vit_tiny3_patch4_32")
    heads = {int(c[0]) for c in model.attn_groups[0].cells}
    assert heads == {1, 2, 3}


def test_apply_arch_reproduces_a_cut_model():
    source = _searchable()
    for name, group in source.groups():
        source.force_cell(name, len(group.cells) // 2)
    spec = source.arch_spec()
    target = _searchable()
    target.apply_arch(spec)
    assert target.arch_spec() == spec
    assert ArchSpec.dense(spec.base).macs() > spec.macs()


def test_expected_macs_is_differentiable_and_dense_at_full_width():
    model = _searchable()
    macs = model.expected_macs()
    macs.backward()
    assert model.attn_groups[0].alpha.grad is not None
    assert float(macs.detach()) < ArchSpec.dense(model.shape).macs()


def test_wrong_image_size_is_a_clear_error():
    with pytest.raises(ValueError, match=r"images: expected a batch of shape \(B, 3, 32, 32\)"):
        _searchable()(torch.randn(1, 3, 64, 64))
