"""Hostile inputs and faults against the real `ofbdeploy` CLI (one subprocess each), with what happened.

Each case builds its input in a scratch workspace, runs the command, and records the exit code against
the one the contract asks for (0 ok, 1 limit missed, 2 bad input, 3 internal error, 130 interrupted),
whether stderr ended with exactly one error line and no traceback, and whether the run directory it
touched is intact (unchanged when the command was refused; consistent and complete when it ran).
The cases live in ``hostile/``, one module per category (recipe and options, paths, models and
checkpoints, data, baselines, luts, arch, rundir, signals, links), on the harness in ``hostile/harness.py``.

    python tools/qa/hostile_inputs.py --json hostile.json           # every case (about 10 minutes on 2 cores)
    python tools/qa/hostile_inputs.py --only recipe --only paths    # some categories
    python tools/qa/hostile_inputs.py --list                        # the cases, without running them

Prints a markdown table; exits 1 when any case is not handled as expected.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from hostile import CASES, REPO, Outcome, Workspace, run_case


def _codes(expected: int | tuple[int, ...]) -> str:
    return " or ".join(map(str, expected)) if isinstance(expected, tuple) else str(expected)


def _table(outcomes: list[Outcome]) -> None:
    print("| category | input or fault | expected | got | one line, no traceback | intact | what it said |")
    print("|---|---|---|---|---|---|---|")
    for o in outcomes:
        clean = "yes" if o.one_line and not o.traceback else "NO"
        print(f"| {o.category} | {o.case} | {_codes(o.expected)} | {o.got} | {clean} | {'yes' if o.intact else 'NO'} | "
              f"{o.note.replace('|', '/')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=[], help="categories to run (repeatable)")
    parser.add_argument("--case", action="append", default=[], help="cases whose name contains this (repeatable)")
    parser.add_argument("--list", action="store_true", help="print the selected cases and exit")
    parser.add_argument("--json", type=Path, default=None, help="write the outcomes here")
    parser.add_argument("--keep", action="store_true", help="keep the scratch workspace")
    args = parser.parse_args()
    chosen = [c for c in CASES if (not args.only or c[0] in args.only)
              and (not args.case or any(part in c[1] for part in args.case))]
    if args.list:
        for category, name, expected, _ in chosen:
            print(f"{category}\t{name}\t{_codes(expected)}")
        print(f"{len(chosen)} cases", file=sys.stderr)
        return
    sys.path.insert(0, str(REPO))
    root = Path(tempfile.mkdtemp(prefix="ofbdeploy-hostile-"))
    ws = Workspace(root)
    outcomes = []
    try:
        for category, name, expected, fn in chosen:
            outcome = run_case(ws, category, name, expected, fn)
            outcomes.append(outcome)
            print(f"{'ok  ' if outcome.ok else 'FAIL'} [{category}] {name}: expected {_codes(expected)}, "
                  f"got {outcome.got} ({outcome.seconds:.1f} s)", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    _table(outcomes)
    passed = sum(o.ok for o in outcomes)
    print(f"\n{passed}/{len(outcomes)} handled as the contract asks")
    if args.json:
        args.json.write_text(json.dumps([{**asdict(o), "ok": o.ok} for o in outcomes], indent=1) + "\n")
    sys.exit(0 if passed == len(outcomes) else 1)


if __name__ == "__main__":
    main()
