"""Model families behind one interface, found through a registry (the way timm finds model builders).

Each family is one folder holding everything about it (shape and cost, search space, supported variants and
refusals, rebuild, searchable model, checkpoint filter); adding one is a new folder plus one line below.
"""

from ofbdeploy.families.registry import (
    arch_from_dict,
    families,
    family_of,
    family_of_model,
    get_family,
    load_arch,
    read_shape,
    register_family,
    shape_from_dict,
    shape_types,
)
from ofbdeploy.families.swin.family import SwinFamily
from ofbdeploy.families.vit.family import ViTFamily

register_family(SwinFamily())
register_family(ViTFamily())

__all__ = ["arch_from_dict", "families", "family_of", "family_of_model", "get_family", "load_arch", "read_shape",
           "register_family", "shape_from_dict", "shape_types"]
