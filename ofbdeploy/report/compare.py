"""``ofbdeploy compare``: finished runs side by side, e.g. one recipe run with each ``search.method``.

Everything comes from each run's ``report.json`` (the report stage's numbers: method, FLOPs, parameters,
accuracy, and the latency the profile measured per backend, precision and batch), so runs made on other
machines or by older versions compare as long as their report is there. One table, and on request the
same rows as Markdown or JSON and a plot of accuracy and measured speedup against FLOPs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ofbdeploy.errors import InputError
from ofbdeploy.io import atomic_write, atomic_write_text, check_output_file, read_json
from ofbdeploy.table import format_table

_REQUIRED = ("flops_dense", "flops_pruned", "params_dense", "params_pruned", "top1_dense", "top1_pruned")


@dataclass
class RunRow:
    """One run's headline figures; ``latency`` maps "backend precision bN" to (pruned ms, speedup)."""

    run: str
    method: str
    model: str
    flops_ratio: float
    params_pruned: int
    params_dense: int
    top1_pruned: float
    top1_dense: float
    latency: dict[str, tuple[float, float]] = field(default_factory=dict)


def read_run(run_dir: Path) -> RunRow:
    """A finished run's row; a missing directory or report, or a report without its figures, is one line."""
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: not a run directory" + ("" if run_dir.exists() else " (it does not exist)"))
    path = run_dir / "report.json"
    if not path.is_file():
        raise InputError(f"{run_dir}: no report.json (the run has not finished its report stage)")
    report = read_json(path, "report")
    missing = [key for key in _REQUIRED if not isinstance(report.get(key), int | float)]
    if missing:
        raise InputError(f"{path}: not a run report (no {', '.join(missing)})")
    latency = {}
    for row in report.get("latency") or []:
        try:
            latency[f"{row['backend']} {row['precision']} b{row['batch']}"] = (float(row["latency_ms_pruned"]),
                                                                               float(row["speedup"]))
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: a latency row without backend, precision, batch, latency or speedup") from None
    return RunRow(run=str(run_dir), method=str(report.get("method", "ofb")), model=str(report.get("model", "")),
                  flops_ratio=report["flops_pruned"] / report["flops_dense"],
                  params_pruned=int(report["params_pruned"]), params_dense=int(report["params_dense"]),
                  top1_pruned=float(report["top1_pruned"]), top1_dense=float(report["top1_dense"]), latency=latency)


def latency_keys(rows: list[RunRow]) -> list[str]:
    """Every backend/precision/batch any run measured, in the order first seen."""
    return list(dict.fromkeys(key for row in rows for key in row.latency))


def table(rows: list[RunRow], markdown: bool = False) -> str:
    """One line per run; a latency column per backend/precision/batch ("-" where a run did not measure it)."""
    keys = latency_keys(rows)
    lines = [(row.run, row.method, row.model, f"{100 * row.flops_ratio:.1f}", f"{row.params_pruned / 1e6:.3f}",
              f"{row.top1_pruned:.2f}", f"{row.top1_pruned - row.top1_dense:+.2f}",
              *(f"{row.latency[k][0]:.3f} ms, {row.latency[k][1]:.2f}x" if k in row.latency else "-" for k in keys))
             for row in rows]
    headers = ("run", "method", "model", "FLOPs % of dense", "params (M)", "top-1 %", "vs dense",
               *(f"{k} (pruned, speedup)" for k in keys))
    return format_table(headers, lines, markdown=markdown)


def _label(row: RunRow) -> str:
    """A point's label: the method and the run directory's name (runs of one method told apart)."""
    return f"{row.method} ({Path(row.run).name})"


def plot(rows: list[RunRow], path: Path) -> Path:
    """Two panels against FLOPs (% of dense): top-1 of each run, and its measured speedup per backend/batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, speed_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for row in rows:
        x = 100 * row.flops_ratio
        acc_ax.scatter([x], [row.top1_pruned], label=f"{row.method}: {row.run}")
        acc_ax.annotate(_label(row), (x, row.top1_pruned), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for dense in sorted({row.top1_dense for row in rows}):
        acc_ax.axhline(dense, color="grey", linestyle="--", linewidth=0.8)
    acc_ax.set(xlabel="FLOPs, % of dense", ylabel="top-1 % after finetune (dashed: dense)", title="accuracy")
    acc_ax.legend(fontsize=7)
    for key in latency_keys(rows):
        points = sorted((100 * r.flops_ratio, r.latency[key][1], _label(r)) for r in rows if key in r.latency)
        speed_ax.plot([p[0] for p in points], [p[1] for p in points], "o", label=key)
        for x, y, label in points:
            speed_ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    speed_ax.set(xlabel="FLOPs, % of dense", ylabel="measured speedup over dense (x)", title="measured speedup")
    if latency_keys(rows):
        speed_ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def check_outputs(outputs: dict[str, Path | None], force: bool) -> None:
    """Refuse, before anything is read or written, an output that exists (without ``force``) or cannot be
    written; the keys are the option names."""
    for option, path in outputs.items():
        if path is None:
            continue
        if path.exists() and not path.is_file():
            raise InputError(f"{option}: {path} is not a regular file")
        if path.exists() and not force:
            raise InputError(f"{option}: {path} exists; pass --force to overwrite it")
        check_output_file(path, option)


def compare_runs(run_dirs: list[Path], *, plot_path: Path | None = None, json_path: Path | None = None,
                 markdown_path: Path | None = None, force: bool = False) -> str:
    """Read every run, write the outputs asked for, and return the table for the terminal."""
    check_outputs({"--plot": plot_path, "--json": json_path, "--markdown": markdown_path}, force)
    rows = [read_run(path) for path in run_dirs]
    if json_path is not None:
        atomic_write_text(json_path, json.dumps({"runs": [asdict(row) for row in rows]}, indent=1) + "\n")
    if markdown_path is not None:
        atomic_write_text(markdown_path, table(rows, markdown=True) + "\n")
    if plot_path is not None:
        plot(rows, plot_path)
    return table(rows)
