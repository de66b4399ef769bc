"""Measure a run's final model again, with nothing of ofbdeploy's deploy or latency code in the path.

A latency budget is only delivered if another harness sees it too. This one reads the widths a run recorded
(``report.json``'s ``arch``; the model's name and image size from its ``arch.json``), builds a plain timm model (a
ViT, or a Swin with one width per stage) of those widths by hand (random weights: latency does not depend on their
values), exports it and the dense model with a bare ``torch.onnx.export``, and times both in plain ONNX Runtime
sessions (default options, the thread count given) alternately, ``--rounds`` rounds of ``--repeats`` calls each; the
ratio is the median over rounds of pruned/dense medians, and the quiet ratio the same over the rounds in which
both models ran within 7.5% of their fastest round (a shared host's spells of load move the ratio itself).
``--files`` also times the ONNX files in the run's ``export/`` (``dense.onnx``, ``pruned.onnx`` and their ``-int8``
files where present; ``pruned-weights.onnx``, the weights-only file of ``bench_int8.py --variants --keep``), each
against dense fp32, in plain sessions of every ``--backend``: ONNX Runtime's CPU provider, or OpenVINO's CPU
plugin compiled with two settings only (the latency hint, and f32 inference precision: without it OpenVINO runs
fp32 files in bf16 on CPUs that have it). A directory of such files (``tools/benchmarks/bench_int8.py --keep``)
can be given instead of a run.

    python tools/benchmarks/remeasure.py runs/lat50 runs/lat30 --batch 1 --json remeasure.json
    python tools/benchmarks/remeasure.py /tmp/int8files --files --backend ort --backend openvino
    python tools/benchmarks/remeasure.py acc.json --rows   # a bench_accuracy.py file's latency-budget rows

Prints one line per run with the run's own measured ratio (its report) beside this harness's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

try:
    import openvino
except ImportError:  # optional: only --backend openvino needs it
    openvino = None
import timm
import torch
from torch import nn

import ofbdeploy.models.zoo  # noqa: F401  (registers the small ofb_vit_* configs with timm: configs only)


def _shrink_linear(layer: nn.Linear, inputs: int, outputs: int) -> nn.Linear:
    return nn.Linear(inputs, outputs, bias=layer.bias is not None)


def _shrink_norm(norm: nn.Module, width: int) -> nn.Module:
    return nn.LayerNorm(width, eps=norm.eps) if isinstance(norm, nn.LayerNorm) else norm


def _shrink_attention(attn: nn.Module, embed: int, heads: int, head_dim: int) -> None:
    attn.qkv = _shrink_linear(attn.qkv, embed, 3 * heads * head_dim)
    attn.proj = _shrink_linear(attn.proj, heads * head_dim, embed)
    attn.num_heads, attn.head_dim, attn.attn_dim = heads, head_dim, heads * head_dim
    attn.scale = head_dim ** -0.5
    table = getattr(attn, "relative_position_bias_table", None)  # a Swin window attention's, one column per head
    if table is not None:
        attn.relative_position_bias_table = nn.Parameter(torch.zeros(table.shape[0], heads))


def plain_swin(model: nn.Module, num_classes: int, arch: dict[str, Any]) -> nn.Module:
    """timm's Swin with each layer replaced by a plain one of the recorded widths (one per stage)."""
    embeds, blocks = arch["embed_dims"], iter(arch["blocks"])
    conv = model.patch_embed.proj
    model.patch_embed.proj = nn.Conv2d(conv.in_channels, embeds[0], conv.kernel_size, conv.stride,
                                       bias=conv.bias is not None)
    model.patch_embed.norm = _shrink_norm(model.patch_embed.norm, embeds[0])
    previous = embeds[0]
    for stage, embed in zip(model.layers, embeds, strict=True):
        if isinstance(stage.downsample, nn.Module) and hasattr(stage.downsample, "reduction"):
            stage.downsample.norm = _shrink_norm(stage.downsample.norm, 4 * previous)
            stage.downsample.reduction = _shrink_linear(stage.downsample.reduction, 4 * previous, embed)
        for block in stage.blocks:
            widths = next(blocks)
            block.norm1, block.norm2 = _shrink_norm(block.norm1, embed), _shrink_norm(block.norm2, embed)
            _shrink_attention(block.attn, embed, widths["heads"], widths["head_dim"])
            block.mlp.fc1 = _shrink_linear(block.mlp.fc1, embed, widths["mlp_dim"])
            block.mlp.fc2 = _shrink_linear(block.mlp.fc2, widths["mlp_dim"], embed)
        previous = embed
    model.norm = _shrink_norm(model.norm, previous)
    model.head.fc = _shrink_linear(model.head.fc, previous, num_classes)
    return model.eval()


def plain_model(name: str, img_size: int, num_classes: int, arch: dict[str, Any]) -> nn.Module:
    """timm's own model with each layer replaced by a plain one of the recorded width."""
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=img_size).eval()
    if arch.get("family") == "swin":
        return plain_swin(model, num_classes, arch)
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
        for scale in (block.ls1, block.ls2):  # LayerScale (DINOv2): one factor per residual channel
            if hasattr(scale, "gamma"):
                scale.gamma = nn.Parameter(torch.ones(embed))
        _shrink_attention(block.attn, embed, heads, head_dim)
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


Call = Callable[[np.ndarray], object]


def session(path: Path, threads: int, backend: str = "ort") -> Call:
    """A plain inference call on ``path``: an ONNX Runtime CPU session, or an OpenVINO CPU compile."""
    if backend == "openvino":
        if openvino is None:
            print("--backend openvino: the openvino package is not installed (pip install openvino)", file=sys.stderr)
            raise SystemExit(2)
        compiled = openvino.Core().compile_model(str(path), "CPU", {
            "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads})
        request = compiled.create_infer_request()
        return lambda x: request.infer([x])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})


def _median_ms(call: Call, x: np.ndarray, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(x)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def alternate(calls: list[Call], shape: tuple[int, ...], rounds: int, repeats: int) -> list[list[float]]:
    """Each call's median per round, the calls taking turns round after round (after a warm-up of each)."""
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    for call in calls:
        _median_ms(call, x, max(3, repeats // 5))
    return [[_median_ms(call, x, repeats) for call in calls] for _ in range(rounds)]


QUIET = 0.075  # a round is quiet where both models ran within 7.5% of their fastest round


def paired_ratio(dense: Call, pruned: Call, shape: tuple[int, ...], rounds: int, repeats: int) -> dict[str, Any]:
    """The ratio of pruned to dense medians per round, and its median over rounds; also over the quiet rounds
    only. A shared host has spells of other tenants' load that slow a small model more than a large one (the
    ratio moves by 10 points and more), so the quiet rounds' ratio is the one a dedicated machine would see."""
    pairs = alternate([dense, pruned], shape, rounds, repeats)
    ratios = [p / d for d, p in pairs]
    fastest = (min(d for d, _ in pairs), min(p for _, p in pairs))
    quiet = [p / d for d, p in pairs if d <= fastest[0] * (1 + QUIET) and p <= fastest[1] * (1 + QUIET)]
    return {"ratio": statistics.median(ratios), "ratios": ratios, "dense_ms_per_round": [d for d, _ in pairs],
            "quiet_ratio": statistics.median(quiet) if quiet else None, "quiet_rounds": len(quiet),
            "dense_ms": statistics.median(d for d, _ in pairs), "pruned_ms": statistics.median(p for _, p in pairs)}


FILES = ("dense.onnx", "dense-int8.onnx", "pruned.onnx", "pruned-int8.onnx", "pruned-weights.onnx")


def time_files(folder: Path, shape: tuple[int, ...], threads: int, backends: list[str], rounds: int,
               repeats: int) -> dict[str, Any]:
    """Every file of ``folder`` on every backend, all alternating in one loop; each against dense fp32 of the
    same backend (the median over rounds of per-round ratios)."""
    present = [folder / f for f in FILES if (folder / f).is_file()]
    keys = [(b, p.stem) for b in backends for p in present]
    medians = alternate([session(p, threads, b) for b in backends for p in present], shape, rounds, repeats)
    out: dict[str, Any] = {}
    for j, (backend, name) in enumerate(keys):
        dense = keys.index((backend, "dense"))
        out[f"{backend}:{name}"] = {
            "median_ms": statistics.median(r[j] for r in medians),
            "speedup_vs_dense_fp32": statistics.median(r[dense] / r[j] for r in medians)}
    return out


def plain_ratio(name: str, img: int, classes: int, arch: dict[str, Any], batch: int, threads: int, rounds: int,
                repeats: int) -> dict[str, Any]:
    """Widths ``arch`` rebuilt as a plain timm model, exported bare and timed against the dense model."""
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        dense = export(timm.create_model(name, pretrained=False, num_classes=classes, img_size=img).eval(),
                       Path(tmp) / "dense.onnx", img, batch)
        pruned = export(plain_model(name, img, classes, arch), Path(tmp) / "pruned.onnx", img, batch)
        return paired_ratio(session(dense, threads), session(pruned, threads), (batch, 3, img, img), rounds, repeats)


def remeasure(run: Path, batch: int, threads: int, rounds: int, repeats: int) -> dict[str, Any]:
    """The run's recorded widths rebuilt and timed against dense, with the run's own ratio beside."""
    report = json.loads((run / "report.json").read_text())
    base = json.loads((run / "finetuned" / "arch.json").read_text())["base"]
    name, img, classes = base["model_name"], base["img_size"], base["num_classes"]
    own = {(row["backend"], row["batch"], row["precision"]): row for row in report.get("latency") or []}
    out: dict[str, Any] = {"run": str(run), "batch": batch, "threads": threads, "model": name,
                           "flops_ratio": report.get("flops_ratio"), "budget": report.get("budget")}
    row = own.get(("ort-cpu", batch, "fp32"))
    out["run_ratio"] = row["latency_ms_pruned"] / row["latency_ms_dense"] if row else None
    out["plain_export"] = plain_ratio(name, img, classes, report["arch"], batch, threads, rounds, repeats)
    return out


BENCH_CLASSES = 10  # both of bench_accuracy.py's datasets (Fashion-MNIST, digits) have ten classes


def remeasure_rows(path: Path, threads: int, rounds: int, repeats: int, methods: list[str] | None = None,
                   tags: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows of a ``bench_accuracy.py --json`` file rebuilt from their widths and timed against dense at the batch
    the benchmark measured (32), with the row's own measured ratio beside: the rows of ``methods`` and
    ``tags`` where given, else every latency-budget row."""
    data = json.loads(path.read_text())
    settings = data["meta"]["settings"]
    out = []
    for row in data["rows"]:
        chosen = (row["method"] in methods if methods else row.get("budget") == "latency") and (
            not tags or row.get("tag", "") in tags)
        if not chosen or "blocks" not in row:
            continue
        arch = {"embed_dim": row["embed_dim"],
                "blocks": [{"heads": h, "head_dim": d, "mlp_dim": m} for h, d, m in row["blocks"]]}
        res = {"row": {k: row.get(k) for k in ("method", "tag", "budget", "ratio", "seed", "flops_ratio")}, "batch": 32,
               "threads": threads, "model": settings["model"],
               "run_ratio": row["latency_ms_pruned_ort_cpu_b32"] / row["latency_ms_dense_ort_cpu_b32"],
               "plain_export": plain_ratio(settings["model"], settings["img_size"], BENCH_CLASSES, arch, 32,
                                           threads, rounds, repeats)}
        out.append(res)
    return out


def _input_shape(path: Path, batch: int) -> tuple[int, ...]:
    dims = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0].shape
    return (batch, *dims[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path,
                        help="run directories (each with report.json), or with --files folders of ONNX files")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--rounds", type=int, default=5, help="alternating dense/pruned rounds")
    parser.add_argument("--repeats", type=int, default=30, help="calls per model per round")
    parser.add_argument("--files", action="store_true",
                        help="time the ONNX files of each run's export/ (or of each folder given)")
    parser.add_argument("--backend", action="append", choices=["ort", "openvino"],
                        help="plain sessions to time --files in (repeatable; default ort)")
    parser.add_argument("--rows", action="store_true",
                        help="the paths are bench_accuracy.py --json files: time their latency-budget rows")
    parser.add_argument("--row-method", action="append", help="--rows: the rows of this method instead (repeatable)")
    parser.add_argument("--row-tag", action="append", help="--rows: only the rows of this tag ('' for untagged)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    results = _rows(args) if args.rows else _runs(args)
    if results is None:
        return 2
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


def _rows(args: argparse.Namespace) -> list[dict[str, Any]] | None:
    results = []
    for path in args.runs:
        if not path.is_file():
            print(f"{path}: expected a bench_accuracy.py --json file", file=sys.stderr)
            return None
        for res in remeasure_rows(path, args.threads, args.rounds, args.repeats, args.row_method, args.row_tag):
            plain = res["plain_export"]
            print(f"{path} {res['row']}: pruned/dense, the row's profile {res['run_ratio']:.3f}, plain export "
                  f"{plain['ratio']:.3f} (dense {plain['dense_ms']:.2f} ms), its quiet rounds {_quiet(plain)}")
            results.append(res)
    return results


def _quiet(timing: dict[str, Any]) -> str:
    if timing["quiet_ratio"] is None:
        return f"none of {len(timing['ratios'])}"
    return f"{timing['quiet_ratio']:.3f} ({timing['quiet_rounds']} of {len(timing['ratios'])})"


def _runs(args: argparse.Namespace) -> list[dict[str, Any]] | None:
    results = []
    for run in args.runs:
        is_run = (run / "report.json").is_file()
        folder = run / "export" if is_run else run
        if not is_run and not (args.files and (folder / "dense.onnx").is_file()):
            print(f"{run}: expected a finished run directory (report.json), or with --files a folder with "
                  "dense.onnx", file=sys.stderr)
            return None
        res: dict[str, Any] = {"run": str(run)}
        if is_run:
            res = remeasure(run, args.batch, args.threads, args.rounds, args.repeats)
            own = f"{res['run_ratio']:.3f}" if res["run_ratio"] is not None else "-"
            plain = res["plain_export"]
            print(f"{run}: pruned/dense, run's profile {own}, plain export {plain['ratio']:.3f} (dense "
                  f"{plain['dense_ms']:.2f} ms), its quiet rounds {_quiet(plain)}")
        if args.files:
            res["files"] = time_files(folder, _input_shape(folder / "dense.onnx", args.batch), args.threads,
                                      args.backend or ["ort"], args.rounds, args.repeats)
            for key, timing in res["files"].items():
                print(f"{run}: {key} {timing['median_ms']:.2f} ms, {timing['speedup_vs_dense_fp32']:.2f}x dense fp32")
        results.append(res)
    return results


if __name__ == "__main__":
    sys.exit(main())
