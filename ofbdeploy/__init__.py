"""ofbdeploy: OFB search, materialisation and deployment for timm Vision Transformers."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ArchSpec", "ViTShape", "load_pruned", "save_pruned"]
__version__ = "0.1.0"

# Imported on first use (PEP 562), so that `ofbdeploy --help` and a refused input answer without first
# loading torch and timm.
_LAZY = {"ArchSpec": "ofbdeploy.arch", "ViTShape": "ofbdeploy.families.vit.shape",
         "load_pruned": "ofbdeploy.models.pruned", "save_pruned": "ofbdeploy.models.pruned"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ofbdeploy' has no attribute {name!r}")
