"""Sort timm's ViT and Swin models into prunable (by which family, which variant) and refused (why).

Each model is built on the meta device (no weights are made), so the whole registry is judged in seconds,
the way timm's own tests cap their model sweeps. A refusal is a one-line :class:`ModelError`; any other
exception is a crash, which is a bug of ofbdeploy (``tools/scripts/family_census.py`` prints the counts; the tests
fail on a crash). Exactness is checked on real weights separately: per variant on a shrunken copy (few
blocks, narrow) at a small image size, or on the real widths by the opt-in sweep.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any

import timm
import torch

from ofbdeploy.errors import OfbError
from ofbdeploy.families import family_of, read_shape
from ofbdeploy.models.dense import build_dense
from ofbdeploy.verify.exactness import Agreement, check_agreement, decide_randomly, meta_device

MODULES = ("vision_transformer", "deit", "vision_transformer_hybrid", "swin_transformer")
MAX_PARAMS = 400_000_000
# Shape fields that are sizes, not variants: two models differing only in these prune the same way.
_SIZES = {"img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "embed_dims", "depth", "depths",
          "num_heads", "head_dim", "head_dims", "mlp_dim", "mlp_dims", "window_sizes", "model_name", "pool_heads",
          "pool_mlp_dim"}
# Shrunken copies for the exactness check of a variant: timm builders let keyword arguments override their sizes.
_SHRINK = {"vit": {"embed_dim": 64, "depth": 2, "num_heads": 4},
           "swin": {"embed_dim": 24, "depths": (2, 2, 2, 2), "num_heads": (3, 6, 12, 24)}}
_CHECK_GRID = {"vit": 4, "swin": 16}  # patches per side of the small image the exactness check uses


@dataclass(frozen=True)
class Verdict:
    """What ofbdeploy says about one registered model."""

    name: str
    params: int
    family: str | None = None  # the family that prunes it
    variant: tuple = ()  # the family's options (sizes left out)
    refused: str | None = None  # the one-line reason
    crashed: str | None = None  # an exception that is not a refusal: a bug

    @property
    def verdict(self) -> str:
        return "crashed" if self.crashed else "refused" if self.refused else "supported"


def registry_names(modules: tuple[str, ...] = MODULES) -> list[str]:
    return [name for module in modules for name in timm.list_models(module=module)]


def variant(shape: Any) -> tuple:
    """The options of a dense shape without its sizes: models with the same variant prune the same way."""
    return (shape.family, *((k, v) for k, v in sorted(dataclasses.asdict(shape).items()) if k not in _SIZES))


def judge(name: str, max_params: int = MAX_PARAMS) -> Verdict | None:
    """The verdict on ``name`` (None when it has ``max_params`` parameters or more)."""
    with meta_device():
        model = timm.create_model(name, pretrained=False)
    params = sum(p.numel() for p in model.parameters())
    if params >= max_params:
        return None
    try:
        shape = read_shape(model, name)
    except OfbError as err:
        return Verdict(name, params, refused=str(err).split(": ", 1)[-1])
    except Exception as err:  # what the census exists to find
        return Verdict(name, params, crashed=f"{type(err).__name__}: {err}")
    return Verdict(name, params, family=shape.family, variant=variant(shape))


def census(names: list[str] | None = None, max_params: int = MAX_PARAMS) -> list[Verdict]:
    """Verdicts on every model of ``names`` (default: timm's ViT and Swin modules) under ``max_params``."""
    verdicts = (judge(name, max_params) for name in (names if names is not None else registry_names()))
    return [v for v in verdicts if v is not None]


def representatives(verdicts: list[Verdict]) -> list[Verdict]:
    """The smallest supported model of each variant."""
    best: dict[tuple, Verdict] = {}
    for v in verdicts:
        if v.family is not None and (v.variant not in best or v.params < best[v.variant].params):
            best[v.variant] = v
    return sorted(best.values(), key=lambda v: v.name)


def check_exactness(name: str, *, shrink: bool = True, seed: int = 0) -> Agreement:
    """One random architecture of ``name`` (shrunken to a few narrow blocks unless ``shrink`` is off), at a small
    image size, materialised and compared with the masked model."""
    with meta_device():
        probe = read_shape(timm.create_model(name), name)
    kwargs = dict(_SHRINK[probe.family]) if shrink else {}
    torch.manual_seed(seed)
    dense = build_dense(name, img_size=_CHECK_GRID[probe.family] * probe.patch_size, **kwargs)
    shape = read_shape(dense, name)
    family = family_of(shape)
    searchable = family.searchable(dense, family.space(shape), name)
    decide_randomly(searchable, random.Random(seed))
    return check_agreement(searchable, batch=2, seed=seed)
