"""Budget limits and latency-regression gates over a run's ``report.json``.

Each check is one line: what was limited, the limit, the measured value, pass or fail. Latency limits are
checked against measured numbers only; speedups are ratios measured in one run (dense and pruned
alternating on the same backend), so they are comparable across machines, while absolute latencies are
compared with a baseline only when the device is the same.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ofbdeploy.deploy.config import Backend, Precision
from ofbdeploy.errors import InputError, one_line
from ofbdeploy.latency.config import LatencyTargetCfg
from ofbdeploy.recipe import Recipe
from ofbdeploy.report.config import BudgetCfg
from ofbdeploy.table import format_table


@dataclass(frozen=True)
class Check:
    name: str
    limit: str
    measured: str
    ok: bool


def _row(report: dict[str, Any], backend: str, batch: int, precision: str) -> dict[str, Any] | None:
    for row in report.get("latency", []):
        if (row["backend"], row["batch"], row["precision"]) == (backend, batch, precision):
            return row
    return None


def _not_measured(report: dict[str, Any], backend: str, batch: int, precision: str) -> str:
    """'not measured', with the profile's reason when it skipped that backend/precision/batch."""
    for entry in report.get("profile_skipped", []):
        if isinstance(entry, dict) and (entry["backend"], entry["precision"]) == (backend, precision) \
                and entry.get("batch") in (None, batch):
            return f"not measured: {entry['reason']}"
    return "not measured"


def budget_checks(report: dict[str, Any], budget: BudgetCfg) -> list[Check]:
    """Every limit of the recipe's ``budget`` section against the run's measured figures."""
    checks: list[Check] = []
    if budget.max_gflops is not None:
        value = report["flops_pruned"] / 1e9
        checks.append(Check("GFLOPs (MACs)", f"<= {budget.max_gflops:g}", f"{value:.4f}", value <= budget.max_gflops))
    if budget.max_params_m is not None:
        value = report["params_pruned"] / 1e6
        checks.append(Check("params (M)", f"<= {budget.max_params_m:g}", f"{value:.3f}", value <= budget.max_params_m))
    if budget.min_top1 is not None:
        value = report["top1_pruned"]
        checks.append(Check("top-1 %", f">= {budget.min_top1:g}", f"{value:.2f}", value >= budget.min_top1))
    for limit in budget.latency:
        name = f"latency ms {limit.backend} {limit.precision} batch {limit.batch}"
        row = _row(report, limit.backend, limit.batch, limit.precision)
        measured = _not_measured(report, limit.backend, limit.batch, limit.precision) if row is None \
            else f"{row['latency_ms_pruned']:.3f}"
        checks.append(Check(name, f"<= {limit.max_ms:g}", measured,
                            row is not None and row["latency_ms_pruned"] <= limit.max_ms))
    for limit in budget.speedup:
        name = f"speedup {limit.backend} {limit.precision} batch {limit.batch}"
        row = _row(report, limit.backend, limit.batch, limit.precision)
        measured = _not_measured(report, limit.backend, limit.batch, limit.precision) if row is None \
            else f"{row['speedup']:.3f}x"
        checks.append(Check(name, f">= {limit.min:g}x", measured, row is not None and row["speedup"] >= limit.min))
    return checks


def search_target_checks(report: dict[str, Any], target: LatencyTargetCfg | None) -> list[Check]:
    """The search's latency budget against the final model's measured latency (never the prediction): in
    milliseconds for ``target_ms``, as the measured fraction of dense for ``target_ratio``."""
    if target is None:
        return []
    where = f"{target.backend} {target.precision} batch {target.batch}"
    row = _row(report, target.backend, target.batch, target.precision)
    if target.target_ms is not None:
        value = None if row is None else row["latency_ms_pruned"]
        return [Check(f"search latency target ms {where}", f"<= {target.target_ms:g}",
                      _not_measured(report, target.backend, target.batch, target.precision) if value is None
                      else f"{value:.3f}",
                      value is not None and value <= target.target_ms)]
    value = None if row is None else row["latency_ms_pruned"] / row["latency_ms_dense"]
    return [Check(f"search latency target, fraction of dense {where}", f"<= {target.target_ratio:.1%}",
                  _not_measured(report, target.backend, target.batch, target.precision) if value is None
                  else f"{value:.1%}",
                  value is not None and value <= target.target_ratio)]


def recipe_checks(report: dict[str, Any], recipe: Recipe) -> list[Check]:
    """Every limit a recipe sets on its run: the ``budget`` section and the search's latency target."""
    return budget_checks(report, recipe.budget) + search_target_checks(report, recipe.search.latency_target)


BASELINE_FORMAT = "ofbdeploy.baseline/2"
# What a baseline is "for": the recipe sections that decide which pruned model is measured.
IDENTITY_SECTIONS = ("model", "data", "search")


class BaselineRow(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    backend: Backend
    batch: int = Field(ge=1)
    precision: Precision
    device: str
    speedup: float = Field(gt=0)
    latency_ms_dense: float = Field(gt=0)
    latency_ms_pruned: float = Field(gt=0)


class Baseline(BaseModel):
    """A baseline file: the speedups and latencies a later run of the same recipe is held to."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    format: str
    model: str = Field(min_length=1)
    recipe: str
    identity: str = Field(min_length=1, description="digest of the recipe's model, data and search sections")
    rows: list[BaselineRow] = Field(min_length=1)


def recipe_identity(recipe: Recipe) -> str:
    """Digest of the recipe sections that decide the measured model (see :data:`IDENTITY_SECTIONS`)."""
    data = recipe.model_dump(mode="json")
    return hashlib.sha256(json.dumps({k: data[k] for k in IDENTITY_SECTIONS}, sort_keys=True).encode()).hexdigest()


def make_baseline(report: dict[str, Any], recipe: Recipe) -> dict[str, Any]:
    """The figures a later run is compared with: per backend/batch/precision speedup and latencies."""
    keys = ("backend", "batch", "precision", "device", "speedup", "latency_ms_dense", "latency_ms_pruned")
    rows = [{k: row[k] for k in keys} for row in report.get("latency", [])]
    if not rows:
        raise InputError("--write-baseline: the run measured no latency (profile disabled or every backend "
                         "skipped); a baseline needs at least one measurement")
    return {"format": BASELINE_FORMAT, "model": report.get("model", ""), "recipe": recipe.name,
            "identity": recipe_identity(recipe), "rows": rows}


def parse_baseline(data: Any, source: str = "baseline") -> Baseline:
    """Validate a baseline file's content; an empty, malformed or older one is one :class:`InputError` line."""
    if not isinstance(data, dict) or data.get("format") != BASELINE_FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise InputError(f"{source}: not an ofbdeploy baseline of format {BASELINE_FORMAT} (found "
                         f"{str(found)[:40]!r}); record one with ofbdeploy check RUN --write-baseline FILE")
    try:
        baseline = Baseline.model_validate(data)
    except ValidationError as err:
        problem = err.errors()[0]
        where = ".".join(str(p) for p in problem["loc"]) or "baseline"
        raise InputError(one_line(f"{source}: {where}: {problem['msg']}", 300)) from None
    keys = [(r.backend, r.batch, r.precision) for r in baseline.rows]
    if len(set(keys)) != len(keys):
        raise InputError(f"{source}: rows: the same backend, batch and precision appear twice")
    return baseline


def check_baseline_fits(baseline: Baseline, report: dict[str, Any], recipe: Recipe, source: str) -> None:
    """Refuse a baseline recorded for another model or other recipe settings: comparing them means nothing."""
    if baseline.model != report.get("model"):
        raise InputError(f"{source}: the baseline is for model {baseline.model!r}, this run is of "
                         f"{report.get('model')!r}")
    if baseline.identity != recipe_identity(recipe):
        raise InputError(f"{source}: the baseline was recorded for recipe {baseline.recipe!r} with other "
                         f"{'/'.join(IDENTITY_SECTIONS)} settings than this run's; record it again with "
                         f"--write-baseline")


def regression_checks(report: dict[str, Any], baseline: Baseline, tolerance: float) -> list[Check]:
    """Speedups may not fall more than ``tolerance`` below the baseline's; on the same device neither may the
    pruned model's latency rise more than ``tolerance`` above it. A row the run did not measure fails."""
    checks: list[Check] = []
    for base in baseline.rows:
        key = f"{base.backend} {base.precision} batch {base.batch}"
        row = _row(report, base.backend, base.batch, base.precision)
        floor = base.speedup * (1 - tolerance)
        if row is None:
            checks.append(Check(f"speedup {key}", f">= {floor:.3f}x", "not measured", False))
            continue
        checks.append(Check(f"speedup {key}", f">= {floor:.3f}x", f"{row['speedup']:.3f}x", row["speedup"] >= floor))
        if row["device"] == base.device:
            ceiling = base.latency_ms_pruned * (1 + tolerance)
            checks.append(Check(f"latency ms {key}", f"<= {ceiling:.3f}", f"{row['latency_ms_pruned']:.3f}",
                                row["latency_ms_pruned"] <= ceiling))
    return checks


def format_checks(checks: list[Check], markdown: bool = False) -> str:
    rows = [(c.name, c.limit, c.measured, "ok" if c.ok else "MISSED") for c in checks]
    return format_table(("check", "limit", "measured", "result"), rows, markdown=markdown)


def parse_tolerance(text: str) -> float:
    """'10%' or '0.1' -> 0.1."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise InputError(f"--tolerance: expected a fraction or a percentage such as 10%, got {text[:40]!r}") from None
    if not 0 <= value < 1:
        raise InputError(f"--tolerance: expected 0 <= tolerance < 100%, got {text[:40]!r}")
    return value
