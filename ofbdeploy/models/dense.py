"""Build dense timm models of a supported family by name and load local checkpoints into them.

Checkpoint adaptation lives here, outside the model (as in timm): the model stays a plain timm model of its
family's class, and every file format users have is normalised to its state dict (with the family's own
filter, the one timm applies to hub weights).
"""

import difflib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.serialization import get_unsafe_globals_in_checkpoint

import ofbdeploy.models.zoo  # noqa: F401  (registers the ofb_vit_* names with timm)
from ofbdeploy.errors import CheckpointError, ModelError
from ofbdeploy.families import family_of_model

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
# Where training scripts nest the weights: DeiT uses "model", timm's train.py "state_dict".
_NESTED_KEYS = ("model", "state_dict", "model_ema")
_DDP_PREFIX = "module."
_SHOWN_KEYS = 4
_MAX_NAME = 200
# timm.create_model arguments that would fetch or read weights behind the recipe's back.
_HUB_ARGUMENTS = frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict",
                            "checkpoint_path", "cache_dir", "features_only"})


@dataclass(frozen=True)
class LoadReport:
    """What load_weights did, so callers can log or assert on adaptations instead of guessing."""

    path: Path
    format: str  # "safetensors", "torch" (bare state dict) or "torch[<key>]" (nested under key)
    reset_head: bool  # the model keeps its freshly initialised classifier (other class count, or none in the file)
    resized_pos_embed: bool
    missing: list[str]
    unexpected: list[str]


def build_dense(
    name: str,
    *,
    num_classes: int | None = None,
    img_size: int | None = None,
    checkpoint: str | Path | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build a timm model of a supported family without touching the hub; weights only ever come from a local
    checkpoint. A model of no supported family is a one-line :class:`ModelError`."""
    _check_known(name)
    refused = sorted(set(overrides) & _HUB_ARGUMENTS)
    if refused:
        raise ModelError(f"model.overrides.{refused[0]}: not allowed; weights come only from a local model.checkpoint")
    kwargs = dict(overrides)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception as err:  # any failure of timm's constructor here comes from the arguments the user gave
        given = ", ".join(f"{k}={v!r}"[:60] for k, v in kwargs.items()) or "its defaults"
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise ModelError(f"model: timm cannot build {name} with {given} (model.overrides, img_size, num_classes): "
                         f"{reason}"[:400]) from None
    family_of_model(model)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model


def _check_known(name: str) -> None:
    """Fail early with suggestions; also keeps hub-prefixed names from reaching the network."""
    if not isinstance(name, str) or not name or len(name) > _MAX_NAME:
        raise ModelError(f"model name: expected a timm model name of at most {_MAX_NAME} characters")
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"close matches: {', '.join(close)}" if close else "see timm.list_models()"
    raise ModelError(f"unknown model {name!r}; {hint}")


def load_weights(model: nn.Module, path: str | Path) -> LoadReport:
    """Load a local DeiT/timm/DDP/safetensors checkpoint, adapting it the way timm adapts hub weights."""
    path = Path(path).expanduser()
    raw, fmt = _read_state_dict(path)
    state = {k.removeprefix(_DDP_PREFIX): v for k, v in raw.items()}
    family = family_of_model(model)
    head_keys = family.head_keys(model)
    try:
        adapted = family.checkpoint_filter(state, model)
    except Exception as err:  # timm's adaptation (pos_embed resampling, ...) on tensors of the wrong kind
        raise CheckpointError(f"{path}: does not fit the model ({type(err).__name__}: {err})"[:400]) from None
    resized = "pos_embed" in state and "pos_embed" in adapted and adapted["pos_embed"].shape != state["pos_embed"].shape
    if resized:
        old, new = tuple(state["pos_embed"].shape), tuple(adapted["pos_embed"].shape)
        logger.info("%s: resized pos_embed %s -> %s", path, old, new)
    expected = model.state_dict()
    backbone = _is_backbone(adapted, expected, head_keys)
    reset_head = backbone or _head_differs(adapted, expected, head_keys)
    if backbone:
        logger.info("%s: a backbone without a classifier; the model's head is freshly initialised", path)
    elif reset_head:
        logger.info("%s: classifier shape differs from the model's; keeping its fresh head", path)
        adapted = {k: v for k, v in adapted.items() if k not in head_keys}
    allowed_missing = set(head_keys) if reset_head else set()
    problems = _mismatches(adapted, expected, allowed_missing)
    if problems:
        more = f" (+{len(problems) - _SHOWN_KEYS} more)" if len(problems) > _SHOWN_KEYS else ""
        raise CheckpointError(f"{path}: does not fit the model: {'; '.join(problems[:_SHOWN_KEYS])}{more}")
    result = model.load_state_dict(adapted, strict=False)
    return LoadReport(path, fmt, reset_head, resized, list(result.missing_keys), list(result.unexpected_keys))


def _read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Read the file safely (never unpickling code) and return its state dict plus a format label."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise CheckpointError(f"{path}: unsupported checkpoint extension; expected one of {CHECKPOINT_SUFFIXES}")
    if suffix == ".safetensors":
        try:
            state = load_file(path, device="cpu")
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
        return _tensors_only(state, path), "safetensors"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({err.strerror or err})") from None
    except Exception as err:  # a file that is not a checkpoint fails in many ways (KeyError on text, ...)
        raise CheckpointError(_unreadable_message(path)) from err
    return _unwrap(obj, path)


def _unreadable_message(path: Path) -> str:
    """Name the pickled classes when the file has any, since that is the common case (full training dumps)."""
    try:
        unsafe = get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint at all, or a truncated one
        unsafe = []
    if unsafe:
        return f"{path}: holds pickled Python objects ({', '.join(unsafe[:3])}), not a state dict"
    return f"{path}: not a readable PyTorch checkpoint"


def _unwrap(obj: object, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Find the state dict in a bare dict or one nested by a training script."""
    if isinstance(obj, Mapping):
        for key in _NESTED_KEYS:
            if isinstance(obj.get(key), Mapping):
                return _tensors_only(obj[key], path), f"torch[{key}]"
        return _tensors_only(obj, path), "torch"
    raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")


def _tensors_only(state: Mapping[Any, Any], path: Path) -> dict[str, torch.Tensor]:
    """Reject dicts that are not name -> tensor, which would otherwise fail deep inside load_state_dict."""
    bad = [str(k)[:60] for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise CheckpointError(f"{path}: not a state dict; non-tensor entries: {', '.join(bad[:_SHOWN_KEYS])}")
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise CheckpointError(f"{path}: holds NaN or infinite values ({', '.join(broken[:_SHOWN_KEYS])})")
    return dict(state)


def _is_backbone(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                 head_keys: tuple[str, ...]) -> bool:
    """True for a checkpoint with no classifier at all (DINOv2, MAE, CLIP image towers) loaded into a model that
    has one: the head stays as initialised and is trained with the rest."""
    return not any(k in state for k in head_keys) and any(k in expected for k in head_keys)


def _head_differs(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                  head_keys: tuple[str, ...]) -> bool:
    """True when the checkpoint's classifier cannot be used as is (other class count, or no head at all)."""
    return any(k in state and (k not in expected or state[k].shape != expected[k].shape) for k in head_keys)


def _mismatches(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], allowed_missing: set[str]
) -> list[str]:
    """List every key that would load wrongly, checked before loading so the model is never half-loaded."""
    problems = [
        f"{k} expected {tuple(expected[k].shape)} got {tuple(v.shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems += [
        f"{k} missing (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k not in state and k not in allowed_missing
    ]
    problems += [f"{k} unexpected (got {tuple(v.shape)})" for k, v in state.items() if k not in expected]
    return problems
