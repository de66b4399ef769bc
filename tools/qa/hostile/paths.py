"""Output and input paths: existing files, directories, unwritable places, and targets that are not what a
command expects."""

from __future__ import annotations

from .harness import PICO, case, refused_untouched


@case("paths", "run --output naming an existing file", 2)
def _out_file(ws):
    where = ws.new_dir("outfile")
    (where / "f").write_text("mine")
    result = ws.cli("run", ws.recipe(where), "--output", where / "f")
    return result, (where / "f").read_text() == "mine", "file untouched"


@case("paths", "run --output below a file", 2)
def _out_below_file(ws):
    where = ws.new_dir("outbelow")
    (where / "f").write_text("mine")
    return ws.cli("run", ws.recipe(where), "--output", where / "f" / "run"), True, ""


@case("paths", "run --output in /proc (unwritable)", 2)
def _out_proc(ws):
    return ws.cli("run", ws.recipe(ws.new_dir("outproc")), "--output", "/proc/ofbdeploy-run"), True, ""


@case("paths", "run --output a non-empty foreign directory", 2)
def _out_foreign(ws):
    where = ws.new_dir("outforeign")
    (where / "home").mkdir()
    (where / "home" / "notes.txt").write_text("mine")
    result = ws.cli("run", ws.recipe(where), "--output", where / "home")
    return result, [p.name for p in (where / "home").iterdir()] == ["notes.txt"], "directory untouched"


@case("options", "check --tolerance 150%", 2)
def _tolerance(ws):
    run = ws.finished()
    return refused_untouched(ws, run, "check", run, "--tolerance", "150%")


@case("paths", "check --write-baseline into a directory", 2)
def _wb_dir(ws):
    run = ws.finished()
    return refused_untouched(ws, run, "check", run, "--write-baseline", run.parent)


@case("paths", "check --write-baseline in /proc", 2)
def _wb_proc(ws):
    run = ws.finished()
    return refused_untouched(ws, run, "check", run, "--write-baseline", "/proc/ofb-baseline.json")


@case("paths", "selfcheck --save naming a file", 2)
def _save_file(ws):
    where = ws.new_dir("savefile")
    (where / "f").write_text("mine")
    return ws.cli("selfcheck", "--trials", "0", "--save", where / "f"), (where / "f").read_text() == "mine", ""


@case("paths", "lut build --cache-dir naming a file", 2)
def _cache_file(ws):
    where = ws.new_dir("cachefile")
    (where / "f").write_text("mine")
    return ws.cli("lut", "build", "--model", PICO, "--cache-dir", where / "f"), True, ""


@case("paths", "info on a missing path", 2)
def _info_missing(ws):
    return ws.cli("info", ws.root / "nowhere"), True, ""


@case("paths", "export on a directory that is neither a run nor a model", 2)
def _export_other(ws):
    return ws.cli("export", ws.new_dir("empty")), True, ""
