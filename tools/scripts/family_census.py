"""Which timm ViTs and Swins can ofbdeploy prune? The registry-wide census, with its counts.

Every model of timm's ViT and Swin modules under 400 M parameters is built on the meta device and sorted into
supported (by the ViT or the Swin family), refused (with the one-line reason) or crashed (any other
exception: a bug). ``--exactness`` also materialises one random architecture of a shrunken copy of each
variant (or, with ``--real-widths``, of every supported model at its own widths) at a small image size.

    python tools/scripts/family_census.py                      # counts, refusal reasons, variants
    python tools/scripts/family_census.py --exactness --json census.json
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time

from ofbdeploy.verify.census import MAX_PARAMS, MODULES, census, check_exactness, registry_names, representatives


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", nargs="+", default=list(MODULES), help="timm model modules to census")
    parser.add_argument("--max-params", type=float, default=MAX_PARAMS, help="skip models this large or larger")
    parser.add_argument("--exactness", action="store_true", help="check one shrunken model per variant")
    parser.add_argument("--real-widths", action="store_true", help="with --exactness: every supported model")
    parser.add_argument("--json", default=None, help="write every verdict here")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    verdicts = census(registry_names(tuple(args.modules)), int(args.max_params))
    counts = collections.Counter(v.verdict for v in verdicts)
    print(f"{len(verdicts)} models of {', '.join(args.modules)} under {args.max_params / 1e6:.0f} M parameters "
          f"({time.perf_counter() - t0:.0f} s): {counts['supported']} supported, {counts['refused']} refused, "
          f"{counts['crashed']} crashed")
    for family, n in collections.Counter(v.family for v in verdicts if v.family).most_common():
        variants = len({v.variant for v in verdicts if v.family == family})
        print(f"  supported by {family}: {n} models, {variants} variants")
    for reason, n in collections.Counter(v.refused for v in verdicts if v.refused).most_common():
        print(f"  refused ({n}): {reason}")
    for v in verdicts:
        if v.crashed:
            print(f"  CRASHED {v.name}: {v.crashed}")
    rows = {v.name: {"verdict": v.verdict, "params": v.params, "family": v.family, "refused": v.refused,
                     "crashed": v.crashed} for v in verdicts}
    failed = 0
    if args.exactness:
        checked = [v for v in verdicts if v.family] if args.real_widths else representatives(verdicts)
        for v in checked:
            agreement = check_exactness(v.name, shrink=not args.real_widths)
            failed += not agreement.ok
            rows[v.name]["exactness"] = {"max_abs_diff": agreement.max_abs_diff, "ok": agreement.ok,
                                         "macs_spec": agreement.macs_spec, "macs_counted": agreement.macs_counted}
            print(f"  {'ok  ' if agreement.ok else 'FAIL'} {v.name}: max |diff| {agreement.max_abs_diff:.1e}, "
                  f"MACs {agreement.macs_spec:.0f} analytic / {agreement.macs_counted:.0f} counted")
        print(f"exactness: {len(checked) - failed} of {len(checked)} exact")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if counts["crashed"] or failed else 0


if __name__ == "__main__":
    sys.exit(main())
