"""The strict base of every configuration section: a typo is an error, not a silent default.

Each layer declares the section it reads (deploy/config.py, latency/config.py, report/config.py, ...) on this
base, and ``recipe.py`` only puts the sections together; so a lower layer never imports the recipe.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

MAX_BATCH = 1 << 16  # images per call a latency measurement or an engine profile may ask for
MAX_REPEATS = 100_000
MAX_THREADS = 4096
MAX_EPOCHS = 100_000
BatchSize = Annotated[int, Field(ge=1, le=MAX_BATCH)]


class Strict(BaseModel):
    """Unknown keys, assignments of the wrong type and NaN/inf are refused."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
