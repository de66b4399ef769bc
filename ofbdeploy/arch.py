"""The architecture record shared by search, materialisation and deployment.

``ViTShape`` is the dense model a search starts from; ``ArchSpec`` is one pruned architecture of it: per
block the kept heads, their width and the MLP width, plus the embedding width, together with the indices
of the dense units that were kept. It is the only object the search and the deploy code both know.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from ofbdeploy import cost
from ofbdeploy.errors import ArchError
from ofbdeploy.io import atomic_write_text

if TYPE_CHECKING:
    from ofbdeploy.grids import SearchSpace

ARCH_FORMAT = "ofbdeploy.arch/1"


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
    def from_dict(cls, data: dict[str, Any], source: str = "arch.json") -> ArchSpec:
        """Parse and validate; every problem is one line naming ``source`` and the field."""
        try:
            if data.get("format") != ARCH_FORMAT:
                raise ArchError(f"format: expected {ARCH_FORMAT!r}, got {data.get('format')!r}")
            base = _strict(ViTShape, data["base"], "base")
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
            return cls(base, int(data["embed_dim"]), blocks, tuple(data.get("kept_embed", ())), data.get("notes", {}))
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
    return kind(**data)
