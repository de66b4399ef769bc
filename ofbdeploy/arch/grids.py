"""Candidate widths ("cells") of each prunable group.

The paper's grids are kept for fidelity; ``align`` builds them from multiples of N only, because widths
such as 204 or 228 waste tensor-core tiles on every GPU and most CPU GEMM kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

ALIGNMENTS = (8, 16, 32, 64)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def width_grid(full: int, low: int, step: int, align: int | None = None) -> list[int]:
    """Widths ``low, low + step, ... <= full`` plus ``full`` itself (the dense width is always a choice).

    With ``align`` both ``low`` and ``step`` are rounded up to a multiple of it; ``full`` stays in the grid
    even when it is not aligned, since keeping everything needs no choice.
    """
    if full < 1 or low < 1 or step < 1:
        raise ValueError(f"width grid needs positive sizes, got full={full} low={low} step={step}")
    if align is not None:
        if align not in ALIGNMENTS:
            raise ValueError(f"align must be one of {ALIGNMENTS} or null, got {align}")
        low, step = _round_up(low, align), _round_up(step, align)
    widths = set(range(min(low, full), full + 1, step))
    widths.add(full)
    return sorted(widths)


def head_grid(num_heads: int) -> list[int]:
    """Kept head counts: ``2, 4, ..., H`` as in the paper; every count for odd H so that H is reachable."""
    step = 2 if num_heads % 2 == 0 else 1
    return list(range(step, num_heads + 1, step))


def head_width_grid(head_dim: int, align: int | None = None) -> list[int]:
    """Per-head qkv channels ``d/4, d/4 + d/8, ..., d``."""
    return width_grid(head_dim, max(1, head_dim // 4), max(1, head_dim // 8), align)


def mlp_grid(mlp_dim: int, align: int | None = None) -> list[int]:
    """MLP hidden widths ``D/4, D/4 + D/8, ..., D``."""
    return width_grid(mlp_dim, max(1, mlp_dim // 4), max(1, mlp_dim // 8), align)


def embed_grid(embed_dim: int, align: int | None = None) -> list[int]:
    """Embedding widths ``E/2, E/2 + s, ..., E`` with ``s = min(E/32, 12)``."""
    return width_grid(embed_dim, max(1, embed_dim // 2), max(1, min(embed_dim // 32, 12)), align)


@dataclass(frozen=True)
class SearchSpace:
    """The cells of the groups of one ViT-style stack of blocks: attention cells are (heads, head width) pairs."""

    attention: tuple[tuple[int, int], ...]
    mlp: tuple[int, ...]
    embedding: tuple[int, ...]

    @classmethod
    def for_model(
        cls, embed_dim: int, num_heads: int, head_dim: int, mlp_dim: int, align: int | None = None
    ) -> SearchSpace:
        """Build the joint grids of a ViT with the given dense sizes."""
        attention = tuple((n, c) for n in head_grid(num_heads) for c in head_width_grid(head_dim, align))
        return cls(attention, tuple(mlp_grid(mlp_dim, align)), tuple(embed_grid(embed_dim, align)))


    @property
    def stage_spaces(self) -> tuple[SearchSpace, ...]:
        """The grids per stage: one stack of blocks has one space for all of them (a Swin's has one per stage)."""
        return (self,)


def unaligned(widths: list[int], multiple: int = 8) -> list[int]:
    """The widths that are not multiples of ``multiple`` (what ``ofbdeploy info`` warns about)."""
    return [w for w in widths if w % multiple]
