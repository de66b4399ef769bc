"""The dense ViT (:class:`ViTShape`): its options, their checks, and what an architecture of it costs.

Cost convention (:mod:`ofbdeploy.arch.cost`): multiply-accumulates of matrix products and convolutions for
one image, every token counted including prefix tokens; widths may be numbers or tensors of expected widths
(the search's differentiable FLOPs loss).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from ofbdeploy.arch.cost import Width, block_macs
from ofbdeploy.arch.grids import SearchSpace
from ofbdeploy.arch.spec import (
    MAX_WIDTH,
    ArchSpec,
    BlockSpec,
    Widths,
    check_eps,
    check_int,
    check_model_name,
    require,
)
from ofbdeploy.errors import ArchError

_SHAPE_INTS = (("img_size", 1, 1 << 14), ("patch_size", 1, 1 << 14), ("in_chans", 1, 1024),
               ("num_classes", 0, 1 << 20), ("embed_dim", 1, MAX_WIDTH), ("depth", 1, 1024),
               ("num_heads", 1, 4096), ("head_dim", 1, MAX_WIDTH), ("mlp_dim", 1, 1 << 18),
               ("reg_tokens", 0, 1024), ("pool_heads", 0, 4096), ("pool_mlp_dim", 0, 1 << 18))
_VIT_BOOLS = ("qkv_bias", "class_token", "fc_norm", "layer_scale", "distilled", "pos_embed", "no_embed_class",
              "pre_norm", "patch_norm", "final_norm", "proj_bias", "pool_include_prefix", "dynamic_img_size")
VIT_POOLS = ("token", "avg", "max", "avgmax", "map")
VIT_ACTS = ("gelu", "gelu_tanh", "quick_gelu")
VIT_BLOCKS = ("Block", "ResPostBlock")


@dataclass(frozen=True)
class ViTShape:
    """The dense timm ``VisionTransformer`` configuration the search and the rebuild need.

    The options after ``model_name`` describe the ViT variants ofbdeploy prunes (class, register and
    distillation tokens, position embeddings with or without a class slot, CLIP's pre-norm, a norm after the
    patch embedding, LayerScale, GELU variants, fc-norm, pooling, the attention-pool head); their defaults
    are the plain DeiT, so records written before they existed read unchanged.
    """

    family: ClassVar[str] = "vit"
    # The work counts a latency table weighs (see latency_features).
    latency_feature_names: ClassVar[tuple[str, ...]] = (
        "stem", "stem x embed", "embed x heads x head width", "heads x head width", "heads", "embed x mlp", "mlp")

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
        require(self.patch_size <= self.img_size,
                f"patch_size: expected at most img_size ({self.img_size}), got {self.patch_size}")
        for name in _VIT_BOOLS:
            value = getattr(self, name)
            require(isinstance(value, bool), f"{name}: expected true or false, got {str(value)[:40]!r}")
        for name, allowed in (("global_pool", VIT_POOLS), ("act", VIT_ACTS), ("block", VIT_BLOCKS)):
            value = getattr(self, name)
            require(value in allowed, f"{name}: expected one of {allowed}, got {str(value)[:40]!r}")
        check_eps(self.norm_eps)
        check_model_name(self.model_name)
        require(self.global_pool != "map" or (self.pool_heads >= 1 and self.embed_dim % self.pool_heads == 0
                                              and self.pool_mlp_dim >= 1),
                "pool_heads, pool_mlp_dim: an attention-pool head needs heads dividing embed_dim and an MLP width")

    # -- architectures of this shape ----------------------------------------------------------------
    def check(self, spec: ArchSpec) -> None:
        """A model with an attention-pool head keeps its embedding width (see :mod:`ofbdeploy.families.vit`)."""
        if self.global_pool == "map" and spec.embed_dim != self.embed_dim:
            raise ArchError(f"embed_dim: a model with an attention-pool head keeps its embedding width "
                            f"{self.embed_dim}, got {spec.embed_dim}")

    def narrowest(self, space: SearchSpace) -> ArchSpec:
        heads, head_dim = min(space.attention, key=lambda cell: cell[0] * cell[1])
        return ArchSpec.uniform(self, min(space.embedding), heads, head_dim, min(space.mlp))

    def spec_from_widths(self, widths: Widths) -> ArchSpec:
        blocks = tuple(BlockSpec(*widths[f"blocks.{i}.attn"], widths[f"blocks.{i}.mlp"][0])
                       for i in range(self.depth))
        return ArchSpec(self, widths["embedding"], blocks)

    # -- cost ---------------------------------------------------------------------------------------
    def macs_at(self, embeds: Sequence[Width], attn_dims: Sequence[Width], mlp_dims: Sequence[Width]) -> Width:
        """MACs of a ViT of this shape whose embedding (``embeds[0]``), attention (heads x head width) and MLP
        widths are given."""
        embed = embeds[0]
        n = self.num_tokens
        total = self.num_patches * self.in_chans * self.patch_size**2 * embed
        for attn_dim, mlp_dim in zip(attn_dims, mlp_dims, strict=True):
            total = total + block_macs(n, embed, attn_dim, mlp_dim)
        if self.global_pool == "map":
            total = total + self._attention_pool_macs(embed)
        return total + embed * self.num_classes * (2 if self.distilled else 1)

    def latency_features(self, embeds: Sequence[Width], attn: Sequence[tuple[Width, Width]],
                         mlp_dims: Sequence[Width]) -> list[Width]:
        """The work counts of :attr:`latency_feature_names` at the given widths (``attn``: per block, heads and
        heads x head width): the stem-and-head's fixed cost and its embedding width, the attention GEMMs, the
        attention matmuls and softmax, the MLP GEMMs and activation. Every block sees the same token count, so
        it is folded into the coefficients. Numbers or tensors of expected widths (then differentiable)."""
        embed = embeds[0]
        heads = sum(h for h, _ in attn)
        channels = sum(c for _, c in attn)
        mlp = sum(mlp_dims)
        return [1.0, embed, embed * channels, channels, heads, embed * mlp, mlp]

    def params(self, spec: ArchSpec) -> int:
        """Parameters (weights, biases, norms, tokens, position embedding, heads) of the plain ViT of ``spec``."""
        embed = spec.embed_dim
        prefix = self.num_prefix_tokens
        stem = embed * self.in_chans * self.patch_size**2 + embed * int(not self.pre_norm)  # timm: no bias w/ pre-norm
        positions = self.num_patches + (0 if self.no_embed_class else prefix)
        stem = stem + embed * positions * int(self.pos_embed) + embed * prefix
        stem = stem + _norm(embed, self.patch_norm) + _norm(embed, self.pre_norm) + _norm(embed, self.final_norm)
        heads = (embed + 1) * self.num_classes * (2 if self.distilled else 1)
        total = stem + heads
        if self.global_pool == "map":
            total = total + self._attention_pool_params(embed)
        bias = int(self.proj_bias)
        for blk in spec.blocks:
            attn_dim, mlp_dim = blk.attn_dim, blk.mlp_dim
            qkv = embed * 3 * attn_dim + 3 * attn_dim * int(self.qkv_bias)
            proj = attn_dim * embed + embed * bias
            mlp = embed * mlp_dim + mlp_dim * bias + mlp_dim * embed + embed * bias
            norms = 4 * embed + 2 * embed * int(self.layer_scale)
            total = total + qkv + proj + mlp + norms
        return total

    def _attention_pool_macs(self, embed: Width) -> Width:
        """SigLIP's attention-pool head ('map'): one latent query over the patch tokens, then its MLP."""
        tokens = self.num_patches + (self.num_prefix_tokens if self.pool_include_prefix else 0)
        query = embed * embed
        keys_values = tokens * embed * 2 * embed
        attention = 2 * tokens * embed
        return query + keys_values + attention + embed * embed + 2 * embed * self.pool_mlp_dim

    def _attention_pool_params(self, embed: int) -> int:
        """Latent, q, kv and output projections, norm and MLP of the attention-pool head."""
        hidden = self.pool_mlp_dim
        projections = (embed * embed + embed) + (embed * 2 * embed + 2 * embed) + (embed * embed + embed)
        return embed + projections + 2 * embed + (embed * hidden + hidden + hidden * embed + embed)


def _norm(embed: int, present: bool) -> int:
    return 2 * embed * int(present)
