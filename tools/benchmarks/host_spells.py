"""Is this host quiet enough to check a latency ratio to a few percent? Time two ONNX files alternately for a
while and show its spells of load.

A shared host (a cloud VM) has spells of other tenants' work lasting seconds to minutes, and they do not slow a
small model and a large one alike: on a 2-vCPU VM they added 10-13 ms to every batch-1 call of both DeiT-S and a
pruned DeiT-S, so the same pair measured 0.66 of dense in quiet spells and 0.77 in loaded ones. This tool times
``dense`` and ``pruned`` (plain ONNX Runtime sessions, nothing of ofbdeploy) in ``--trials`` short alternating
measurements one after another, calls a trial quiet where both models ran within ``--margin`` of their fastest
trial, and prints the ratio of the quiet and of the loaded trials with their spreads. A tolerance on a latency
ratio can be checked on this host only to about the quiet trials' spread; where the two kinds differ by more than
the tolerance, a check that does not tell them apart lands on either side by chance.

    python tools/benchmarks/host_spells.py runs/x/export/dense.onnx runs/x/export/pruned.onnx --trials 40
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort


def session(path: Path, threads: int, batch: int):
    """A plain CPU session on ``path`` and a call that runs it on a fixed random input of ``batch`` images."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    meta = sess.get_inputs()[0]
    x = np.random.default_rng(0).standard_normal((batch, *meta.shape[1:]), dtype=np.float32)
    return lambda: sess.run(None, {meta.name: x})


def block_ms(call, calls: int) -> float:
    """The median of ``calls`` timed calls, after one untimed call (the other model's idle threads settle)."""
    call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def trial(dense, pruned, rounds: int, calls: int) -> tuple[float, float]:
    """Dense and pruned medians of one measurement: ``rounds`` blocks each, in ABBA order."""
    d, p = [], []
    for k in range(rounds):
        order = [(dense, d), (pruned, p)]
        for call, out in order if k % 2 == 0 else order[::-1]:
            out.append(block_ms(call, calls))
    return statistics.median(d), statistics.median(p)


def spells(trials: list[dict[str, float]], margin: float) -> dict[str, Any]:
    """Each trial called quiet (both models within ``margin`` of their fastest trial) or loaded; the ratio of
    each kind: median, 10th and 90th percentiles, and the relative spread (p90 - p10) / median."""
    fastest = min(t["dense_ms"] for t in trials), min(t["pruned_ms"] for t in trials)
    summary: dict[str, Any] = {"margin": margin, "fastest_dense_ms": fastest[0], "fastest_pruned_ms": fastest[1]}
    for t in trials:
        t["quiet"] = t["dense_ms"] <= fastest[0] * (1 + margin) and t["pruned_ms"] <= fastest[1] * (1 + margin)
    for kind, quiet in (("quiet", True), ("loaded", False)):
        ratios = [t["ratio"] for t in trials if t["quiet"] == quiet]
        if ratios:
            p10, mid, p90 = np.percentile(ratios, [10, 50, 90])
            summary[kind] = {"trials": len(ratios), "ratio": float(mid), "p10": float(p10), "p90": float(p90),
                             "spread": float((p90 - p10) / mid)}
        else:
            summary[kind] = {"trials": 0}
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dense", type=Path, help="the dense model's ONNX file")
    parser.add_argument("pruned", type=Path, help="the pruned model's ONNX file")
    parser.add_argument("--trials", type=int, default=40, help="measurements, one after another")
    parser.add_argument("--rounds", type=int, default=5, help="alternating blocks per model in a trial")
    parser.add_argument("--calls", type=int, default=4, help="timed calls per block")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="intra-op threads")
    parser.add_argument("--margin", type=float, default=0.075,
                        help="a trial is quiet where both models ran within this fraction of their fastest trial")
    parser.add_argument("--json", type=Path, help="write every trial and the summary here")
    args = parser.parse_args(argv)
    for path in (args.dense, args.pruned):
        if not path.is_file():
            print(f"{path}: expected an ONNX file", file=sys.stderr)
            return 2
    if min(args.trials, args.rounds, args.calls, args.batch, args.threads) < 1 or args.margin <= 0:
        print("--trials, --rounds, --calls, --batch, --threads and --margin must be positive", file=sys.stderr)
        return 2
    dense, pruned = (session(p, args.threads, args.batch) for p in (args.dense, args.pruned))
    trial(dense, pruned, 1, 3)  # warm-up
    start, trials = time.perf_counter(), []
    for index in range(args.trials):
        d, p = trial(dense, pruned, args.rounds, args.calls)
        trials.append({"trial": index, "at_s": time.perf_counter() - start, "dense_ms": d, "pruned_ms": p,
                       "ratio": p / d})
    summary = spells(trials, args.margin)
    for t in trials:
        print(f"{t['at_s']:7.1f} s  dense {t['dense_ms']:8.2f} ms  pruned {t['pruned_ms']:8.2f} ms  "
              f"ratio {t['ratio']:.3f}  {'quiet' if t['quiet'] else 'loaded'}")
    for kind in ("quiet", "loaded"):
        s = summary[kind]
        print(f"{kind}: {s['trials']} trial(s)" + (f", ratio {s['ratio']:.3f} (p10 {s['p10']:.3f}, p90 {s['p90']:.3f}, "
                                                   f"spread {s['spread']:.1%})" if s["trials"] else ""))
    if args.json:
        args.json.write_text(json.dumps({"dense": str(args.dense), "pruned": str(args.pruned), "batch": args.batch,
                                         "threads": args.threads, "summary": summary, "trials": trials}, indent=1)
                             + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
