"""ofbdeploy: OFB search, materialisation and deployment for timm Vision Transformers."""

from ofbdeploy.arch import ArchSpec, ViTShape
from ofbdeploy.models.pruned import load_pruned, save_pruned

__all__ = ["ArchSpec", "ViTShape", "load_pruned", "save_pruned"]
__version__ = "0.1.0"
