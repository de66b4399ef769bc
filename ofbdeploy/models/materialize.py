"""Searched masks -> a physically smaller plain timm model that computes what the masked model computes.

The search has already sliced the layers to the decided widths; what is left is to fold each group's
multiplier (and the attention scale correction) into the weights in front of it (each family's searchable
model knows where), and to rebuild the model from timm parts so that no ofbdeploy layer or hook remains.
"""

from __future__ import annotations

from torch import nn

from ofbdeploy.arch import ArchSpec
from ofbdeploy.errors import ArchError
from ofbdeploy.models.pruned import build_plain
from ofbdeploy.search.searchable import SearchableModel

# Masked and materialised outputs may differ by float rounding only: the largest |difference| the pipeline and
# the benchmarks accept, and selfcheck's relative to the outputs' size.
TOLERANCE = 1e-4


def materialize(searchable: SearchableModel) -> tuple[nn.Module, ArchSpec]:
    """Build the plain pruned model (eval mode) and its architecture record from a decided search."""
    undecided = [name for name, group in searchable.groups() if not group.is_decided]
    if undecided:
        raise ArchError(
            f"cannot materialise: {len(undecided)} group(s) still undecided ({', '.join(undecided[:3])}"
            f"{', ...' if len(undecided) > 3 else ''}); finish the search or decide them first"
        )
    spec = searchable.arch_spec()
    model = build_plain(spec)
    model.load_state_dict(searchable.folded_state_dict(), strict=True)
    return model.eval(), spec
