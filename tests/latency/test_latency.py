"""Latency lookup tables and the latency-aware search (ONNX Runtime CPU, tiny models)."""

import dataclasses
import random

import numpy as np
import pytest
import timm
import torch
from conftest import SYNTHETIC_COEFFICIENTS

from ofbdeploy.arch import ArchSpec
from ofbdeploy.errors import OfbError
from ofbdeploy.families import family_of, read_shape
from ofbdeploy.families.vit.searchable import SearchableViT
from ofbdeploy.families.vit.space import space_for
from ofbdeploy.families.vit.support import read_vit_shape
from ofbdeploy.latency.lut import (
    LatencyLUT,
    LutKey,
    arch_features,
    fit_coefficients,
    load_or_build,
    probe_set,
    sample_arch,
)
from ofbdeploy.prune.ofb.engine import run_search
from ofbdeploy.prune.ofb.objective import LatencyObjective
from ofbdeploy.recipe import SearchCfg
from ofbdeploy.train.data import DataSpec, build_datasets, build_loader
from ofbdeploy.train.distributed import Dist
from ofbdeploy.verify.exactness import decide_randomly

NAME = "ofb_vit_pico_patch4_32"


def _shape_space():
    shape = read_vit_shape(timm.create_model(NAME, img_size=16), NAME)
    return shape, space_for(shape)


@pytest.fixture(scope="module")
def lut(tmp_path_factory) -> LatencyLUT:
    shape, space = _shape_space()
    cache = tmp_path_factory.mktemp("lut")
    table = load_or_build(shape, space, backend="ort-cpu", precision="fp32", batch=1, cache_dir=cache,
                          embed_points=2, width_points=2, random_points=3, repeats=5, progress=False)
    again = load_or_build(shape, space, backend="ort-cpu", precision="fp32", batch=1, cache_dir=cache,
                          embed_points=2, width_points=2, random_points=3, repeats=5, progress=False)
    assert again.to_dict() == table.to_dict()  # the second call is a cache hit, not a rebuild
    return table


def test_table_is_keyed_and_round_trips(lut, tmp_path):
    shape, space = _shape_space()
    assert lut.key.backend == "ort-cpu" and lut.key.batch == 1 and lut.key.device.startswith("cpu")
    heads = len({n for n, _ in space.attention})
    assert lut.points == 2 + 2 * (heads * 2 + 1) + 3  # dense and narrowest, grid probes, random uneven ones
    assert len(lut.probes) == lut.points and all(c >= 0 for c in lut.coefficients)
    path = lut.save(tmp_path / "t.json")
    assert LatencyLUT.load(path).to_dict() == lut.to_dict()
    assert lut.threads is None  # timed with the runtime's own thread count
    assert 0 < lut.quiet_dense_ms <= lut.dense_ms  # the fastest dense measurement, and the median
    threaded = LatencyLUT.load(path)
    threaded.threads = 2
    assert LatencyLUT.load(threaded.save(tmp_path / "threads.json")).threads == 2
    assert lut.predict(ArchSpec.dense(lut.shape)) > 0
    assert lut.predict(ArchSpec.narrowest(shape, space)) < lut.predict(ArchSpec.dense(shape))


def test_old_or_foreign_tables_are_refused_and_an_old_cache_entry_is_rebuilt(lut, tmp_path):
    path = tmp_path / "old.json"
    path.write_text('{"format": "ofbdeploy.lut/1"}')
    with pytest.raises(OfbError, match="rebuild it with `ofbdeploy lut build`"):
        LatencyLUT.load(path)
    shape, space = _shape_space()
    (tmp_path / lut.key.filename(shape)).write_text('{"format": "ofbdeploy.lut/1"}')
    rebuilt = load_or_build(shape, space, backend="ort-cpu", precision="fp32", batch=1, cache_dir=tmp_path,
                            embed_points=1, width_points=1, random_points=3, repeats=5, progress=False)
    assert LatencyLUT.load(tmp_path / lut.key.filename(shape)).to_dict() == rebuilt.to_dict()


def test_fit_recovers_a_known_latency_model_and_predicts_unseen_uneven_models():
    shape, space = _shape_space()
    specs = probe_set(shape, space, embed_points=3, width_points=3, random_points=8)
    truth = [float(arch_features(s) @ SYNTHETIC_COEFFICIENTS) for s in specs]
    coefficients, errors = fit_coefficients(specs, truth)
    assert np.abs(errors).max() < 1e-6
    rng = np.random.default_rng(5)
    for fraction in (0.1, 0.5, 0.9):
        unseen = sample_arch(shape, space, fraction, rng)
        assert float(arch_features(unseen) @ coefficients) == pytest.approx(float(arch_features(unseen) @
                                                                                  SYNTHETIC_COEFFICIENTS), rel=1e-6)


def test_fit_keeps_every_part_non_negative_under_noise():
    shape, space = _shape_space()
    specs = probe_set(shape, space, embed_points=2, width_points=2, random_points=4)
    rng = np.random.default_rng(0)
    noisy = [float(arch_features(s) @ SYNTHETIC_COEFFICIENTS) * rng.uniform(0.7, 1.3) for s in specs]
    coefficients, _ = fit_coefficients(specs, noisy)
    assert min(coefficients) >= 0.0


def test_expected_latency_is_exact_for_decided_models_and_differentiable(synthetic_lut):
    shape, space = _shape_space()
    lut = synthetic_lut(NAME, 16)
    objective = LatencyObjective(lut, target_ratio=0.6)
    model = SearchableViT(timm.create_model(NAME, img_size=16), space, NAME)
    expected = objective.expected_ms(model)
    expected.backward()
    assert model.attn_groups[0].alpha.grad is not None and model.embed_group.alpha.grad is not None
    decide_randomly(model, random.Random(0))
    assert float(objective.expected_ms(model)) == pytest.approx(lut.predict(model.arch_spec()), rel=1e-5)
    assert objective.target_ms == pytest.approx(0.6 * lut.predict(ArchSpec.dense(shape)))


def test_latency_only_search_meets_the_predicted_budget(synthetic_lut):
    _, space = _shape_space()
    lut = synthetic_lut(NAME, 16)
    torch.manual_seed(0)
    model = SearchableViT(timm.create_model(NAME, img_size=16), space, NAME)
    train, _, _ = build_datasets(DataSpec(kind="synthetic", img_size=16, limit_train=128, limit_val=16))
    cfg = SearchCfg(epochs=3, arch_lr=0.5, latency={"target_ratio": 0.5})
    objective = LatencyObjective(lut, target_ratio=0.5)
    result = run_search(model, build_loader(train, batch_size=32, train=True), cfg, Dist(), progress=False,
                        latency=objective)
    assert model.all_decided and result.target_macs is None
    assert result.predicted_latency_ms <= objective.target_ms + 1e-9
    assert result.predicted_latency_ms == pytest.approx(lut.predict(model.arch_spec()))


def test_impossible_latency_budget_is_refused(synthetic_lut):
    _, space = _shape_space()
    lut = synthetic_lut(NAME, 16)
    model = SearchableViT(timm.create_model(NAME, img_size=16), space, NAME)
    objective = LatencyObjective(lut, target_ms=1e-6)
    train, _, _ = build_datasets(DataSpec(kind="synthetic", img_size=16, limit_train=64, limit_val=16))
    with pytest.raises(OfbError, match=r"latency budget .* cannot be met"):
        run_search(model, build_loader(train, batch_size=32, train=True), SearchCfg(latency={"target_ms": 1e-6}),
                   Dist(), progress=False, latency=objective)


def test_cache_serves_other_head_widths_but_not_other_families(lut, tmp_path):
    shape, space = _shape_space()
    lut.save(tmp_path / lut.key.filename(shape))
    ten_classes = dataclasses.replace(shape, num_classes=10)
    assert lut.key.filename(ten_classes) == lut.key.filename(shape)
    reused = load_or_build(ten_classes, space, backend="ort-cpu", precision="fp32", batch=1, cache_dir=tmp_path,
                           progress=False)  # a rebuild would take minutes with the default probe counts
    assert reused.to_dict() == lut.to_dict()
    assert lut.key.filename(dataclasses.replace(shape, layer_scale=True)) != lut.key.filename(shape)


def test_latency_table_of_a_vit_variant(tmp_path):
    """Probes of a variant (registers, CLIP's pre-norm, LayerScale, SigLIP's attention pool) are built like its
    pruned models; the table steers its search."""
    model = timm.create_model(NAME, img_size=16, class_token=False, reg_tokens=2, pre_norm=True, init_values=0.1,
                              global_pool="map")
    shape = read_vit_shape(model, NAME)
    space = space_for(shape)
    table = load_or_build(shape, space, backend="torch", precision="fp32", batch=1, cache_dir=tmp_path,
                          embed_points=1, width_points=2, random_points=2, repeats=5, progress=False)
    assert LatencyLUT.load(tmp_path / table.key.filename(shape)).shape == shape
    searchable = SearchableViT(model, space, NAME)
    objective = LatencyObjective(table, target_ratio=0.6)
    expected = objective.expected_ms(searchable)
    assert expected.requires_grad and 0 < float(expected.detach()) <= table.predict(ArchSpec.dense(shape)) * 1.0001


SWIN = "ofb_swin_pico_patch2_32"
SWIN_COEFFICIENTS = [0.05, 3e-6, 2e-8, 1e-8, 5e-8, 4e-7, 1e-8, 2e-6]  # made up, one per Swin work count


def _swin_shape_space(img_size: int = 32):
    shape = read_shape(timm.create_model(SWIN, img_size=img_size), SWIN)
    return shape, family_of(shape).space(shape)


def _sampled_ms(model, lut: LatencyLUT, draws: int, seed: int) -> float:
    """Mean predicted latency of architectures drawn cell by cell from the groups' distributions: the
    expectation by sampling, independent of how the objective computes it."""
    gen = torch.Generator().manual_seed(seed)
    named = list(model.groups())
    picks = [torch.multinomial(g.probs().detach(), draws, replacement=True, generator=gen) for _, g in named]
    total = 0.0
    for k in range(draws):
        widths = {name: tuple(int(w) for w in g.cells[int(p[k])]) for (name, g), p in zip(named, picks, strict=True)}
        total += lut.predict(model.shape.spec_from_widths(widths))
    return total / draws


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_expected_latency_of_undecided_groups_equals_the_sampled_mean(family, synthetic_lut):
    if family == "vit":
        shape, space = _shape_space()
        lut = synthetic_lut(NAME, 16)
        model = SearchableViT(timm.create_model(NAME, img_size=16), space, NAME)
    else:
        shape, space = _swin_shape_space()
        lut = LatencyLUT(LutKey("cpu: synthetic", "ort-cpu", "fp32", 1, 32, SWIN), shape, SWIN_COEFFICIENTS, 1.0)
        model = family_of(shape).searchable(timm.create_model(SWIN), space, SWIN)
    with torch.no_grad():
        for _, group in model.groups():
            group.alpha.uniform_(-2, 2)  # uneven distributions, every cell possible
    objective = LatencyObjective(lut, target_ratio=0.5)
    expected = float(objective.expected_ms(model).detach())
    assert expected == pytest.approx(_sampled_ms(model, lut, 4000, seed=1), rel=0.01)
    decide_randomly(model, random.Random(3))
    assert float(objective.expected_ms(model).detach()) == pytest.approx(lut.predict(model.arch_spec()), rel=1e-6)


@pytest.mark.parametrize("img_size", [32, 20])  # 20: windows padded, clamped in the last stages
def test_swin_work_counts_hold_the_same_gemms_as_its_macs(img_size):
    """The Swin table's product counts, weighted by each product's MACs per count, add up to the MACs the shape
    counts (themselves checked against an independent counter): the table sees every stage's tokens."""
    shape, space = _swin_shape_space(img_size)
    shape = dataclasses.replace(shape, num_classes=0)
    rng = np.random.default_rng(0)
    for spec in [ArchSpec.dense(shape), ArchSpec.narrowest(shape, space),
                 *(sample_arch(shape, space, f, rng) for f in (0.2, 0.5, 0.8))]:
        f = dict(zip(shape.latency_feature_names, arch_features(spec), strict=True))
        stem = shape.grid(0) ** 2 * shape.in_chans * shape.patch_size**2 * spec.embed_dims[0]
        products = (f["patch merging"] + 4 * f["tokens x embed x attention"] + 2 * f["window attention"]
                    + 2 * f["tokens x embed x mlp"])
        assert stem + products == pytest.approx(spec.macs(), rel=1e-12)


def test_swin_table_fit_recovers_per_stage_coefficients_from_its_probes():
    shape, space = _swin_shape_space()
    specs = probe_set(shape, space, embed_points=2, width_points=2, random_points=6)
    assert len({s.embed_dims for s in specs}) > 2  # every stage's embedding moves across the probes
    truth = [float(arch_features(s) @ SWIN_COEFFICIENTS) for s in specs]
    coefficients, errors = fit_coefficients(specs, truth)
    assert np.abs(errors).max() < 1e-6
    unseen = sample_arch(shape, space, 0.4, np.random.default_rng(9))
    assert float(arch_features(unseen) @ coefficients) == pytest.approx(float(arch_features(unseen) @
                                                                              SWIN_COEFFICIENTS), rel=1e-6)
