"""The ``ofbdeploy`` command line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from ofbdeploy.errors import OfbError


class _Group(click.Group):
    """Turn ofbdeploy's own errors into one line on stderr and exit status 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except OfbError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages too.")
def main(verbose: bool) -> None:
    """ofbdeploy: compress timm Vision Transformers with OFB and check the result on real deployment numbers."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(name)s %(message)s")


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a recipe field, e.g. --set search.epochs=3 (repeatable; values parsed as YAML).")
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="Run directory (default: the recipe's output_dir).")
@click.option("--resume", is_flag=True,
              help="Continue a stopped search, pretrain or finetune from its last epoch checkpoint.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars (logs still go to run.log).")
def run(recipe: Path, overrides: tuple[str, ...], output: Path | None, resume: bool, no_progress: bool) -> None:
    """Run a recipe: dense model -> OFB search -> materialise -> finetune -> evaluate -> export -> profile
    -> report. Exits 1 when a limit of the recipe's budget section is missed.

    Every stage writes its artifacts into the run directory; stages whose artifacts exist and whose
    recipe sections are unchanged are skipped, so re-running after a change redoes only what changed.
    Under `torchrun --standalone --nproc_per_node N -m ofbdeploy run ...` the search and the training
    stages run with PyTorch DDP.
    """
    from ofbdeploy.pipeline import Run
    from ofbdeploy.recipe import load_recipe

    extra = [*overrides, f"output_dir={output}"] if output is not None else list(overrides)
    report = Run(load_recipe(recipe, extra), resume=resume, progress=not no_progress).execute()
    if not report.get("budget_met", True):
        click.echo("budget missed: see the budget table above and report.md", err=True)
        sys.exit(1)


def _comma_ints(_ctx, _param, value: str) -> list[int]:
    try:
        numbers = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not numbers or min(numbers) < 1:
        raise click.BadParameter(f"expected positive integers, got {value!r}")
    return numbers


class _Target:
    """What export/profile work on: a run directory (recipe.yaml + finetuned/) or a pruned model directory."""

    def __init__(self, path: Path) -> None:
        from ofbdeploy.arch import ArchSpec
        from ofbdeploy.models.pruned import ARCH_FILE

        self.path = path
        self.run = None
        if (path / "recipe.yaml").is_file():
            from ofbdeploy.pipeline import Run
            from ofbdeploy.recipe import load_recipe

            self.run = Run(load_recipe(path / "recipe.yaml", [f"output_dir={path}"]))
            if not (path / "finetuned" / ARCH_FILE).is_file():
                raise OfbError(f"{path}: the run has no finetuned model yet; finish it with ofbdeploy run")
            self.spec = ArchSpec.load(path / "finetuned" / ARCH_FILE)
        elif (path / ARCH_FILE).is_file():
            self.spec = ArchSpec.load(path / ARCH_FILE)
        else:
            raise OfbError(f"{path}: expected a run directory (recipe.yaml) or a pruned model directory ({ARCH_FILE})")
        self.export_dir = path / "export"

    def models(self):
        """Dense and pruned; outside a run the dense model has random weights (fine for latency)."""
        from ofbdeploy.deploy.workflow import dense_like
        from ofbdeploy.models.pruned import load_pruned

        if self.run is not None:
            return self.run.deploy_models()
        return {"dense": dense_like(self.spec), "pruned": load_pruned(self.path)}

    def check_images(self, count: int):
        """Validation images of the run's data; seeded random images for a bare model directory."""
        import torch

        from ofbdeploy.train.data import sample_batch

        if self.run is not None:
            val = self.run.data()[1]
            return sample_batch(val, min(count, len(val)))
        b = self.spec.base
        return torch.randn(count, b.in_chans, b.img_size, b.img_size, generator=torch.Generator().manual_seed(0))


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--trt", is_flag=True, help="Also build TensorRT engines (needs TensorRT: see the Dockerfile).")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(["fp32", "fp16", "int8"]),
              help="Precision to write (repeatable): an ONNX graph of it, and with --trt an engine built from that "
                   "graph (default with --trt: fp16). fp32 ONNX is always written. int8 is a Q/DQ graph calibrated "
                   "on the run's training split, so it needs a run directory.")
@click.option("--fp16-onnx", is_flag=True, help="Also write fp16 ONNX graphs (the same as --precision fp16).")
@click.option("--batch-range", default="1,16,64", show_default=True, callback=_comma_ints,
              help="TensorRT optimisation profile: min,opt,max batch.")
@click.option("--opset", default=17, show_default=True, type=int, help="ONNX opset (>= 17: LayerNormalization op).")
@click.option("--check-images", default=64, show_default=True, type=int,
              help="Images for the ORT-vs-torch and TensorRT-vs-ORT parity checks.")
@click.option("--tf32/--no-tf32", default=True, show_default=True,
              help="TensorRT's TF32 flag for the engines (the profile's TF32 policy must match).")
def export(path: Path, trt: bool, precisions: tuple[str, ...], fp16_onnx: bool, batch_range: list[int], opset: int,
           check_images: int, tf32: bool) -> None:
    """Export dense and pruned models to ONNX (and TensorRT engines) into PATH/export.

    PATH is a run directory or a pruned model directory. Every ONNX file is checked in ONNX Runtime against
    torch, and every engine against ONNX Runtime; a failed check is an error (exit 2), never a warning.
    Engines are strongly typed (their precision is the ONNX graph's) and cached by ONNX content, build
    settings, TensorRT version and GPU name.
    """
    from ofbdeploy.deploy.workflow import export_models
    from ofbdeploy.recipe import ExportCfg

    if len(batch_range) != 3:
        raise click.BadParameter("expected min,opt,max", param_hint="--batch-range")
    target = _Target(path)
    # a run keeps its recipe's other export settings (calibration sample size, simplification, ...)
    base = target.run.recipe.export if target.run is not None else ExportCfg()
    cfg = base.model_copy(update={"opset": opset, "fp16": fp16_onnx or "fp16" in precisions,
                                  "int8": "int8" in precisions, "trt": trt,
                                  "trt_precisions": list(precisions) or ["fp16"], "batch_range": tuple(batch_range),
                                  "check_images": check_images})
    calibration = None
    if "int8" in cfg.onnx_precisions():
        if target.run is None:
            raise OfbError("int8 needs calibration images from the training data: export from a run directory")
        from ofbdeploy.train.data import calibration_batch

        train, val, _ = target.run.data()
        calibration = calibration_batch(train, val, min(cfg.calibration_images, len(train)),
                                        target.run.recipe.seed).numpy()
    images = target.check_images(check_images)
    artifacts = export_models(target.models(), target.export_dir, cfg, img_size=target.spec.base.img_size,
                              in_chans=target.spec.base.in_chans, check_images=images, calibration=calibration,
                              tf32=tf32)
    if target.run is not None:  # a run's export.json carries the files' accuracy, as `ofbdeploy run` writes it
        artifacts.accuracy = target.run.onnx_accuracy(artifacts)
        artifacts.save(target.export_dir)
    for check in artifacts.checks:
        click.echo(f"{check['model']:<12} {check['path']}: max |diff| {check['max_abs_diff']:.2e}, "
                   f"top-1 agreement {check['top1_agreement']:.1%}")


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--backend", "backends", multiple=True,
              type=click.Choice(["torch", "torch-compile", "ort-cpu", "ort-cuda", "ort-trt", "tensorrt"]),
              help="Latency backend (repeatable; default: ort-cpu).")
@click.option("--batch", "batches", default="1,64", show_default=True, callback=_comma_ints,
              help="Comma-separated batch sizes.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16", "bf16", "int8"]),
              help="Precision to measure in (fp16 ORT needs an --fp16-onnx export; tensorrt needs that engine).")
@click.option("--warmup", default=10, show_default=True, type=int, help="Untimed calls before measuring.")
@click.option("--repeats", default=50, show_default=True, type=int, help="Timed calls per model and batch.")
@click.option("--threads", default=None, type=int, help="CPU threads for ORT and torch (default: the library's).")
def profile(path: Path, backends: tuple[str, ...], batches: list[int], precision: str, warmup: int, repeats: int,
            threads: int | None) -> None:
    """Measure dense vs pruned latency on each backend and write PATH/profile.json.

    Dense and pruned are timed alternately in this process (medians over repeats, p90/p99, throughput,
    peak memory), with the input resident on the device, so their ratio is robust on a noisy machine.
    Exports ONNX first when an ONNX Runtime backend needs it and PATH/export has none.
    """
    import json

    from ofbdeploy.arch import ArchSpec
    from ofbdeploy.deploy.workflow import DeployArtifacts, export_models, profile_models
    from ofbdeploy.recipe import ExportCfg, ProfileCfg
    from ofbdeploy.report.render import format_skip, latency_table

    target = _Target(path)
    cfg = ProfileCfg(backends=list(backends) or ["ort-cpu"], batches=batches, precision=precision, warmup=warmup,
                     repeats=repeats, threads=threads)
    artifacts = DeployArtifacts.load(target.export_dir)
    models = target.models()
    if any(b.startswith("ort") for b in cfg.backends) and "pruned" not in artifacts.onnx:
        artifacts = export_models(models, target.export_dir, ExportCfg(fp16=precision == "fp16"),
                                  img_size=target.spec.base.img_size, in_chans=target.spec.base.in_chans,
                                  check_images=target.check_images(16))
    ratio = target.spec.macs() / ArchSpec.dense(target.spec.base).macs()
    rows, skipped = profile_models(models, artifacts, cfg, ratio)
    (path / "profile.json").write_text(json.dumps({"latency": rows, "skipped": skipped}, indent=1) + "\n")
    click.echo(latency_table({"latency": rows, "flops_ratio": ratio}))
    for entry in skipped:
        click.echo(f"not measured: {format_skip(entry)}")


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--baseline", type=click.Path(path_type=Path), default=None,
              help="Baseline JSON from --write-baseline: fail when speedups fall (or, on the same device, "
                   "latencies rise) beyond --tolerance.")
@click.option("--tolerance", default="10%", show_default=True, help="Allowed regression, e.g. 10% or 0.1.")
@click.option("--write-baseline", type=click.Path(path_type=Path), default=None,
              help="Record this run's speedups and latencies as a baseline file.")
def check(run_dir: Path, baseline: Path | None, tolerance: str, write_baseline: Path | None) -> None:
    """Check a finished run against its recipe's budget and, optionally, a latency baseline (CI gate).

    Prints every limit with the measured value; exits 1 when any is missed. Speedups are ratios measured
    in one run (dense vs pruned on the same backend), so they compare across machines; absolute latencies
    are compared only when the baseline was measured on the same device.
    """
    import json

    from ofbdeploy.recipe import load_recipe
    from ofbdeploy.report.checks import format_checks, make_baseline, parse_tolerance, recipe_checks, regression_checks

    report_path = run_dir / "report.json"
    if not report_path.is_file():
        raise OfbError(f"{report_path}: missing; run the recipe to the report stage first")
    report = json.loads(report_path.read_text())
    checks = recipe_checks(report, load_recipe(run_dir / "recipe.yaml"))
    if baseline is not None:
        if not baseline.is_file():
            raise OfbError(f"baseline not found: {baseline}")
        checks += regression_checks(report, json.loads(baseline.read_text()), parse_tolerance(tolerance))
    if write_baseline is not None:
        from ofbdeploy.io import atomic_write_text

        atomic_write_text(write_baseline, json.dumps(make_baseline(report), indent=1) + "\n")
        click.echo(f"baseline written to {write_baseline}")
    if checks:
        click.echo(format_checks(checks))
    else:
        click.echo("no budget limits in the recipe and no baseline given: nothing to check")
    if not all(c.ok for c in checks):
        sys.exit(1)


@main.group()
def lut() -> None:
    """Latency lookup tables: measured part latencies of a model family on this machine's backend."""


@lut.command("build")
@click.option("--model", "model_name", required=True, help="timm model name, e.g. deit_small_patch16_224.")
@click.option("--img-size", type=int, default=None, help="Image size (default: the model's).")
@click.option("--backend", default="ort-cpu", show_default=True,
              type=click.Choice(["torch", "torch-compile", "ort-cpu", "ort-cuda", "ort-trt", "tensorrt"]))
@click.option("--batch", default=1, show_default=True, type=int, help="Batch size the table is measured at.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16", "bf16", "int8"]))
@click.option("--align", type=click.Choice(["8", "16", "32", "64"]), default=None,
              help="Build for the aligned search grids.")
@click.option("--embed-points", default=4, show_default=True, type=int, help="Embedding widths measured.")
@click.option("--width-points", default=3, show_default=True, type=int,
              help="Head widths and MLP widths measured per embedding width.")
@click.option("--random-points", default=16, show_default=True, type=int,
              help="Random uneven models measured (like the ones a search ends with).")
@click.option("--repeats", default=20, show_default=True, type=int, help="Timed calls per probe model.")
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
    from ofbdeploy.latency.lut import default_cache_dir, load_or_build
    from ofbdeploy.models.dense import build_dense

    shape = read_shape(build_dense(model_name, img_size=img_size), model_name)
    family_of(shape).check_latency()
    space = family_of(shape).space(shape, int(align) if align else None)
    cache = cache_dir or default_cache_dir()
    table = load_or_build(shape, space, backend=backend, precision=precision, batch=batch, cache_dir=cache,
                          embed_points=embed_points, width_points=width_points, random_points=random_points,
                          repeats=repeats)
    path = cache / table.key.filename(shape)
    click.echo(f"{path}: {table.points} probe models, built in {table.build_seconds:.1f} s "
               f"on {table.key.device}; dense predicted {table.predict(ArchSpec.dense(shape)):.3f} ms, fit error "
               f"on the probes median {table.fit_error['median_abs']:.1%}, max {table.fit_error['max_abs']:.1%}")


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
def info(path: Path) -> None:
    """Print the architecture of a materialised model.

    PATH is a pruned model directory (model.safetensors + arch.json) or an arch.json file. The table
    lists per block the kept heads x head width and the MLP width; the totals give params and FLOPs
    (multiply-accumulates) next to the dense model's, and widths that are not multiples of 8 are named.
    """
    from ofbdeploy.arch import ArchSpec
    from ofbdeploy.describe import describe
    from ofbdeploy.models.pruned import ARCH_FILE

    arch = path / ARCH_FILE if path.is_dir() else path
    click.echo(describe(ArchSpec.load(arch), title=f"pruned model: {path}"))


@main.command()
@click.option("--model", "model_name", default="ofb_vit_pico_patch4_32", show_default=True,
              help="timm model name to check (any model of a supported family, e.g. deit_small_patch16_224, "
                   "vit_small_patch14_dinov2, swin_tiny_patch4_window7_224).")
@click.option("--img-size", type=int, default=None,
              help="Image size to build the model at (default: the model's own, reduced for large token grids).")
@click.option("--trials", type=int, default=5, show_default=True, help="Random architectures to try.")
@click.option("--align", type=click.Choice(["8", "16", "32", "64"]), default=None,
              help="Build the width grids from multiples of this only.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for weights and architectures.")
@click.option("--save", type=click.Path(path_type=Path), default=None,
              help="Write the last materialised model here (model.safetensors + arch.json).")
def selfcheck(model_name: str, img_size: int | None, trials: int, align: str | None, seed: int,
              save: Path | None) -> None:
    """Ask whether a timm model can be pruned, and check materialisation on this machine's torch and timm.

    A model of no supported family, or with a part the search has no unit for, is refused in one line
    (exit 2). Otherwise the model is built with random weights, random architectures are decided (plus the
    narrowest and the widest the grids allow), each is materialised into a plain timm model of the same
    class and compared with the masked model (fused attention on and off), and FLOPs/params with PyTorch's
    own counter. Exits 1 if any check fails.
    """
    from ofbdeploy.materialize import materialize
    from ofbdeploy.models.pruned import save_pruned
    from ofbdeploy.table import format_table
    from ofbdeploy.verify import selfcheck_model

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
        sys.exit(1)
