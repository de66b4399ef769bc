"""``ofbdeploy check``: a finished run against its recipe's limits and, optionally, a latency baseline.

The gate checks what it gates. Before reading a figure it verifies that every stage finished under the
current recipe.yaml and that every file the report was made from (weights, ONNX files, engines, profile,
the report itself) still has the size and SHA-256 recorded in stages.json; a replaced file is bad input
(exit 2, one line naming it), never a pass. It writes nothing but an explicit ``--write-baseline``, and
that only after a passing check, never over an existing file without ``--force``, never onto a device,
FIFO or socket, and never over one of the run's own files.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ofbdeploy.errors import InputError, RunDirError
from ofbdeploy.io import atomic_write_text, check_output_file, read_json
from ofbdeploy.recipe import Recipe, load_recipe
from ofbdeploy.report.checks import (
    IDENTITY_SECTIONS,
    Check,
    check_baseline_fits,
    format_checks,
    identity_digest,
    make_baseline,
    parse_baseline,
    parse_tolerance,
    recipe_checks,
    regression_checks,
)
from ofbdeploy.run.rundir import RUN_MARKERS, RunLock, StageBook, to_json
from ofbdeploy.run.stages import STAGES, stage_sections


@dataclass
class GateOutcome:
    """What ``check`` found: the checks, and the lines to print (the table, the baseline's fate)."""

    checks: list[Check] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    @property
    def missed(self) -> list[str]:
        return [f"{c.name} ({c.measured})" for c in self.checks if not c.ok]


def recipe_identity(recipe: Recipe) -> str:
    """The digest a baseline is recorded for: the recipe's model, data and search sections."""
    data = recipe.model_dump(mode="json")
    return identity_digest({k: data[k] for k in IDENTITY_SECTIONS})


def check_baseline_target(path: Path, force: bool) -> Path:
    """Where ``--write-baseline`` may write: a new file, or an existing regular file (or link) with ``--force``;
    never a directory, device, FIFO or socket (writing one would hang or turn it into a plain file)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return check_output_file(path, "--write-baseline")
    except OSError as err:
        raise InputError(f"--write-baseline: cannot use {path} ({err.strerror or err})") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"--write-baseline: {path} is a directory; expected a file path")
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise InputError(f"--write-baseline: {path} is not a regular file (a device, FIFO or socket); "
                         f"choose a file path")
    if not force:
        raise InputError(f"--write-baseline: {path} already exists; pass --force to replace it")
    return check_output_file(path, "--write-baseline")


def _run_files(run_dir: Path, book: StageBook) -> set[Path]:
    """Every file the run owns: its markers and each artifact recorded in stages.json."""
    records, _ = book.load()
    names = [*RUN_MARKERS, *(rel for r in records.values() for rel in r.get("artifacts", {}))]
    return {(run_dir / name).resolve() for name in names}


def verify_run(run_dir: Path, recipe: Recipe) -> StageBook:
    """Every stage finished under ``recipe`` and every file it wrote is intact (else one line, exit 2)."""
    book = StageBook(run_dir)
    for stage in STAGES:
        book.verify(stage.name, stage_sections(recipe, stage.name))
    return book


def check_run(run_dir: Path, *, baseline: Path | None = None, tolerance: str = "10%",
              write_baseline: Path | None = None, force: bool = False) -> GateOutcome:
    """Check the finished run in ``run_dir``; the caller turns :attr:`GateOutcome.missed` into exit 1."""
    if not (run_dir / "recipe.yaml").is_file():
        raise InputError(f"{run_dir}: not a run directory (no recipe.yaml)")
    holder = RunLock.holder(run_dir)
    if holder is not None:
        raise RunDirError(f"{run_dir}: a run is in progress there ({holder.describe()}); check it when it is done")
    tol = parse_tolerance(tolerance)
    if write_baseline is not None:
        check_baseline_target(write_baseline, force)
    recipe = load_recipe(run_dir / "recipe.yaml", [f"output_dir={run_dir}"])
    book = verify_run(run_dir, recipe)
    if write_baseline is not None and write_baseline.resolve() in _run_files(run_dir, book):
        raise InputError(f"--write-baseline: {write_baseline} is a file of the run {run_dir}; choose another path")
    report = read_json(run_dir / "report.json", "report")
    identity = recipe_identity(recipe)
    outcome = GateOutcome(recipe_checks(report, recipe.budget, recipe.search.latency_target))
    if baseline is not None:
        base = parse_baseline(read_json(baseline, "baseline"), str(baseline))
        check_baseline_fits(base, report, identity, str(baseline))
        outcome.checks += regression_checks(report, base, tol)
    if not outcome.checks and write_baseline is None:
        raise InputError(f"{run_dir}: nothing to check: the recipe's budget section sets no limit and no "
                         f"--baseline was given")
    if write_baseline is not None:
        if outcome.missed:  # a failed run must not become the next gate's goalpost
            outcome.lines.append(f"baseline not written: the check failed, so {write_baseline} is left as it was")
        else:
            atomic_write_text(write_baseline, to_json(make_baseline(report, recipe.name, identity)))
            outcome.lines.append(f"baseline written to {write_baseline}")
    if outcome.checks:
        outcome.lines.append(format_checks(outcome.checks))
    return outcome
