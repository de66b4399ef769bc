"""The interface every model family implements, so that search, budgets, the pipeline and deploy stay
family-agnostic.

A family adapter knows one kind of timm model (the plain ViT and its variants, Swin, ...): how to read a
dense model's shape (refusing, in one line, what the search has no unit for), which groups a search has and
how they attach (its searchable model), how to rebuild a plain timm model from an :class:`ArchSpec`, what a
spec costs in MACs and parameters, and whether the latency table models it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from ofbdeploy.errors import OfbError

if TYPE_CHECKING:
    from ofbdeploy.arch import ArchSpec
    from ofbdeploy.search.searchable import SearchableModel

Widths = Mapping[str, tuple[int, ...]]


class Family(ABC):
    """One model family: found by the timm class of a model, or by the name an ``arch.json`` records."""

    name: ClassVar[str]
    shape_type: ClassVar[type]
    model_types: ClassVar[tuple[type, ...]]  # timm classes of this family (exact types: subclasses differ)
    # Why the latency table cannot steer a search of this family (None: it can).
    latency_refusal: ClassVar[str | None] = None

    def handles(self, model: nn.Module) -> bool:
        return type(model) in self.model_types

    @abstractmethod
    def read_shape(self, model: nn.Module, model_name: str = "") -> Any:
        """The dense shape of ``model``; a :class:`ModelError` naming the first part the search cannot prune."""

    @abstractmethod
    def space(self, shape: Any, align: int | None = None) -> Any:
        """The candidate widths of every group of a search of ``shape``."""

    @abstractmethod
    def searchable(self, model: nn.Module, space: Any, model_name: str = "", **options: float) -> SearchableModel:
        """``model`` with the family's bi-mask groups attached (the search's model)."""

    @abstractmethod
    def narrowest(self, shape: Any, space: Any) -> ArchSpec:
        """The smallest architecture the grids of ``space`` allow."""

    @abstractmethod
    def spec_from_widths(self, shape: Any, widths: Widths) -> ArchSpec:
        """The architecture (no kept indices) that group widths, keyed by group name, describe: for costing."""

    @abstractmethod
    def macs(self, spec: ArchSpec) -> float | Tensor:
        """Multiply-accumulates of one image (the FLOPs loss, the budget and every report use this)."""

    @abstractmethod
    def params(self, spec: ArchSpec) -> int:
        """Parameters of the model :meth:`build_plain` builds for ``spec``."""

    @abstractmethod
    def build_plain(self, spec: ArchSpec) -> nn.Module:
        """A plain timm model of the family's own class with the widths of ``spec`` (weights uninitialised)."""

    def validate(self, spec: ArchSpec) -> None:  # noqa: B027  (a hook: most families need no extra checks)
        """Family-specific consistency checks of a spec, beyond the generic ones (none by default)."""

    def checkpoint_filter(self, state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
        """Adapt a checkpoint's state dict to ``model`` the way timm adapts hub weights (identity by default)."""
        return state

    def head_keys(self, model: nn.Module) -> tuple[str, ...]:
        """State-dict keys of the classifier(s), which a checkpoint with other classes (or none) leaves out."""
        return ("head.weight", "head.bias")

    def check_img_size(self, shape: Any) -> int:
        """The image size ``ofbdeploy selfcheck`` builds a model at by default (its own unless that is costly)."""
        return shape.img_size

    def summary(self, shape: Any) -> str:
        """One line on the dense model's structure and options, for selfcheck and logs."""
        return ""

    def check_latency(self) -> None:
        """Refuse a latency budget for a family the latency table does not model."""
        if self.latency_refusal is not None:
            raise OfbError(f"latency budgets are not available for {self.name} models: {self.latency_refusal}")
