"""Measure a run's final model again, with nothing of ofbdeploy's deploy or latency code in the path.

A latency budget is only delivered if another harness sees it too. This one reads the widths a run recorded
(``report.json``'s ``arch``; the model's name and image size from its ``arch.json``), builds a plain timm model
of those widths by hand (random weights: latency does not depend on their values), exports it and the dense
model with a bare ``torch.onnx.export``, and times both in plain ONNX Runtime sessions (default options, the
thread count given) alternately, ``--rounds`` rounds of ``--repeats`` calls each; the ratio is the median over
rounds of pruned/dense medians. ``--files`` also times the run's own exported ONNX files (fp32 and, when
present, int8) in the same plain sessions.

    python tools/benchmarks/remeasure.py runs/lat50 runs/lat30 --batch 1 --json remeasure.json

Prints one line per run with the run's own measured ratio (its report) beside this harness's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import timm
import torch
from torch import nn

import ofbdeploy.models.zoo  # noqa: F401  (registers the small ofb_vit_* configs with timm: configs only)


def _shrink_linear(layer: nn.Linear, inputs: int, outputs: int) -> nn.Linear:
    return nn.Linear(inputs, outputs, bias=layer.bias is not None)


def _shrink_norm(norm: nn.Module, width: int) -> nn.Module:
    return nn.LayerNorm(width, eps=norm.eps) if isinstance(norm, nn.LayerNorm) else norm


def plain_model(name: str, img_size: int, num_classes: int, arch: dict[str, Any]) -> nn.Module:
    """timm's own model with each layer replaced by a plain one of the recorded width."""
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=img_size).eval()
    embed = arch["embed_dim"]
    conv = model.patch_embed.proj
    model.patch_embed.proj = nn.Conv2d(conv.in_channels, embed, conv.kernel_size, conv.stride,
                                       bias=conv.bias is not None)
    if getattr(model, "cls_token", None) is not None:
        model.cls_token = nn.Parameter(torch.zeros(1, 1, embed))
    model.pos_embed = nn.Parameter(torch.zeros(1, model.pos_embed.shape[1], embed))
    for block, widths in zip(model.blocks, arch["blocks"], strict=True):
        heads, head_dim, mlp = widths["heads"], widths["head_dim"], widths["mlp_dim"]
        block.norm1, block.norm2 = _shrink_norm(block.norm1, embed), _shrink_norm(block.norm2, embed)
        attn = block.attn
        attn.qkv = _shrink_linear(attn.qkv, embed, 3 * heads * head_dim)
        attn.proj = _shrink_linear(attn.proj, heads * head_dim, embed)
        attn.num_heads, attn.head_dim, attn.attn_dim = heads, head_dim, heads * head_dim
        attn.scale = head_dim ** -0.5
        block.mlp.fc1 = _shrink_linear(block.mlp.fc1, embed, mlp)
        block.mlp.fc2 = _shrink_linear(block.mlp.fc2, mlp, embed)
    model.norm = _shrink_norm(model.norm, embed)
    model.head = _shrink_linear(model.head, embed, num_classes)
    return model.eval()


def export(model: nn.Module, path: Path, img_size: int, batch: int) -> Path:
    with torch.no_grad():
        torch.onnx.export(model, torch.randn(batch, 3, img_size, img_size), str(path), input_names=["x"],
                          output_names=["y"], opset_version=17, dynamo=False)
    return path


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _median_ms(sess: ort.InferenceSession, feed: dict[str, np.ndarray], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def paired_ratio(dense: ort.InferenceSession, pruned: ort.InferenceSession, shape: tuple[int, ...], rounds: int,
                 repeats: int) -> dict[str, Any]:
    """Alternating rounds after a warm-up; the ratio of each round's medians, and their median."""
    feeds = [{s.get_inputs()[0].name: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
             for s in (dense, pruned)]
    for sess, feed in zip((dense, pruned), feeds, strict=True):
        _median_ms(sess, feed, max(3, repeats // 5))
    pairs = []
    for _ in range(rounds):
        d = _median_ms(dense, feeds[0], repeats)
        p = _median_ms(pruned, feeds[1], repeats)
        pairs.append((d, p))
    ratios = [p / d for d, p in pairs]
    return {"ratio": statistics.median(ratios), "ratios": ratios,
            "dense_ms": statistics.median(d for d, _ in pairs), "pruned_ms": statistics.median(p for _, p in pairs)}


def remeasure(run: Path, batch: int, threads: int, rounds: int, repeats: int, files: bool) -> dict[str, Any]:
    report = json.loads((run / "report.json").read_text())
    base = json.loads((run / "finetuned" / "arch.json").read_text())["base"]
    name, img, classes = base["model_name"], base["img_size"], base["num_classes"]
    own = {(row["backend"], row["batch"], row["precision"]): row for row in report.get("latency") or []}
    out: dict[str, Any] = {"run": str(run), "batch": batch, "threads": threads, "model": name,
                           "flops_ratio": report.get("flops_ratio"), "budget": report.get("budget")}
    row = own.get(("ort-cpu", batch, "fp32"))
    out["run_ratio"] = row["latency_ms_pruned"] / row["latency_ms_dense"] if row else None
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        dense = export(timm.create_model(name, pretrained=False, num_classes=classes, img_size=img).eval(),
                       Path(tmp) / "dense.onnx", img, batch)
        pruned = export(plain_model(name, img, classes, report["arch"]), Path(tmp) / "pruned.onnx", img, batch)
        out["plain_export"] = paired_ratio(session(dense, threads), session(pruned, threads), (batch, 3, img, img),
                                           rounds, repeats)
    if files:
        for precision in ("fp32", "int8"):
            suffix = "" if precision == "fp32" else ".int8"
            paths = [run / "export" / f"{m}{suffix}.onnx" for m in ("dense", "pruned")]
            if all(p.is_file() for p in paths):
                out[f"run_files_{precision}"] = paired_ratio(session(paths[0], threads), session(paths[1], threads),
                                                             (batch, 3, img, img), rounds, repeats)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (each with report.json)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--rounds", type=int, default=5, help="alternating dense/pruned rounds")
    parser.add_argument("--repeats", type=int, default=30, help="calls per model per round")
    parser.add_argument("--files", action="store_true", help="also time the run's exported ONNX files")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    results = []
    for run in args.runs:
        if not (run / "report.json").is_file():
            print(f"{run}: no report.json (expected a finished run directory)", file=sys.stderr)
            return 2
        res = remeasure(run, args.batch, args.threads, args.rounds, args.repeats, args.files)
        results.append(res)
        extra = "".join(f", run files {p}: {res[f'run_files_{p}']['ratio']:.3f}" for p in ("fp32", "int8")
                        if f"run_files_{p}" in res)
        own = f"{res['run_ratio']:.3f}" if res["run_ratio"] is not None else "-"
        print(f"{run}: run's profile {own}, plain export {res['plain_export']['ratio']:.3f} "
              f"(dense {res['plain_export']['dense_ms']:.2f} ms){extra}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
