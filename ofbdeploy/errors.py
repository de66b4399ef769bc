"""Error types, so callers (and the CLI) can tell user mistakes from bugs."""


class OfbError(Exception):
    """Base for every error ofbdeploy raises on purpose."""


class CheckpointError(OfbError, ValueError):
    """A weights file is missing, unreadable, or does not fit the model."""


class ModelError(OfbError, ValueError):
    """A model name is unknown or does not build a timm VisionTransformer."""


class ArchError(OfbError, ValueError):
    """An architecture record (arch.json) or a pruning request that is inconsistent."""
