"""The hostile-input suite, one module per category sharing one harness; importing the package registers every
case of every category in ``CASES``."""

from . import arch, data, gate, links, luts, models, paths, recipes, rundir, signals
from .harness import CASES, REPO, Outcome, Workspace, run_case

__all__ = ["CASES", "REPO", "Outcome", "Workspace", "arch", "data", "gate", "links", "luts", "models", "paths",
           "recipes", "run_case", "rundir", "signals"]
