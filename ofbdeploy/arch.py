"""The architecture record shared by search, materialisation and deployment.

``ViTShape`` is the dense model a search starts from; ``ArchSpec`` is one pruned architecture of it: per
block the kept heads, their width and the MLP width, plus the embedding width, together with the indices
of the dense units that were kept. It is the only object the search and the deploy code both know.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from ofbdeploy import cost
from ofbdeploy.errors import ArchError, OfbError
from ofbdeploy.io import atomic_write_text, read_json

if TYPE_CHECKING:
    from ofbdeploy.grids import SearchSpace

ARCH_FORMAT = "ofbdeploy.arch/1"
# Bounds on a ViT's sizes: far above any real model (ViT-22B: 6144 wide, 48 deep), low enough that a
# hand-edited record can never ask for a model that does not fit in memory.
_MAX_WIDTH = 1 << 16
_SHAPE_INTS = (("img_size", 1, 1 << 14), ("patch_size", 1, 1 << 14), ("in_chans", 1, 1024),
               ("num_classes", 0, 1 << 20), ("embed_dim", 1, _MAX_WIDTH), ("depth", 1, 1024),
               ("num_heads", 1, 4096), ("head_dim", 1, _MAX_WIDTH), ("mlp_dim", 1, 1 << 18))
_POOLS = ("token", "avg")
_ARCH_KEYS = {"format", "base", "embed_dim", "kept_embed", "blocks", "macs", "params", "notes"}
_BLOCK_KEYS = {"heads", "head_dim", "mlp_dim", "kept_heads", "kept_channels", "kept_mlp"}


@dataclass(frozen=True)
class ViTShape:
    """The dense timm ``VisionTransformer`` configuration the search and the rebuild need."""

    img_size: int
    patch_size: int
    in_chans: int
    num_classes: int
    embed_dim: int
    depth: int
    num_heads: int
    head_dim: int
    mlp_dim: int
    qkv_bias: bool = True
    class_token: bool = True
    global_pool: str = "token"
    fc_norm: bool = False
    layer_scale: bool = False
    model_name: str = ""

    def __post_init__(self) -> None:
        """Every field of the right type and within what a buildable ViT can have (arch.json is user input)."""
        for name, low, high in _SHAPE_INTS:
            _check_int(getattr(self, name), name, low, high)
        _check(self.patch_size <= self.img_size,
               f"patch_size: expected at most img_size ({self.img_size}), got {self.patch_size}")
        for name in ("qkv_bias", "class_token", "fc_norm", "layer_scale"):
            value = getattr(self, name)
            _check(isinstance(value, bool), f"{name}: expected true or false, got {str(value)[:40]!r}")
        _check(self.global_pool in _POOLS, f"global_pool: expected one of {_POOLS}, got {str(self.global_pool)[:40]!r}")
        _check(isinstance(self.model_name, str) and len(self.model_name) <= 200,
               "model_name: expected a model name (a string of at most 200 characters)")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + int(self.class_token)

    @classmethod
    def from_model(cls, model: nn.Module, model_name: str = "") -> ViTShape:
        """Read the shape of a timm ViT, refusing variants whose extra parts the search cannot prune."""
        from ofbdeploy.models.support import check_supported

        check_supported(model)
        block = model.blocks[0]
        img = model.patch_embed.img_size
        patch = model.patch_embed.patch_size
        if img[0] != img[1] or patch[0] != patch[1]:
            raise ArchError(f"only square images and patches are supported, got img {img} patch {patch}")
        return cls(
            img_size=int(img[0]),
            patch_size=int(patch[0]),
            in_chans=int(model.patch_embed.proj.in_channels),
            num_classes=int(model.num_classes),
            embed_dim=int(model.embed_dim),
            depth=len(model.blocks),
            num_heads=int(block.attn.num_heads),
            head_dim=int(block.attn.head_dim),
            mlp_dim=int(block.mlp.fc1.out_features),
            qkv_bias=block.attn.qkv.bias is not None,
            class_token=model.cls_token is not None,
            global_pool=str(model.global_pool),
            fc_norm=not isinstance(model.fc_norm, nn.Identity),
            layer_scale=not isinstance(block.ls1, nn.Identity),
            model_name=model_name,
        )


@dataclass(frozen=True)
class BlockSpec:
    """One transformer block: ``heads`` heads of ``head_dim`` channels, an MLP of ``mlp_dim`` units."""

    heads: int
    head_dim: int
    mlp_dim: int
    kept_heads: tuple[int, ...] = ()
    kept_channels: tuple[tuple[int, ...], ...] = ()
    kept_mlp: tuple[int, ...] = ()

    @property
    def attn_dim(self) -> int:
        return self.heads * self.head_dim


@dataclass(frozen=True)
class ArchSpec:
    """A pruned architecture of ``base``; ``kept_*`` index the dense model's units."""

    base: ViTShape
    embed_dim: int
    blocks: tuple[BlockSpec, ...]
    kept_embed: tuple[int, ...] = ()
    notes: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def dense(cls, base: ViTShape) -> ArchSpec:
        """The unpruned architecture, with every unit kept."""
        block = BlockSpec(
            heads=base.num_heads,
            head_dim=base.head_dim,
            mlp_dim=base.mlp_dim,
            kept_heads=tuple(range(base.num_heads)),
            kept_channels=tuple(tuple(range(base.head_dim)) for _ in range(base.num_heads)),
            kept_mlp=tuple(range(base.mlp_dim)),
        )
        return cls(base, base.embed_dim, (block,) * base.depth, tuple(range(base.embed_dim)))

    @classmethod
    def uniform(cls, base: ViTShape, embed_dim: int, heads: int, head_dim: int, mlp_dim: int) -> ArchSpec:
        """Every block alike (no kept indices): for costing, probing and building test models."""
        return cls(base, embed_dim, (BlockSpec(heads, head_dim, mlp_dim),) * base.depth)

    @classmethod
    def narrowest(cls, base: ViTShape, space: SearchSpace) -> ArchSpec:
        """The smallest architecture the grids of ``space`` allow (the floor of any budget)."""
        heads, head_dim = min(space.attention, key=lambda cell: cell[0] * cell[1])
        return cls.uniform(base, min(space.embedding), heads, head_dim, min(space.mlp))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every width against the base model and every index list against its width."""
        b = self.base
        _check(len(self.blocks) == b.depth, f"blocks: expected {b.depth} blocks, got {len(self.blocks)}")
        _check(1 <= self.embed_dim <= b.embed_dim, f"embed_dim: expected 1..{b.embed_dim}, got {self.embed_dim}")
        _check_indices("kept_embed", self.kept_embed, self.embed_dim, b.embed_dim)
        for i, blk in enumerate(self.blocks):
            where = f"blocks[{i}]"
            _check(1 <= blk.heads <= b.num_heads, f"{where}.heads: expected 1..{b.num_heads}, got {blk.heads}")
            _check(
                1 <= blk.head_dim <= b.head_dim,
                f"{where}.head_dim: expected 1..{b.head_dim}, got {blk.head_dim}",
            )
            _check(1 <= blk.mlp_dim <= b.mlp_dim, f"{where}.mlp_dim: expected 1..{b.mlp_dim}, got {blk.mlp_dim}")
            _check_indices(f"{where}.kept_heads", blk.kept_heads, blk.heads, b.num_heads)
            _check_indices(f"{where}.kept_mlp", blk.kept_mlp, blk.mlp_dim, b.mlp_dim)
            if blk.kept_channels:
                _check(
                    len(blk.kept_channels) == blk.heads,
                    f"{where}.kept_channels: expected {blk.heads} lists, got {len(blk.kept_channels)}",
                )
                for h, chans in enumerate(blk.kept_channels):
                    _check_indices(f"{where}.kept_channels[{h}]", chans, blk.head_dim, b.head_dim)

    # -- cost -------------------------------------------------------------------------------------
    def macs(self) -> float:
        """Multiply-accumulates of one image's forward pass (see :mod:`ofbdeploy.cost`)."""
        return float(cost.vit_macs(self.base, self.embed_dim, self._attn_dims(), self._mlp_dims()))

    def params(self) -> int:
        """Parameter count of the materialised model."""
        return int(cost.vit_params(self.base, self.embed_dim, self._attn_dims(), self._mlp_dims()))

    def _attn_dims(self) -> list[int]:
        return [blk.attn_dim for blk in self.blocks]

    def _mlp_dims(self) -> list[int]:
        return [blk.mlp_dim for blk in self.blocks]

    # -- JSON ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": ARCH_FORMAT,
            "base": asdict(self.base),
            "embed_dim": self.embed_dim,
            "kept_embed": list(self.kept_embed),
            "blocks": [
                {
                    "heads": blk.heads,
                    "head_dim": blk.head_dim,
                    "mlp_dim": blk.mlp_dim,
                    "kept_heads": list(blk.kept_heads),
                    "kept_channels": [list(c) for c in blk.kept_channels],
                    "kept_mlp": list(blk.kept_mlp),
                }
                for blk in self.blocks
            ],
            "macs": self.macs(),
            "params": self.params(),
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "arch.json") -> ArchSpec:
        """Parse and validate; every problem is one :class:`ArchError` line naming ``source`` and the field."""
        try:
            _check(isinstance(data, dict), f"expected a JSON object, got {type(data).__name__}")
            _check(data.get("format") == ARCH_FORMAT,
                   f"format: expected {ARCH_FORMAT!r}, got {str(data.get('format'))[:40]!r}")
            _known(data, _ARCH_KEYS, "")
            for name in ("macs", "params"):
                _check(name not in data or _is_number(data[name]), f"{name}: expected a number")
            notes = data.get("notes", {})
            _check(isinstance(notes, dict), f"notes: expected an object, got {type(notes).__name__}")
            base = _required(data, "base", "")
            _check(isinstance(base, dict), "base: expected an object with the dense model's shape")
            base = _strict(ViTShape, base, "base")
            blocks = _required(data, "blocks", "")
            _check(isinstance(blocks, list), "blocks: expected a list of blocks")
            _check(len(blocks) == base.depth, f"blocks: expected {base.depth} blocks, got {len(blocks)}")
            return cls(base, _check_int(_required(data, "embed_dim", ""), "embed_dim", 1, _MAX_WIDTH),
                       tuple(_block(b, f"blocks[{i}]") for i, b in enumerate(blocks)),
                       _indices(data.get("kept_embed", []), "kept_embed"), notes)
        except ArchError as err:
            raise ArchError(f"{source}: {err}") from None

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    def digest(self) -> str:
        """SHA-256 of what the record says about the model (not its free-form notes): the weights file
        stores it, so weights and an edited or swapped arch.json cannot be paired silently."""
        record = {k: v for k, v in self.to_dict().items() if k != "notes"}
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()

    @classmethod
    def load(cls, path: str | Path) -> ArchSpec:
        path = Path(path)
        if not path.is_file():
            raise ArchError(f"architecture file not found: {path}")
        try:
            data = read_json(path, "arch.json")
        except OfbError as err:
            raise ArchError(str(err)) from None
        return cls.from_dict(data, str(path))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ArchError(message)


def _check_indices(name: str, indices: tuple[int, ...], width: int, dense: int) -> None:
    if not indices:
        return
    _check(len(indices) == width, f"{name}: expected {width} indices, got {len(indices)}")
    _check(len(set(indices)) == width, f"{name}: indices must be unique")
    _check(all(0 <= i < dense for i in indices), f"{name}: indices must lie in 0..{dense - 1}")


def _strict(kind: type, data: dict[str, Any], where: str) -> Any:
    names = {f.name for f in fields(kind)}
    _known(data, names, where)
    try:
        return kind(**data)
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


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(value: Any, name: str, low: int, high: int) -> int:
    """``value`` if it is an int (not a bool, not a float) in ``low..high``; an ArchError naming ``name`` else."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        shown = repr(value)[:40] if isinstance(value, int | float | str | None) else type(value).__name__
        raise ArchError(f"{name}: expected an integer in {low}..{high}, got {shown}")
    return value


def _indices(values: Any, name: str) -> tuple[int, ...]:
    _check(isinstance(values, list), f"{name}: expected a list of indices")
    return tuple(_check_int(v, f"{name}[{i}]", 0, _MAX_WIDTH * 4) for i, v in enumerate(values))


def _block(data: Any, where: str) -> BlockSpec:
    _check(isinstance(data, dict), f"{where}: expected an object")
    _known(data, _BLOCK_KEYS, where)
    channels = data.get("kept_channels", [])
    _check(isinstance(channels, list), f"{where}.kept_channels: expected a list of index lists")
    return BlockSpec(
        heads=_check_int(_required(data, "heads", where), f"{where}.heads", 1, 4096),
        head_dim=_check_int(_required(data, "head_dim", where), f"{where}.head_dim", 1, _MAX_WIDTH),
        mlp_dim=_check_int(_required(data, "mlp_dim", where), f"{where}.mlp_dim", 1, 1 << 18),
        kept_heads=_indices(data.get("kept_heads", []), f"{where}.kept_heads"),
        kept_channels=tuple(_indices(c, f"{where}.kept_channels[{h}]") for h, c in enumerate(channels)),
        kept_mlp=_indices(data.get("kept_mlp", []), f"{where}.kept_mlp"),
    )
