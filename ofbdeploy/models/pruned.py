"""The materialised model on disk: ``model.safetensors`` + ``arch.json``, rebuilt as a plain timm model.

Loading needs only timm and this module (never the search code): the record names its family and says per
stage how wide the embedding is and per block how many heads of which width and how wide the MLP is; the
family assembles the model of its own timm class from timm's own modules with those sizes. No pickled
modules anywhere.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ofbdeploy.arch import ArchSpec, arch_digest, save_arch
from ofbdeploy.errors import ArchError, CheckpointError
from ofbdeploy.families import family_of, load_arch
from ofbdeploy.io import atomic_write

WEIGHTS_FILE = "model.safetensors"
ARCH_FILE = "arch.json"
ARCH_DIGEST_KEY = "arch_sha256"  # safetensors metadata: arch_digest() of the record saved beside

log = logging.getLogger("ofbdeploy.models")


def build_plain(spec: ArchSpec) -> nn.Module:
    """A plain timm model of ``spec``'s family with the widths of ``spec`` (weights uninitialised)."""
    return family_of(spec.base).build_plain(spec)


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """A module's state dict as safetensors (CPU, contiguous), written atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


def save_pruned(model: nn.Module, spec: ArchSpec, directory: str | Path) -> Path:
    """Write the weights (carrying the digest of their record), then the record (its presence marks a
    complete directory)."""
    directory = Path(directory)
    save_weights(model, directory / WEIGHTS_FILE, {"arch": ARCH_FILE, ARCH_DIGEST_KEY: arch_digest(spec)})
    save_arch(spec, directory / ARCH_FILE)
    return directory


def _check_pair(weights: Path, spec: ArchSpec, arch: Path) -> None:
    """Refuse weights saved with another record: equal tensor shapes do not make equal models (head counts
    can differ at the same qkv width)."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({err})") from None
    recorded = metadata.get(ARCH_DIGEST_KEY)
    if recorded is None:
        log.warning("%s: saved without the digest of its %s (an older ofbdeploy): the pair is not verified",
                    weights, ARCH_FILE)
    elif recorded != arch_digest(spec):
        raise ArchError(f"{weights}: was saved with another {ARCH_FILE} than {arch} (digest mismatch); keep each "
                        f"model's weights and record together")


def load_pruned(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a materialised model from its directory, in eval mode."""
    directory = Path(path)
    if directory.is_file() and directory.name == ARCH_FILE:
        directory = directory.parent
    if not directory.is_dir():
        raise CheckpointError(f"pruned model directory not found: {directory}")
    spec = load_arch(directory / ARCH_FILE)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing (a pruned model directory holds {WEIGHTS_FILE} and {ARCH_FILE})")
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({err})") from None
    _check_pair(weights, spec, directory / ARCH_FILE)
    model = build_plain(spec)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise ArchError(f"{weights}: weights do not fit {directory / ARCH_FILE}: {first[-1].strip()}") from None
    return model.to(device).eval()
