"""Recipes: one YAML file describes a whole run; strict, so that a typo is an error, not a silent default.

Every section rejects unknown keys; every problem is reported as one line naming the file, the dotted
field and what was expected. ``--set section.key=value`` overrides are parsed as YAML scalars and
validated like the file. The resolved recipe is written into the run directory.
"""

from __future__ import annotations

import difflib
import math
import reprlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from ofbdeploy.config import MAX_BATCH, MAX_EPOCHS, Strict
from ofbdeploy.deploy.config import Backend, ExportCfg, Precision, ProfileCfg
from ofbdeploy.errors import OfbError, one_line
from ofbdeploy.io import atomic_write_text, read_text
from ofbdeploy.latency.config import LatencyTargetCfg
from ofbdeploy.prune.config import MethodCfg
from ofbdeploy.prune.ofb.config import LossWeights, PMIMCfg, SearchCfg
from ofbdeploy.prune.registry import METHODS, MethodConfig
from ofbdeploy.report.config import BudgetCfg, LatencyLimit, SpeedupLimit
from ofbdeploy.train.config import DistillCfg

__all__ = [  # sections declared by the layers that read them, re-exported for recipe users
    "Backend", "BudgetCfg", "ExportCfg", "LatencyLimit", "LatencyTargetCfg", "LossWeights", "MethodCfg", "PMIMCfg",
    "Precision", "ProfileCfg", "Recipe", "RecipeError", "SearchCfg", "SpeedupLimit", "load_recipe",
]


class RecipeError(OfbError, ValueError):
    """A recipe that cannot be run as written."""


class ModelCfg(Strict):
    """The dense model the run starts from."""

    name: str = Field(description="timm model name, e.g. deit_small_patch16_224 (a pretrained tag such as "
                      "deit_small_patch16_224.fb_in1k allowed), hf-hub:org/repo, or an ofb_vit_* test config")
    checkpoint: str | None = Field(None, description="local weights file (DeiT/timm .pth or .safetensors)")
    pretrained: bool = Field(False, description="weights by name through timm's pretrained config and the Hugging "
                             "Face / torch hub caches (HF_HOME, HF_HUB_OFFLINE honoured); checked and adapted like "
                             "a local checkpoint")
    num_classes: int | None = Field(None, ge=1, le=1 << 20, description="classifier size; default: the dataset's")
    img_size: int | None = Field(None, ge=8, le=4096, description="input size; default: the model's own")
    overrides: dict[str, Any] = Field(default_factory=dict, description="extra timm constructor arguments")

    @model_validator(mode="after")
    def _one_source(self) -> ModelCfg:
        if self.pretrained and self.checkpoint:
            raise ValueError("give one of checkpoint and pretrained: true, not both")
        if self.name.startswith("hf-hub:") and not self.pretrained:
            raise ValueError("an hf-hub: name is its weights: set pretrained: true")
        return self

    @field_validator("overrides")
    @classmethod
    def _plain_values(cls, value: dict[str, Any]) -> dict[str, Any]:
        """Free-form constructor arguments still have to be values a constructor can take: identifiers for names,
        finite numbers (a NaN drop rate builds a model that fails mid-run), nesting of sane depth."""
        _check_plain(value, "", 0)
        return value


class AugmentCfg(Strict):
    hflip: float = Field(0.0, ge=0, le=1)
    crop_padding: int = Field(0, ge=0, le=256)
    random_erasing: float = Field(0.0, ge=0, le=1)
    randaugment: str | None = Field(None, description="timm RandAugment string (ImageFolder data only)")


class DataCfg(Strict):
    kind: Literal["digits", "fashion_mnist", "imagefolder", "synthetic"]
    root: str | None = None
    val_fraction: float = Field(0.2, gt=0, lt=1)
    limit_train: int | None = Field(None, ge=1)
    limit_val: int | None = Field(None, ge=1)
    batch_size: int = Field(128, ge=1, le=1 << 20, description="images per optimiser step, over all processes "
                            "(the global batch the learning rates are scaled by)")
    max_batch_per_process: int | None = Field(
        None, ge=1, le=1 << 20, description="memory cap: a process takes at most this many images per forward; a "
                                            "larger share of the batch is split into gradient-accumulation steps")
    eval_batch_size: int = Field(256, ge=1, le=MAX_BATCH, description="images per evaluation forward, per process")
    workers: int = Field(0, ge=0, le=256, description="loader worker processes per process")
    repeated_aug: int = Field(1, ge=1, le=64, description="each training image this many times per epoch, the copies "
                                                   "on different processes (DeiT/OFB use 3)")
    augment: AugmentCfg = Field(default_factory=AugmentCfg)


class PretrainCfg(Strict):
    """Training of the dense model before the search, for users without pretrained weights."""

    epochs: int = Field(0, ge=0, le=MAX_EPOCHS, description="0: use the dense model as built/loaded")
    lr: float = Field(1e-3, gt=0, description="learning rate per 256 images")
    min_lr: float = Field(1e-5, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: int = Field(1, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    drop_path: float = Field(0.0, ge=0, lt=1, description="stochastic depth of the last block (linear in depth)")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap on optimiser steps per epoch")


class FinetuneCfg(Strict):
    epochs: int = Field(300, ge=0, le=MAX_EPOCHS)
    lr: float = Field(1.5e-4, gt=0, description="per 256 images (6e-4 at batch 1024, the authors' setting)")
    min_lr: float = Field(1e-5, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: int = Field(5, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    mixup: float = Field(0.0, ge=0)
    cutmix: float = Field(0.0, ge=0)
    ema_decay: float | None = Field(None, gt=0, lt=1)
    drop_path: float = Field(0.0, ge=0, lt=1, description="stochastic depth of the last block (linear in depth)")
    distill: DistillCfg = Field(default_factory=DistillCfg)
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap on optimiser steps per epoch")


class Recipe(Strict):
    """A whole run: model -> data -> (pretrain) -> search -> materialise -> finetune -> export -> profile."""

    name: str = "run"
    output_dir: str = Field("runs/run", description="the run directory")
    seed: int = Field(0, ge=0, lt=2**32)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["off", "bf16", "fp16"] = Field("off", description="autocast precision of search and training "
                                                                    "(CUDA or CPU); fp16 adds loss scaling")
    strict_fp32: bool = Field(False, description="fp32 matrix products in full IEEE fp32 on CUDA (default: TF32)")
    dist_timeout_min: float = Field(
        30.0, gt=0, le=7 * 24 * 60, description="torchrun: minutes a collective may wait for a rank before the run "
        "fails, at most a week (waits for rank 0's solo work, such as a latency table, are not bounded by it)")
    model: ModelCfg
    data: DataCfg
    pretrain: PretrainCfg = Field(default_factory=PretrainCfg)
    search: MethodConfig = Field(description="the pruning method (method: ofb, the default; torch-pruning, l1, "
                                             "uniform, random) and its settings")
    finetune: FinetuneCfg = Field(default_factory=FinetuneCfg)
    export: ExportCfg = Field(default_factory=ExportCfg)
    profile: ProfileCfg = Field(default_factory=ProfileCfg)
    budget: BudgetCfg = Field(default_factory=BudgetCfg)

    @field_validator("amp", mode="before")
    @classmethod
    def _off_is_off(cls, value: Any) -> Any:
        """YAML reads a bare ``off`` (``--set amp=off``, ``amp: off``) as false: it means "off"."""
        return "off" if value is False else value

    @model_validator(mode="after")
    def _int8_is_profiled(self) -> Recipe:
        """Asking for an int8 export is asking what it buys: its latency is profiled beside fp32 unless the recipe
        lists its own profile.precisions."""
        if self.export.int8 and "precisions" not in self.profile.model_fields_set and "int8" not in \
                self.profile.precisions:
            object.__setattr__(self.profile, "precisions", [*self.profile.precisions, "int8"])
        return self

    @model_validator(mode="after")
    def _latency_target_is_measured(self) -> Recipe:
        """A search latency budget is checked against a measurement, so the profile must take it."""
        target, profile = self.search.latency_target, self.profile
        if target is not None and not (profile.enabled and target.backend in profile.backends
                                       and target.batch in profile.batches and target.precision in profile.precisions):
            raise ValueError(f"search.latency targets {target.backend} {target.precision} batch {target.batch}, "
                             f"which profile does not measure: add it to profile.backends/batches/precisions")
        return self

    def to_yaml(self) -> str:
        """The resolved recipe, every default written out (``search.method`` included)."""
        return yaml.safe_dump(self.model_dump(mode="json", context={"resolved": True}), sort_keys=False)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_yaml())


_MAX_OVERRIDE_DEPTH = 8


def _check_plain(value: Any, where: str, depth: int) -> None:
    """Refuse what no timm constructor argument is: non-identifier names, NaN or infinite numbers, deep nesting."""
    if depth > _MAX_OVERRIDE_DEPTH:
        raise ValueError(f"{where or 'overrides'}: nested deeper than {_MAX_OVERRIDE_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or not key.isidentifier():
                raise ValueError(f"{where + '.' if where else ''}{key!r}: not a constructor argument name")
            _check_plain(item, f"{where + '.' if where else ''}{key}", depth + 1)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]", depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: {value} is not a finite number")


MAX_RECIPE_BYTES = 256 << 10  # a recipe is a few kB; anything near this is not a recipe
MAX_DEPTH = 64  # nesting of sections and lists (recipes use 4 or 5); also keeps PyYAML's scanner linear
MAX_YAML_NODES = 100_000  # after alias expansion: an alias bomb is refused before it is built
MAX_EXTENDS = 16
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML has it: same results, far faster


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe; every problem is a one-line :class:`RecipeError`.

    A recipe may start with ``extends: other.yaml`` (relative to itself): the other recipe is read first
    and this one's keys are merged over it, section by section. Files are read as bounded UTF-8 text and
    YAML aliases are counted before anything is built, so a hostile file costs milliseconds, not memory.
    """
    path = Path(path)
    data = _read_with_parents(path, seen=())
    for item in overrides:
        _apply_override(data, item)
    _refuse_nul(data)
    return parse_recipe(data, str(path))


def _read_with_parents(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if len(seen) > MAX_EXTENDS:
        raise RecipeError(f"{path}: more than {MAX_EXTENDS} levels of 'extends'")
    if path.resolve() in seen:
        raise RecipeError(f"{path}: extends itself through {' -> '.join(p.name for p in seen)}")
    try:
        text = read_text(path, "recipe", MAX_RECIPE_BYTES)
    except OfbError as err:
        raise RecipeError(str(err)) from None
    data = safe_yaml(text, str(path))
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping of sections (model, data, search, ...)")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent or "\0" in parent:
        raise RecipeError(f"{path}: extends: expected the path of another recipe, got {_short(parent)}")
    return _merge(_read_with_parents(path.parent / parent, (*seen, path.resolve())), data)


def safe_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` with the expanded size counted first: YAML aliases may share a node many times
    (a "billion laughs" file is a few hundred bytes), so the node graph is measured before it is turned
    into Python objects, and recursive aliases are refused."""
    if _flow_depth(text) > MAX_DEPTH:
        raise RecipeError(f"{source}: YAML nested more than {MAX_DEPTH} levels")
    try:
        loader = _LOADER(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _check_expansion(node, source)
            _refuse_duplicate_keys(node, source)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        raise RecipeError(f"{source}: not valid YAML ({one_line(str(err).splitlines()[0], 200)})") from None
    except RecursionError:
        raise RecipeError(f"{source}: YAML nested too deeply") from None


def _flow_depth(text: str) -> int:
    """The deepest nesting of brackets and braces, counted everywhere (quoted or not: an over-count only
    refuses a file no recipe resembles)."""
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth = max(0, depth - 1)
    return deepest


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(root: yaml.Node, source: str) -> None:
    """Refuse a document whose aliases expand past :data:`MAX_YAML_NODES` nodes, or refer to themselves."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in _children(node))
            if sizes[key] > MAX_YAML_NODES:
                raise RecipeError(f"{source}: YAML holds more than {MAX_YAML_NODES} values once its aliases are "
                                  f"expanded; a recipe has a few hundred")
            continue
        if key in sizes:
            continue
        on_path.add(key)
        if len(on_path) > MAX_DEPTH:
            raise RecipeError(f"{source}: YAML nested more than {MAX_DEPTH} levels")
        stack.append((node, True))
        for child in _children(node):
            if id(child) in on_path:
                raise RecipeError(f"{source}: a YAML alias refers to a value that contains it (recursive)")
            if id(child) not in sizes:
                stack.append((child, False))


def _refuse_duplicate_keys(root: yaml.Node, source: str) -> None:
    """PyYAML keeps the last of two equal keys in a mapping and drops the first without a word (a whole
    section, or a budget limit); refuse that, naming the key and both lines. Runs after the expansion check,
    so the walk is bounded; each node is visited once."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], yaml.Node] = {}
            for key, _ in node.value:
                if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                    continue
                earlier = first.setdefault((key.tag, key.value), key)
                if earlier is not key:
                    raise RecipeError(f"{source}: line {key.start_mark.line + 1}: duplicate key "
                                      f"{_short(key.value)} (first at line {earlier.start_mark.line + 1})")
        stack.extend(_children(node))


def _refuse_nul(data: Any) -> None:
    """NUL bytes cannot be in file names or model names; refuse them here rather than deep in os.stat."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str) and "\0" in value:
            raise RecipeError(f"{where or 'recipe'}: NUL character in a string")
        if isinstance(value, dict):
            stack += [(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(v, f"{where}[{i}]") for i, v in enumerate(value)]


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def parse_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate a recipe given as a dict."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(f"{source}: {_first_problem(err)}") from None
    except RecursionError:
        raise RecipeError(f"{source}: nested too deeply") from None


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise RecipeError(f"--set {_short(item)}: expected section.key=value")
    try:
        value = safe_yaml(raw, f"--set {key}") if raw else None
    except RecipeError as err:
        if "not valid YAML" not in str(err):
            raise
        value = raw  # not YAML: the plain string
    node = data
    parts = key.split(".")
    if len(parts) > 8 or not all(parts):
        raise RecipeError(f"--set {_short(item)}: expected section.key=value (dotted names, at most 8 parts)")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"--set {_short(item)}: {_short(part)} is not a section")
        node = child
    node[parts[-1]] = value


def _short(value: Any) -> str:
    """A bounded repr: an error message never echoes a huge (or alias-expanded) input."""
    return one_line(_REPR.repr(value), 120)


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 80, 80, 2, 4, 4


def _first_problem(err: ValidationError) -> str:
    problem = err.errors()[0]
    loc = _recipe_loc(problem["loc"])
    where = one_line(".".join(str(p) for p in loc), 120)
    if problem["type"] == "extra_forbidden":
        method = problem["loc"][1] if loc != problem["loc"] else "ofb"
        under = f" under search.method {method}" if method != "ofb" else ""  # e.g. an OFB key left by --set
        return f"{where}: unknown field{under}{_suggest(loc, problem['loc'])}"
    if problem["type"] == "missing":
        return f"{where}: required field is missing"
    got = problem.get("input")
    if problem["type"] == "unknown_method":  # the search union's tag (see ofbdeploy.prune.registry)
        return f"{where}.method: expected one of {', '.join(METHODS)}, got {_short(got.get('method'))}"
    message = problem["msg"].removeprefix("Value error, ")
    if problem["type"] == "value_error" or isinstance(got, dict):
        return f"{where}: {message}" if where else message
    return f"{where}: {message}, got {_short(got)}"


def _recipe_loc(loc: tuple) -> tuple:
    """An error's location as the recipe spells it: pydantic puts the union member's tag after ``search``
    (``search.l1.epochs``), which is not a key of the recipe (``search.epochs``)."""
    if len(loc) > 1 and loc[0] == "search" and loc[1] in METHODS:
        return (loc[0], *loc[2:])
    return loc


def _suggest(loc: tuple, raw: tuple) -> str:
    """'did you mean' for a misspelt key, looked up among the fields of the section it sits in (``raw``, the
    location pydantic gives, names the method whose section it is)."""
    model: type[BaseModel] = Recipe
    for depth, part in enumerate(loc[:-1]):
        if depth == 0 and part == "search":
            model = METHODS[str(raw[1])].config if len(raw) > len(loc) else SearchCfg
            continue
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    close = difflib.get_close_matches(str(loc[-1])[:100], list(model.model_fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(model.model_fields)})"
