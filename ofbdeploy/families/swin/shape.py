"""The dense Swin (:class:`SwinShape`): per-stage sizes, their checks, and what an architecture of it costs.

Costs follow timm's forward exactly (see :mod:`ofbdeploy.families.swin`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from ofbdeploy.arch.cost import Width
from ofbdeploy.arch.grids import SearchSpace
from ofbdeploy.arch.spec import (
    MAX_WIDTH,
    ArchSpec,
    BlockSpec,
    Widths,
    check_eps,
    check_int,
    check_ints,
    check_model_name,
)
from ofbdeploy.errors import ArchError

POOLS = ("avg", "max", "avgmax")


@dataclass(frozen=True)
class SwinShape:
    """The dense timm ``SwinTransformer``: per-stage widths, depths, heads and (requested) window sizes."""

    family: ClassVar[str] = "swin"
    # The work counts a latency table weighs (see latency_features).
    latency_feature_names: ClassVar[tuple[str, ...]] = (
        "fixed", "tokens x embed", "patch merging", "tokens x embed x attention", "window attention", "softmax",
        "tokens x embed x mlp", "tokens x mlp")

    img_size: int
    patch_size: int
    in_chans: int
    num_classes: int
    embed_dims: tuple[int, ...]
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    head_dims: tuple[int, ...]
    mlp_dims: tuple[int, ...]
    window_sizes: tuple[int, ...]  # as requested from timm; the effective ones are clamped (see window())
    qkv_bias: bool = True
    patch_norm: bool = True
    global_pool: str = "avg"
    norm_eps: float = 1e-5
    model_name: str = ""

    def __post_init__(self) -> None:
        """Every field of the right type and within what a buildable Swin can have (arch.json is user input)."""
        for name, low, high in (("img_size", 1, 1 << 14), ("patch_size", 1, 1 << 14), ("in_chans", 1, 1024),
                                ("num_classes", 0, 1 << 20)):
            check_int(getattr(self, name), name, low, high)
        stages = len(self.depths) if isinstance(self.depths, tuple) else 0
        if not 1 <= stages <= 8:
            raise ArchError(f"depths: expected 1 to 8 stage depths, got {str(self.depths)[:40]}")
        for name, low, high in (("embed_dims", 1, MAX_WIDTH), ("depths", 1, 1024), ("num_heads", 1, 4096),
                                ("head_dims", 1, MAX_WIDTH), ("mlp_dims", 1, 1 << 18), ("window_sizes", 1, 1 << 10)):
            check_ints(getattr(self, name), name, stages, low, high)
        for name in ("qkv_bias", "patch_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ArchError(f"{name}: expected true or false, got {str(getattr(self, name))[:40]!r}")
        if self.global_pool not in POOLS:
            raise ArchError(f"global_pool: expected one of {POOLS}, got {str(self.global_pool)[:40]!r}")
        if self.patch_size > self.img_size:
            raise ArchError(f"patch_size: expected at most img_size ({self.img_size}), got {self.patch_size}")
        check_eps(self.norm_eps)
        check_model_name(self.model_name)

    @property
    def stages(self) -> int:
        return len(self.depths)

    @property
    def depth(self) -> int:
        return sum(self.depths)

    @property
    def num_patches(self) -> int:
        """Patch-embedding tokens: PMIM's masking unit."""
        return self.grid(0) ** 2

    @property
    def stride(self) -> int:
        """Pixels per token side at the last stage (the PMIM decoder's upsampling factor)."""
        return self.patch_size * 2 ** (self.stages - 1)

    def grid(self, stage: int) -> int:
        """Tokens per side in ``stage`` (patch merging rounds odd sizes up)."""
        side = self.img_size // self.patch_size
        for _ in range(stage):
            side = -(-side // 2)
        return side

    def window(self, stage: int) -> int:
        """The window timm uses in ``stage``: the requested one, clamped to the feature resolution."""
        return min(self.window_sizes[stage], self.grid(stage))

    def stage_of(self, index: int) -> int:
        for stage, end in enumerate(_ends(self.depths)):
            if index < end:
                return stage
        raise IndexError(f"block {index} of {self.depth}")

    def block_dims(self, index: int) -> tuple[int, int, int]:
        s = self.stage_of(index)
        return self.num_heads[s], self.head_dims[s], self.mlp_dims[s]

    # -- architectures of this shape ----------------------------------------------------------------
    def check(self, spec: ArchSpec) -> None:
        """No checks beyond the generic ones: every stage width and block width may be searched."""

    def narrowest(self, space: SwinSpace) -> ArchSpec:
        blocks = []
        for i in range(self.depth):
            stage = space.stages[self.stage_of(i)]
            heads, head_dim = min(stage.attention, key=lambda cell: cell[0] * cell[1])
            blocks.append(BlockSpec(heads, head_dim, min(stage.mlp)))
        return ArchSpec(self, tuple(min(st.embedding) for st in space.stages), tuple(blocks))

    def spec_from_widths(self, widths: Widths) -> ArchSpec:
        blocks = tuple(BlockSpec(*widths[f"blocks.{i}.attn"], widths[f"blocks.{i}.mlp"][0])
                       for i in range(self.depth))
        embeds = tuple(widths[f"stages.{s}.embedding"][0] for s in range(self.stages))
        return ArchSpec(self, embeds, blocks)

    # -- cost ---------------------------------------------------------------------------------------
    def macs_at(self, embeds: Sequence[Width], attn_dims: Sequence[Width], mlp_dims: Sequence[Width]) -> Width:
        """MACs at the given stage widths and per-block attention (heads x width) and MLP widths (numbers or
        tensors), following timm's forward: clamped windows, padding to a multiple of the window for attention,
        patch merging (see :mod:`ofbdeploy.families.swin`)."""
        side = self.grid(0)
        total = side * side * self.in_chans * self.patch_size**2 * embeds[0]
        ends = _ends(self.depths)
        for s in range(self.stages):
            width = embeds[s]
            if s > 0:
                side = self.grid(s)
                total = total + side * side * 4 * embeds[s - 1] * width
            window = self.window(s)
            padded = math.ceil(side / window) * window
            windowed, area = padded * padded, window * window
            for i in range(ends[s] - self.depths[s], ends[s]):
                attn = attn_dims[i]
                total = (total + windowed * width * 3 * attn + 2 * windowed * area * attn + windowed * attn * width
                         + 2 * side * side * width * mlp_dims[i])
        return total + embeds[-1] * self.num_classes

    def latency_features(self, embeds: Sequence[Width], attn: Sequence[tuple[Width, Width]],
                         mlp_dims: Sequence[Width]) -> list[Width]:
        """The work counts of :attr:`latency_feature_names` at the given widths (``attn``: per block, heads and
        heads x head width), each summed over the stages with the tokens of its stage, as :meth:`macs_at`
        counts them: a fixed cost; per-token work on the residual width (norms, residual adds, window
        partition and shift, the patch embedding); the patch mergings' products; the attention GEMMs on the
        padded windows; the windows' attention matmuls and their softmax; the MLP GEMMs and activation. Counting
        each stage's work with its own tokens lets one coefficient per kind of work serve every stage, to first
        order (a GEMM over 3,136 tokens and one over 49 do not run at quite the same rate: docs/benchmarks.md).
        Numbers or tensors of expected widths (then differentiable)."""
        side = self.grid(0)
        per_token = side * side * embeds[0]
        merging = attention = windows = softmax = mlp = activation = 0.0
        ends = _ends(self.depths)
        for s in range(self.stages):
            width = embeds[s]
            side = self.grid(s)
            tokens = side * side
            if s > 0:
                merging = merging + tokens * 4 * embeds[s - 1] * width
                per_token = per_token + tokens * 4 * embeds[s - 1]
            window = self.window(s)
            windowed = (math.ceil(side / window) * window) ** 2
            area = window * window
            per_token = per_token + tokens * width * self.depths[s]
            for i in range(ends[s] - self.depths[s], ends[s]):
                heads, channels = attn[i]
                attention = attention + windowed * width * channels
                windows = windows + windowed * area * channels
                softmax = softmax + windowed * area * heads
                mlp = mlp + tokens * width * mlp_dims[i]
                activation = activation + tokens * mlp_dims[i]
        return [1.0, per_token, merging, attention, windows, softmax, mlp, activation]

    def params(self, spec: ArchSpec) -> int:
        """Parameters of the plain Swin the family builds for ``spec``."""
        e = spec.embed_dims
        total = e[0] * self.in_chans * self.patch_size**2 + e[0] + 2 * e[0] * int(self.patch_norm)
        for s in range(1, self.stages):
            total += 2 * 4 * e[s - 1] + 4 * e[s - 1] * e[s]
        table = [(2 * self.window(self.stage_of(i)) - 1) ** 2 for i in range(self.depth)]
        for i, blk in enumerate(spec.blocks):
            width = e[self.stage_of(i)]
            qkv = width * 3 * blk.attn_dim + 3 * blk.attn_dim * int(self.qkv_bias)
            mlp = width * blk.mlp_dim + blk.mlp_dim + blk.mlp_dim * width + width
            total += 4 * width + qkv + table[i] * blk.heads + blk.attn_dim * width + width + mlp
        return total + 2 * e[-1] + (e[-1] + 1) * self.num_classes


def _ends(depths: tuple[int, ...]) -> list[int]:
    return [sum(depths[: s + 1]) for s in range(len(depths))]


@dataclass(frozen=True)
class SwinSpace:
    """One ViT-style search space per stage (the stages differ in width, heads and MLP width)."""

    stages: tuple[SearchSpace, ...]

    @property
    def stage_spaces(self) -> tuple[SearchSpace, ...]:
        return self.stages
