"""The interface every model family implements, so that search, budgets, the pipeline and deploy stay
family-agnostic.

A family adapter knows one kind of timm model (the plain ViT and its variants, Swin, ...): how to read a
dense model's shape (refusing, in one line, what the search has no unit for), which groups a search has and
how they attach (its searchable model) and how to rebuild a plain timm model from an :class:`ArchSpec`.
What a spec costs (MACs, and the work counts a latency table weighs) and which specs are consistent, the
family's dense *shape* answers (see :class:`~ofbdeploy.arch.ModelShape`). The refusals every family shares
live here too.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import Tensor, nn

from ofbdeploy.arch import ArchSpec
from ofbdeploy.errors import ModelError
from ofbdeploy.search.searchable import SearchableModel


class Family(ABC):
    """One model family: found by the timm class of a model, or by the name an ``arch.json`` records."""

    name: ClassVar[str]
    shape_type: ClassVar[type]
    model_types: ClassVar[tuple[type, ...]]  # timm classes of this family (exact types: subclasses differ)

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
    def build_plain(self, spec: ArchSpec) -> nn.Module:
        """A plain timm model of the family's own class with the widths of ``spec`` (weights uninitialised)."""

    @abstractmethod
    def block_prefix(self, shape: Any, index: int) -> str:
        """The state-dict prefix of block ``index`` (numbered across stages) in the plain timm model."""

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


def kind(module: object) -> str:
    """The class name of ``module``: how a refusal names a part (never an ``AttributeError``)."""
    return type(module).__name__


def norm_problems(model: nn.Module) -> list[str]:
    """What every family needs of its norms: affine LayerNorms, one eps (the records keep one)."""
    problems = []
    norms = [m for m in model.modules() if "Norm" in kind(m) and not isinstance(m, nn.LayerNorm)]
    if norms:
        problems.append(f"norm layer {kind(norms[0])} (supported: LayerNorm)")
    layer_norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    if any(m.weight is None or m.bias is None for m in layer_norms):
        problems.append("layer norm without affine weight and bias")
    if len({m.eps for m in layer_norms}) > 1:
        problems.append("layer norms with different eps")
    return problems


def refuse(problems: list[str], what: str) -> None:
    """One line for the first problem (``what`` names the family's model); nothing when there is none."""
    if problems:
        raise ModelError(f"this {what} cannot be pruned by ofbdeploy: {problems[0]}")
