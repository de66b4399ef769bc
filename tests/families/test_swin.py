"""Swin (v1) as in the OFB paper: per-block heads/head width and MLP, per-stage embedding, patch merging sliced
on both sides; exact materialisation into a plain timm SwinTransformer; FLOPs equal to PyTorch's counter."""

import json
import random
from pathlib import Path

import pytest
import timm
import torch
import yaml
from click.testing import CliRunner

from ofbdeploy import load_pruned
from ofbdeploy.arch import ArchSpec
from ofbdeploy.arch.cost import count_params, measure_macs
from ofbdeploy.cli import main
from ofbdeploy.errors import OfbError
from ofbdeploy.families import family_of, load_arch, read_shape
from ofbdeploy.latency.lut import LatencyLUT
from ofbdeploy.models.materialize import materialize
from ofbdeploy.models.pruned import save_pruned
from ofbdeploy.prune.budget import check_budget, enforce_budget, resolve_target
from ofbdeploy.prune.ofb.engine import run_search
from ofbdeploy.recipe import SearchCfg, load_recipe
from ofbdeploy.search.pmim import random_token_mask, reconstruction_loss
from ofbdeploy.train.data import DataSpec, build_datasets, build_loader
from ofbdeploy.train.distributed import Dist
from ofbdeploy.verify.exactness import check_agreement, decide_randomly

PICO = "ofb_swin_pico_patch2_32"
RECIPES = Path(__file__).parents[2] / "recipes"


def _searchable(name: str = PICO, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs)
    shape = read_shape(model, name)
    return family_of(shape).searchable(model, family_of(shape).space(shape), name)


@pytest.mark.parametrize("img_size", [32, 28, 20])  # 28, 20: padded windows, odd merges, clamped windows
@pytest.mark.parametrize("extreme", ["narrowest", "widest", None])
def test_materialised_swin_agrees_with_the_masked_model(img_size, extreme):
    searchable = _searchable(img_size=img_size)
    decide_randomly(searchable, random.Random(img_size), extreme)
    result = check_agreement(searchable)  # fused attention on and off
    assert result.ok, result
    assert result.macs_spec == result.macs_counted and result.params_spec == result.params_counted


def test_materialised_swin_is_a_plain_timm_swin_with_per_block_widths(tmp_path):
    searchable = _searchable()
    decide_randomly(searchable, random.Random(5))
    model, spec = materialize(searchable)
    assert type(model) is timm.models.swin_transformer.SwinTransformer
    assert not any(m.__module__.startswith("ofbdeploy") for m in model.modules())
    blocks = [b for stage in model.layers for b in stage.blocks]
    for block, blk, stage in zip(blocks, spec.blocks, [0, 0, 1, 1, 2, 2, 3, 3], strict=True):
        assert block.attn.num_heads == blk.heads and block.attn.qkv.out_features == 3 * blk.attn_dim
        assert block.attn.relative_position_bias_table.shape[1] == blk.heads
        assert block.mlp.fc1.out_features == blk.mlp_dim and block.norm1.normalized_shape[0] == spec.embed_dims[stage]
        assert not block.attn.qkv._forward_hooks
    for k in range(1, 4):
        merge = model.layers[k].downsample
        assert merge.norm.normalized_shape[0] == merge.reduction.in_features == 4 * spec.embed_dims[k - 1]
        assert merge.reduction.out_features == spec.embed_dims[k]
    assert model.head.fc.in_features == spec.embed_dims[-1]
    save_pruned(model, spec, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "arch.json").read_text())["family"] == "swin"
    loaded = load_pruned(tmp_path / "m")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_head_cut_keeps_the_relative_position_bias_of_the_kept_heads():
    searchable = _searchable()
    block = searchable.blocks[2]  # stage 1: 6 heads
    table = block.attn.relative_position_bias_table.detach().clone()
    group = searchable.attn_groups[2]
    with torch.no_grad():
        group.score.copy_(torch.arange(6 * 8, dtype=torch.float).reshape(6, 8) / 100)  # later heads matter more
    searchable.force_cell("blocks.2.attn", [tuple(c) for c in group.cells.tolist()].index((2, 8)))
    assert group.kept_heads.tolist() == [4, 5]
    assert torch.equal(block.attn.relative_position_bias_table, table[:, [4, 5]])


def test_stage_cut_slices_the_next_patch_merging_on_its_four_input_groups():
    searchable = _searchable()
    merge = searchable.swin.layers[2].downsample  # reads stage 1 (48 wide)
    norm_weight, reduction = merge.norm.weight.detach().clone(), merge.reduction.weight.detach().clone()
    stage = searchable.embed_groups[1]
    cell = [int(c[0]) for c in stage.cells].index(24)
    searchable.force_cell("stages.1.embedding", cell)
    kept = torch.tensor(stage.kept_indices())
    quads = torch.cat([kept + j * 48 for j in range(4)])
    assert torch.equal(merge.norm.weight, norm_weight[quads])
    assert torch.equal(merge.reduction.weight, reduction[:, quads])
    assert searchable.swin.layers[1].downsample.reduction.out_features == 24


@pytest.mark.slow
@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "swin_s3_tiny_224"])
def test_swin_t_flops_match_the_torch_counter_at_224(name):
    model = timm.create_model(name)
    dense = ArchSpec.dense(read_shape(model, name))
    assert dense.macs() == measure_macs(model, 224) and dense.params() == count_params(model)
    assert round(dense.macs() / 1e9, 1) == {"swin_tiny_patch4_window7_224": 4.5, "swin_s3_tiny_224": 4.6}[name]
    searchable = _searchable(name)
    decide_randomly(searchable, random.Random(1))
    model, spec = materialize(searchable)
    assert spec.macs() == measure_macs(model, 224) and spec.params() == count_params(model)


def test_pmim_masks_patch_tokens_and_decodes_from_the_last_stage():
    for img_size in (32, 28):
        searchable = _searchable(img_size=img_size)
        images = torch.randn(2, 3, img_size, img_size)
        token_mask = random_token_mask(2, searchable.shape.num_patches, 0.75, torch.device("cpu"))
        logits, reconstruction = searchable(images, token_mask)
        assert logits.shape == (2, 10) and reconstruction.shape == images.shape
        loss = reconstruction_loss(images, reconstruction, token_mask, searchable.shape.patch_size)
        loss.backward()
        assert searchable.mask_token.grad is not None and searchable.mask_token.grad.abs().sum() > 0
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in searchable.decoder.parameters())


def test_swin_search_decides_meets_the_budget_and_resumes(tmp_path):
    train, _, _ = build_datasets(DataSpec(kind="synthetic", img_size=16, limit_train=128, limit_val=32))
    cfg = SearchCfg(target_flops_ratio=0.5, epochs=3, warmup_epochs=1, lr=1e-3, arch_lr=0.5,
                    loss_weights={"flops": 50.0})
    model = _searchable(img_size=16)
    result = run_search(model, build_loader(train, batch_size=32, train=True, seed=0), cfg, Dist(), progress=False,
                        checkpoint_path=tmp_path / "s.ckpt")
    assert model.all_decided and result.achieved_macs <= result.target_macs
    assert result.spec.family == "swin" and len(result.spec.embed_dims) == 4
    again = _searchable(img_size=16)
    again.apply_arch(result.spec)  # a stage's and a block's widths restored from the record
    assert again.arch_spec() == result.spec


def test_budget_enforcement_narrows_swin_stages_and_blocks():
    model = _searchable()
    model.decide_widest()
    dense = ArchSpec.dense(model.shape).macs()
    steps = enforce_budget(model, 0.7 * dense)
    assert steps and model.arch_spec().macs() <= 0.7 * dense
    assert {s.group.split(".")[0] for s in steps} <= {"stages", "blocks"}


@pytest.fixture(scope="module")
def swin_tables(tmp_path_factory) -> tuple[Path, str]:
    """A cache with a Swin table measured on ONNX Runtime by `ofbdeploy lut build` (the swin quickstart's 16 px),
    and what the command printed."""
    cache = tmp_path_factory.mktemp("swin-lut")
    args = ["lut", "build", "--model", PICO, "--img-size", "16", "--cache-dir", str(cache), "--embed-points", "1",
            "--width-points", "2", "--random-points", "1", "--repeats", "5"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return cache, result.output


def test_lut_build_measures_a_swin_table_that_round_trips_and_orders_models(swin_tables):
    cache, output = swin_tables
    (path,) = cache.glob("*.json")
    table = LatencyLUT.load(path)
    assert str(path) in output and table.shape.family == "swin" and len(table.coefficients) == 8
    assert LatencyLUT.load(table.save(path.with_name("again.json"))).to_dict() == table.to_dict()
    shape, space = table.shape, family_of(table.shape).space(table.shape)
    assert table.predict(ArchSpec.narrowest(shape, space)) < table.predict(ArchSpec.dense(shape))
    vit = read_shape(timm.create_model("ofb_vit_pico_patch4_32", img_size=16), "ofb_vit_pico_patch4_32")
    with pytest.raises(OfbError, match="not for this run's model"):
        table.check_fits(vit, "ort-cpu", "fp32", 1, "search.latency.lut")
    path.with_name("again.json").unlink()


@pytest.mark.parametrize(("recipe", "gflops"), [("ofb_swin_a", 1.0), ("ofb_swin_b", 2.6), ("ofb_swin_c", 3.1)])
def test_paper_swin_recipes_fit_the_search_space(recipe, gflops):
    from ofbdeploy.verify.exactness import meta_device

    loaded = load_recipe(RECIPES / f"{recipe}.yaml")
    assert loaded.model.name == "swin_tiny_patch4_window7_224.ms_in1k" and loaded.model.pretrained
    assert loaded.search.target_gflops == gflops
    with meta_device():
        shape = read_shape(timm.create_model(loaded.model.name, num_classes=1000), loaded.model.name)
    space = family_of(shape).space(shape, loaded.search.align)
    check_budget(resolve_target(loaded.search, shape), space, shape)  # raises when the grids cannot reach it


def test_swin_quickstart_runs_end_to_end(tmp_path):
    data = yaml.safe_load((RECIPES / "swin_quickstart.yaml").read_text())
    data.update(output_dir=str(tmp_path / "run"), device="cpu")
    data["data"] = {"kind": "synthetic", "limit_train": 96, "limit_val": 32, "batch_size": 32, "eval_batch_size": 32}
    data["pretrain"].update(epochs=0)
    data["search"].update(epochs=2, warmup_epochs=1)
    data["finetune"].update(epochs=1)
    data["profile"] = {"enabled": False}  # latency is measured like any model's; here: search to export
    path = tmp_path / "swin.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["run", str(path), "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["arch"]["family"] == "swin" and report["flops_pruned"] <= 0.5 * report["flops_dense"]
    assert report["materialize_max_abs_diff"] < 1e-4 and report["export"][-1]["max_abs_diff"] < 1e-3
    assert type(load_pruned(tmp_path / "run" / "finetuned")).__name__ == "SwinTransformer"


def test_swin_latency_budget_run_steers_the_search_with_a_measured_per_stage_table(tmp_path, swin_tables):
    """A latency budget on a Swin: the run takes the table of its stages from the cache (measured on ONNX Runtime by
    `lut build`), the search meets the budget on it, the fit stage closes the loop on measurements, and the profile
    measures the result."""
    data = yaml.safe_load((RECIPES / "swin_quickstart.yaml").read_text())
    data.update(output_dir=str(tmp_path / "run"), device="cpu")
    data["data"] = {"kind": "synthetic", "limit_train": 96, "limit_val": 32, "batch_size": 32, "eval_batch_size": 32}
    data["pretrain"].update(epochs=0)
    del data["search"]["target_flops_ratio"]
    data["search"].update(epochs=2, warmup_epochs=1, latency={
        "target_ratio": 0.6, "cache_dir": str(swin_tables[0]), "repeats": 5, "max_rounds": 2})
    data["finetune"].update(epochs=1)
    data["export"] = {"int8": False}
    data["profile"] = {"batches": [1], "backends": ["ort-cpu"], "repeats": 10}
    path = tmp_path / "swin.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["run", str(path), "--no-progress"])
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert "latency table from cache" in (tmp_path / "run" / "run.log").read_text()
    table = LatencyLUT.load(tmp_path / "run" / "search" / "lut.json")
    assert table.shape.family == "swin" and len(table.coefficients) == len(table.features) == 8
    searched = load_arch(tmp_path / "run" / "pruned" / "arch.json")
    assert table.predict(searched) <= report["latency_target_ms"] + 1e-9  # the search met its budget on the table
    assert report["latency_target_ms"] == pytest.approx(0.6 * table.dense_ms)
    fit = report["fit"]["latency"]
    assert fit is not None and 1 <= len(fit["rounds"]) <= 2 and report["fit"]["skipped"] is None
    assert all(r["measured_ratio"] > 0 and r["repeats"] >= 3 for r in fit["rounds"])
    assert report["arch"]["family"] == "swin"
    check = next(c for c in report["budget"] if c["name"].startswith("search latency target"))
    row = next(r for r in report["latency"] if r["batch"] == 1)
    assert check["measured"] == f"{row['latency_ms_pruned'] / row['latency_ms_dense']:.1%}"
    assert result.exit_code == (0 if check["ok"] else 1), result.output


def test_info_describes_a_pruned_swin(tmp_path):
    searchable = _searchable()
    decide_randomly(searchable, random.Random(2))
    model, spec = materialize(searchable)
    save_pruned(model, spec, tmp_path / "m")
    result = CliRunner().invoke(main, ["info", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "swin family" in result.output and "embedding (per stage): " in result.output
    assert f"{spec.embed_dims[3]} of 192" in result.output and f"{spec.params() / 1e6:.2f} M" in result.output


def test_swin_checkpoints_load_with_the_family_filter_and_head_keys(tmp_path):
    from safetensors.torch import save_file

    from ofbdeploy.models.dense import build_dense, load_weights

    source = timm.create_model(PICO)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(tmp_path / "full.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("head.")}, str(tmp_path / "backbone.safetensors"))
    same = build_dense(PICO, checkpoint=tmp_path / "full.safetensors")
    assert torch.equal(same.head.fc.weight, source.head.fc.weight)
    for file in ("full", "backbone"):
        other = build_dense(PICO, num_classes=7)
        report = load_weights(other, tmp_path / f"{file}.safetensors")
        assert report.reset_head and other.head.fc.out_features == 7
        assert torch.equal(other.layers[3].blocks[1].mlp.fc2.weight, source.layers[3].blocks[1].mlp.fc2.weight)
