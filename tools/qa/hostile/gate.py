"""Baselines and the CI gate (``check``): malformed or foreign baselines, edited reports, limits the run did
not measure."""

from __future__ import annotations

import json
from collections.abc import Callable

from .harness import Proc, Workspace, case, consistent, refused_untouched


def baseline_case(ws: Workspace, edit: Callable[[dict], object], raw: bool = False) -> tuple[Proc, bool, str]:
    run = ws.finished()
    base = run.parent / "baseline.json"
    made = ws.cli("check", run, "--write-baseline", base)
    if made.code != 0:
        return made, False, "could not write the baseline"
    data = json.loads(base.read_text())
    new = edit(data)
    base.write_bytes(new if raw else json.dumps(new).encode())
    return refused_untouched(ws, run, "check", run, "--baseline", base)


def _rows(data, **change):
    return {**data, "rows": [{**data["rows"][0], **change}]}


for _name, _code, _edit, _raw in [
    ("baseline {'foo': 1}", 2, lambda d: {"foo": 1}, False),
    ("baseline with no rows", 2, lambda d: {**d, "rows": []}, False),
    ("baseline of another model", 2, lambda d: {**d, "model": "deit_small_patch16_224"}, False),
    ("baseline of another recipe", 2, lambda d: {**d, "identity": "0" * 64}, False),
    ("baseline of an older format", 2, lambda d: {**d, "format": "ofbdeploy.baseline/1"}, False),
    ("baseline that is not JSON", 2, lambda d: b"{rows: [", True),
    ("baseline that is a JSON list", 2, lambda d: [d], False),
    ("baseline with a NaN speedup", 2, lambda d: json.dumps(_rows(d, speedup=1.0)).replace(
        '"speedup": 1.0', '"speedup": NaN').encode(), True),
    ("baseline row with a string speedup", 2, lambda d: _rows(d, speedup="fast"), False),
    ("baseline row with an unknown backend", 2, lambda d: _rows(d, backend="tpu"), False),
    ("baseline naming a measurement the run lacks", 1, lambda d: _rows(d, batch=999), False),
    ("baseline twice as fast (a regression)", 1, lambda d: _rows(d, speedup=d["rows"][0]["speedup"] * 2), False),
]:
    case("baselines", _name, _code)(lambda ws, e=_edit, r=_raw: baseline_case(ws, e, r))


@case("baselines", "report.json edited by hand", 2)
def _edited_report(ws):
    run = ws.finished()
    report = json.loads((run / "report.json").read_text())
    report["latency"][0]["speedup"] = 99.0
    (run / "report.json").write_text(json.dumps(report))
    return refused_untouched(ws, run, "check", run)


@case("baselines", "a budget limit the run did not measure", 1)
def _unmeasured_limit(ws):
    run = ws.finished()
    result = ws.rerun(run, "--set", "budget.latency=[{backend: ort-cpu, batch: 64, max_ms: 100}]")
    ok, note = consistent(run)
    gate = ws.cli("check", run)
    return result, ok and gate.code == 1, f"{note}; check exits {gate.code}: {gate.last_line[:80]}"


@case("baselines", "check with no limit and no baseline", 2)
def _nothing_to_check(ws):
    run = ws.finished()
    result = ws.rerun(run, "--set", "budget={}")
    return ws.cli("check", run), result.code == 0, f"run exits {result.code}"


@case("baselines", "check on a directory that is not a run", 2)
def _check_not_run(ws):
    return ws.cli("check", ws.new_dir("notrun")), True, ""
