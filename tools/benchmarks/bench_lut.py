"""How well the latency table predicts whole models it has never seen, on this machine and backend.

Random uneven architectures (like the ones a search ends with) are spread over the range from narrow to
dense; each is exported, timed alternately with the dense model (the deploy protocol's paired mode), and
compared with the table's prediction. Two errors are reported per model: of the absolute prediction
(milliseconds, what a latency budget in ms relies on) and of the predicted fraction of dense latency
(what a ``target_ratio`` budget relies on; immune to the machine being faster or slower than when the
table was built).

    python tools/benchmarks/bench_lut.py --model deit_small_patch16_224 --backend ort-cpu --batch 1 --samples 8 \\
        --json docs/benchmarks/lut_accuracy_deit_s_ort_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
import timm
import torch

import ofbdeploy.models.zoo  # noqa: F401  (the small ofb_vit_* configs, for smoke runs)
from ofbdeploy.arch import ArchSpec
from ofbdeploy.deploy.measure import measure_pair
from ofbdeploy.families.vit.space import space_for
from ofbdeploy.families.vit.support import read_vit_shape
from ofbdeploy.latency.lut import LatencyLUT, load_or_build, sample_arch, spec_runner
from ofbdeploy.table import format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deit_small_patch16_224", help="timm ViT name")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--align", type=int, default=None, help="aligned grids (8/16/32/64); default none")
    parser.add_argument("--backend", default="ort-cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--samples", type=int, default=8, help="held-out architectures to check")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per model and pair")
    parser.add_argument("--lut", type=Path, default=None, help="a table file; default: the cache, else build one")
    parser.add_argument("--cache", type=Path, default=None, help="LUT cache directory")
    parser.add_argument("--lut-repeats", type=int, default=20, help="timed calls per probe when building")
    parser.add_argument("--seed", type=int, default=1, help="sampling seed (a table draws its own probes with seed 0)")
    parser.add_argument("--json", type=Path, default=None, help="write the raw rows here")
    args = parser.parse_args()

    shape = read_vit_shape(timm.create_model(args.model, img_size=args.img_size, pretrained=False), args.model)
    space = space_for(shape, args.align)
    if args.lut is not None:
        lut = LatencyLUT.load(args.lut)
    else:
        lut = load_or_build(shape, space, backend=args.backend, precision=args.precision, batch=args.batch,
                            cache_dir=args.cache, repeats=args.lut_repeats)
    rng = np.random.default_rng(args.seed)
    dense = ArchSpec.dense(shape)
    rows, table = [], []
    with tempfile.TemporaryDirectory() as tmp:
        dense_runner = spec_runner(dense, args.backend, args.precision, args.batch, Path(tmp))
        for fraction in np.linspace(0.05, 0.95, args.samples):
            spec = sample_arch(shape, space, float(fraction), rng)
            runner = spec_runner(spec, args.backend, args.precision, args.batch, Path(tmp))
            d, p = measure_pair(dense_runner, runner, args.batch, warmup=5, repeats=args.repeats)
            predicted, predicted_dense = lut.predict(spec), lut.predict(dense)
            fraction = predicted / lut.dense_ms  # what a target_ratio budget is held to
            row = {"flops_ratio": spec.macs() / dense.macs(), "predicted_ms": predicted, "measured_ms": p.median_ms,
                   "predicted_dense_ms": predicted_dense, "measured_dense_ms": d.median_ms,
                   "error": predicted / p.median_ms - 1, "dense_error": predicted_dense / d.median_ms - 1,
                   "predicted_fraction": fraction, "measured_fraction": p.median_ms / d.median_ms,
                   "ratio_error": fraction / (p.median_ms / d.median_ms) - 1,
                   "embed_dim": spec.embed_dim, "blocks": [(b.heads, b.head_dim, b.mlp_dim) for b in spec.blocks]}
            rows.append(row)
            table.append((f"{row['flops_ratio']:.1%}", f"{predicted:.2f}", f"{p.median_ms:.2f}", f"{row['error']:+.1%}",
                          f"{d.median_ms:.2f}", f"{row['dense_error']:+.1%}", f"{row['ratio_error']:+.1%}"))
    print(f"table: {lut.key.family} on {lut.key.backend} {lut.key.precision} batch {lut.key.batch} "
          f"({lut.key.device}), {lut.points} probe models, built in {lut.build_seconds:.0f} s")
    print(format_table(("FLOPs", "predicted ms", "measured ms", "error", "dense ms", "dense error",
                        "fraction error"), table))
    summary = {key: {"median_abs": float(np.median(np.abs([r[key] for r in rows]))),
                     "max_abs": float(np.max(np.abs([r[key] for r in rows])))}
               for key in ("error", "dense_error", "ratio_error")}
    print("  ".join(f"{key}: median |.| {v['median_abs']:.1%}, max |.| {v['max_abs']:.1%}"
                    for key, v in summary.items()))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"date": date.today().isoformat(), "machine": platform.platform(), "torch": torch.__version__,
                "device": lut.key.device, "command": "python tools/benchmarks/bench_lut.py " + " ".join(sys.argv[1:]),
                "lut": lut.to_dict()}
        args.json.write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
