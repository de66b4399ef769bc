"""The ``ofbdeploy`` command line."""

from __future__ import annotations

import logging
import random
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
    """Run a recipe: dense model -> OFB search -> materialise -> finetune -> evaluate -> report.

    Every stage writes its artifacts into the run directory; stages whose artifacts exist and whose
    recipe sections are unchanged are skipped, so re-running after a change redoes only what changed.
    Under `torchrun --nproc_per_node N` the search and the training stages run with PyTorch DDP.
    """
    from ofbdeploy.pipeline import Run
    from ofbdeploy.recipe import load_recipe

    extra = [*overrides, f"output_dir={output}"] if output is not None else list(overrides)
    Run(load_recipe(recipe, extra), resume=resume, progress=not no_progress).execute()


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
              help="timm model name to check (any supported ViT, e.g. deit_small_patch16_224).")
@click.option("--img-size", type=int, default=None, help="Image size to build the model at (default: the model's).")
@click.option("--trials", type=int, default=5, show_default=True, help="Random architectures to try.")
@click.option("--align", type=click.Choice(["8", "16", "32", "64"]), default=None,
              help="Build the width grids from multiples of this only.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for weights and architectures.")
@click.option("--save", type=click.Path(path_type=Path), default=None,
              help="Write the last materialised model here (model.safetensors + arch.json).")
def selfcheck(model_name: str, img_size: int | None, trials: int, align: str | None, seed: int,
              save: Path | None) -> None:
    """Check materialisation on this machine's torch and timm.

    Builds the model with random weights, decides random architectures (plus the narrowest and the
    widest the grids allow), materialises each into a plain timm ViT and compares outputs with the
    masked model (fused attention on and off), and FLOPs/params with PyTorch's own counter.
    Exits 1 if any check fails.
    """
    import torch

    from ofbdeploy.grids import SearchSpace
    from ofbdeploy.materialize import materialize
    from ofbdeploy.models.dense import build_dense
    from ofbdeploy.models.pruned import save_pruned
    from ofbdeploy.search.searchable import SearchableViT
    from ofbdeploy.table import format_table
    from ofbdeploy.verify import check_agreement, decide_randomly

    rng = random.Random(seed)
    rows, failed, last = [], False, None
    for trial, extreme in enumerate(["narrowest", "widest"] + [None] * trials):
        torch.manual_seed(seed + trial)
        vit = build_dense(model_name, img_size=img_size)
        s = vit.blocks[0]
        space = SearchSpace.for_model(vit.embed_dim, s.attn.num_heads, s.attn.head_dim, s.mlp.fc1.out_features,
                                      int(align) if align else None)
        searchable = SearchableViT(vit, space, model_name)
        decide_randomly(searchable, rng, extreme)
        result = check_agreement(searchable, seed=seed + trial)
        ok = (result.max_abs_diff <= 1e-4 and abs(result.macs_counted - result.macs_spec) <= 0.01 * result.macs_spec
              and result.params_counted == result.params_spec)
        failed |= not ok
        rows.append((extreme or f"random {trial - 1}", f"{result.max_abs_diff:.2e}", f"{result.macs_spec / 1e6:.2f}",
                     f"{result.macs_counted / 1e6:.2f}", result.params_spec, result.params_counted,
                     "ok" if ok else "FAIL"))
        last = searchable
    click.echo(format_table(("architecture", "max |diff|", "MMACs spec", "MMACs counted", "params spec",
                             "params counted", "result"), rows))
    if save is not None and last is not None:
        model, spec = materialize(last)
        save_pruned(model, spec, save)
        click.echo(f"saved the last architecture to {save}")
    if failed:
        sys.exit(1)
