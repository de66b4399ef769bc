"""The family registry (the way timm finds model builders): name -> :class:`Family`.

``family_of_model(model)`` finds the adapter of a live timm model by its class; ``family_of(shape)`` the
adapter of a dense shape or an ``arch.json`` record by the family name it carries; ``load_arch`` reads a
record with the registered shape types. Infrastructure asks this registry and never imports a family; the
built-in families are registered by :mod:`ofbdeploy.families`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ofbdeploy.arch import ArchSpec, ModelShape
from ofbdeploy.arch import record as arch_record
from ofbdeploy.errors import ArchError, ModelError
from ofbdeploy.families.base import Family

_FAMILIES: dict[str, Family] = {}
# Why timm classes close to a supported family are not part of it (what the search has no unit for).
_UNSUPPORTED = {
    "Eva": "rotary position embeddings and SwiGLU MLPs",
    "VisionTransformerRelPos": "relative-position attention",
    "VisionTransformerSAM": "windowed attention with relative positions",
    "SwinTransformerV2": "Swin v2's cosine attention with a continuous position-bias MLP (Swin v1 is supported)",
    "SwinTransformerV2Cr": "Swin v2's cosine attention with a continuous position-bias MLP (Swin v1 is supported)",
}


def register_family(family: Family) -> Family:
    """Add a family adapter to the registry (a later one of the same name replaces the earlier)."""
    _FAMILIES[family.name] = family
    return family


def families() -> list[Family]:
    return list(_FAMILIES.values())


def get_family(name: str) -> Family:
    """The family called ``name`` (as an arch.json records it)."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ArchError(f"family: unknown model family {name!r} (known: {', '.join(_FAMILIES)})") from None


def family_of(shape: ModelShape) -> Family:
    """The family of a dense shape (``ViTShape``, ``SwinShape``, ...)."""
    return get_family(shape.family)


def family_of_model(model: nn.Module) -> Family:
    """The family whose timm class ``model`` is; a one-line :class:`ModelError` for any other model."""
    for family in _FAMILIES.values():
        if family.handles(model):
            return family
    kind = type(model).__name__
    known = ", ".join(t.__name__ for f in _FAMILIES.values() for t in f.model_types)
    why = f": {_UNSUPPORTED[kind]}" if kind in _UNSUPPORTED else ""
    raise ModelError(f"{kind} models cannot be pruned by ofbdeploy{why} (supported timm classes: {known})")


def read_shape(model: nn.Module, model_name: str = "") -> Any:
    """The dense shape of any supported model, or a one-line :class:`ModelError` saying why not."""
    return family_of_model(model).read_shape(model, model_name)


def shape_types() -> dict[str, type]:
    """Family name -> dense shape type: what reading an ``arch.json`` needs."""
    return {name: family.shape_type for name, family in _FAMILIES.items()}


def arch_from_dict(data: Any, source: str = "arch.json") -> ArchSpec:
    """An architecture record (a parsed ``arch.json``, or one stored in a checkpoint) of any registered family."""
    return arch_record.arch_from_dict(data, shape_types(), source)


def shape_from_dict(family: str, data: Any, where: str = "shape") -> Any:
    """The dense shape of a registered family from its JSON fields (as a latency table stores it)."""
    return arch_record.shape_from_dict(family, data, shape_types(), where)


def load_arch(path: str | Path) -> ArchSpec:
    """Read and validate an ``arch.json`` of any registered family."""
    return arch_record.load_arch(path, shape_types())
