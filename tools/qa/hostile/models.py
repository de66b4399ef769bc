"""Model names and constructor overrides the project cannot prune, and checkpoint files that must be refused
without touching a finished run."""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path

from .harness import PICO, Proc, Workspace, case, recipe_with, snapshot

for _name, _model in [
    ("overrides: unknown argument", {"name": PICO, "overrides": {"no_such_argument": 1}}),
    ("overrides: impossible argument (3 heads of 64)", {"name": PICO, "overrides": {"num_heads": 3}}),
    ("overrides: a model that cannot be allocated", {"name": PICO, "overrides": {"embed_dim": 100000, "depth": 48}}),
    ("overrides: pretrained=true (hub)", {"name": PICO, "overrides": {"pretrained": True}}),
    ("overrides: depth 0", {"name": PICO, "overrides": {"depth": 0}}),
    ("a CNN name (resnet18)", {"name": "resnet18"}),
    ("a hybrid ViT with a CNN stem", {"name": "vit_tiny_r_s16_p8_224", "img_size": 32}),
    ("a misspelt model name", {"name": "deit_smal_patch16_224"}),
    ("a hub model name", {"name": "hf-hub:timm/deit_small_patch16_224"}),
    # distilled DeiT, register tokens and CLIP's pre-norm were refused here before the ViT family learnt them
    # (tests/families/test_families.py); they run now, so they are no longer hostile inputs.
    ("model.img_size 10**6", {"name": PICO, "img_size": 1000000}),
]:
    case("models", _name, 2)(lambda ws, m=_model, n=_name: recipe_with(ws, "model", model=m))

case("models", "selfcheck --model resnet18", 2)(lambda ws: (ws.cli("selfcheck", "--model", "resnet18"), True, ""))
case("models", "lut build --model with a CNN stem", 2)(
    lambda ws: (ws.cli("lut", "build", "--model", "vit_tiny_r_s16_p8_224", "--img-size", "32"), True, ""))


# -- checkpoints -------------------------------------------------------------------------------------------------
def checkpoint_into_finished_run(ws: Workspace, name: str, make: Callable[[Path], None]) -> tuple[Proc, bool, str]:
    """The issue's case: a run of a finished directory rejected for its checkpoint must leave it (and the
    gate on it) as it was."""
    run = ws.finished()
    bad = run.parent / name
    make(bad)
    before = snapshot(run)
    result = ws.rerun(run, "--set", f"model.checkpoint={bad}", "--set", "budget.max_gflops=0.0000001")
    gate = ws.cli("check", run)
    same = snapshot(run) == before
    return result, same and gate.code == 0, f"run unchanged: {same}; check afterwards exits {gate.code}"


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {tempfile.gettempdir()}/ofbdeploy-pwned",))


for _name, _file, _make in [
    ("a text file named .pth", "text.pth", lambda p: p.write_text("not a checkpoint\n")),
    ("an empty .pth", "empty.pth", lambda p: p.write_bytes(b"")),
    ("random bytes named .safetensors", "rand.safetensors", lambda p: p.write_bytes(os.urandom(4096))),
    ("a pickle that runs a command", "evil.pth", lambda p: p.write_bytes(pickle.dumps({"model": _Evil()}))),
    ("a directory named .pth", "dir.pth", lambda p: p.mkdir()),
    ("a .txt checkpoint", "w.txt", lambda p: p.write_text("x")),
]:
    case("checkpoints", _name, 2)(lambda ws, f=_file, m=_make: checkpoint_into_finished_run(ws, f, m))


@case("checkpoints", "weights of another model (shapes differ)", 2)
def _other_weights(ws):
    import timm
    import torch

    def make(path):
        torch.save(timm.create_model("vit_tiny_patch16_224", img_size=32).state_dict(), path)

    return checkpoint_into_finished_run(ws, "other.pth", make)


@case("checkpoints", "weights holding NaN", 2)
def _nan_weights(ws):
    from safetensors.torch import load_file, save_file

    def make(path):
        state = load_file(str(ws.root / "base" / "w.safetensors"))
        state["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
        save_file(state, str(path))

    return checkpoint_into_finished_run(ws, "nan.safetensors", make)
