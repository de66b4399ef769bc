"""The architecture record shared by search, materialisation and deployment.

A *shape* is the dense model a search starts from (``ViTShape`` here; each model family defines its own in
:mod:`ofbdeploy.families`); ``ArchSpec`` is one pruned architecture of it: the embedding width of each stage
(one stage for a ViT, four for a Swin) and, per block, the kept heads, their width and the MLP width,
together with the indices of the dense units that were kept. It records its family, and it is the only
object the search and the deploy code both know.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from torch import nn

from ofbdeploy.errors import ArchError
from ofbdeploy.io import atomic_write_text

if TYPE_CHECKING:
    pass

ARCH_FORMAT = "ofbdeploy.arch/2"
# Format 1 (ViT only, one embedding width "embed_dim"/"kept_embed") is still read, as a ViT record.
ARCH_FORMAT_V1 = "ofbdeploy.arch/1"


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
    def from_dict(cls, data: dict[str, Any], source: str = "arch.json") -> ArchSpec:
        """Parse and validate; every problem is one line naming ``source`` and the field.

        Records of format 1 (before families existed) are ViT records with one ``embed_dim``.
        """
        try:
            fmt = data.get("format")
            if fmt == ARCH_FORMAT_V1:
                family, embeds, kept = "vit", [data["embed_dim"]], [data.get("kept_embed", [])]
                kept = [] if not kept[0] else kept
            elif fmt == ARCH_FORMAT:
                family, embeds, kept = data["family"], data["embed_dims"], data.get("kept_embeds", [])
            else:
                raise ArchError(f"format: expected {ARCH_FORMAT!r} (or {ARCH_FORMAT_V1!r}), got {fmt!r}")
            from ofbdeploy.families import get_family

            base = _strict(get_family(family).shape_type, data["base"], "base")
            blocks = tuple(
                BlockSpec(
                    heads=int(b["heads"]),
                    head_dim=int(b["head_dim"]),
                    mlp_dim=int(b["mlp_dim"]),
                    kept_heads=tuple(b.get("kept_heads", ())),
                    kept_channels=tuple(tuple(c) for c in b.get("kept_channels", ())),
                    kept_mlp=tuple(b.get("kept_mlp", ())),
                )
                for b in data["blocks"]
            )
            return cls(base, tuple(int(e) for e in embeds), blocks, tuple(tuple(k) for k in kept),
                       data.get("notes", {}))
        except KeyError as err:
            raise ArchError(f"{source}: missing field {err.args[0]!r}") from None
        except (TypeError, ValueError) as err:
            raise ArchError(f"{source}: {err}") from None

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ArchSpec:
        path = Path(path)
        if not path.is_file():
            raise ArchError(f"architecture file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ArchError(f"{path}: not valid JSON ({err})") from None
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
    unknown = sorted(set(data) - names)
    if unknown:
        raise ArchError(f"{where}: unknown field(s) {', '.join(unknown)}")
    converted = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return kind(**converted)
