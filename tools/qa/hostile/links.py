"""Links and special files where the project reads or writes: a run file linked out of the run directory must
not carry the run's writes out, and a FIFO, a device or a name too long is one line, never a hang."""

from __future__ import annotations

import os

from .harness import case, refused_untouched


def _planted(ws, name: str):
    """A finished run whose ``name`` is a link to a file outside it, and that file."""
    run = ws.finished()
    outside = run.parent / "outside.txt"
    outside.write_text("precious\n")
    (run / name).unlink(missing_ok=True)
    (run / name).symlink_to(outside)
    return run, outside


@case("links", "run.log linked to a file outside the run", 2)
def _log_link(ws):
    run, outside = _planted(ws, "run.log")
    (run / "metrics.json").unlink()
    result = ws.rerun(run)
    kept = outside.read_text() == "precious\n"
    return result, kept, f"outside file untouched: {kept}"


@case("links", "run.lock linked to a file outside the run", 2)
def _lock_link(ws):
    run, outside = _planted(ws, "run.lock")
    result = ws.rerun(run)
    kept = outside.read_text() == "precious\n"
    return result, kept, f"outside file untouched (not truncated): {kept}"


@case("links", "report.json linked outside, rewritten by a rerun", 0)
def _report_link(ws):
    run, outside = _planted(ws, "report.json")
    (run / "metrics.json").unlink()
    result = ws.rerun(run)
    ok = outside.read_text() == "precious\n" and not (run / "report.json").is_symlink()
    return result, ok, f"link replaced, outside file untouched: {ok}"


@case("links", "recipe is a FIFO", 2)
def _fifo_recipe(ws):
    where = ws.new_dir("fifo-recipe")
    os.mkfifo(where / "r.yaml")
    return ws.cli("run", where / "r.yaml"), True, "returned without a writer"


@case("links", "check --baseline naming a FIFO", 2)
def _fifo_baseline(ws):
    run = ws.finished()
    os.mkfifo(run.parent / "base.json")
    return refused_untouched(ws, run, "check", run, "--baseline", run.parent / "base.json")


@case("links", "check --write-baseline naming a FIFO", 2)
def _fifo_write_baseline(ws):
    run = ws.finished()
    fifo = run.parent / "base.json"
    os.mkfifo(fifo)
    result, same, note = refused_untouched(ws, run, "check", run, "--write-baseline", fifo)
    still = fifo.exists() and not fifo.is_file()
    return result, same and still, f"{note}; still a FIFO: {still}"


@case("links", "recipe path with a name too long", 2)
def _long_name(ws):
    return ws.cli("run", ws.new_dir("long") / ("r" * 300 + ".yaml")), True, ""
