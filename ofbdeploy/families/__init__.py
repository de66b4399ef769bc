"""Model families behind one interface, found through a registry (the way timm finds model builders).

``family_of_model(model)`` finds the adapter of a live timm model by its class; ``family_of(shape)`` the
adapter of a dense shape or an ``arch.json`` record by the family name it carries. The built-in families
(``vit``: timm's VisionTransformer and its variants; ``swin``: Swin Transformer v1) register themselves
when this package is imported.
"""

from __future__ import annotations

from typing import Any

from torch import nn

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


def family_of(shape: Any) -> Family:
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


from ofbdeploy.families import swin, vit  # noqa: E402,F401  (registers the built-in families)
