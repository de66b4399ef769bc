"""The ViT family's adapter: ties its shape, space, support, rebuild and searchable model to the registry."""

from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn

from ofbdeploy.arch import ArchSpec
from ofbdeploy.arch.grids import SearchSpace
from ofbdeploy.families.base import Family
from ofbdeploy.families.vit.build import build_vit
from ofbdeploy.families.vit.searchable import SearchableViT
from ofbdeploy.families.vit.shape import ViTShape
from ofbdeploy.families.vit.space import space_for
from ofbdeploy.families.vit.support import MODEL_TYPES, read_vit_shape

# selfcheck's default: at most this many patches per side (exactness does not depend on the image size).
CHECK_GRID = 16


class ViTFamily(Family):
    name = "vit"
    shape_type = ViTShape
    model_types = MODEL_TYPES

    def read_shape(self, model: nn.Module, model_name: str = "") -> ViTShape:
        return read_vit_shape(model, model_name)

    def space(self, shape: ViTShape, align: int | None = None) -> SearchSpace:
        return space_for(shape, align)

    def searchable(self, model: nn.Module, space: SearchSpace, model_name: str = "", **options: float) -> SearchableViT:
        return SearchableViT(model, space, model_name, **options)

    def build_plain(self, spec: ArchSpec) -> VisionTransformer:
        return build_vit(spec)

    def block_prefix(self, shape: ViTShape, index: int) -> str:
        return f"blocks.{index}."

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

