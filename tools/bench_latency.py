"""Dense vs OFB-shaped pruned ViTs: measured speedup next to the FLOPs ratio (the limit) on each backend.

Pruned architectures come from the OFB machinery with random weights (latency does not depend on the
values): every group starts at full width and the budget enforcement narrows the least important units
(random importance) one grid step at a time until the FLOPs target is met, which gives the uneven
per-block widths a real search produces. With --align the grids hold multiples of N only.

    python tools/bench_latency.py --model deit_small_patch16_224 --ratio 0.5 --align none --align 8 \
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
from ofbdeploy.arch import ArchSpec, ViTShape
from ofbdeploy.deploy.workflow import export_models, profile_models
from ofbdeploy.grids import space_for
from ofbdeploy.materialize import materialize
from ofbdeploy.recipe import ExportCfg, ProfileCfg
from ofbdeploy.search.budget import enforce_budget
from ofbdeploy.search.searchable import SearchableViT
from ofbdeploy.table import format_table


def pruned_pair(name: str, ratio: float, align: int | None, img_size: int, seed: int = 0):
    """(dense timm model, pruned plain timm model, its ArchSpec) at ``ratio`` of dense FLOPs."""
    torch.manual_seed(seed)
    dense = timm.create_model(name, img_size=img_size).eval()
    shape = ViTShape.from_model(dense, name)
    space = space_for(shape, align)
    searchable = SearchableViT(copy.deepcopy(dense), space, name)
    searchable.decide_widest()
    enforce_budget(searchable, ratio * ArchSpec.dense(shape).macs())
    pruned, spec = materialize(searchable.eval())
    return dense, pruned, spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="timm ViT name (repeatable)")
    parser.add_argument("--ratio", action="append", type=float, help="FLOPs target as a fraction (repeatable)")
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
    for name in args.model or ["deit_small_patch16_224"]:
        for ratio in args.ratio or [0.5]:
            for align_text in args.align or ["none"]:
                align = None if align_text == "none" else int(align_text)
                dense, pruned, spec = pruned_pair(name, ratio, align, args.img_size)
                achieved = spec.macs() / ArchSpec.dense(spec.base).macs()
                with tempfile.TemporaryDirectory() as tmp:
                    artifacts = export_models({"dense": dense, "pruned": pruned}, Path(tmp),
                                              ExportCfg(fp16=args.precision == "fp16", check_images=4),
                                              img_size=args.img_size)
                    measured, skipped = profile_models({"dense": dense, "pruned": pruned}, artifacts, profile,
                                                       achieved)
                for row in measured:
                    row.update(model=name, align=align_text, flops_ratio=achieved,
                               parity_max_abs_diff=max(c["max_abs_diff"] for c in artifacts.checks),
                               arch=[(b.heads, b.head_dim, b.mlp_dim) for b in spec.blocks], embed_dim=spec.embed_dim)
                    rows.append(row)
                    table.append((name, align_text, f"{achieved:.3f}", row["backend"], row["precision"], row["batch"],
                                  f"{row['latency_ms_dense']:.2f}", f"{row['latency_ms_pruned']:.2f}",
                                  f"{row['speedup']:.2f}x", f"{1 / achieved:.2f}x",
                                  f"{row['speedup'] * achieved:.2f}"))
                for reason in skipped:
                    print(f"not measured: {reason}")
    print(format_table(("model", "align", "FLOPs ratio", "backend", "precision", "batch", "dense ms", "pruned ms",
                        "speedup", "FLOPs limit", "speedup/limit"), table))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"date": date.today().isoformat(), "machine": platform.platform(), "torch": torch.__version__,
                "command": "python tools/bench_latency.py " + " ".join(sys.argv[1:])}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
