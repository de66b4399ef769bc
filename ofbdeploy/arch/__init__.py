"""What a pruned model is, independent of any family: the spec, its record on disk, width grids and generic cost.

Nothing here imports a model family: a shape carries its own cost and checks, and reading a record is given
the family registry's shape types.
"""

from ofbdeploy.arch.record import ARCH_FORMAT, arch_digest, arch_from_dict, arch_to_dict, save_arch
from ofbdeploy.arch.spec import ArchSpec, BlockSpec, ModelShape, Widths

__all__ = ["ARCH_FORMAT", "ArchSpec", "BlockSpec", "ModelShape", "Widths", "arch_digest", "arch_from_dict",
           "arch_to_dict", "save_arch"]
