"""The two ways a runner request fails, light enough for the registry and the recipe validator to raise."""

from __future__ import annotations

from ofbdeploy.errors import OfbError


class BackendError(OfbError, ValueError):
    """A runner request that cannot work anywhere: unknown backend, missing model file, unsupported precision."""


class BackendUnavailable(OfbError, RuntimeError):
    """The backend exists but this machine lacks what it needs (a package, a GPU, an execution provider)."""
