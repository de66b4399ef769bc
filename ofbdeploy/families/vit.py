"""The ViT family: timm's ``VisionTransformer`` and ``VisionTransformerDistilled`` with their variants.

Variants are options of one adapter, recorded in :class:`ViTShape`: class, register and distillation
tokens; position embeddings with or without a class slot (or none); CLIP's pre-norm and a norm after the
patch embedding; LayerScale; GELU, tanh GELU and QuickGELU; any LayerNorm eps; fc-norm; token, average and
max pooling; the distilled DeiT's two heads; res-post blocks; and SigLIP's attention-pool head ('map').

The attention pool is kept dense, and so is the embedding width of a model that has one: timm's
``AttentionPoolLatent`` reshapes its attention output to its *input* width, so its input cannot be sliced
while it stays dense, and slicing its internals with the residual channels would regroup its heads (a
different function, not one the search scored). Heads, head widths and MLP widths are searched as usual.
"""

from __future__ import annotations

from functools import partial

from timm.layers import Attention, LayerNorm, Mlp
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn

from ofbdeploy import cost
from ofbdeploy.arch import ArchSpec, BlockSpec, ViTShape
from ofbdeploy.errors import ArchError
from ofbdeploy.families import register_family
from ofbdeploy.families.base import Family, Widths
from ofbdeploy.grids import SearchSpace, space_for
from ofbdeploy.models.support import BLOCKS, activation_name, refuse, vit_problems

# selfcheck's default: at most this many patches per side (exactness does not depend on the image size).
CHECK_GRID = 16


def read_vit_shape(model: nn.Module, model_name: str = "") -> ViTShape:
    """The shape of a timm ViT, or a one-line :class:`ModelError` naming what the search cannot prune."""
    if type(model) not in ViTFamily.model_types:
        refuse([f"expected a timm VisionTransformer, got {type(model).__name__}"])
    refuse(vit_problems(model))
    block = model.blocks[0]
    img, patch = model.patch_embed.img_size, model.patch_embed.patch_size
    if img[0] != img[1] or patch[0] != patch[1]:
        refuse([f"only square images and patches are supported, got img {img} patch {patch}"])
    pool = model.attn_pool
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    return ViTShape(
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
        layer_scale=not isinstance(getattr(block, "ls1", nn.Identity()), nn.Identity),
        model_name=model_name,
        reg_tokens=int(model.num_reg_tokens),
        distilled=type(model) is VisionTransformerDistilled,
        pos_embed=model.pos_embed is not None,
        no_embed_class=bool(model.no_embed_class),
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        patch_norm=not isinstance(model.patch_embed.norm, nn.Identity),
        final_norm=not (isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.Identity)),
        act=activation_name(block.mlp.act) or "",
        norm_eps=float(norms[0].eps) if norms else 1e-6,
        proj_bias=block.attn.proj.bias is not None,
        block=type(block).__name__,
        pool_include_prefix=bool(model.pool_include_prefix),
        dynamic_img_size=bool(model.dynamic_img_size),
        pool_heads=int(pool.num_heads) if pool is not None else 0,
        pool_mlp_dim=int(pool.mlp.fc1.out_features) if pool is not None else 0,
    )


def build_vit(spec: ArchSpec) -> VisionTransformer:
    """A timm ``VisionTransformer`` (or ``VisionTransformerDistilled``) with the widths of ``spec``.

    Built with the dense model's options, then every block gets timm's own ``Attention`` and ``Mlp`` of its
    searched widths (weights uninitialised: they are loaded).
    """
    b = spec.base
    embed = spec.embed_dim
    norm = partial(LayerNorm, eps=b.norm_eps)
    cls = VisionTransformerDistilled if b.distilled else VisionTransformer
    model = cls(
        img_size=b.img_size, patch_size=b.patch_size, in_chans=b.in_chans, num_classes=b.num_classes,
        global_pool=b.global_pool, embed_dim=embed, depth=b.depth,
        num_heads=b.pool_heads or 1, mlp_ratio=b.pool_mlp_dim / embed if b.pool_mlp_dim else 1.0,
        qkv_bias=b.qkv_bias, proj_bias=b.proj_bias, init_values=1.0 if b.layer_scale else None,
        class_token=b.class_token, pos_embed="learn" if b.pos_embed else "none", no_embed_class=b.no_embed_class,
        reg_tokens=b.reg_tokens, pre_norm=b.pre_norm, final_norm=b.final_norm, fc_norm=b.fc_norm,
        pool_include_prefix=b.pool_include_prefix, dynamic_img_size=b.dynamic_img_size,
        embed_norm_layer=norm if b.patch_norm else None, norm_layer=norm, act_layer=b.act,
        block_fn=BLOCKS[b.block], weight_init="skip",
    )
    act = model.blocks[0].mlp.act.__class__
    for block, blk in zip(model.blocks, spec.blocks, strict=True):
        block.attn = Attention(embed, num_heads=blk.heads, attn_head_dim=blk.head_dim, qkv_bias=b.qkv_bias,
                               proj_bias=b.proj_bias)
        block.mlp = Mlp(embed, hidden_features=blk.mlp_dim, act_layer=act, bias=b.proj_bias)
    if model.attn_pool is not None and model.attn_pool.mlp.fc1.out_features != b.pool_mlp_dim:
        model.attn_pool.mlp = Mlp(embed, hidden_features=b.pool_mlp_dim, out_features=embed, act_layer=act)
    return model


class ViTFamily(Family):
    name = "vit"
    shape_type = ViTShape
    model_types = (VisionTransformer, VisionTransformerDistilled)

    def read_shape(self, model: nn.Module, model_name: str = "") -> ViTShape:
        return read_vit_shape(model, model_name)

    def space(self, shape: ViTShape, align: int | None = None) -> SearchSpace:
        return space_for(shape, align)

    def searchable(self, model: nn.Module, space: SearchSpace, model_name: str = "", **options: float):
        from ofbdeploy.search.searchable import SearchableViT

        return SearchableViT(model, space, model_name, **options)

    def narrowest(self, shape: ViTShape, space: SearchSpace) -> ArchSpec:
        heads, head_dim = min(space.attention, key=lambda cell: cell[0] * cell[1])
        return ArchSpec.uniform(shape, min(space.embedding), heads, head_dim, min(space.mlp))

    def spec_from_widths(self, shape: ViTShape, widths: Widths) -> ArchSpec:
        blocks = tuple(BlockSpec(*widths[f"blocks.{i}.attn"], widths[f"blocks.{i}.mlp"][0])
                       for i in range(shape.depth))
        return ArchSpec(shape, widths["embedding"], blocks)

    def macs(self, spec: ArchSpec) -> float | Tensor:
        return cost.vit_macs(spec.base, spec.embed_dim, [b.attn_dim for b in spec.blocks],
                             [b.mlp_dim for b in spec.blocks])

    def params(self, spec: ArchSpec) -> int:
        return int(cost.vit_params(spec.base, spec.embed_dim, [b.attn_dim for b in spec.blocks],
                                   [b.mlp_dim for b in spec.blocks]))

    def validate(self, spec: ArchSpec) -> None:
        if spec.base.global_pool == "map" and spec.embed_dim != spec.base.embed_dim:
            raise ArchError(f"embed_dim: a model with an attention-pool head keeps its embedding width "
                            f"{spec.base.embed_dim}, got {spec.embed_dim}")

    def build_plain(self, spec: ArchSpec) -> VisionTransformer:
        return build_vit(spec)

    def check_img_size(self, shape: ViTShape) -> int:
        return min(shape.img_size, CHECK_GRID * shape.patch_size)

    def summary(self, shape: ViTShape) -> str:
        options = [
            "distilled (distillation token, two heads)" if shape.distilled else "",
            "class token" if shape.class_token else "no class token",
            f"{shape.reg_tokens} register token(s)" if shape.reg_tokens else "",
            ("no position embedding" if not shape.pos_embed
             else "no class slot in the position embedding" if shape.no_embed_class else ""),
            "norm after the patch embedding" if shape.patch_norm else "",
            "pre-norm" if shape.pre_norm else "",
            "LayerScale" if shape.layer_scale else "",
            "res-post blocks" if shape.block == "ResPostBlock" else "",
            shape.act, f"LayerNorm eps {shape.norm_eps:g}",
            f"{shape.global_pool} pooling" + (" (attention pool kept dense, embedding not searched)"
                                              if shape.global_pool == "map" else ""),
            "fc-norm" if shape.fc_norm else "" if shape.final_norm else "no final norm",
        ]
        widths = (f"{shape.embed_dim} wide, {shape.depth} blocks of {shape.num_heads} heads x {shape.head_dim}, "
                  f"MLP {shape.mlp_dim}")
        return "; ".join([widths, ", ".join(o for o in options if o)])

    def checkpoint_filter(self, state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
        # adapt_layer_scale: official DeiT-III files store LayerScale as gamma_1/gamma_2.
        return checkpoint_filter_fn(state, model, adapt_layer_scale=True)

    def head_keys(self, model: nn.Module) -> tuple[str, ...]:
        keys = ("head.weight", "head.bias")
        return (*keys, "head_dist.weight", "head_dist.bias") if hasattr(model, "head_dist") else keys


register_family(ViTFamily())
