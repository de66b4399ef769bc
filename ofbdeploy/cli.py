"""The ``ofbdeploy`` command line.

Every command ends through :meth:`_Group.invoke`, which maps what happened to the exit-code contract of
:mod:`ofbdeploy.errors` in one place: commands raise (:class:`OfbError` subclasses for bad input,
:class:`LimitMissed` for a missed limit) and never call ``sys.exit`` themselves.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import click

from ofbdeploy.arch.grids import ALIGNMENTS
from ofbdeploy.deploy.runtimes import registry
from ofbdeploy.errors import (
    EXIT_CODE_HELP,
    ExitCode,
    InputError,
    LimitMissed,
    RunDirError,
    exit_code_of,
    one_line,
    traceback_note,
)
from ofbdeploy.threads import configure as configure_threads


def _traceback_file(error: BaseException) -> str:
    """Where the full traceback is: the run's log when the run wrote it there, else a new temporary file."""
    noted = traceback_note(error)
    if noted is not None:
        return noted
    with tempfile.NamedTemporaryFile("w", prefix="ofbdeploy-traceback-", suffix=".txt", delete=False) as f:
        f.write("".join(traceback.format_exception(error)))
    return f.name


def _finish(error: BaseException) -> None:
    """One line on stderr and the contract's exit code for ``error`` (see ofbdeploy.errors)."""
    code = exit_code_of(error)
    if code == ExitCode.INTERRUPTED:
        click.echo("interrupted: finished stages and files are kept; `ofbdeploy run --resume` continues a run",
                   err=True)
    elif code == ExitCode.LIMIT_MISSED:
        click.echo(f"limit missed: {one_line(str(error))}", err=True)
    elif code == ExitCode.INTERNAL:
        where = _traceback_file(error)
        click.echo(f"internal error: {one_line(f'{type(error).__name__}: {error}', 300)} "
                   f"(full traceback in {where})", err=True)
    elif isinstance(error, OSError):  # a path error (errors.is_path_error): the path and the reason
        click.echo(f"error: {one_line(f'{error.filename}: {error.strerror or error}')}", err=True)
    else:
        click.echo(f"error: {one_line(str(error))}", err=True)
    _settle_sigterm(code)
    sys.exit(int(code))


class _ExitCodesHelp:
    """Every command's --help ends with the exit-code contract."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)  # type: ignore[misc]
        with formatter.section("Exit codes"):
            formatter.write_text(EXIT_CODE_HELP.removeprefix("Exit codes: "))


class _Command(_ExitCodesHelp, click.Command):
    pass


class _Group(_ExitCodesHelp, click.Group):
    """Turn anything a command raises into one line on stderr and the contract's exit code."""

    command_class = _Command
    group_class = type  # subgroups (lut) behave the same

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        """click's own usage errors exit 2 as before, but as one line like every other error."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.ClickException as error:
            where = f" (see {error.ctx.command_path} --help)" if getattr(error, "ctx", None) else ""
            click.echo(f"error: {one_line(error.format_message())}{where}", err=True)
            _settle_sigterm(ExitCode.BAD_INPUT)
            sys.exit(int(ExitCode.BAD_INPUT))
        except click.exceptions.Abort as error:  # Ctrl-C while click itself was running
            _finish(KeyboardInterrupt(str(error)))
        code = result if isinstance(result, int) else 0
        _settle_sigterm(code)
        sys.exit(code)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise  # click's own usage errors and help are handled in main()
        except BaseException as error:
            _finish(error)


def _sigterm_interrupts(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # torchrun's stop, and a closed terminal or ssh session


def _interrupt_on_sigterm() -> None:
    """torchrun stops its workers with SIGTERM, a closed terminal sends SIGHUP: treat both like Ctrl-C (locks
    released, checkpoints kept, exit 130). A signal the caller chose to ignore stays ignored (nohup)."""
    for stop in _STOP_SIGNALS:
        try:
            if signal.getsignal(stop) is signal.SIG_DFL:
                signal.signal(stop, _sigterm_interrupts)
        except ValueError:  # not the main thread
            pass


def _settle_sigterm(code: int) -> None:
    """Once the outcome is decided, a SIGTERM only ends the process with that outcome's code.

    torchrun SIGTERMs the other workers as soon as one fails; a worker that already printed its own line
    and is shutting down would otherwise print a KeyboardInterrupt traceback from interpreter shutdown.
    """
    def exit_with_outcome(_signum: int, _frame: Any) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(code))

    for stop in _STOP_SIGNALS:
        try:
            if signal.getsignal(stop) is _sigterm_interrupts:
                signal.signal(stop, exit_with_outcome)
        except ValueError:  # not the main thread
            pass


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages too.")
@click.option("--threads", type=click.IntRange(1, 4096), default=None,
              help="CPU threads of this process (default: the CPUs it may use, shared among a DDP run's local "
                   "processes; also OFBDEPLOY_THREADS).")
def main(verbose: bool, threads: int | None) -> None:
    """ofbdeploy: compress timm Vision Transformers with OFB and check the result on real deployment numbers."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(name)s %(message)s")
    configure_threads(threads)  # before any command loads torch: OpenMP reads its settings then
    _interrupt_on_sigterm()


def _config(kind: type, option_names: dict[str, str], **values: Any) -> Any:
    """Build a recipe config from CLI options; a value the schema refuses is one line naming the option."""
    from pydantic import ValidationError

    try:
        return kind(**values)
    except ValidationError as err:
        problem = err.errors()[0]
        field = str(problem["loc"][0]) if problem["loc"] else ""
        raise InputError(one_line(f"{option_names.get(field, field)}: {problem['msg']}")) from None


def _check_backends(backends: list[str], option: str = "--backend") -> None:
    """Refuse, before any work, a backend this machine cannot run (naming it and why)."""
    from ofbdeploy.deploy.runtimes.registry import BackendUnavailable, available_backends, create_runner

    here = available_backends()
    for backend in backends:
        if backend in here:
            continue
        try:
            create_runner(backend)
        except BackendUnavailable as err:
            reason = str(err)
        else:  # pragma: no cover - available_backends and create_runner disagree
            continue
        raise InputError(f"{option} {backend}: cannot run on this machine ({reason}); available: {', '.join(here)}")


def _check_free_dir(path: Path, option: str, force: bool) -> None:
    """An output model directory that already holds files is overwritten only with --force."""
    if path.exists() and not path.is_dir():
        raise InputError(f"{option}: {path} is a file; expected a directory")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise InputError(f"{option}: {path} already holds files; pass --force to overwrite them")


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a recipe field, e.g. --set search.epochs=3 (repeatable; values parsed as YAML).")
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="Run directory (default: the recipe's output_dir).")
@click.option("--resume", is_flag=True,
              help="Continue a stopped search, pretrain or finetune from its last epoch checkpoint (refused, "
                   "naming the change, when its settings changed other than by more epochs).")
@click.option("--no-progress", is_flag=True, help="Hide progress bars (logs still go to run.log).")
def run(recipe: Path, overrides: tuple[str, ...], output: Path | None, resume: bool, no_progress: bool) -> None:
    """Run a recipe: dense model -> search (search.method: the OFB search by default, or torch-pruning, l1,
    uniform, random) -> materialise -> finetune -> evaluate -> export -> profile -> report. Exits 1 when a
    limit of the recipe's budget section is missed.

    Every input is checked before the run directory is written. Every stage writes its artifacts into the
    run directory and records their digests in stages.json; a stage is skipped only while its recipe
    sections, its inputs and its artifacts are unchanged, so re-running after a change (or after an
    artifact was deleted or replaced) redoes only what is needed, and run.log says why. One run at a time
    per directory (run.lock). Under `python -m ofbdeploy.torchrun --standalone --nproc_per_node N -m
    ofbdeploy run ...` (torchrun's arguments, these exit codes) the search and training run with DDP.
    """
    from ofbdeploy.recipe import load_recipe
    from ofbdeploy.run.rundir import check_run_dir

    extra = [*overrides, f"output_dir={output}"] if output is not None else list(overrides)
    resolved = load_recipe(recipe, extra)  # before the heavy imports: a bad recipe or output fails in a blink
    check_run_dir(Path(resolved.output_dir))

    from ofbdeploy.run.driver import Run

    report = Run(resolved, resume=resume, progress=not no_progress).execute()
    if report is None:  # a non-main process that parted after the last collective stage: rank 0 reports
        return
    if not report:
        raise RunDirError(f"{resolved.output_dir}: the run ended without a report.json")
    if not report.get("budget_met", True):
        missed = [f"{c['name']} ({c['measured']})" for c in report.get("budget", []) if not c.get("ok")]
        raise LimitMissed(f"{', '.join(missed)}; see the budget table above and report.md")


def _comma_ints(_ctx, _param, value: str) -> list[int]:
    try:
        numbers = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value[:40]!r}") from None
    if not numbers or min(numbers) < 1 or max(numbers) > 1 << 16:
        raise click.BadParameter(f"expected integers in 1..65536, got {value[:40]!r}")
    return numbers


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--trt", is_flag=True, help="Also build TensorRT engines (needs TensorRT: see the Dockerfile).")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(registry.ONNX_PRECISIONS),
              help="Precision to write (repeatable): an ONNX graph of it, and with --trt an engine built from that "
                   "graph (default with --trt: fp16). fp32 ONNX is always written. int8 is a Q/DQ graph calibrated "
                   "on the run's training split, so it needs a run directory.")
@click.option("--fp16-onnx", is_flag=True, help="Also write fp16 ONNX graphs (the same as --precision fp16).")
@click.option("--batch-range", default="1,16,64", show_default=True, callback=_comma_ints,
              help="TensorRT optimisation profile: min,opt,max batch.")
@click.option("--opset", default=17, show_default=True, type=click.IntRange(17, 30),
              help="ONNX opset (>= 17: LayerNormalization op).")
@click.option("--check-images", default=64, show_default=True, type=click.IntRange(1, 100_000),
              help="Images for the ORT-vs-torch and TensorRT-vs-ORT parity checks.")
@click.option("--tf32/--no-tf32", default=True, show_default=True,
              help="TensorRT's TF32 flag for the engines (the profile's TF32 policy must match).")
@click.option("--force", is_flag=True, help="Overwrite an existing PATH/export.")
def export(path: Path, trt: bool, precisions: tuple[str, ...], fp16_onnx: bool, batch_range: list[int], opset: int,
           check_images: int, tf32: bool, force: bool) -> None:
    """Export dense and pruned models to ONNX (and TensorRT engines) into PATH/export.

    PATH is a run directory or a pruned model directory. Every ONNX file is checked in ONNX Runtime against
    torch, and every engine against ONNX Runtime; a failed check is an error (exit 2), never a warning.
    Engines are strongly typed (their precision is the ONNX graph's) and cached by ONNX content, build
    settings, TensorRT version and GPU name. An existing PATH/export is replaced only with --force.
    """
    if len(batch_range) != 3 or not batch_range[0] <= batch_range[1] <= batch_range[2]:
        raise click.BadParameter("expected min,opt,max with min <= opt <= max", param_hint="--batch-range")
    _check_free_dir(path / "export", "export", force)

    from ofbdeploy.deploy.config import ExportCfg
    from ofbdeploy.run.target import Target

    with Target(path) as target:
        # a run keeps its recipe's other export settings (calibration sample size, simplification, ...)
        base = target.run.recipe.export.model_dump() if target.run is not None else {}
        cfg = _config(ExportCfg, {"opset": "--opset", "batch_range": "--batch-range",
                                  "check_images": "--check-images", "trt_precisions": "--precision"},
                      **{**base, "opset": opset, "fp16": fp16_onnx or "fp16" in precisions,
                         "int8": "int8" in precisions, "trt": trt, "trt_precisions": list(precisions) or ["fp16"],
                         "batch_range": tuple(batch_range), "check_images": check_images})
        artifacts = target.export(cfg, tf32)
    for check in artifacts.checks:
        click.echo(f"{check['model']:<12} {check['path']}: max |diff| {check['max_abs_diff']:.2e}, "
                   f"top-1 agreement {check['top1_agreement']:.1%}")


BACKENDS = registry.names()


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--backend", "backends", multiple=True, type=click.Choice(BACKENDS),
              help="Latency backend (repeatable; default: ort-cpu).")
@click.option("--batch", "batches", default="1,64", show_default=True, callback=_comma_ints,
              help="Comma-separated batch sizes.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(registry.PRECISIONS),
              help="Precision to measure in (fp16 ORT needs an --fp16-onnx export; tensorrt needs that engine).")
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(0, 100_000),
              help="Untimed calls before measuring.")
@click.option("--repeats", default=50, show_default=True, type=click.IntRange(5, 100_000),
              help="Timed calls per model and batch.")
@click.option("--threads", default=None, type=click.IntRange(1, 4096),
              help="CPU threads for ORT and torch (default: the library's).")
def profile(path: Path, backends: tuple[str, ...], batches: list[int], precision: str, warmup: int, repeats: int,
            threads: int | None) -> None:
    """Measure dense vs pruned latency on each backend and write PATH/profile.json.

    Dense and pruned are timed alternately in this process (medians over repeats, p90/p99, throughput,
    peak memory), with the input resident on the device, so their ratio is robust on a noisy machine.
    Exports ONNX first when an ONNX Runtime backend needs it and PATH/export has none. A backend that
    cannot run here is an error (exit 2) naming it, and the last profile.json is left as it was.
    """
    from ofbdeploy.deploy.config import ProfileCfg
    from ofbdeploy.report.render import latency_table
    from ofbdeploy.run.target import Target

    cfg = _config(ProfileCfg, {"backends": "--backend", "batches": "--batch", "precision": "--precision",
                               "warmup": "--warmup", "repeats": "--repeats", "threads": "--threads"},
                  backends=list(backends) or ["ort-cpu"], batches=batches, precision=precision, warmup=warmup,
                  repeats=repeats, threads=threads)
    _check_backends(cfg.backends)
    with Target(path) as target:
        rows, ratio = target.profile(cfg)
    click.echo(latency_table({"latency": rows, "flops_ratio": ratio}))


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--baseline", type=click.Path(path_type=Path), default=None,
              help="Baseline JSON from --write-baseline: fail when speedups fall (or, on the same device, "
                   "latencies rise) beyond --tolerance.")
@click.option("--tolerance", default="10%", show_default=True, help="Allowed regression, e.g. 10% or 0.1.")
@click.option("--write-baseline", type=click.Path(path_type=Path), default=None,
              help="Record this run's speedups and latencies as a baseline file (only when every check passes).")
@click.option("--force", is_flag=True, help="Replace an existing --write-baseline file.")
def check(run_dir: Path, baseline: Path | None, tolerance: str, write_baseline: Path | None, force: bool) -> None:
    """Check a finished run against its recipe's budget and, optionally, a latency baseline (CI gate).

    Prints every limit with the measured value; exits 1 when any is missed, a limit whose measurement is
    missing included. The run must have finished under its recipe.yaml with every file the report was made
    from intact (weights, ONNX files, engines, profile.json, report.json: their digests in stages.json), and
    a baseline must be of this model and of the recipe's model, data and search settings (else exit 2).
    Having nothing to check (no budget limits, no baseline, nothing to write) is an error too.
    --write-baseline writes only when every check passes, and replaces an existing file only with --force.
    Speedups are
    ratios measured in one run (dense vs pruned on the same backend), so they compare across machines;
    absolute latencies are compared only when the baseline was measured on the same device.
    """
    from ofbdeploy.run.gate import check_run

    outcome = check_run(run_dir, baseline=baseline, tolerance=tolerance, write_baseline=write_baseline, force=force)
    for line in outcome.lines:
        click.echo(line)
    if outcome.missed:
        raise LimitMissed(", ".join(outcome.missed))


@main.group()
def lut() -> None:
    """Latency lookup tables: measured part latencies of a model family on this machine's backend."""


@lut.command("build")
@click.option("--model", "model_name", required=True, help="timm model name, e.g. deit_small_patch16_224.")
@click.option("--img-size", type=click.IntRange(8, 4096), default=None, help="Image size (default: the model's).")
@click.option("--backend", default="ort-cpu", show_default=True, type=click.Choice(BACKENDS))
@click.option("--batch", default=1, show_default=True, type=click.IntRange(1, 4096),
              help="Batch size the table is measured at.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(registry.PRECISIONS))
@click.option("--align", type=click.Choice([str(a) for a in ALIGNMENTS]), default=None,
              help="Build for the aligned search grids.")
@click.option("--embed-points", default=4, show_default=True, type=click.IntRange(1, 64),
              help="Embedding widths measured.")
@click.option("--width-points", default=3, show_default=True, type=click.IntRange(1, 64),
              help="Head widths and MLP widths measured per embedding width.")
@click.option("--random-points", default=16, show_default=True, type=click.IntRange(0, 4096),
              help="Random uneven models measured (like the ones a search ends with).")
@click.option("--repeats", default=20, show_default=True, type=click.IntRange(5, 100_000),
              help="Timed calls per probe model.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Where tables are kept (default ~/.cache/ofbdeploy/lut); an existing one is reused.")
def lut_build(model_name: str, img_size: int | None, backend: str, batch: int, precision: str, align: str | None,
              embed_points: int, width_points: int, random_points: int, repeats: int, cache_dir: Path | None) -> None:
    """Measure (or reuse) the latency table of a model family and print where it is.

    Whole probe ViTs (uniform ones on a coarse grid of widths, and random uneven ones) are each timed
    alternately with the dense model, with the profile protocol; a non-negative least-squares fit of
    per-part work counts (GEMM sizes, heads, widths) to those latencies covers every width in between.
    """
    from ofbdeploy.arch import ArchSpec
    from ofbdeploy.families import family_of, read_shape
    from ofbdeploy.io import check_output_dir
    from ofbdeploy.latency.lut import default_cache_dir, load_or_build
    from ofbdeploy.models.dense import build_dense

    _check_backends([backend])
    cache = check_output_dir(cache_dir or default_cache_dir(), "--cache-dir")
    shape = read_shape(build_dense(model_name, img_size=img_size), model_name)
    space = family_of(shape).space(shape, int(align) if align else None)
    table = load_or_build(shape, space, backend=backend, precision=precision, batch=batch, cache_dir=cache,
                          embed_points=embed_points, width_points=width_points, random_points=random_points,
                          repeats=repeats)
    path = cache / table.key.filename(shape)
    click.echo(f"{path}: {table.points} probe models, built in {table.build_seconds:.1f} s "
               f"on {table.key.device}; dense predicted {table.predict(ArchSpec.dense(shape)):.3f} ms, fit error "
               f"on the probes median {table.fit_error['median_abs']:.1%}, max {table.fit_error['max_abs']:.1%}")


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None,
              help="Also write a PNG: top-1 and measured speedup against FLOPs (% of dense), one point per run.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Also write the rows as JSON (one object per run, latency per backend/precision/batch).")
@click.option("--markdown", "markdown_path", type=click.Path(path_type=Path), default=None,
              help="Also write the table as Markdown.")
@click.option("--force", is_flag=True, help="Overwrite existing --plot, --json or --markdown files.")
def compare(run_dirs: tuple[Path, ...], plot_path: Path | None, json_path: Path | None, markdown_path: Path | None,
            force: bool) -> None:
    """Compare finished runs in one table, e.g. one recipe run with each search.method.

    RUN_DIRS are run directories with a report.json. Per run: the pruning method, FLOPs as % of the dense
    model, parameters, top-1 after finetune (and against dense), and, per backend/precision/batch its
    profile measured, the pruned model's latency and its speedup over dense. Nothing is recomputed: the
    numbers are the runs' own. An output file that exists is refused unless --force is given.
    """
    from ofbdeploy.report.compare import compare_runs

    click.echo(compare_runs(list(run_dirs), plot_path=plot_path, json_path=json_path, markdown_path=markdown_path,
                            force=force))


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
def info(path: Path) -> None:
    """Print the architecture of a materialised model.

    PATH is a pruned model directory (model.safetensors + arch.json) or an arch.json file. The table
    lists per block the kept heads x head width and the MLP width; the totals give params and FLOPs
    (multiply-accumulates) next to the dense model's, and widths that are not multiples of 8 are named.
    """
    from ofbdeploy.families import load_arch
    from ofbdeploy.models.pruned import ARCH_FILE
    from ofbdeploy.report.describe import describe

    arch = path / ARCH_FILE if path.is_dir() else path
    click.echo(describe(load_arch(arch), title=f"pruned model: {path}"))


@main.command()
@click.option("--model", "model_name", default="ofb_vit_pico_patch4_32", show_default=True,
              help="timm model name to check (any model of a supported family, e.g. deit_small_patch16_224, "
                   "vit_small_patch14_dinov2, swin_tiny_patch4_window7_224).")
@click.option("--img-size", type=click.IntRange(8, 4096), default=None,
              help="Image size to build the model at (default: the model's own, reduced for large token grids).")
@click.option("--trials", type=click.IntRange(0, 1000), default=5, show_default=True,
              help="Random architectures to try.")
@click.option("--align", type=click.Choice([str(a) for a in ALIGNMENTS]), default=None,
              help="Build the width grids from multiples of this only.")
@click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=0, show_default=True,
              help="Seed for weights and architectures.")
@click.option("--save", type=click.Path(path_type=Path), default=None,
              help="Write the last materialised model here (model.safetensors + arch.json).")
@click.option("--force", is_flag=True, help="Overwrite a --save directory that already holds files.")
def selfcheck(model_name: str, img_size: int | None, trials: int, align: str | None, seed: int,
              save: Path | None, force: bool) -> None:
    """Ask whether a timm model can be pruned, and check materialisation on this machine's torch and timm.

    A model of no supported family, or with a part the search has no unit for, is refused in one line
    (exit 2). Otherwise the model is built with random weights, random architectures are decided (plus the
    narrowest and the widest the grids allow), each is materialised into a plain timm model of the same
    class and compared with the masked model (fused attention on and off), and FLOPs/params with PyTorch's
    own counter. Exits 1 if any check misses its tolerance.
    """
    from ofbdeploy.io import check_output_dir
    from ofbdeploy.models.materialize import materialize
    from ofbdeploy.models.pruned import save_pruned
    from ofbdeploy.table import format_table
    from ofbdeploy.verify.exactness import selfcheck_model

    if save is not None:
        _check_free_dir(save, "--save", force)
        check_output_dir(save, "--save")
    report = selfcheck_model(model_name, img_size=img_size, trials=trials, align=int(align) if align else None,
                             seed=seed, keep_last=save is not None)
    click.echo(report.header)
    click.echo(format_table(("architecture", "max |diff|", "MMACs spec", "MMACs counted", "params spec",
                             "params counted", "result"), report.table()))
    if save is not None and report.last is not None:
        model, spec = materialize(report.last)
        save_pruned(model, spec, save)
        click.echo(f"saved the last architecture to {save}")
    if not report.ok:
        failed = [name for name, agreement in report.rows if not agreement.ok]
        raise LimitMissed(f"selfcheck: materialisation outside its tolerance for {', '.join(failed)}")
