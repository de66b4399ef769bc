"""A saved model directory edited by hand: arch.json out of range, not UTF-8, deeply nested; weights truncated
or missing."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from .harness import Proc, Workspace, case


def model_dir(ws: Workspace, name: str) -> Path:
    where = ws.new_dir(name) / "model"
    result = ws.cli("selfcheck", "--trials", "0", "--save", where)
    if result.code != 0:
        raise SystemExit(result.stderr)
    return where


def arch_case(ws: Workspace, name: str, edit: Callable[[Path], None], *command: str) -> tuple[Proc, bool, str]:
    where = model_dir(ws, name)
    edit(where)
    args = [a if a != "{dir}" else str(where) for a in command] or ["info", str(where)]
    return ws.cli(*args), True, ""


def _edit_arch(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads((path / "arch.json").read_text())
    change(data)
    (path / "arch.json").write_text(json.dumps(data))


def _heads_same_qkv(data: dict) -> None:
    """Another head count at the same qkv width (4 x 8 <-> 2 x 16 ...), which loads without a shape error."""
    block = data["blocks"][0]
    width = block["heads"] * block["head_dim"]
    for heads in range(1, data["base"]["num_heads"] + 1):
        if heads != block["heads"] and width % heads == 0 and width // heads <= data["base"]["head_dim"]:
            block.update(heads=heads, head_dim=width // heads, kept_heads=[], kept_channels=[])
            return
    block.update(kept_heads=list(reversed(block["kept_heads"])))


case("arch", "arch.json with heads out of range", 2)(
    lambda ws: arch_case(ws, "arch-range", lambda p: _edit_arch(p, lambda d: d["blocks"][0].update(heads=99))))
case("arch", "arch.json with other heads, same qkv shape", 2)(
    lambda ws: arch_case(ws, "arch-heads", lambda p: _edit_arch(p, _heads_same_qkv), "profile", "{dir}",
                         "--backend", "torch", "--batch", "1", "--repeats", "5"))
case("arch", "arch.json not UTF-8", 2)(
    lambda ws: arch_case(ws, "arch-utf", lambda p: (p / "arch.json").write_bytes(b"\xff\xfe{}")))
case("arch", "arch.json nested 100000 deep", 2)(
    lambda ws: arch_case(ws, "arch-deep", lambda p: (p / "arch.json").write_text("[" * 100000)))
case("arch", "arch.json with a float head count", 2)(
    lambda ws: arch_case(ws, "arch-float", lambda p: _edit_arch(p, lambda d: d["blocks"][0].update(heads=2.5))))
case("arch", "arch.json with patch larger than the image", 2)(
    lambda ws: arch_case(ws, "arch-patch", lambda p: _edit_arch(p, lambda d: d["base"].update(patch_size=4096))))
case("arch", "weights file truncated", 2)(
    lambda ws: arch_case(ws, "w-trunc", lambda p: (p / "model.safetensors").write_bytes(
        (p / "model.safetensors").read_bytes()[:1000]), "export", "{dir}"))
case("arch", "weights file missing", 2)(
    lambda ws: arch_case(ws, "w-missing", lambda p: (p / "model.safetensors").unlink(), "export", "{dir}"))
