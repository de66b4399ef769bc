"""The Swin family's adapter: ties its shape, space, support, rebuild and searchable model to the registry."""

from __future__ import annotations

from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn
from torch import Tensor, nn

from ofbdeploy.arch import ArchSpec
from ofbdeploy.families.base import Family
from ofbdeploy.families.swin.build import build_swin
from ofbdeploy.families.swin.searchable import SearchableSwin
from ofbdeploy.families.swin.shape import SwinShape, SwinSpace
from ofbdeploy.families.swin.space import swin_space
from ofbdeploy.families.swin.support import read_swin_shape

# selfcheck's default: at most this many patches per side (Swin-T's 224 px at patch 4).
CHECK_GRID = 56


class SwinFamily(Family):
    name = "swin"
    shape_type = SwinShape
    model_types = (SwinTransformer,)

    def read_shape(self, model: nn.Module, model_name: str = "") -> SwinShape:
        return read_swin_shape(model, model_name)

    def space(self, shape: SwinShape, align: int | None = None) -> SwinSpace:
        return swin_space(shape, align)

    def searchable(self, model: nn.Module, space: SwinSpace, model_name: str = "", **options: float) -> SearchableSwin:
        return SearchableSwin(model, space, model_name, **options)

    def build_plain(self, spec: ArchSpec) -> SwinTransformer:
        return build_swin(spec)

    def checkpoint_filter(self, state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
        return checkpoint_filter_fn(state, model)

    def head_keys(self, model: nn.Module) -> tuple[str, ...]:
        return ("head.fc.weight", "head.fc.bias")

    def block_prefix(self, shape: SwinShape, index: int) -> str:
        stage = shape.stage_of(index)
        return f"layers.{stage}.blocks.{index - sum(shape.depths[:stage])}."

    def check_img_size(self, shape: SwinShape) -> int:
        return min(shape.img_size, CHECK_GRID * shape.patch_size)

    def summary(self, shape: SwinShape) -> str:
        def join(values: tuple[int, ...]) -> str:
            return "/".join(map(str, values))

        windows = tuple(shape.window(s) for s in range(shape.stages))
        return (f"stages {join(shape.embed_dims)} wide, depths {join(shape.depths)}, heads {join(shape.num_heads)} "
                f"x {join(shape.head_dims)}, MLP {join(shape.mlp_dims)}, windows {join(windows)} "
                f"(requested {join(shape.window_sizes)}), {shape.global_pool} pooling")

