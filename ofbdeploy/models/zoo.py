"""Small ViTs and a small Swin registered in timm's registry, for tests and the CPU quickstarts.

They are plain ``timm`` ``VisionTransformer`` / ``SwinTransformer`` instances sized for 32 px inputs
(CIFAR-like), so the whole pipeline can run on a laptop CPU in seconds or minutes. No hub weights exist for
them: ``pretrained=True`` is refused. Importing this module registers them, after which
``timm.create_model(name)`` works.
"""

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from ofbdeploy.errors import ModelError

_IMG_SIZE = 32
_NUM_CLASSES = 10


def _cfg() -> dict[str, Any]:
    """Data config without weights, so timm's data helpers resolve 32 px inputs and 10 classes."""
    return {
        "num_classes": _NUM_CLASSES,
        "input_size": (3, _IMG_SIZE, _IMG_SIZE),
        "fixed_input_size": True,
        "crop_pct": 1.0,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "description": "ofbdeploy test / quickstart model; no pretrained weights",
    }


# register_model reads this module attribute, so it must exist before the entrypoints below.
default_cfgs = generate_default_cfgs(
    {
        "ofb_vit_pico_patch4_32": _cfg(),
        "ofb_vit_micro_patch4_32": _cfg(),
        "ofb_vit_tiny3_patch4_32": _cfg(),
        "ofb_swin_pico_patch2_32": _cfg(),
    }
)


def _create(variant: str, pretrained: bool, preset: dict[str, Any], kwargs: dict[str, Any],
            cls: type = VisionTransformer) -> Any:
    """Build the preset with caller kwargs taking precedence; refuse hub weights, which do not exist."""
    if pretrained:
        raise ModelError(
            f"{variant} has no pretrained weights; build it with pretrained=False and load a local checkpoint"
        )
    base = {"img_size": _IMG_SIZE, "patch_size": 4, "mlp_ratio": 4.0, "qkv_bias": True, "num_classes": _NUM_CLASSES}
    return build_model_with_cfg(cls, variant, pretrained=False, **{**base, **preset, **kwargs})


@register_model
def ofb_vit_pico_patch4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Pico (64 dim, 4 blocks, 4 heads): the smallest model, for fast unit tests."""
    preset = {"embed_dim": 64, "depth": 4, "num_heads": 4}
    return _create("ofb_vit_pico_patch4_32", pretrained, preset, kwargs)


@register_model
def ofb_vit_micro_patch4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Micro (128 dim, 6 blocks, 4 heads): big enough for the CPU quickstart to learn something."""
    preset = {"embed_dim": 128, "depth": 6, "num_heads": 4}
    return _create("ofb_vit_micro_patch4_32", pretrained, preset, kwargs)


@register_model
def ofb_vit_tiny3_patch4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Pico with 3 heads of 16 dims (48 dim): an odd head count, like DeiT-Tiny, for head-pruning tests."""
    preset = {"embed_dim": 48, "depth": 4, "num_heads": 3}
    return _create("ofb_vit_tiny3_patch4_32", pretrained, preset, kwargs)


@register_model
def ofb_swin_pico_patch2_32(pretrained: bool = False, **kwargs: Any) -> SwinTransformer:
    """Swin-Pico: Swin-T's proportions at 1/4 width (24/48/96/192 dims, 3/6/12/24 heads of 8, windows of 4,
    2 blocks per stage) on 2 px patches: stage grids 16/8/4/2, so the last two stages clamp their windows."""
    preset = {"patch_size": 2, "embed_dim": 24, "depths": (2, 2, 2, 2), "num_heads": (3, 6, 12, 24),
              "window_size": 4, "drop_path_rate": 0.0}
    return _create("ofb_swin_pico_patch2_32", pretrained, preset, kwargs, SwinTransformer)
