"""report.md and its plot: accuracy and latency against FLOPs, dense next to pruned."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ofbdeploy.io import atomic_write, atomic_write_text
from ofbdeploy.report.checks import Check, format_checks
from ofbdeploy.table import format_table


def plot_report(report: dict[str, Any], path: Path) -> Path:
    """Two panels: measured latency vs GFLOPs per backend/batch (with the FLOPs-proportional ideal), and
    top-1 vs GFLOPs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense_g, pruned_g = report["flops_dense"] / 1e9, report["flops_pruned"] / 1e9
    fig, (lat_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for row in report.get("latency", []):
        label = f"{row['backend']} {row['precision']} b{row['batch']}"
        line = lat_ax.plot([dense_g, pruned_g], [row["latency_ms_dense"], row["latency_ms_pruned"]], "o-",
                           label=f"{label}: {row['speedup']:.2f}x")[0]
        lat_ax.plot([dense_g, pruned_g], [row["latency_ms_dense"], row["latency_ms_dense"] * pruned_g / dense_g],
                    ":", color=line.get_color(), alpha=0.6)
    lat_ax.set(xlabel="GFLOPs (MACs)", ylabel="median latency (ms)", title="latency vs FLOPs (dotted: FLOPs ratio)")
    if report.get("latency"):
        lat_ax.set_yscale("log")
        lat_ax.legend(fontsize=7)
    points = [("dense", dense_g, report["top1_dense"]),
              ("pruned, before finetune", pruned_g, report["top1_pruned_before_finetune"]),
              ("pruned, finetuned", pruned_g, report["top1_pruned"])]
    for name, x, y in points:
        acc_ax.scatter([x], [y], label=f"{name}: {y:.2f}%")
    acc_ax.set(xlabel="GFLOPs (MACs)", ylabel="top-1 (%)", title="accuracy vs FLOPs")
    acc_ax.legend(fontsize=7)
    fig.suptitle(f"{report.get('model', '')}: {report['flops_ratio']:.1%} of dense FLOPs")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def latency_table(report: dict[str, Any], markdown: bool = False) -> str:
    """Dense vs pruned per backend, precision and batch; "vs dense fp32" is the pruned model of the row against
    the dense fp32 model timed in the same run; TF32 and CUDA graph say how GPU rows ran ("-" on CPU)."""
    rows = [
        (row["backend"], row["precision"], row["batch"], f"{row['latency_ms_dense']:.3f}",
         f"{row['latency_ms_pruned']:.3f}", f"{row['speedup']:.2f}x", _ratio(row.get("speedup_vs_dense_fp32")),
         f"{1 / report['flops_ratio']:.2f}x", f"{row['throughput_pruned']:.0f}", _flag(row.get("tf32")),
         _flag(row.get("cuda_graph")), row["device"])
        for row in report.get("latency", [])
    ]
    return format_table(("backend", "precision", "batch", "dense ms", "pruned ms", "speedup", "vs dense fp32",
                         "FLOPs limit", "pruned img/s", "TF32", "CUDA graph", "device"), rows, markdown=markdown)


def accuracy_table(report: dict[str, Any], markdown: bool = False) -> str:
    """Top-1/top-5 of each exported file on its runtime, with top-1 against the same model in fp32."""
    fp32 = {(e["model"], e["runtime"]): e["top1"] for e in report.get("accuracy", []) if e["precision"] == "fp32"}
    rows = [(e["model"], e["precision"], e["runtime"], f"{e['top1']:.2f}", f"{e['top5']:.2f}",
             "-" if (e["model"], e["runtime"]) not in fp32 or e["precision"] == "fp32"
             else f"{e['top1'] - fp32[(e['model'], e['runtime'])]:+.2f}")
            for e in report.get("accuracy", [])]
    return format_table(("model", "precision", "runtime", "top-1 %", "top-5 %", "top-1 vs fp32"), rows,
                        markdown=markdown)


def format_skip(entry: dict[str, Any] | str) -> str:
    """One line for a ``profile_skipped`` record (older reports hold plain strings)."""
    if isinstance(entry, str):
        return entry
    batch = "every batch" if entry.get("batch") is None else f"batch {entry['batch']}"
    return f"{entry['backend']} {entry['precision']} {batch}: {entry['reason']}"


def skipped_lines(report: dict[str, Any]) -> list[str]:
    """What the profile could not measure and why, one line each."""
    return [format_skip(entry) for entry in report.get("profile_skipped", [])]


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _flag(value: bool | None) -> str:
    return "-" if value is None else ("on" if value else "off")


def fit_lines(fit: dict[str, Any] | None) -> list[str]:
    """What the fit stage did: the FLOPs fill, and each measured round of the latency loop."""
    if not fit:
        return []
    lines = []
    if fit.get("skipped"):
        lines.append(f"Fit to the budget: {fit['skipped']}.")
    if fit.get("flops_steps"):
        target = fit["flops_target"]
        lines.append(f"Fit to the FLOPs budget: {len(fit['flops_steps'])} widening step(s), "
                     f"{fit['flops_before'] / target:.1%} -> {fit['flops_after'] / target:.1%} of the target.")
    latency = fit.get("latency")
    if latency:
        lines.append(f"Latency closed loop on {latency['backend']} {latency['precision']} batch {latency['batch']}, "
                     f"target {latency['target_ratio']:.1%} of dense (tolerance {latency['tolerance']:.0%}): "
                     f"{'met' if latency['met'] else 'not met'} after {len(latency['rounds'])} round(s)"
                     + (f", the architecture of round {latency['kept_round']} kept." if "kept_round" in latency
                        else "."))
        lines += [f"- round {r['round']}: predicted {r['predicted_ratio']:.1%}, measured {r['measured_ratio']:.1%} "
                  f"({r['repeats']} repeats, spread {r['spread']:.1%}, measured {r['measurements']}x, dense "
                  f"{r['dense_ms']:.1f} ms{', host loaded' if r.get('loaded') else ''}); {r['action']}"
                  + (f": {', '.join(r['steps'])}" if r["steps"] else "") for r in latency["rounds"]]
    return lines


def write_markdown(report: dict[str, Any], checks: list[Check], path: Path, plot: Path | None) -> Path:
    """The human-readable report next to report.json."""
    summary = format_table(
        ("model", "params (M)", "GFLOPs", "of dense", "top-1 %", "top-5 %"),
        [("dense", f"{report['params_dense'] / 1e6:.3f}", f"{report['flops_dense'] / 1e9:.4f}", "100.0%",
          f"{report['top1_dense']:.2f}", f"{report['top5_dense']:.2f}"),
         ("pruned", f"{report['params_pruned'] / 1e6:.3f}", f"{report['flops_pruned'] / 1e9:.4f}",
          f"{report['flops_ratio']:.1%}", f"{report['top1_pruned']:.2f}", f"{report['top5_pruned']:.2f}")],
        markdown=True,
    )
    parts = [f"# ofbdeploy report: {report.get('model', '')}", "", summary, ""]
    target = f"{report['flops_target'] / 1e9:.4f} G" if report.get("flops_target") else "none"
    parts.append(f"FLOPs target {target}; search {report['search_seconds']:.1f} s, "
                 f"finetune {report['finetune_seconds']:.1f} s; materialised model matches the masked one to "
                 f"{report['materialize_max_abs_diff']:.1e}.")
    if report.get("search_budget_steps"):
        parts.append(f"Budget enforcement after the search: {'; '.join(report['search_budget_steps'])}.")
    if report.get("search_forced_groups"):
        parts.append(f"Undecided at the epoch budget (most probable cell taken): "
                     f"{', '.join(report['search_forced_groups'])}.")
    parts += fit_lines(report.get("fit"))
    for item in report.get("export", []):
        parts.append(f"Export {item['path']}: max |ORT - torch| {item['max_abs_diff']:.2e}, top-1 agreement "
                     f"{item['top1_agreement']:.1%} on {item['check_images']} images.")
    if report.get("accuracy"):
        parts += ["", "## Accuracy of the exported files (validation split)", "", accuracy_table(report, markdown=True)]
    if report.get("latency"):
        parts += ["", "## Latency (dense and pruned, every precision, measured alternately in one run; medians)", "",
                  latency_table(report, markdown=True)]
    prediction = report.get("latency_prediction")
    if prediction and "measured_ms_pruned" in prediction:
        parts.append(f"\nLatency table prediction on {prediction['backend']} {prediction['precision']} batch "
                     f"{prediction['batch']}: pruned {prediction['predicted_ms_pruned']:.3f} ms predicted vs "
                     f"{prediction['measured_ms_pruned']:.3f} ms measured ({prediction['rel_error_pruned']:+.1%}); "
                     f"dense {prediction['predicted_ms_dense']:.3f} vs {prediction['measured_ms_dense']:.3f} ms "
                     f"({prediction['rel_error_dense']:+.1%}); as a fraction of dense, "
                     f"{prediction['predicted_ms_pruned'] / prediction['dense_ms_at_build']:.1%} predicted vs "
                     f"{prediction['measured_ms_pruned'] / prediction['measured_ms_dense']:.1%} measured "
                     f"({prediction['rel_error_fraction']:+.1%}). Budgets are checked against the measured numbers.")
    skips = skipped_lines(report)
    if skips:
        parts += ["", "Not measured:", *(f"- {line}" for line in skips)]
    if checks:
        parts += ["", "## Budget", "", format_checks(checks, markdown=True)]
    if plot is not None:
        parts += ["", f"![accuracy and latency vs FLOPs]({plot.name})"]
    return atomic_write_text(path, "\n".join(parts) + "\n")
