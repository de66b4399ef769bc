"""The Swin family: timm's ``SwinTransformer`` (v1), pruned as in the OFB paper's OFB-Swin.

Searchable groups: per block, heads x per-head qkv channels (the relative-position-bias table keeps the
columns of the kept heads) and the MLP hidden width; per *stage*, the embedding width (the residual stream of
that stage), which slices the patch embedding (stage 0) or the patch-merging reduction's outputs (later
stages), every block of the stage, and the next patch merging's LayerNorm and reduction inputs (4 x E
channels) or, after the last stage, the final norm and the classifier.

The stage's embedding mask multiplies the stage's input (the patch embedding's, or the merging's output)
and folds into that layer at materialisation. PMIM hides patch-embedding tokens (the same unit as a ViT's
token: mask tokens replace them where the first stage starts) and reconstructs the image from the last
stage's tokens at their stride (patch size x 2^(stages - 1), as SimMIM decodes Swin), cropped to the image.

Costs follow timm's forward exactly: windows are clamped to the feature resolution (and then not shifted),
feature maps are padded to a multiple of the window for attention (qkv and the projection run on the padded
tokens), and patch merging pads odd resolutions. The shift mask is an addition: no multiply-accumulates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

from timm.layers import ClassifierHead, Mlp, PatchEmbed
from timm.models.swin_transformer import (
    PatchMerging,
    SwinTransformer,
    SwinTransformerBlock,
    SwinTransformerStage,
    WindowAttention,
    checkpoint_filter_fn,
)
from torch import Tensor, nn

from ofbdeploy.arch import MAX_WIDTH, ArchSpec, BlockSpec, check_eps, check_int, check_ints, check_model_name
from ofbdeploy.errors import ArchError
from ofbdeploy.families import register_family
from ofbdeploy.families.base import Family, Widths
from ofbdeploy.grids import SearchSpace
from ofbdeploy.models.support import norm_problems, refuse

POOLS = ("avg", "max", "avgmax")
# selfcheck's default: at most this many patches per side (Swin-T's 224 px at patch 4).
CHECK_GRID = 56


@dataclass(frozen=True)
class SwinShape:
    """The dense timm ``SwinTransformer``: per-stage widths, depths, heads and (requested) window sizes."""

    family: ClassVar[str] = "swin"

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


def _ends(depths: tuple[int, ...]) -> list[int]:
    return [sum(depths[: s + 1]) for s in range(len(depths))]


@dataclass(frozen=True)
class SwinSpace:
    """One ViT-style search space per stage (the stages differ in width, heads and MLP width)."""

    stages: tuple[SearchSpace, ...]


def swin_space(shape: SwinShape, align: int | None = None) -> SwinSpace:
    return SwinSpace(tuple(
        SearchSpace.for_model(shape.embed_dims[s], shape.num_heads[s], shape.head_dims[s], shape.mlp_dims[s], align)
        for s in range(shape.stages)
    ))


# -- reading a dense model --------------------------------------------------------------------------
def _kind(module: object) -> str:
    return type(module).__name__


def _block_problems(s: int, block: nn.Module) -> list[str]:
    if type(block) is not SwinTransformerBlock:
        return [f"stage {s}: block {_kind(block)} is not timm's SwinTransformerBlock"]
    attn, mlp = block.attn, block.mlp
    act = getattr(mlp, "act", None)
    return [f"stage {s}: {reason}" for reason, bad in (
        (f"attention {_kind(attn)} is not timm's WindowAttention", type(attn) is not WindowAttention),
        (f"MLP {_kind(mlp)} is not timm's Mlp", type(mlp) is not Mlp),
        (f"MLP activation {_kind(act)} (supported: exact GELU)",
         type(act) is not nn.GELU or getattr(act, "approximate", "") != "none"),
        ("MLP hidden norm", not isinstance(getattr(mlp, "norm", None), nn.Identity)),
        ("MLP without biases", getattr(mlp.fc1, "bias", None) is None or getattr(mlp.fc2, "bias", None) is None),
        ("windows always partitioned (always_partition)", block.always_partition),
        ("dynamic attention masks", block.dynamic_mask),
    ) if bad]


def swin_problems(model: nn.Module) -> list[str]:
    """Every feature of a timm Swin that the Swin family cannot prune (empty: prunable)."""
    embed = model.patch_embed
    problems: list[str] = []
    if type(embed) is not PatchEmbed or not isinstance(getattr(embed, "proj", None), nn.Conv2d):
        return [f"patch embedding {_kind(embed)} is not timm's PatchEmbed"]
    for s, stage in enumerate(model.layers):
        if type(stage) is not SwinTransformerStage:
            return [f"stage {s}: {_kind(stage)} is not timm's SwinTransformerStage"]
        if len(stage.blocks) == 0:
            return [f"stage {s} has no blocks (depth 0)"]
        down = stage.downsample
        if (s == 0) != isinstance(down, nn.Identity) or (s > 0 and type(down) is not PatchMerging):
            problems.append(f"stage {s}: downsampling {_kind(down)} (supported: timm's PatchMerging after stage 0)")
        for block in stage.blocks:
            problems += _block_problems(s, block)
        if problems:
            return problems
        blocks = list(stage.blocks)
        if len({(b.attn.num_heads, b.attn.qkv.out_features, b.mlp.fc1.out_features, b.attn.qkv.bias is not None)
                for b in blocks}) > 1:
            problems.append(f"stage {s}: blocks of different widths (ofbdeploy prunes uniform dense stages)")
    head = model.head
    problems += [reason for reason, bad in (
        ("dynamic image size", model.dynamic_img_size),
        (f"global_pool {model.global_pool!r} (supported: {', '.join(POOLS)})", model.global_pool not in POOLS),
        ("classifier head other than timm's ClassifierHead with a Linear layer",
         type(head) is not ClassifierHead or not isinstance(head.fc, nn.Linear | nn.Identity)),
        ("qkv biases that differ between stages",
         len({b.attn.qkv.bias is not None for st in model.layers for b in st.blocks}) > 1),
        ("rectangular windows", any(w[0] != w[1] for w in model._ref_window_sizes)),
    ) if bad]
    problems += norm_problems(model)
    return problems


def read_swin_shape(model: nn.Module, model_name: str = "") -> SwinShape:
    """The shape of a timm Swin, or a one-line :class:`ModelError` naming what the search cannot prune."""
    if type(model) is not SwinTransformer:
        refuse([f"expected a timm SwinTransformer, got {type(model).__name__}"], "Swin")
    refuse(swin_problems(model), "Swin")
    img, patch = model.patch_embed.img_size, model.patch_embed.patch_size
    if img[0] != img[1] or patch[0] != patch[1] or img[0] % patch[0]:
        refuse([f"only square images that are a multiple of a square patch, got img {img} patch {patch}"], "Swin")
    firsts = [stage.blocks[0] for stage in model.layers]
    heads = tuple(int(b.attn.num_heads) for b in firsts)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    shape = SwinShape(
        img_size=int(img[0]),
        patch_size=int(patch[0]),
        in_chans=int(model.patch_embed.proj.in_channels),
        num_classes=int(model.num_classes),
        embed_dims=tuple(int(b.norm1.normalized_shape[0]) for b in firsts),
        depths=tuple(len(stage.blocks) for stage in model.layers),
        num_heads=heads,
        head_dims=tuple(int(b.attn.qkv.out_features // 3 // h) for b, h in zip(firsts, heads, strict=True)),
        mlp_dims=tuple(int(b.mlp.fc1.out_features) for b in firsts),
        window_sizes=tuple(int(w[0]) for w in model._ref_window_sizes),
        qkv_bias=firsts[0].attn.qkv.bias is not None,
        patch_norm=not isinstance(model.patch_embed.norm, nn.Identity),
        global_pool=str(model.global_pool),
        norm_eps=float(norms[0].eps),
        model_name=model_name,
    )
    clamped = [f"stage {s}: window {b.window_size} is not the requested one clamped to the feature size "
               f"({shape.window(s)})" for s, st in enumerate(model.layers) for b in st.blocks
               if tuple(b.window_size) != (shape.window(s),) * 2]
    refuse(clamped, "Swin")
    return shape


# -- rebuilding ---------------------------------------------------------------------------------------
def build_swin(spec: ArchSpec) -> SwinTransformer:
    """A timm ``SwinTransformer`` with the widths of ``spec``: built with the dense options, then the patch
    embedding, every stage (its patch merging sized E_prev -> E), every block's ``WindowAttention`` and ``Mlp``,
    the final norm and the classifier are timm modules of the searched widths (weights uninitialised)."""
    b: SwinShape = spec.base
    norm = partial(nn.LayerNorm, eps=b.norm_eps)
    model = SwinTransformer(
        img_size=b.img_size, patch_size=b.patch_size, in_chans=b.in_chans, num_classes=b.num_classes,
        global_pool=b.global_pool, embed_dim=spec.embed_dims[0], depths=b.depths, num_heads=(1,) * b.stages,
        head_dim=1, window_size=tuple((w, w) for w in b.window_sizes), mlp_ratio=1.0, qkv_bias=b.qkv_bias,
        drop_path_rate=0.0, norm_layer=norm, weight_init="skip",
    )
    model.patch_embed = PatchEmbed(b.img_size, b.patch_size, b.in_chans, spec.embed_dims[0],
                                   norm_layer=norm if b.patch_norm else None, output_fmt="NHWC")
    blocks = iter(spec.blocks)
    in_dim = spec.embed_dims[0]
    for s, old in enumerate(model.layers):
        width = spec.embed_dims[s]
        stage = SwinTransformerStage(dim=in_dim, out_dim=width, input_resolution=old.input_resolution,
                                     depth=b.depths[s], downsample=s > 0, num_heads=1, head_dim=1,
                                     window_size=b.window_sizes[s], mlp_ratio=1.0, qkv_bias=b.qkv_bias,
                                     norm_layer=norm)
        for block in stage.blocks:
            blk = next(blocks)
            block.attn = WindowAttention(width, num_heads=blk.heads, head_dim=blk.head_dim,
                                         window_size=block.window_size, qkv_bias=b.qkv_bias)
            block.mlp = Mlp(width, hidden_features=blk.mlp_dim, act_layer=nn.GELU)
        model.layers[s] = stage
        in_dim = width
    model.norm = norm(in_dim)
    model.head = ClassifierHead(in_dim, b.num_classes, pool_type=b.global_pool, input_fmt="NHWC")
    model.embed_dim = spec.embed_dims[0]
    model.num_features = model.head_hidden_size = in_dim
    return model


# -- cost -------------------------------------------------------------------------------------------
def swin_macs(shape: SwinShape, embeds: list, attn_dims: list, mlp_dims: list):
    """MACs of a Swin of ``shape`` at the given stage widths and per-block attention (heads x width) and MLP
    widths (numbers or tensors)."""
    side = shape.grid(0)
    total = side * side * shape.in_chans * shape.patch_size**2 * embeds[0]
    ends = _ends(shape.depths)
    for s in range(shape.stages):
        width = embeds[s]
        if s > 0:
            side = shape.grid(s)
            total = total + side * side * 4 * embeds[s - 1] * width
        window = shape.window(s)
        padded = math.ceil(side / window) * window
        windowed, area = padded * padded, window * window
        for i in range(ends[s] - shape.depths[s], ends[s]):
            attn = attn_dims[i]
            total = (total + windowed * width * 3 * attn + 2 * windowed * area * attn + windowed * attn * width
                     + 2 * side * side * width * mlp_dims[i])
    return total + embeds[-1] * shape.num_classes


def swin_params(spec: ArchSpec) -> int:
    """Parameters of the Swin :func:`build_swin` builds for ``spec``."""
    b: SwinShape = spec.base
    e = spec.embed_dims
    total = e[0] * b.in_chans * b.patch_size**2 + e[0] + 2 * e[0] * int(b.patch_norm)
    for s in range(1, b.stages):
        total += 2 * 4 * e[s - 1] + 4 * e[s - 1] * e[s]
    table = [(2 * b.window(b.stage_of(i)) - 1) ** 2 for i in range(b.depth)]
    for i, blk in enumerate(spec.blocks):
        width = e[b.stage_of(i)]
        qkv = width * 3 * blk.attn_dim + 3 * blk.attn_dim * int(b.qkv_bias)
        mlp = width * blk.mlp_dim + blk.mlp_dim + blk.mlp_dim * width + width
        total += 4 * width + qkv + table[i] * blk.heads + blk.attn_dim * width + width + mlp
    return total + 2 * e[-1] + (e[-1] + 1) * b.num_classes


class SwinFamily(Family):
    name = "swin"
    shape_type = SwinShape
    model_types = (SwinTransformer,)
    latency_refusal = (
        "the latency table fits one token count and one residual width shared by every block (a plain ViT), "
        "while a Swin's four stages differ in both and add window padding and patch merging, which the table "
        "has no terms for; use a FLOPs budget (search.target_gflops or target_flops_ratio)"
    )

    def read_shape(self, model: nn.Module, model_name: str = "") -> SwinShape:
        return read_swin_shape(model, model_name)

    def space(self, shape: SwinShape, align: int | None = None) -> SwinSpace:
        return swin_space(shape, align)

    def searchable(self, model: nn.Module, space: SwinSpace, model_name: str = "", **options: float):
        from ofbdeploy.search.searchable_swin import SearchableSwin

        return SearchableSwin(model, space, model_name, **options)

    def narrowest(self, shape: SwinShape, space: SwinSpace) -> ArchSpec:
        blocks = []
        for i in range(shape.depth):
            stage = space.stages[shape.stage_of(i)]
            heads, head_dim = min(stage.attention, key=lambda cell: cell[0] * cell[1])
            blocks.append(BlockSpec(heads, head_dim, min(stage.mlp)))
        return ArchSpec(shape, tuple(min(st.embedding) for st in space.stages), tuple(blocks))

    def spec_from_widths(self, shape: SwinShape, widths: Widths) -> ArchSpec:
        blocks = tuple(BlockSpec(*widths[f"blocks.{i}.attn"], widths[f"blocks.{i}.mlp"][0])
                       for i in range(shape.depth))
        embeds = tuple(widths[f"stages.{s}.embedding"][0] for s in range(shape.stages))
        return ArchSpec(shape, embeds, blocks)

    def macs(self, spec: ArchSpec) -> float:
        return swin_macs(spec.base, list(spec.embed_dims), [b.attn_dim for b in spec.blocks],
                         [b.mlp_dim for b in spec.blocks])

    def params(self, spec: ArchSpec) -> int:
        return swin_params(spec)

    def build_plain(self, spec: ArchSpec) -> SwinTransformer:
        return build_swin(spec)

    def checkpoint_filter(self, state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
        return checkpoint_filter_fn(state, model)

    def head_keys(self, model: nn.Module) -> tuple[str, ...]:
        return ("head.fc.weight", "head.fc.bias")

    def check_img_size(self, shape: SwinShape) -> int:
        return min(shape.img_size, CHECK_GRID * shape.patch_size)

    def summary(self, shape: SwinShape) -> str:
        def join(values: tuple[int, ...]) -> str:
            return "/".join(map(str, values))

        windows = tuple(shape.window(s) for s in range(shape.stages))
        return (f"stages {join(shape.embed_dims)} wide, depths {join(shape.depths)}, heads {join(shape.num_heads)} "
                f"x {join(shape.head_dims)}, MLP {join(shape.mlp_dims)}, windows {join(windows)} "
                f"(requested {join(shape.window_sizes)}), {shape.global_pool} pooling")


register_family(SwinFamily())
