"""Weights by name, the way timm users get them: ``deit_small_patch16_224.fb_in1k`` or ``hf-hub:org/repo``.

timm's pretrained configuration says where a model's weights live (a Hugging Face Hub repository, or a URL
for the few that are not on the Hub). This module only finds the *file* through the same caches timm uses
(the Hub cache, honouring ``HF_HOME`` and ``HF_HUB_OFFLINE``; torch hub's checkpoint directory for URLs) and
hands it to :func:`ofbdeploy.models.dense.load_weights`, so hub weights get exactly the checks and adaptation
of a local ``model.checkpoint`` (family filter, position-embedding resize, head reset, NaN refusal).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
from timm.models import get_pretrained_cfg

from ofbdeploy.errors import ModelError

HUB_PREFIX = "hf-hub:"
# The file names timm looks for in a Hub repository, safest first (timm's own order).
_HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class HubWeights:
    """Where a named model's weights were found: the timm architecture to build and the local file."""

    architecture: str
    file: Path
    source: str  # "hf-hub:<repo>" or the URL


def is_hub_name(name: str) -> bool:
    """True for ``hf-hub:org/repo`` names, whose architecture is read from the repository's config.json."""
    return isinstance(name, str) and name.startswith(HUB_PREFIX)


def find_weights(name: str) -> HubWeights:
    """The local weights file of ``name`` (downloaded into the cache when the network allows).

    A name that timm knows takes its pretrained tag's source (``name.tag``; the default tag otherwise);
    ``hf-hub:org/repo`` reads the repository's config.json for the architecture. Offline and not cached, or
    a name without hub weights, is a one-line :class:`ModelError` (exit 2).
    """
    if is_hub_name(name):
        repo = name[len(HUB_PREFIX):]
        config = json.loads(_hub_file(repo, (_CONFIG_FILE,), name).read_text(encoding="utf-8"))
        architecture = config.get("architecture") if isinstance(config, dict) else None
        if not isinstance(architecture, str) or not timm.is_model(architecture):
            raise ModelError(f"model.name: {name}'s config.json names no timm architecture ({architecture!r})")
        return HubWeights(architecture, _hub_file(repo, _HUB_WEIGHT_FILES, name), name)
    cfg = get_pretrained_cfg(name, allow_unregistered=False)
    architecture = name.split(".", 1)[0]
    if cfg is not None and cfg.hf_hub_id:
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HUB_WEIGHT_FILES
        return HubWeights(architecture, _hub_file(cfg.hf_hub_id, files, name), HUB_PREFIX + cfg.hf_hub_id)
    if cfg is not None and cfg.url:
        return HubWeights(architecture, _url_file(cfg.url, name), cfg.url)
    raise ModelError(f"model.pretrained: timm has no pretrained weights for {name}; set model.checkpoint instead")


def _hub_file(repo: str, files: tuple[str, ...], name: str) -> Path:
    """The first of ``files`` in the Hub repository ``repo`` (``repo@revision`` allowed), from the cache."""
    repo_id, _, revision = repo.partition("@")
    missing: list[str] = []
    for filename in files:
        try:
            return Path(hf_hub_download(repo_id=repo_id, filename=filename, revision=revision or None))
        except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: caught first
            if len(files) > 1 and filename != files[-1]:
                missing.append(filename)
                continue
            raise ModelError(
                f"model.pretrained: {name}: {filename} of {repo_id} is not in the local Hugging Face cache "
                "and the hub cannot be reached (offline or HF_HUB_OFFLINE=1); fetch it where there is network "
                "access (same HF_HOME) or set model.checkpoint") from None
        except EntryNotFoundError:  # online, and the repository has no such file: try the next name
            missing.append(filename)
        except (HFValidationError, HfHubHTTPError, OSError) as err:
            raise ModelError(f"model.pretrained: {name}: cannot get {filename} of {repo_id}: "
                             f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]) from None
    raise ModelError(f"model.pretrained: {name}: {repo_id} has none of {', '.join(missing)}")


def _url_file(url: str, name: str) -> Path:
    """torch hub's cached copy of ``url`` (the directory timm's URL loader uses), downloaded when absent."""
    target = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(target), progress=False)
    except Exception as err:  # urllib raises URLError, socket timeouts, HTTP errors: all mean "not reachable"
        raise ModelError(f"model.pretrained: {name}: {target.name} is not in {target.parent} and {url} cannot be "
                         f"downloaded ({type(err).__name__}); download it there or set model.checkpoint") from None
    return target


def model_source(name: str, checkpoint: str | None, pretrained: bool) -> tuple[str, Path | None]:
    """The timm architecture to build and the weights file to load for a recipe's ``model`` section: the local
    ``checkpoint``, the named model's hub weights (``pretrained``), or none."""
    if pretrained:
        found = find_weights(name)
        return found.architecture, found.file
    return name, Path(checkpoint).expanduser() if checkpoint else None
