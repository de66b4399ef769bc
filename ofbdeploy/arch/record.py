"""``arch.json``: the on-disk record of an :class:`ArchSpec` (format 2; format 1 is still read, as a ViT).

Reading needs the dense shape type of the family a record names; the caller passes the family registry's
``name -> shape type`` table in (:func:`ofbdeploy.families.load_arch` does), so this module knows no family.
Every problem of a record is one :class:`ArchError` line naming the file and the field.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from ofbdeploy.arch.spec import MAX_WIDTH, ArchSpec, BlockSpec, check_int, is_number, require
from ofbdeploy.errors import ArchError, OfbError
from ofbdeploy.io import atomic_write_text, read_json

ARCH_FORMAT = "ofbdeploy.arch/2"
# Format 1 (ViT only, one embedding width "embed_dim"/"kept_embed") is still read, as a ViT record.
ARCH_FORMAT_V1 = "ofbdeploy.arch/1"
_V1_FAMILY = "vit"
_ARCH_KEYS = {"format", "family", "base", "embed_dims", "kept_embeds", "blocks", "macs", "params", "notes"}
_ARCH_KEYS_V1 = {"format", "base", "embed_dim", "kept_embed", "blocks", "macs", "params", "notes"}
_BLOCK_KEYS = {"heads", "head_dim", "mlp_dim", "kept_heads", "kept_channels", "kept_mlp"}

# The family name an arch.json records -> that family's dense shape type (a frozen dataclass).
ShapeTypes = Mapping[str, type]


def arch_to_dict(spec: ArchSpec) -> dict[str, Any]:
    """The format-2 record of ``spec`` (JSON-ready), with its MACs and parameters for readers."""
    return {
        "format": ARCH_FORMAT,
        "family": spec.family,
        "base": asdict(spec.base),
        "embed_dims": list(spec.embed_dims),
        "kept_embeds": [list(k) for k in spec.kept_embeds],
        "blocks": [
            {
                "heads": blk.heads,
                "head_dim": blk.head_dim,
                "mlp_dim": blk.mlp_dim,
                "kept_heads": list(blk.kept_heads),
                "kept_channels": [list(c) for c in blk.kept_channels],
                "kept_mlp": list(blk.kept_mlp),
            }
            for blk in spec.blocks
        ],
        "macs": spec.macs(),
        "params": spec.params(),
        "notes": spec.notes,
    }


def arch_from_dict(data: Any, shape_types: ShapeTypes, source: str = "arch.json") -> ArchSpec:
    """Parse and validate a record; every problem is one :class:`ArchError` line naming ``source`` and the field.

    Records of format 1 (before families existed) are ViT records with one ``embed_dim``.
    """
    try:
        require(isinstance(data, dict), f"expected a JSON object, got {type(data).__name__}")
        fmt = data.get("format")
        require(fmt in (ARCH_FORMAT, ARCH_FORMAT_V1),
                f"format: expected {ARCH_FORMAT!r} (or {ARCH_FORMAT_V1!r}), got {str(fmt)[:40]!r}")
        _known(data, _ARCH_KEYS if fmt == ARCH_FORMAT else _ARCH_KEYS_V1, "")
        for name in ("macs", "params"):
            require(name not in data or is_number(data[name]), f"{name}: expected a number")
        notes = data.get("notes", {})
        require(isinstance(notes, dict), f"notes: expected an object, got {type(notes).__name__}")
        if fmt == ARCH_FORMAT:
            family = _required(data, "family", "")
            require(isinstance(family, str), "family: expected a model family name")
            embeds = _required(data, "embed_dims", "")
            require(isinstance(embeds, list) and len(embeds) >= 1, "embed_dims: expected a list of widths")
            embeds = [check_int(e, f"embed_dims[{k}]", 1, MAX_WIDTH) for k, e in enumerate(embeds)]
            kept = data.get("kept_embeds", [])
            require(isinstance(kept, list), "kept_embeds: expected a list of index lists")
            kept = [_indices(k, f"kept_embeds[{n}]") for n, k in enumerate(kept)]
        else:
            family = _V1_FAMILY
            embeds = [check_int(_required(data, "embed_dim", ""), "embed_dim", 1, MAX_WIDTH)]
            kept_v1 = _indices(data.get("kept_embed", []), "kept_embed")
            kept = [kept_v1] if kept_v1 else []
        require(family in shape_types,
                f"family: unknown model family {family!r} (known: {', '.join(shape_types)})")
        base = _required(data, "base", "")
        require(isinstance(base, dict), "base: expected an object with the dense model's shape")
        base = _strict(shape_types[family], base, "base")
        blocks = _required(data, "blocks", "")
        require(isinstance(blocks, list), "blocks: expected a list of blocks")
        require(len(blocks) == base.depth, f"blocks: expected {base.depth} blocks, got {len(blocks)}")
        return ArchSpec(base, tuple(embeds), tuple(_block(b, f"blocks[{i}]") for i, b in enumerate(blocks)),
                        tuple(kept), notes)
    except ArchError as err:
        raise ArchError(f"{source}: {err}") from None


def save_arch(spec: ArchSpec, path: str | Path) -> None:
    """Write ``spec``'s record atomically."""
    atomic_write_text(path, json.dumps(arch_to_dict(spec), indent=1) + "\n")


def arch_digest(spec: ArchSpec) -> str:
    """SHA-256 of what the record says about the model (not its free-form notes): the weights file
    stores it, so weights and an edited or swapped arch.json cannot be paired silently."""
    record = {k: v for k, v in arch_to_dict(spec).items() if k != "notes"}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def load_arch(path: str | Path, shape_types: ShapeTypes) -> ArchSpec:
    """Read and validate the record at ``path`` (a missing or unreadable file is one :class:`ArchError` line)."""
    path = Path(path)
    if not path.is_file():
        raise ArchError(f"architecture file not found: {path}")
    try:
        data = read_json(path, "arch.json")
    except OfbError as err:
        raise ArchError(str(err)) from None
    return arch_from_dict(data, shape_types, str(path))


def shape_from_dict(family: Any, data: Any, shape_types: ShapeTypes, where: str = "shape") -> Any:
    """A dense shape of a registered family from its JSON fields (another file than arch.json keeps one: a
    latency table); every problem is one :class:`ArchError` naming ``where`` and the field."""
    require(family in shape_types,
            f"{where}: unknown model family {str(family)[:40]!r} (known: {', '.join(shape_types)})")
    require(isinstance(data, dict), f"{where}: expected an object with the dense model's shape")
    return _strict(shape_types[family], data, where)


def _strict(kind: type, data: dict[str, Any], where: str) -> Any:
    names = {f.name for f in fields(kind)}
    _known(data, names, where)
    converted = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    try:
        return kind(**converted)
    except TypeError:  # a required field is missing
        missing = sorted(n for n in names if n not in data)
        raise ArchError(f"{where}: missing field(s) {', '.join(missing)}") from None
    except ArchError as err:
        raise ArchError(f"{where}.{err}") from None


def _required(data: dict[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise ArchError(f"{where + ': ' if where else ''}missing field {key!r}")
    return data[key]


def _known(data: dict[str, Any], names: set[str], where: str) -> None:
    unknown = sorted(str(k)[:40] for k in set(data) - names)
    if unknown:
        raise ArchError(f"{where + ': ' if where else ''}unknown field(s) {', '.join(unknown[:5])}")


def _indices(values: Any, name: str) -> tuple[int, ...]:
    require(isinstance(values, list), f"{name}: expected a list of indices")
    return tuple(check_int(v, f"{name}[{i}]", 0, MAX_WIDTH * 4) for i, v in enumerate(values))


def _block(data: Any, where: str) -> BlockSpec:
    require(isinstance(data, dict), f"{where}: expected an object")
    _known(data, _BLOCK_KEYS, where)
    channels = data.get("kept_channels", [])
    require(isinstance(channels, list), f"{where}.kept_channels: expected a list of index lists")
    return BlockSpec(
        heads=check_int(_required(data, "heads", where), f"{where}.heads", 1, 4096),
        head_dim=check_int(_required(data, "head_dim", where), f"{where}.head_dim", 1, MAX_WIDTH),
        mlp_dim=check_int(_required(data, "mlp_dim", where), f"{where}.mlp_dim", 1, 1 << 18),
        kept_heads=_indices(data.get("kept_heads", []), f"{where}.kept_heads"),
        kept_channels=tuple(_indices(c, f"{where}.kept_channels[{h}]") for h, c in enumerate(channels)),
        kept_mlp=_indices(data.get("kept_mlp", []), f"{where}.kept_mlp"),
    )
