"""Every pruning method by its recipe name (``search.method``): its config class and its ``decide()``.

Adding a method is one module with a config class (on :class:`~ofbdeploy.prune.config.MethodCfg`) and a
``decide(model, cfg, job)``, plus one row here (its name is its config's ``method``); the recipe's ``search``
union, its validation and the run's search stage follow from this table.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import Discriminator, Tag

from ofbdeploy.errors import OfbError
from ofbdeploy.prune import scored, torch_pruning
from ofbdeploy.prune.method import Method
from ofbdeploy.prune.ofb import engine as ofb
from ofbdeploy.prune.ofb.config import SearchCfg

DEFAULT = "ofb"
METHODS: dict[str, Method] = {method.name: method for method in (
    Method(SearchCfg, ofb.decide, trains=True),
    Method(scored.UniformCfg, scored.decide_uniform_l1, families=("vit",)),
    Method(scored.L1Cfg, scored.decide_l1, families=("vit",)),
    Method(scored.RandomCfg, scored.decide_random, families=("vit",)),
    Method(torch_pruning.TorchPruningCfg, torch_pruning.decide, families=("vit",), requires=torch_pruning.MODULE,
           install=torch_pruning.INSTALL),
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
