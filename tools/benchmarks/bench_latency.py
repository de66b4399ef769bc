"""Dense vs OFB-shaped pruned ViTs: measured speedup next to the FLOPs ratio (the limit) on each backend.

Pruned architectures come from the OFB machinery with random weights (latency does not depend on the
values): every group starts at full width and the budget enforcement narrows the least important units
(random importance) one grid step at a time until the budget is met, which gives the uneven per-block
widths a real search produces. Two budgets, one per method:
  flops    the MACs of the architecture at most ``ratio`` of dense
  latency  the latency table's prediction (``--lut-backend`` at ``--lut-batch``, built on first use and
           cached) at most ``ratio`` of the dense latency measured while building it
With --align the grids hold multiples of N only.

    python tools/benchmarks/bench_latency.py --model deit_small_patch16_224 --ratio 0.5 --align none --align 8 \
        --backend ort-cpu --batch 1,8 --json docs/benchmarks/latency_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

import timm
import torch

import ofbdeploy.models.zoo  # noqa: F401  (the small ofb_vit_* configs, for smoke runs)
from ofbdeploy.arch import ArchSpec
from ofbdeploy.deploy.config import ExportCfg, ProfileCfg
from ofbdeploy.deploy.workflow import export_models, profile_models
from ofbdeploy.families.vit.searchable import SearchableViT
from ofbdeploy.families.vit.space import space_for
from ofbdeploy.families.vit.support import read_vit_shape
from ofbdeploy.latency.lut import LatencyLUT, load_or_build
from ofbdeploy.models.materialize import materialize
from ofbdeploy.prune.budget import enforce_budget, spec_cost
from ofbdeploy.table import format_table


def pruned_pair(name: str, ratio: float, align: int | None, img_size: int, method: str, lut_options: dict,
                lut_file: Path | None = None, seed: int = 0):
    """(dense timm model, pruned plain timm model, its ArchSpec, predicted fraction of dense latency or None)
    at ``ratio`` of dense FLOPs (``method`` flops) or of the table's dense latency (``method`` latency)."""
    torch.manual_seed(seed)
    dense = timm.create_model(name, img_size=img_size).eval()
    shape = read_vit_shape(dense, name)
    space = space_for(shape, align)
    searchable = SearchableViT(copy.deepcopy(dense), space, name)
    searchable.decide_widest()
    if method == "latency":
        lut = LatencyLUT.load(lut_file) if lut_file else load_or_build(shape, space, **lut_options)
        dense_ms = lut.dense_ms
        enforce_budget(searchable, ratio * dense_ms, cost=spec_cost(shape, lut.predict))
    else:
        enforce_budget(searchable, ratio * ArchSpec.dense(shape).macs())
    pruned, spec = materialize(searchable.eval())
    predicted = lut.predict(spec) / dense_ms if method == "latency" else None
    return dense, pruned, spec, predicted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="timm ViT name (repeatable)")
    parser.add_argument("--ratio", action="append", type=float, help="budget as a fraction of dense (repeatable)")
    parser.add_argument("--method", action="append", choices=["flops", "latency"],
                        help="budget kind (repeatable; default both)")
    parser.add_argument("--lut-backend", default="ort-cpu", help="backend of the latency table (method latency)")
    parser.add_argument("--lut-batch", type=int, default=1, help="batch of the latency table (method latency)")
    parser.add_argument("--lut-cache", type=Path, default=None, help="latency table cache directory")
    parser.add_argument("--lut", type=Path, default=None, help="use this latency table file instead of the cache")
    parser.add_argument("--align", action="append", default=None, help="none or 8/16/32/64 (repeatable)")
    parser.add_argument("--backend", action="append", help="latency backend (repeatable; default ort-cpu)")
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="write the raw rows here")
    args = parser.parse_args()
    profile = ProfileCfg(backends=args.backend or ["ort-cpu"], batches=[int(b) for b in args.batch.split(",")],
                         precision=args.precision, repeats=args.repeats, warmup=args.warmup)
    rows, table = [], []
    lut_options = {"backend": args.lut_backend, "precision": args.precision, "batch": args.lut_batch,
                   "cache_dir": args.lut_cache}
    for name in args.model or ["deit_small_patch16_224"]:
        for ratio in args.ratio or [0.5]:
            for method in args.method or ["flops", "latency"]:
                for align_text in args.align or ["none"]:
                    align = None if align_text == "none" else int(align_text)
                    dense, pruned, spec, predicted = pruned_pair(name, ratio, align, args.img_size, method,
                                                                 lut_options, args.lut)
                    achieved = spec.macs() / ArchSpec.dense(spec.base).macs()
                    with tempfile.TemporaryDirectory() as tmp:
                        artifacts = export_models({"dense": dense, "pruned": pruned}, Path(tmp),
                                                  ExportCfg(fp16=args.precision == "fp16", check_images=4),
                                                  img_size=args.img_size)
                        measured, skipped = profile_models({"dense": dense, "pruned": pruned}, artifacts, profile,
                                                           achieved)
                    for row in measured:
                        row.update(model=name, method=method, target=ratio, align=align_text, flops_ratio=achieved,
                                   predicted_latency_fraction=predicted,
                                   parity_max_abs_diff=max(c["max_abs_diff"] for c in artifacts.checks),
                                   arch=[(b.heads, b.head_dim, b.mlp_dim) for b in spec.blocks],
                                   embed_dim=spec.embed_dim)
                        rows.append(row)
                        table.append((name, f"{method} {ratio:.2f}", align_text, f"{achieved:.3f}", row["backend"],
                                      row["batch"], f"{row['latency_ms_dense']:.2f}", f"{row['latency_ms_pruned']:.2f}",
                                      f"{row['speedup']:.2f}x", f"{1 / achieved:.2f}x",
                                      f"{row['speedup'] * achieved:.2f}",
                                      "-" if predicted is None else f"{1 / predicted:.2f}x"))
                    for reason in skipped:
                        print(f"not measured: {reason}")
    print(format_table(("model", "budget", "align", "FLOPs ratio", "backend", "batch", "dense ms", "pruned ms",
                        "speedup", "FLOPs limit", "speedup/limit", "LUT-predicted speedup"), table))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"date": date.today().isoformat(), "machine": platform.platform(), "torch": torch.__version__,
                "command": "python tools/benchmarks/bench_latency.py " + " ".join(sys.argv[1:])}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
