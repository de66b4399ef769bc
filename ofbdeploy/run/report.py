"""The run's headline numbers (report.json) and its closing summary table, built from the files the stages
wrote; rendering them as Markdown and a plot is :mod:`ofbdeploy.report.render`'s job."""

from __future__ import annotations

from typing import Any

from ofbdeploy.arch import ArchSpec
from ofbdeploy.deploy.workflow import DeployArtifacts
from ofbdeploy.families import load_arch
from ofbdeploy.latency.lut import LatencyLUT
from ofbdeploy.run.paths import RunPaths
from ofbdeploy.run.rundir import read_json
from ofbdeploy.table import format_table


def build_report(paths: RunPaths) -> dict[str, Any]:
    """The run's headline numbers, from the artifacts the stages wrote."""
    search = read_json(paths.search_result)
    spec = load_arch(paths.finetuned / "arch.json")  # after the fit stage (runs before it: the materialised one)
    dense_spec = ArchSpec.dense(spec.base)
    metrics = read_json(paths.metrics)
    finetune = read_json(paths.finetuned / "train.json")
    profile = read_json(paths.profile) if paths.profile.is_file() else {"latency": [], "skipped": []}
    artifacts = DeployArtifacts.load(paths.export)
    return {
        "model": spec.base.model_name,
        "method": search.get("method", "ofb"),
        "flops_dense": dense_spec.macs(),
        "flops_pruned": spec.macs(),
        "flops_target": search["target_macs"],
        "latency_target_ms": search["target_latency_ms"],
        "flops_ratio": spec.macs() / dense_spec.macs(),
        "params_dense": dense_spec.params(),
        "params_pruned": spec.params(),
        "top1_dense": metrics["dense"]["top1"],
        "top5_dense": metrics["dense"]["top5"],
        "top1_pruned_before_finetune": metrics["pruned"]["top1"],
        "top1_pruned": metrics["finetuned"]["top1"],
        "top5_pruned": metrics["finetuned"]["top5"],
        "amp": search.get("amp", "off"),
        "fp32_matmul": search.get("fp32_matmul", "ieee"),
        "global_batch": search.get("global_batch"),
        "accum_steps": search.get("accum_steps", 1),
        "search_seconds": search["seconds"],
        "search_images_per_second": search["images_per_second"],
        "search_decided_epoch": search["decided_epoch"],
        "search_forced_groups": search["forced_groups"],
        "search_budget_steps": search["budget_steps"],
        "finetune_seconds": finetune["seconds"],
        "materialize_max_abs_diff": read_json(paths.pruned_check)["max_abs_diff"],
        "fit": read_json(paths.fit) if paths.fit.is_file() else None,
        "export": artifacts.checks,
        "accuracy": [{k: entry[k] for k in ("model", "precision", "runtime", "top1", "top5", "images")}
                     for entry in artifacts.accuracy],
        "latency": profile["latency"],
        "profile_skipped": profile["skipped"],
        "latency_prediction": _prediction(paths, spec, profile["latency"]),
        "arch": {"family": spec.family, "embed_dim": spec.embed_dim, "embed_dims": list(spec.embed_dims),
                 "blocks": [{"heads": b.heads, "head_dim": b.head_dim, "mlp_dim": b.mlp_dim} for b in spec.blocks]},
    }


def _prediction(paths: RunPaths, spec: ArchSpec, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The LUT's prediction next to the measured latency on the LUT's own backend/batch/precision."""
    if not paths.lut.is_file():
        return None
    lut = LatencyLUT.load(paths.lut)
    k = lut.key
    row = next((r for r in rows if (r["backend"], r["batch"], r["precision"]) == (k.backend, k.batch, k.precision)),
               None)
    predicted, dense = lut.predict(spec), lut.predict(ArchSpec.dense(spec.base))
    result: dict[str, Any] = {"backend": k.backend, "batch": k.batch, "precision": k.precision,
                              "predicted_ms_pruned": predicted, "predicted_ms_dense": dense,
                              "dense_ms_at_build": lut.dense_ms}
    if row is not None:
        measured_fraction = row["latency_ms_pruned"] / row["latency_ms_dense"]
        result.update(measured_ms_pruned=row["latency_ms_pruned"], measured_ms_dense=row["latency_ms_dense"],
                      rel_error_pruned=predicted / row["latency_ms_pruned"] - 1,
                      rel_error_dense=dense / row["latency_ms_dense"] - 1,
                      rel_error_fraction=predicted / lut.dense_ms / measured_fraction - 1)
    return result


def summary_table(report: dict[str, Any]) -> str:
    """The closing table: dense vs pruned, side by side."""
    rows = [
        ("dense", f"{report['params_dense'] / 1e6:.3f}", f"{report['flops_dense'] / 1e9:.4f}", "100.0%",
         f"{report['top1_dense']:.2f}", f"{report['top5_dense']:.2f}"),
        ("pruned", f"{report['params_pruned'] / 1e6:.3f}", f"{report['flops_pruned'] / 1e9:.4f}",
         f"{report['flops_ratio']:.1%}", f"{report['top1_pruned']:.2f}", f"{report['top5_pruned']:.2f}"),
    ]
    table = format_table(("model", "params (M)", "GMACs", "of dense", "top-1 %", "top-5 %"), rows)
    return (f"{table}\nsearch {report['search_seconds']:.1f} s, finetune {report['finetune_seconds']:.1f} s; "
            f"pruned before finetune: top-1 {report['top1_pruned_before_finetune']:.2f}%")
