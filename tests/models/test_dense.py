"""Dense model building and checkpoint loading: every format users have must load bit-exactly."""

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from ofbdeploy.errors import CheckpointError, ModelError
from ofbdeploy.models.dense import build_dense, load_weights

PICO = "ofb_vit_pico_patch4_32"
ZOO = {"ofb_vit_pico_patch4_32": (64, 4), "ofb_vit_micro_patch4_32": (128, 4), "ofb_vit_tiny3_patch4_32": (48, 3)}


def _build(name: str = PICO, seed: int = 0, **kwargs: object) -> VisionTransformer:
    """Seeded eval-mode build, so source and target start with different weights."""
    torch.manual_seed(seed)
    return build_dense(name, **kwargs).eval()


@pytest.fixture(scope="module")
def source() -> VisionTransformer:
    return _build(seed=0)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    keys = [k for k in a if k not in skip]
    assert keys == [k for k in b if k not in skip]
    for k in keys:
        assert torch.equal(a[k], b[k]), k


SAVERS: dict[str, tuple[str, Callable[[dict[str, torch.Tensor], Path], None], str]] = {
    "deit": ("deit.pth", lambda sd, p: torch.save({"model": sd, "epoch": 299}, p), "torch[model]"),
    "bare": ("timm.pth", lambda sd, p: torch.save(sd, p), "torch"),
    "state_dict": ("train.pt", lambda sd, p: torch.save({"state_dict": sd, "arch": "x"}, p), "torch[state_dict]"),
    "ddp": ("ddp.bin", lambda sd, p: torch.save({f"module.{k}": v for k, v in sd.items()}, p), "torch"),
    "safetensors": ("model.safetensors", lambda sd, p: save_file(sd, str(p)), "safetensors"),
}


@pytest.mark.parametrize("kind", list(SAVERS))
def test_formats_load_bit_exact(kind: str, source: VisionTransformer, images: torch.Tensor, tmp_path: Path) -> None:
    filename, save, fmt = SAVERS[kind]
    path = tmp_path / filename
    save(_state(source), path)
    target = _build(seed=1)
    assert not torch.equal(target.pos_embed, source.pos_embed)

    report = load_weights(target, path)

    assert (report.path, report.format) == (path, fmt)
    assert not report.reset_head and not report.resized_pos_embed
    assert report.missing == [] and report.unexpected == []
    with torch.no_grad():
        assert (target(images) - source(images)).abs().max().item() == 0


def test_build_dense_loads_checkpoint(source: VisionTransformer, tmp_path: Path) -> None:
    path = tmp_path / "pico.pth"
    torch.save(source.state_dict(), path)
    _assert_same(_build(seed=1, checkpoint=path).state_dict(), source.state_dict())


def test_class_count_change_resets_head(source: VisionTransformer, tmp_path: Path) -> None:
    path = tmp_path / "pico.pth"
    torch.save(source.state_dict(), path)
    target = _build(seed=1, num_classes=5)
    fresh_head = _state(target.head)

    report = load_weights(target, path)

    assert report.reset_head and report.missing == ["head.weight", "head.bias"]
    _assert_same(_state(target.head), fresh_head)
    _assert_same(target.state_dict(), source.state_dict(), skip=("head.weight", "head.bias"))


def test_backbone_without_classifier_keeps_fresh_head(source: VisionTransformer, tmp_path: Path, caplog) -> None:
    """DINOv2/MAE/CLIP backbones have no head: the model keeps its fresh one and the log says so."""
    path = tmp_path / "backbone.safetensors"
    save_file({k: v for k, v in _state(source).items() if not k.startswith("head.")}, str(path))
    target = _build(seed=1, num_classes=5)
    fresh_head = _state(target.head)

    with caplog.at_level(logging.INFO, logger="ofbdeploy"):
        report = load_weights(target, path)

    assert report.reset_head and report.missing == ["head.weight", "head.bias"]
    assert "without a classifier" in caplog.text
    _assert_same(_state(target.head), fresh_head)
    _assert_same(target.state_dict(), source.state_dict(), skip=("head.weight", "head.bias"))


def test_image_size_change_resizes_pos_embed(source: VisionTransformer, tmp_path: Path) -> None:
    path = tmp_path / "pico.safetensors"
    save_file(_state(source), str(path))
    target = _build(seed=1, img_size=48)

    report = load_weights(target, path)

    assert report.resized_pos_embed and not report.reset_head
    assert target.pos_embed.shape == (1, 1 + 12 * 12, 64)
    _assert_same(target.state_dict(), source.state_dict(), skip=("pos_embed",))
    with torch.no_grad():
        assert target(torch.randn(1, 3, 48, 48)).shape == (1, 10)


def _save_module(path: Path) -> None:
    torch.save(torch.nn.Linear(2, 2), path)


def _save_namespace(path: Path) -> None:
    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=0.1)}, path)


@pytest.mark.parametrize(
    ("filename", "write", "match"),
    [
        ("absent.pth", None, "checkpoint not found"),
        ("weights.npz", lambda p: p.write_bytes(b"x"), r"unsupported checkpoint extension.*\.safetensors"),
        ("module.pth", _save_module, r"pickled Python objects \(torch\.nn\.modules\.linear\.Linear\)"),
        ("namespace.pth", _save_namespace, r"pickled Python objects \(argparse\.Namespace\)"),
        ("junk.pth", lambda p: p.write_bytes(b"not a checkpoint"), "not a readable PyTorch checkpoint"),
        ("junk.safetensors", lambda p: p.write_bytes(b"not a checkpoint"), "not a readable safetensors"),
        ("tensor.pt", lambda p: torch.save(torch.zeros(3), p), "holds a Tensor, not a state dict"),
        ("meta.pth", lambda p: torch.save({"w": torch.zeros(1), "epoch": 3}, p), "non-tensor entries: epoch"),
    ],
)
def test_unloadable_files(
    filename: str, write: Callable[[Path], object] | None, match: str, source: VisionTransformer, tmp_path: Path
) -> None:
    path = tmp_path / filename
    if write is not None:
        write(path)
    with pytest.raises(CheckpointError, match=match) as info:
        load_weights(source, path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def _drop_norm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if k != "norm.weight"}


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda _: _state(_build("ofb_vit_tiny3_patch4_32")), r"cls_token expected \(1, 1, 64\) got \(1, 1, 48\)"),
        (_drop_norm, r"norm\.weight missing \(expected \(64,\)\)"),
        (lambda sd: {**sd, "extra.weight": torch.zeros(2)}, r"extra\.weight unexpected \(got \(2,\)\)"),
    ],
    ids=["embed_dim", "missing", "unexpected"],
)
def test_wrong_keys_rejected_before_loading(
    edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    match: str,
    source: VisionTransformer,
    tmp_path: Path,
) -> None:
    path = tmp_path / "other.pth"
    torch.save(edit(_state(source)), path)
    target = _build(seed=1)
    before = _state(target)

    with pytest.raises(CheckpointError, match=match) as info:
        load_weights(target, path)

    assert str(path) in str(info.value) and "\n" not in str(info.value)
    _assert_same(target.state_dict(), before)


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(ModelError, match=r"unknown model 'deit_tiny_patch16_244'.*deit_tiny_patch16_224"):
        build_dense("deit_tiny_patch16_244")


def test_non_vit_model_rejected() -> None:
    with pytest.raises(ModelError, match="ResNet models cannot be pruned"):
        build_dense("test_resnet")


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_models_build_and_run(name: str) -> None:
    model = timm.create_model(name)
    embed_dim, heads = ZOO[name]
    assert type(model) is VisionTransformer
    assert (model.embed_dim, model.blocks[0].attn.num_heads, model.num_classes) == (embed_dim, heads, 10)
    assert timm.create_model(name, num_classes=3)(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_zoo_refuses_pretrained() -> None:
    with pytest.raises(ModelError, match="no pretrained weights"):
        timm.create_model(PICO, pretrained=True)


def test_deit_tiny_at_32px() -> None:
    model = _build("deit_tiny_patch16_224", num_classes=10, img_size=32)
    assert model.patch_embed.grid_size == (2, 2)
    assert model.pos_embed.shape == (1, 5, 192)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
