"""The architecture record shared by search, materialisation and deployment.

A *shape* is the dense model a search starts from (``ViTShape`` here; each model family defines its own in
:mod:`ofbdeploy.families`); ``ArchSpec`` is one pruned architecture of it: the embedding width of each stage
(one stage for a ViT, four for a Swin) and, per block, the kept heads, their width and the MLP width,
together with the indices of the dense units that were kept. It records its family, and it is the only
object the search and the deploy code both know.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from torch import nn

from ofbdeploy.errors import ArchError, OfbError
from ofbdeploy.io import atomic_write_text, read_json

if TYPE_CHECKING:
    pass

ARCH_FORMAT = "ofbdeploy.arch/2"
# Format 1 (ViT only, one embedding width "embed_dim"/"kept_embed") is still read, as a ViT record.
ARCH_FORMAT_V1 = "ofbdeploy.arch/1"
# Bounds on a model's sizes: far above any real model (ViT-22B: 6144 wide, 48 deep), low enough that a
# hand-edited record can never ask for a model that does not fit in memory.
MAX_WIDTH = 1 << 16
_SHAPE_INTS = (("img_size", 1, 1 << 14), ("patch_size", 1, 1 << 14), ("in_chans", 1, 1024),
               ("num_classes", 0, 1 << 20), ("embed_dim", 1, MAX_WIDTH), ("depth", 1, 1024),
               ("num_heads", 1, 4096), ("head_dim", 1, MAX_WIDTH), ("mlp_dim", 1, 1 << 18),
               ("reg_tokens", 0, 1024), ("pool_heads", 0, 4096), ("pool_mlp_dim", 0, 1 << 18))
_VIT_BOOLS = ("qkv_bias", "class_token", "fc_norm", "layer_scale", "distilled", "pos_embed", "no_embed_class",
              "pre_norm", "patch_norm", "final_norm", "proj_bias", "pool_include_prefix", "dynamic_img_size")
VIT_POOLS = ("token", "avg", "max", "avgmax", "map")
VIT_ACTS = ("gelu", "gelu_tanh", "quick_gelu")
VIT_BLOCKS = ("Block", "ResPostBlock")
_ARCH_KEYS = {"format", "family", "base", "embed_dims", "kept_embeds", "blocks", "macs", "params", "notes"}
_ARCH_KEYS_V1 = {"format", "base", "embed_dim", "kept_embed", "blocks", "macs", "params", "notes"}
_BLOCK_KEYS = {"heads", "head_dim", "mlp_dim", "kept_heads", "kept_channels", "kept_mlp"}


class ModelShape(Protocol):
    """What every family's dense shape offers the family-agnostic code."""

    family: ClassVar[str]
    model_name: str
    img_size: int
    in_chans: int
    num_classes: int

    @property
    def depth(self) -> int: ...

    @property
    def embed_dims(self) -> tuple[int, ...]: ...

    def block_dims(self, index: int) -> tuple[int, int, int]: ...

    def stage_of(self, index: int) -> int: ...


@dataclass(frozen=True)
class ViTShape:
    """The dense timm ``VisionTransformer`` configuration the search and the rebuild need.

    The options after ``model_name`` describe the ViT variants ofbdeploy prunes (class, register and
    distillation tokens, position embeddings with or without a class slot, CLIP's pre-norm, a norm after the
    patch embedding, LayerScale, GELU variants, fc-norm, pooling, the attention-pool head); their defaults
    are the plain DeiT, so records written before they existed read unchanged.
    """

    family: ClassVar[str] = "vit"

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
    reg_tokens: int = 0
    distilled: bool = False  # timm's VisionTransformerDistilled: a distillation token and a second head
    pos_embed: bool = True
    no_embed_class: bool = False
    pre_norm: bool = False
    patch_norm: bool = False
    final_norm: bool = True
    act: str = "gelu"
    norm_eps: float = 1e-6
    proj_bias: bool = True
    block: str = "Block"
    pool_include_prefix: bool = False
    dynamic_img_size: bool = False
    pool_heads: int = 0  # attention-pool head ('map'): its heads and MLP width (kept dense)
    pool_mlp_dim: int = 0

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens + int(self.distilled)

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens

    @property
    def embed_dims(self) -> tuple[int, ...]:
        return (self.embed_dim,)

    def block_dims(self, index: int) -> tuple[int, int, int]:
        """Dense heads, head width and MLP width of block ``index``."""
        return self.num_heads, self.head_dim, self.mlp_dim

    def stage_of(self, index: int) -> int:
        return 0

    def __post_init__(self) -> None:
        """Every field of the right type and within what a buildable ViT can have (arch.json is user input)."""
        for name, low, high in _SHAPE_INTS:
            check_int(getattr(self, name), name, low, high)
        _check(self.patch_size <= self.img_size,
               f"patch_size: expected at most img_size ({self.img_size}), got {self.patch_size}")
        for name in _VIT_BOOLS:
            value = getattr(self, name)
            _check(isinstance(value, bool), f"{name}: expected true or false, got {str(value)[:40]!r}")
        for name, allowed in (("global_pool", VIT_POOLS), ("act", VIT_ACTS), ("block", VIT_BLOCKS)):
            value = getattr(self, name)
            _check(value in allowed, f"{name}: expected one of {allowed}, got {str(value)[:40]!r}")
        check_eps(self.norm_eps)
        check_model_name(self.model_name)
        _check(self.global_pool != "map" or (self.pool_heads >= 1 and self.embed_dim % self.pool_heads == 0
                                             and self.pool_mlp_dim >= 1),
               "pool_heads, pool_mlp_dim: an attention-pool head needs heads dividing embed_dim and an MLP width")

    @classmethod
    def from_model(cls, model: nn.Module, model_name: str = "") -> ViTShape:
        """Read the shape of a timm ViT, refusing variants whose extra parts the search cannot prune."""
        from ofbdeploy.families.vit import read_vit_shape

        return read_vit_shape(model, model_name)


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
    """A pruned architecture of ``base``; ``kept_*`` index the dense model's units.

    ``embed_dims`` holds one embedding width per stage of the family (a ViT has one stage; a single int
    is accepted for it, and so is a flat ``kept_embeds`` index list); ``blocks`` runs over all blocks of
    all stages in order.
    """

    base: Any  # the family's shape (ViTShape, SwinShape, ...): see ModelShape
    embed_dims: tuple[int, ...]
    blocks: tuple[BlockSpec, ...]
    kept_embeds: tuple[tuple[int, ...], ...] = ()
    notes: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def dense(cls, base: ModelShape) -> ArchSpec:
        """The unpruned architecture, with every unit kept."""
        blocks = []
        for i in range(base.depth):
            heads, head_dim, mlp_dim = base.block_dims(i)
            blocks.append(BlockSpec(heads, head_dim, mlp_dim, tuple(range(heads)),
                                    tuple(tuple(range(head_dim)) for _ in range(heads)), tuple(range(mlp_dim))))
        return cls(base, base.embed_dims, tuple(blocks), tuple(tuple(range(e)) for e in base.embed_dims))

    @classmethod
    def uniform(cls, base: ViTShape, embed_dim: int, heads: int, head_dim: int, mlp_dim: int) -> ArchSpec:
        """Every block of a one-stage model alike (no kept indices): for costing, probing and test models."""
        if len(base.embed_dims) != 1:
            raise ArchError(f"uniform architectures are for one-stage models, not {base.family}")
        return cls(base, (embed_dim,), (BlockSpec(heads, head_dim, mlp_dim),) * base.depth)

    @classmethod
    def narrowest(cls, base: ModelShape, space: Any) -> ArchSpec:
        """The smallest architecture the grids of ``space`` allow (the floor of any budget)."""
        return _family(base).narrowest(base, space)

    def __post_init__(self) -> None:
        if isinstance(self.embed_dims, int):
            object.__setattr__(self, "embed_dims", (self.embed_dims,))
        object.__setattr__(self, "embed_dims", tuple(int(e) for e in self.embed_dims))
        kept = tuple(self.kept_embeds)
        if kept and all(isinstance(i, int) for i in kept):  # a flat list: the one stage of a ViT
            kept = (kept,)
        object.__setattr__(self, "kept_embeds", tuple(tuple(k) for k in kept))
        self.validate()

    @property
    def family(self) -> str:
        return self.base.family

    @property
    def embed_dim(self) -> int:
        """The embedding width of a one-stage model (a ViT); the first stage's for a hierarchical one."""
        return self.embed_dims[0]

    @property
    def kept_embed(self) -> tuple[int, ...]:
        return self.kept_embeds[0] if self.kept_embeds else ()

    def validate(self) -> None:
        """Check every width against the base model and every index list against its width."""
        b = self.base
        dense_embeds = b.embed_dims
        _check(len(self.embed_dims) == len(dense_embeds),
               f"embed_dims: expected {len(dense_embeds)} stage width(s), got {len(self.embed_dims)}")
        _check(not self.kept_embeds or len(self.kept_embeds) == len(dense_embeds),
               f"kept_embeds: expected {len(dense_embeds)} index list(s), got {len(self.kept_embeds)}")
        for s, (width, dense) in enumerate(zip(self.embed_dims, dense_embeds, strict=True)):
            where = "embed_dim" if len(dense_embeds) == 1 else f"embed_dims[{s}]"
            _check(1 <= width <= dense, f"{where}: expected 1..{dense}, got {width}")
            if self.kept_embeds:
                _check_indices(f"kept_embeds[{s}]", self.kept_embeds[s], width, dense)
        _check(len(self.blocks) == b.depth, f"blocks: expected {b.depth} blocks, got {len(self.blocks)}")
        for i, blk in enumerate(self.blocks):
            where = f"blocks[{i}]"
            heads, head_dim, mlp_dim = b.block_dims(i)
            _check(1 <= blk.heads <= heads, f"{where}.heads: expected 1..{heads}, got {blk.heads}")
            _check(1 <= blk.head_dim <= head_dim, f"{where}.head_dim: expected 1..{head_dim}, got {blk.head_dim}")
            _check(1 <= blk.mlp_dim <= mlp_dim, f"{where}.mlp_dim: expected 1..{mlp_dim}, got {blk.mlp_dim}")
            _check_indices(f"{where}.kept_heads", blk.kept_heads, blk.heads, heads)
            _check_indices(f"{where}.kept_mlp", blk.kept_mlp, blk.mlp_dim, mlp_dim)
            if blk.kept_channels:
                _check(
                    len(blk.kept_channels) == blk.heads,
                    f"{where}.kept_channels: expected {blk.heads} lists, got {len(blk.kept_channels)}",
                )
                for h, chans in enumerate(blk.kept_channels):
                    _check_indices(f"{where}.kept_channels[{h}]", chans, blk.head_dim, head_dim)
        _family(b).validate(self)

    # -- cost -------------------------------------------------------------------------------------
    def macs(self) -> float:
        """Multiply-accumulates of one image's forward pass (see :mod:`ofbdeploy.cost`)."""
        return float(_family(self.base).macs(self))

    def params(self) -> int:
        """Parameter count of the materialised model."""
        return int(_family(self.base).params(self))

    # -- JSON ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": ARCH_FORMAT,
            "family": self.family,
            "base": asdict(self.base),
            "embed_dims": list(self.embed_dims),
            "kept_embeds": [list(k) for k in self.kept_embeds],
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
        """Parse and validate; every problem is one :class:`ArchError` line naming ``source`` and the field.

        Records of format 1 (before families existed) are ViT records with one ``embed_dim``.
        """
        try:
            _check(isinstance(data, dict), f"expected a JSON object, got {type(data).__name__}")
            fmt = data.get("format")
            _check(fmt in (ARCH_FORMAT, ARCH_FORMAT_V1),
                   f"format: expected {ARCH_FORMAT!r} (or {ARCH_FORMAT_V1!r}), got {str(fmt)[:40]!r}")
            _known(data, _ARCH_KEYS if fmt == ARCH_FORMAT else _ARCH_KEYS_V1, "")
            for name in ("macs", "params"):
                _check(name not in data or _is_number(data[name]), f"{name}: expected a number")
            notes = data.get("notes", {})
            _check(isinstance(notes, dict), f"notes: expected an object, got {type(notes).__name__}")
            if fmt == ARCH_FORMAT:
                family = _required(data, "family", "")
                _check(isinstance(family, str), "family: expected a model family name")
                embeds = _required(data, "embed_dims", "")
                _check(isinstance(embeds, list) and len(embeds) >= 1, "embed_dims: expected a list of widths")
                embeds = [check_int(e, f"embed_dims[{k}]", 1, MAX_WIDTH) for k, e in enumerate(embeds)]
                kept = data.get("kept_embeds", [])
                _check(isinstance(kept, list), "kept_embeds: expected a list of index lists")
                kept = [_indices(k, f"kept_embeds[{n}]") for n, k in enumerate(kept)]
            else:
                family = "vit"
                embeds = [check_int(_required(data, "embed_dim", ""), "embed_dim", 1, MAX_WIDTH)]
                kept_v1 = _indices(data.get("kept_embed", []), "kept_embed")
                kept = [kept_v1] if kept_v1 else []
            from ofbdeploy.families import get_family

            base = _required(data, "base", "")
            _check(isinstance(base, dict), "base: expected an object with the dense model's shape")
            base = _strict(get_family(family).shape_type, base, "base")
            blocks = _required(data, "blocks", "")
            _check(isinstance(blocks, list), "blocks: expected a list of blocks")
            _check(len(blocks) == base.depth, f"blocks: expected {base.depth} blocks, got {len(blocks)}")
            return cls(base, tuple(embeds), tuple(_block(b, f"blocks[{i}]") for i, b in enumerate(blocks)),
                       tuple(kept), notes)
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


def _family(shape: Any):
    from ofbdeploy.families import family_of

    return family_of(shape)


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


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_int(value: Any, name: str, low: int, high: int) -> int:
    """``value`` if it is an int (not a bool, not a float) in ``low..high``; an ArchError naming ``name`` else."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        shown = repr(value)[:40] if isinstance(value, int | float | str | None) else type(value).__name__
        raise ArchError(f"{name}: expected an integer in {low}..{high}, got {shown}")
    return value


def check_eps(value: Any) -> None:
    """A LayerNorm eps: a positive finite number below 1."""
    _check(_is_number(value) and 0 < value < 1, f"norm_eps: expected a number in (0, 1), got {str(value)[:40]!r}")


def check_model_name(value: Any) -> None:
    _check(isinstance(value, str) and len(value) <= 200,
           "model_name: expected a model name (a string of at most 200 characters)")


def check_ints(values: Any, name: str, count: int, low: int, high: int) -> None:
    """A tuple of ``count`` integers in ``low..high`` (one per stage)."""
    _check(isinstance(values, tuple) and len(values) == count,
           f"{name}: expected {count} integers (one per stage), got {str(values)[:40]}")
    for k, value in enumerate(values):
        check_int(value, f"{name}[{k}]", low, high)


def _indices(values: Any, name: str) -> tuple[int, ...]:
    _check(isinstance(values, list), f"{name}: expected a list of indices")
    return tuple(check_int(v, f"{name}[{i}]", 0, MAX_WIDTH * 4) for i, v in enumerate(values))


def _block(data: Any, where: str) -> BlockSpec:
    _check(isinstance(data, dict), f"{where}: expected an object")
    _known(data, _BLOCK_KEYS, where)
    channels = data.get("kept_channels", [])
    _check(isinstance(channels, list), f"{where}.kept_channels: expected a list of index lists")
    return BlockSpec(
        heads=check_int(_required(data, "heads", where), f"{where}.heads", 1, 4096),
        head_dim=check_int(_required(data, "head_dim", where), f"{where}.head_dim", 1, MAX_WIDTH),
        mlp_dim=check_int(_required(data, "mlp_dim", where), f"{where}.mlp_dim", 1, 1 << 18),
        kept_heads=_indices(data.get("kept_heads", []), f"{where}.kept_heads"),
        kept_channels=tuple(_indices(c, f"{where}.kept_channels[{h}]") for h, c in enumerate(channels)),
        kept_mlp=_indices(data.get("kept_mlp", []), f"{where}.kept_mlp"),
    )
