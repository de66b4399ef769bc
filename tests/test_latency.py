"""Latency lookup tables and the latency-aware search (ONNX Runtime CPU, tiny models)."""

import random

import pytest
import timm
import torch

from ofbdeploy.arch import ArchSpec, ViTShape
from ofbdeploy.errors import OfbError
from ofbdeploy.grids import SearchSpace, space_for
from ofbdeploy.latency.lut import LatencyLUT, LutKey, load_or_build
from ofbdeploy.latency.objective import LatencyObjective
from ofbdeploy.recipe import SearchCfg
from ofbdeploy.search.engine import run_search
from ofbdeploy.search.searchable import SearchableViT
from ofbdeploy.train.data import DataSpec, build_datasets, build_loader
from ofbdeploy.train.distributed import Dist
from ofbdeploy.verify import decide_randomly

NAME = "ofb_vit_pico_patch4_32"


def _shape_space():
    shape = ViTShape.from_model(timm.create_model(NAME, img_size=16), NAME)
    return shape, space_for(shape)


@pytest.fixture(scope="module")
def lut(tmp_path_factory) -> LatencyLUT:
    shape, space = _shape_space()
    cache = tmp_path_factory.mktemp("lut")
    table = load_or_build(shape, space, backend="ort-cpu", precision="fp32", batch=1, cache_dir=cache,
                          embed_points=2, width_points=2, repeats=5, progress=False)
    again = load_or_build(shape, space, backend="ort-cpu", precision="fp32", batch=1, cache_dir=cache,
                          embed_points=2, width_points=2, repeats=5, progress=False)
    assert again.to_dict() == table.to_dict()  # the second call is a cache hit, not a rebuild
    return table


def _synthetic(shape: ViTShape, space: SearchSpace) -> LatencyLUT:
    """A table with made-up, monotone part costs: search logic tested without measurement noise."""
    embed = [min(space.embedding), max(space.embedding)]
    heads = sorted({n for n, _ in space.attention})
    widths = sorted({c for _, c in space.attention})
    mlp = [min(space.mlp), max(space.mlp)]
    attn = [[[1e-3 * e * n * c / 64 for c in widths] for n in heads] for e in embed]
    hidden = [[1e-3 * e * k / 32 for k in mlp] for e in embed]
    key = LutKey("cpu: synthetic", "ort-cpu", "fp32", 1, shape.img_size, shape.model_name)
    return LatencyLUT(key, shape, embed, heads, widths, mlp, [0.05, 0.1], attn, hidden, probe_depth=shape.depth)


def test_table_is_keyed_and_round_trips(lut, tmp_path):
    assert lut.key.backend == "ort-cpu" and lut.key.batch == 1 and lut.key.device.startswith("cpu")
    assert lut.points == 2 * (len(lut.heads) * 2 + 1) + 2  # stems + attention probes + MLP probes
    path = lut.save(tmp_path / "t.json")
    assert LatencyLUT.load(path).to_dict() == lut.to_dict()
    assert lut.predict(ArchSpec.dense(lut.shape)) > 0


def test_expected_latency_is_exact_for_decided_models_and_differentiable():
    shape, space = _shape_space()
    lut = _synthetic(shape, space)
    objective = LatencyObjective(lut, space, target_ratio=0.6)
    model = SearchableViT(timm.create_model(NAME, img_size=16), space, NAME)
    expected = objective.expected_ms(model)
    expected.backward()
    assert model.attn_groups[0].alpha.grad is not None and model.embed_group.alpha.grad is not None
    decide_randomly(model, random.Random(0))
    assert float(objective.expected_ms(model)) == pytest.approx(lut.predict(model.arch_spec()), rel=1e-5)
    assert objective.target_ms == pytest.approx(0.6 * lut.predict(ArchSpec.dense(shape)))


def test_latency_only_search_meets_the_predicted_budget():
    shape, space = _shape_space()
    lut = _synthetic(shape, space)
    torch.manual_seed(0)
    model = SearchableViT(timm.create_model(NAME, img_size=16), space, NAME)
    train, _, _ = build_datasets(DataSpec(kind="synthetic", img_size=16, limit_train=128, limit_val=16))
    cfg = SearchCfg(epochs=3, arch_lr=0.5, latency={"target_ratio": 0.5})
    objective = LatencyObjective(lut, space, target_ratio=0.5)
    result = run_search(model, build_loader(train, batch_size=32, train=True), cfg, Dist(), progress=False,
                        latency=objective)
    assert model.all_decided and result.target_macs is None
    assert result.predicted_latency_ms <= objective.target_ms + 1e-9
    assert result.predicted_latency_ms == pytest.approx(lut.predict(model.arch_spec()))


def test_impossible_latency_budget_is_refused():
    shape, space = _shape_space()
    lut = _synthetic(shape, space)
    model = SearchableViT(timm.create_model(NAME, img_size=16), space, NAME)
    objective = LatencyObjective(lut, space, target_ms=1e-6)
    train, _, _ = build_datasets(DataSpec(kind="synthetic", img_size=16, limit_train=64, limit_val=16))
    with pytest.raises(OfbError, match=r"latency budget .* cannot be met"):
        run_search(model, build_loader(train, batch_size=32, train=True), SearchCfg(latency={"target_ms": 1e-6}),
                   Dist(), progress=False, latency=objective)
