"""Every pruning method by its recipe name (``search.method``): its config class and its ``decide()``.

A method is a ``decide(model, cfg, job)`` in a module of this package (see ``method.Job``) and a config class
(on :class:`~ofbdeploy.prune.config.MethodCfg`) in a module free of torch, plus one row here naming both. The
recipe's ``search`` union and its validation come from the config classes; ``decide`` is imported when a run
asks for it, so reading a recipe or ``--help`` loads no torch (as the runtime registry does).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Union

from pydantic import Discriminator, Tag

from ofbdeploy.errors import OfbError
from ofbdeploy.prune.config import (
    TORCH_PRUNING,
    TORCH_PRUNING_INSTALL,
    L1Cfg,
    MethodCfg,
    RandomCfg,
    TorchPruningCfg,
    UniformCfg,
)
from ofbdeploy.prune.ofb.config import SearchCfg


@dataclass(frozen=True)
class Method:
    """One registered pruning method: its section, where its ``decide`` lives, and what it can prune."""

    config: type[MethodCfg]
    decider: str  # "module:function" in this package
    trains: bool = False  # its decision trains the weights (they are kept, and its images count as training)
    families: tuple[str, ...] | None = None  # model families it can prune (None: every family)
    requires: str | None = None  # an optional module it needs, and how to install it
    install: str = ""

    @property
    def name(self) -> str:
        """The recipe's ``search.method`` for it: the default of its config's ``method`` literal."""
        return str(self.config.model_fields["method"].default)

    @property
    def decide(self) -> Callable[..., Any]:
        """``decide(model, cfg, job) -> SearchResult``, imported now."""
        module, function = self.decider.split(":")
        return getattr(importlib.import_module(f"{__package__}.{module}"), function)

    def check(self, family: str) -> None:
        """Refuse, before anything is written, a method this install or this model cannot run (one line)."""
        if self.families is not None and family not in self.families:
            raise OfbError(f"search.method {self.name} prunes {', '.join(self.families)} models, not {family}; "
                           f"use search.method ofb")
        if self.requires is not None:
            try:
                importlib.import_module(self.requires)
            except ImportError:
                raise OfbError(f"search.method {self.name} needs the {self.requires} package: {self.install}") from None


DEFAULT = "ofb"
METHODS: dict[str, Method] = {method.name: method for method in (
    Method(SearchCfg, "ofb.engine:decide", trains=True),
    Method(UniformCfg, "scored:decide_uniform_l1", families=("vit",)),
    Method(L1Cfg, "scored:decide_l1", families=("vit",)),
    Method(RandomCfg, "scored:decide_random", families=("vit",)),
    Method(TorchPruningCfg, "torch_pruning:decide", families=("vit",), requires=TORCH_PRUNING,
           install=TORCH_PRUNING_INSTALL),
)}


def get_method(name: str) -> Method:
    """The method called ``name``; one line naming the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise OfbError(f"search.method: unknown method {name!r} (known: {', '.join(METHODS)})") from None


def _method_of(value: Any) -> str | None:
    """The union's tag: a section's ``method``, ``ofb`` when it has none (recipes written before methods
    existed); None, an "unknown method" error, for a name no method has."""
    if isinstance(value, dict):
        name = value.get("method", DEFAULT)
        return name if isinstance(name, str) and name in METHODS else None
    return getattr(value, "method", DEFAULT)


# The recipe's ``search`` field: one config class per method, told apart by ``method``.
MethodConfig = Annotated[
    Union[tuple(Annotated[m.config, Tag(name)] for name, m in METHODS.items())],  # noqa: UP007  (built from the table)
    Discriminator(_method_of, custom_error_type="unknown_method",
                  custom_error_message=f"method: expected one of {', '.join(METHODS)}"),
]
