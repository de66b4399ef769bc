"""Weights by name (model.pretrained) offline: a Hugging Face cache the test populates, the way a user's
machine has it after one online run; nothing here reaches the network (HF_HUB_OFFLINE)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import yaml
from click.testing import CliRunner
from huggingface_hub import constants
from safetensors.torch import load_file, save_file

from ofbdeploy.cli import main
from ofbdeploy.errors import ModelError
from ofbdeploy.models.dense import build_dense, load_weights
from ofbdeploy.models.hub import find_weights
from ofbdeploy.recipe import RecipeError, parse_recipe

PICO = "ofb_vit_pico_patch4_32"
COMMIT = "0" * 40


def cache_repo(cache: Path, repo: str, files: dict[str, bytes]) -> None:
    """Lay out ``repo`` in the Hub cache format (refs/main -> snapshots/<commit>/<file>)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)


def weights_bytes(model: torch.nn.Module, tmp: Path) -> bytes:
    path = tmp / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path.read_bytes()


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_a_timm_tag_is_read_from_the_cache_and_loaded_like_a_checkpoint(offline_cache: Path, tmp_path: Path) -> None:
    reference = timm.create_model("test_vit", pretrained=False)
    cfg = timm.models.get_pretrained_cfg("test_vit.r160_in1k")
    cache_repo(offline_cache, cfg.hf_hub_id, {"model.safetensors": weights_bytes(reference, tmp_path)})

    found = find_weights("test_vit.r160_in1k")
    assert found.architecture == "test_vit" and found.file.is_file()
    model = build_dense(found.architecture)
    load_weights(model, found.file)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_an_hf_hub_name_reads_its_architecture_from_config_json(offline_cache: Path, tmp_path: Path) -> None:
    reference = build_dense(PICO)
    config = json.dumps({"architecture": PICO, "num_classes": 10}).encode()
    cache_repo(offline_cache, "someone/pico", {"config.json": config, "pytorch_model.bin": b""})
    # Only the .bin is there: the safetensors name is tried first and skipped, as timm does.
    bin_path = tmp_path / "w.bin"
    torch.save(reference.state_dict(), bin_path)
    (offline_cache / "models--someone--pico" / "snapshots" / COMMIT / "pytorch_model.bin").write_bytes(
        bin_path.read_bytes())

    found = find_weights("hf-hub:someone/pico")
    assert found.architecture == PICO and found.file.name == "pytorch_model.bin"
    model = build_dense(found.architecture, num_classes=7)  # another class count: the head is reset, as locally
    report = load_weights(model, found.file)
    assert report.reset_head
    assert torch.equal(model.state_dict()["pos_embed"], reference.state_dict()["pos_embed"])


def test_offline_and_not_cached_is_one_line_naming_the_way_out(offline_cache: Path) -> None:
    with pytest.raises(ModelError, match=r"not in the local Hugging Face cache .*model.checkpoint") as err:
        find_weights("test_vit.r160_in1k")
    assert "\n" not in str(err.value)


def test_a_model_without_hub_weights_is_refused(offline_cache: Path) -> None:
    with pytest.raises(ModelError, match="no pretrained weights"):
        find_weights(PICO)


def test_a_hub_config_that_names_no_timm_model_is_refused(offline_cache: Path) -> None:
    cache_repo(offline_cache, "someone/odd", {"config.json": b'{"architecture": "no_such_net"}'})
    with pytest.raises(ModelError, match="names no timm architecture"):
        find_weights("hf-hub:someone/odd")


BASE = {"model": {"name": PICO}, "data": {"kind": "digits"}, "search": {"target_flops_ratio": 0.5}}


@pytest.mark.parametrize(("model", "message"), [
    ({"name": PICO, "pretrained": True, "checkpoint": "w.pth"}, "one of checkpoint and pretrained"),
    ({"name": "hf-hub:someone/pico"}, "set pretrained: true"),
])
def test_the_recipe_refuses_contradictory_weight_sources(model: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        parse_recipe({**BASE, "model": model})


def _tiny_run(tmp: Path, model: dict) -> Path:
    recipe = {"name": "hub", "seed": 0, "device": "cpu", "output_dir": str(tmp / "run"), "model": model,
              "data": {"kind": "synthetic", "limit_train": 64, "limit_val": 32, "batch_size": 32},
              "search": {"target_flops_ratio": 0.5, "epochs": 1, "arch_lr": 0.3},
              "finetune": {"epochs": 1}, "export": {"enabled": False}, "profile": {"enabled": False}}
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_a_run_starts_from_hub_weights_offline(offline_cache: Path, tmp_path: Path) -> None:
    """`ofbdeploy run` with model.pretrained: the cached weights are the dense model's, and their file is an input
    of the dense stage (a changed cache re-runs it), all without a network."""
    reference = build_dense(PICO, img_size=16, num_classes=10)
    config = json.dumps({"architecture": PICO, "num_classes": 10}).encode()
    cache_repo(offline_cache, "someone/pico16", {"config.json": config,
                                                 "model.safetensors": weights_bytes(reference, tmp_path)})
    recipe = _tiny_run(tmp_path, {"name": "hf-hub:someone/pico16", "pretrained": True, "img_size": 16,
                                  "num_classes": 10})
    result = CliRunner().invoke(main, ["run", str(recipe), "--no-progress"])
    assert result.exit_code == 0, result.output
    dense = load_file(str(tmp_path / "run" / "dense" / "model.safetensors"))
    assert torch.equal(dense["pos_embed"], reference.state_dict()["pos_embed"])
    stages = json.loads((tmp_path / "run" / "stages.json").read_text())
    assert "model.pretrained" in stages["stages"]["dense"]["inputs"]


def test_a_run_offline_without_the_weights_is_refused_before_writing(offline_cache: Path, tmp_path: Path) -> None:
    recipe = _tiny_run(tmp_path, {"name": "hf-hub:someone/absent", "pretrained": True, "img_size": 16})
    result = CliRunner().invoke(main, ["run", str(recipe), "--no-progress"])
    assert result.exit_code == 2
    assert "not in the local Hugging Face cache" in result.output
    assert not (tmp_path / "run").exists()
