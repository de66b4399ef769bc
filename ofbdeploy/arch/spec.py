"""The architecture record shared by search, materialisation and deployment.

A *shape* is the dense model a search starts from (each model family defines its own in its folder under
:mod:`ofbdeploy.families`); ``ArchSpec`` is one pruned architecture of it: the embedding width of each stage
(one stage for a ViT, four for a Swin) and, per block, the kept heads, their width and the MLP width,
together with the indices of the dense units that were kept. It records its family, and it is the only
object the search and the deploy code both know.

The shape carries its family's cost and checks (:class:`ModelShape`), so this module needs nothing above
it: ``ArchSpec.macs()`` is ``self.base.macs(self)``. Reading and writing ``arch.json`` is
:mod:`ofbdeploy.arch.record`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from ofbdeploy.errors import ArchError

# Bounds on a model's sizes: far above any real model (ViT-22B: 6144 wide, 48 deep), low enough that a
# hand-edited record can never ask for a model that does not fit in memory.
MAX_WIDTH = 1 << 16

# Group widths keyed by group name ("embedding", "blocks.3.attn", ...): what a search's cells describe.
Widths = Mapping[str, tuple[int, ...]]


class ModelShape(Protocol):
    """What every family's dense shape offers the family-agnostic code: its sizes, its cost and its checks."""

    family: ClassVar[str]
    latency_feature_names: ClassVar[tuple[str, ...]]
    model_name: str
    img_size: int
    in_chans: int
    num_classes: int

    @property
    def depth(self) -> int: ...

    @property
    def embed_dims(self) -> tuple[int, ...]: ...

    def block_dims(self, index: int) -> tuple[int, int, int]:
        """Dense heads, head width and MLP width of block ``index``."""

    def stage_of(self, index: int) -> int:
        """The stage block ``index`` belongs to."""

    def macs_at(self, embeds: Sequence[Any], attn_dims: Sequence[Any], mlp_dims: Sequence[Any]) -> Any:
        """MACs at per-stage embedding and per-block attention (heads x width) and MLP widths: numbers, or
        tensors of expected widths (then differentiable: the search's FLOPs loss)."""

    def latency_features(self, embeds: Sequence[Any], attn: Sequence[tuple[Any, Any]],
                         mlp_dims: Sequence[Any]) -> list[Any]:
        """The work counts a latency table weighs (one per name of ``latency_feature_names``) at per-stage
        embedding and per-block (heads, heads x head width) and MLP widths: numbers, or tensors of expected
        widths (then differentiable: the search's latency loss)."""

    def params(self, spec: ArchSpec) -> int:
        """Parameters of the plain model the family builds for ``spec``."""

    def check(self, spec: ArchSpec) -> None:
        """Family-specific consistency checks of ``spec`` beyond the generic ones (an :class:`ArchError`)."""

    def narrowest(self, space: Any) -> ArchSpec:
        """The smallest architecture the grids of ``space`` allow (the floor of any budget)."""

    def spec_from_widths(self, widths: Widths) -> ArchSpec:
        """The architecture (no kept indices) that group widths describe: for costing."""


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

    base: Any  # the family's shape (ViTShape, SwinShape, ...): a ModelShape
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
    def uniform(cls, base: ModelShape, embed_dim: int, heads: int, head_dim: int, mlp_dim: int) -> ArchSpec:
        """Every block of a one-stage model alike (no kept indices): for costing, probing and test models."""
        if len(base.embed_dims) != 1:
            raise ArchError(f"uniform architectures are for one-stage models, not {base.family}")
        return cls(base, (embed_dim,), (BlockSpec(heads, head_dim, mlp_dim),) * base.depth)

    @classmethod
    def narrowest(cls, base: ModelShape, space: Any) -> ArchSpec:
        """The smallest architecture the grids of ``space`` allow (the floor of any budget)."""
        return base.narrowest(space)

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
        require(len(self.embed_dims) == len(dense_embeds),
                f"embed_dims: expected {len(dense_embeds)} stage width(s), got {len(self.embed_dims)}")
        require(not self.kept_embeds or len(self.kept_embeds) == len(dense_embeds),
                f"kept_embeds: expected {len(dense_embeds)} index list(s), got {len(self.kept_embeds)}")
        for s, (width, dense) in enumerate(zip(self.embed_dims, dense_embeds, strict=True)):
            where = "embed_dim" if len(dense_embeds) == 1 else f"embed_dims[{s}]"
            require(1 <= width <= dense, f"{where}: expected 1..{dense}, got {width}")
            if self.kept_embeds:
                _check_indices(f"kept_embeds[{s}]", self.kept_embeds[s], width, dense)
        require(len(self.blocks) == b.depth, f"blocks: expected {b.depth} blocks, got {len(self.blocks)}")
        for i, blk in enumerate(self.blocks):
            where = f"blocks[{i}]"
            heads, head_dim, mlp_dim = b.block_dims(i)
            require(1 <= blk.heads <= heads, f"{where}.heads: expected 1..{heads}, got {blk.heads}")
            require(1 <= blk.head_dim <= head_dim, f"{where}.head_dim: expected 1..{head_dim}, got {blk.head_dim}")
            require(1 <= blk.mlp_dim <= mlp_dim, f"{where}.mlp_dim: expected 1..{mlp_dim}, got {blk.mlp_dim}")
            _check_indices(f"{where}.kept_heads", blk.kept_heads, blk.heads, heads)
            _check_indices(f"{where}.kept_mlp", blk.kept_mlp, blk.mlp_dim, mlp_dim)
            if blk.kept_channels:
                require(
                    len(blk.kept_channels) == blk.heads,
                    f"{where}.kept_channels: expected {blk.heads} lists, got {len(blk.kept_channels)}",
                )
                for h, chans in enumerate(blk.kept_channels):
                    _check_indices(f"{where}.kept_channels[{h}]", chans, blk.head_dim, head_dim)
        b.check(self)

    # -- cost -------------------------------------------------------------------------------------
    def macs(self) -> float:
        """Multiply-accumulates of one image's forward pass (the FLOPs loss, the budget and every report)."""
        return float(self.base.macs_at(self.embed_dims, [b.attn_dim for b in self.blocks],
                                       [b.mlp_dim for b in self.blocks]))

    def params(self) -> int:
        """Parameter count of the materialised model."""
        return int(self.base.params(self))


def require(ok: bool, message: str) -> None:
    """An :class:`ArchError` with ``message`` unless ``ok`` (records and shapes are user input)."""
    if not ok:
        raise ArchError(message)


def _check_indices(name: str, indices: tuple[int, ...], width: int, dense: int) -> None:
    if not indices:
        return
    require(len(indices) == width, f"{name}: expected {width} indices, got {len(indices)}")
    require(len(set(indices)) == width, f"{name}: indices must be unique")
    require(all(0 <= i < dense for i in indices), f"{name}: indices must lie in 0..{dense - 1}")


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_int(value: Any, name: str, low: int, high: int) -> int:
    """``value`` if it is an int (not a bool, not a float) in ``low..high``; an ArchError naming ``name`` else."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        shown = repr(value)[:40] if isinstance(value, int | float | str | None) else type(value).__name__
        raise ArchError(f"{name}: expected an integer in {low}..{high}, got {shown}")
    return value


def check_eps(value: Any) -> None:
    """A LayerNorm eps: a positive finite number below 1."""
    require(is_number(value) and 0 < value < 1, f"norm_eps: expected a number in (0, 1), got {str(value)[:40]!r}")


def check_model_name(value: Any) -> None:
    require(isinstance(value, str) and len(value) <= 200,
            "model_name: expected a model name (a string of at most 200 characters)")


def check_ints(values: Any, name: str, count: int, low: int, high: int) -> None:
    """A tuple of ``count`` integers in ``low..high`` (one per stage)."""
    require(isinstance(values, tuple) and len(values) == count,
            f"{name}: expected {count} integers (one per stage), got {str(values)[:40]}")
    for k, value in enumerate(values):
        check_int(value, f"{name}[{k}]", low, high)

