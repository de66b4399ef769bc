"""The strict base of every configuration section: a typo is an error, not a silent default.

Each layer declares the section it reads (deploy/config.py, latency/config.py, report/config.py, ...) on this
base, and ``recipe.py`` only puts the sections together; so a lower layer never imports the recipe.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Unknown keys, assignments of the wrong type and NaN/inf are refused."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
