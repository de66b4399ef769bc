"""Accuracy and latency of OFB against structured-pruning baselines at equal budgets, same finetune, same data.

A dense teacher is trained once (cached by its settings), then compressed to each budget ratio by:
  ofb            the OFB search (this project) to the ratio of the teacher's FLOPs, from the teacher's weights
  ofb-latency    the OFB search to the ratio of the teacher's latency on ONNX Runtime CPU at batch 32, steered
                 by a measured latency table (cached under --cache/lut); its FLOPs are whatever that gives
  uniform        the same width fraction in every group (the widest one that fits), units kept by L1 magnitude
  l1             L1-magnitude importance of the same units, widths allocated by the budget enforcement
  random         random importance, widths allocated by the budget enforcement
  torch-pruning  Torch-Pruning's isomorphic global pruning with group L2 magnitude (heads' qkv channels, MLP
                 neurons, embedding), in small steps until the FLOPs fit (needs `pip install 'ofbdeploy[bench]'`)
Every pruned model is a plain timm ViT, finetuned with the same epochs and distillation from the teacher,
evaluated, exported to ONNX, and its latency measured against the dense model on ONNX Runtime CPU at batch
32 in one run (alternating, the profile protocol). A JSON row holds the method, its budget kind ("flops" or
"latency") and ratio, the FLOPs reached, top-1, the measured latencies (pruned, dense) and speedup, the widths
(read from the module), and for ofb-latency the table's target and predicted latency.

    python tools/bench_accuracy.py --data fashion_mnist --ratio 0.5 --ratio 0.3 --json docs/benchmarks/acc.json
    python tools/bench_accuracy.py --smoke          # half a minute, on digits: what the test runs
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import logging
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors.torch import load_file
from timm.layers import Attention
from torch import Tensor, nn
from torch.utils.data import DataLoader

import ofbdeploy.models.zoo  # noqa: F401  (the small ofb_vit_* configs)
from ofbdeploy.arch import ArchSpec
from ofbdeploy.cost import measure_macs
from ofbdeploy.deploy.workflow import DeployArtifacts, export_models, profile_models
from ofbdeploy.errors import OfbError
from ofbdeploy.io import atomic_write_text
from ofbdeploy.latency.objective import build_objective
from ofbdeploy.materialize import materialize
from ofbdeploy.models.dense import build_dense
from ofbdeploy.models.pruned import save_weights
from ofbdeploy.pipeline import MATERIALIZE_TOLERANCE
from ofbdeploy.recipe import ExportCfg, LatencyTargetCfg, ProfileCfg, SearchCfg
from ofbdeploy.search.budget import enforce_budget
from ofbdeploy.search.engine import run_search
from ofbdeploy.search.searchable import SearchableViT
from ofbdeploy.table import format_table
from ofbdeploy.train.data import DataSpec, build_datasets, build_loader
from ofbdeploy.train.distributed import Dist
from ofbdeploy.train.trainer import TrainSettings, evaluate, train_classifier
from ofbdeploy.verify import set_fused_attention

log = logging.getLogger("bench_accuracy")
METHODS = ("ofb", "ofb-latency", "uniform", "l1", "random", "torch-pruning")
LATENCY_METHODS = ("ofb-latency",)  # budget is a latency ratio; every other method's is a FLOPs ratio
TORCH_PRUNING_MISSING = "the torch-pruning method needs Torch-Pruning: pip install 'ofbdeploy[bench]'"
EXPORT = ExportCfg(check_images=4)
PROFILE = ProfileCfg(backends=["ort-cpu"], batches=[32], repeats=20)


@dataclass
class Bench:
    """What every method shares: the teacher, the training data and the compression settings."""

    teacher: nn.Module
    loader: DataLoader
    val_loader: DataLoader
    model_name: str
    img_size: int
    seed: int
    search: SearchCfg
    latency: LatencyTargetCfg  # the LUT settings of ofb-latency (its target_ratio is set per ratio)
    prune_step: float  # width fraction Torch-Pruning removes per step
    finetune: TrainSettings
    export_dir: Path
    dense_onnx: DeployArtifacts  # the teacher is exported once and timed against every pruned model


@dataclass
class Compressed:
    """A pruned plain model, its FLOPs as a fraction of the teacher's, and method-specific JSON fields."""

    model: nn.Module
    flops_ratio: float
    extra: dict[str, Any] = field(default_factory=dict)


# -- OFB and the simple baselines: a decided SearchableViT, materialised -------------------------------------
def _l1_importance(model: SearchableViT) -> None:
    """Scores from weight magnitudes: qkv rows per head/channel, fc1 rows, patch-embedding filters."""
    with torch.no_grad():
        for block, attn, mlp in zip(model.vit.blocks, model.attn_groups, model.mlp_groups, strict=True):
            rows = block.attn.qkv.weight.abs().sum(dim=1).reshape(3, *attn.shape).sum(dim=0)
            attn.score.copy_(rows / rows.mean())
            fc1 = block.mlp.fc1.weight.abs().sum(dim=1)
            mlp.score.copy_(fc1 / fc1.mean())
        stem = model.vit.patch_embed.proj.weight.abs().flatten(1).sum(dim=1)
        model.embed_group.score.copy_(stem / stem.mean())


def _uniform(model: SearchableViT, target: float) -> None:
    """The largest common width fraction whose architecture fits the budget."""
    def cell_at(group, fraction: float) -> int:
        full = torch.tensor(group.shape, dtype=torch.float)
        sizes = [(float(torch.prod(c.float() / full)), k) for k, c in enumerate(group.cells)]
        fitting = [(size, k) for size, k in sizes if size <= fraction + 1e-9]
        return max(fitting)[1] if fitting else min(sizes)[1]

    for step in range(100, 0, -1):
        trial = copy.deepcopy(model)
        for name, group in trial.groups():
            trial.force_cell(name, cell_at(group, step / 100))
        if trial.arch_spec().macs() <= target:
            for name, group in model.groups():
                model.force_cell(name, cell_at(group, step / 100))
            return
    raise SystemExit("no uniform architecture fits the budget")


def _decide_by_scores(method: str, model: SearchableViT, ratio: float) -> None:
    """uniform / l1 / random: score the units, then pick widths under the FLOPs budget."""
    target = ratio * ArchSpec.dense(model.shape).macs()
    if method == "random":
        with torch.no_grad():
            for _, group in model.groups():
                group.score.copy_(torch.rand_like(group.score))
    else:
        _l1_importance(model)
    if method == "uniform":
        _uniform(model, target)
    else:
        model.decide_widest()
        enforce_budget(model, target)


def _search(model: SearchableViT, bench: Bench, ratio: float, by_latency: bool) -> dict[str, Any]:
    """The OFB search to ``ratio`` of dense FLOPs, or of dense predicted latency; the latency fields for JSON."""
    if not by_latency:
        cfg = bench.search.model_copy(update={"target_flops_ratio": ratio})
        run_search(model, bench.loader, cfg, Dist(), seed=bench.seed, progress=False)
        return {}
    target = bench.latency.model_copy(update={"target_ratio": ratio})
    cfg = bench.search.model_copy(update={"target_flops_ratio": None, "latency": target})
    result = run_search(model, bench.loader, cfg, Dist(), seed=bench.seed, progress=False,
                        latency=build_objective(target, model, progress=False))
    return {"target_latency_ms": result.target_latency_ms, "predicted_latency_ms": result.predicted_latency_ms,
            "predicted_dense_latency_ms": result.predicted_dense_latency_ms}


def _materialized(model: SearchableViT, extra: dict[str, Any]) -> Compressed:
    """The plain timm model of a decided search state; FLOPs from its architecture record."""
    pruned, spec = materialize(model.eval())
    return Compressed(pruned, spec.macs() / ArchSpec.dense(spec.base).macs(), extra)


# -- Torch-Pruning ------------------------------------------------------------------------------------------
def _torch_pruning() -> ModuleType:
    """The torch_pruning module, or a one-line exit saying how to install it (a benchmark-only extra)."""
    try:
        import torch_pruning
    except ImportError:
        raise SystemExit(TORCH_PRUNING_MISSING) from None
    return torch_pruning


def _attentions(model: nn.Module) -> list[Attention]:
    """timm's attention modules, in block order (Torch-Pruning leaves their shape attributes stale)."""
    return [m for m in model.modules() if isinstance(m, Attention)]


def _sync_shapes(attentions: list[Attention], num_heads: dict[nn.Module, int]) -> None:
    """Torch-Pruning slices qkv/proj but leaves timm's shape attributes, which the forward reshapes by."""
    for attn in attentions:
        attn.num_heads = num_heads[attn.qkv]
        attn.head_dim = attn.qkv.out_features // (3 * attn.num_heads)
        attn.attn_dim = attn.num_heads * attn.head_dim


def _outputs(model: nn.Module, images: Tensor, fused: bool) -> Tensor:
    """Logits with timm's fused attention (scaled_dot_product_attention) switched on or off."""
    before = _attentions(model)[0].fused_attn
    set_fused_attention(model, fused)
    try:
        with torch.no_grad():
            return model(images)
    finally:
        set_fused_attention(model, before)


def _fold_scale(attn: Attention, dense_head_dim: int) -> None:
    """Keep the dense softmax temperature 1/sqrt(d) with head width d' < d in both of timm's paths.

    The fused path always scales by 1/sqrt(d'), the unfused one by ``scale`` (still 1/sqrt(d) after
    Torch-Pruning): fold sqrt(d'/d) into the q rows and set ``scale`` to 1/sqrt(d'), and both compute
    q.k/sqrt(d) as the pruned graph does. Unchanged head widths need nothing.
    """
    if attn.head_dim == dense_head_dim:
        return
    factor = (attn.head_dim / dense_head_dim) ** 0.5
    with torch.no_grad():
        attn.qkv.weight[: attn.attn_dim] *= factor
        if attn.qkv.bias is not None:
            attn.qkv.bias[: attn.attn_dim] *= factor
    attn.scale = attn.head_dim**-0.5


def _random_images(model: nn.Module, img_size: int, count: int) -> Tensor:
    """Seeded inputs of the model's shape, on its device: for tracing and for output checks."""
    images = torch.randn(count, model.patch_embed.proj.in_channels, img_size, img_size,
                         generator=torch.Generator().manual_seed(0))
    return images.to(next(model.parameters()).device)


def _fix_attention(model: nn.Module, dense_head_dims: list[int], img_size: int) -> None:
    """Fold the attention scale, then check both attention paths still give the pruned graph's logits."""
    images = _random_images(model, img_size, 8)
    reference = _outputs(model, images, fused=False)  # sliced weights, dense scale: what Torch-Pruning built
    for attn, head_dim in zip(_attentions(model), dense_head_dims, strict=True):
        _fold_scale(attn, head_dim)
    diff = max(float((_outputs(model, images, fused) - reference).abs().max()) for fused in (False, True))
    if diff > MATERIALIZE_TOLERANCE:
        raise RuntimeError(f"attention fix changed the Torch-Pruning model's outputs: max |diff| {diff:.2e}")


def prune_with_torch_pruning(teacher: nn.Module, ratio: float, img_size: int, step: float) -> Compressed:
    """Torch-Pruning's isomorphic global pruning, ``step`` of every width at a time, until FLOPs <= ratio.

    Groups: each block's qkv channels (the same channels in every head: Torch-Pruning's head_dims mode),
    its MLP neurons, and the embedding (residual channels, through every block, norm, token and position
    embedding); the classifier's outputs are left alone. Isomorphic ranking compares a group only with
    groups of the same structure (all MLPs together, all attentions together), so widths may differ per
    block as in OFB, while mixing magnitudes of unlike layers is avoided.
    """
    tp = _torch_pruning()
    model = copy.deepcopy(teacher).eval()
    attentions = _attentions(model)
    dense_head_dims = [a.head_dim for a in attentions]
    in_chans = model.patch_embed.proj.in_channels
    dense = measure_macs(model, img_size, in_chans)
    steps = max(1, round(0.9 / step))
    pruner = tp.pruner.BasePruner(
        model, _random_images(model, img_size, 1), importance=tp.importance.MagnitudeImportance(p=2),
        global_pruning=True, isomorphic=True, pruning_ratio=steps * step, iterative_steps=steps,
        ignored_layers=[model.head], num_heads={a.qkv: a.num_heads for a in attentions},
        prune_num_heads=False, prune_head_dims=True,
        unwrapped_parameters=[(p, p.dim() - 1) for p in model.parameters(recurse=False)])
    for _ in range(steps):
        pruner.step()
        _sync_shapes(attentions, pruner.num_heads)
        macs = measure_macs(model, img_size, in_chans)
        if macs <= ratio * dense:
            break
    else:
        raise SystemExit(f"torch-pruning: {steps * step:.0%} of every width removed and FLOPs still "
                         f"{macs / dense:.1%} of dense, above the {ratio:.0%} budget")
    _fix_attention(model, dense_head_dims, img_size)
    return Compressed(model, macs / dense)


# -- one method, then the shared finetune / evaluate / export / profile ---------------------------------------
def compress(method: str, bench: Bench, ratio: float) -> Compressed:
    """A plain pruned copy of the teacher at ``ratio`` of its FLOPs (latency for ofb-latency), by ``method``."""
    torch.manual_seed(bench.seed)
    if method == "torch-pruning":
        return prune_with_torch_pruning(bench.teacher, ratio, bench.img_size, bench.prune_step)
    model = SearchableViT(copy.deepcopy(bench.teacher), model_name=bench.model_name)
    if method in ("ofb", "ofb-latency"):
        return _materialized(model, _search(model, bench, ratio, by_latency=method in LATENCY_METHODS))
    _decide_by_scores(method, model, ratio)
    return _materialized(model, {})


def widths(model: nn.Module) -> dict[str, Any]:
    """Embedding width and per-block (heads, head width, MLP width), read from the module itself."""
    return {"embed_dim": model.patch_embed.proj.out_channels,
            "blocks": [(b.attn.num_heads, b.attn.head_dim, b.mlp.fc1.out_features) for b in model.blocks]}


def finetune_and_measure(made: Compressed, bench: Bench) -> dict[str, float]:
    """Distil from the teacher, evaluate, export to ONNX and time against the dense model: one protocol for all."""
    pruned = made.model.train()
    train_classifier(pruned, bench.loader, bench.finetune, Dist(), teacher=bench.teacher, seed=bench.seed,
                     progress=False)
    pruned.eval()
    top1 = evaluate(pruned, bench.val_loader, Dist())["top1"]
    with tempfile.TemporaryDirectory(dir=bench.export_dir) as tmp:
        own = export_models({"pruned": pruned}, Path(tmp), EXPORT, img_size=bench.img_size)
        both = DeployArtifacts(onnx={**bench.dense_onnx.onnx, **own.onnx}, checks=bench.dense_onnx.checks + own.checks)
        latency = profile_models({"dense": bench.teacher, "pruned": pruned}, both, PROFILE, made.flops_ratio)[0][0]
    return {"top1": top1, "latency_ms_pruned_ort_cpu_b32": latency["latency_ms_pruned"],
            "latency_ms_dense_ort_cpu_b32": latency["latency_ms_dense"], "speedup_ort_cpu_b32": latency["speedup"]}


def run_method(method: str, ratio: float, bench: Bench) -> dict[str, Any]:
    """One JSON row: compress, then the shared finetune and measurements, and the widths reached. A budget
    the method cannot meet (e.g. a latency below the narrowest architecture's) is a row saying so."""
    row = {"method": method, "budget": "latency" if method in LATENCY_METHODS else "flops", "ratio": ratio}
    try:
        made = compress(method, bench, ratio)
    except OfbError as err:
        log.warning("%s at %.2f: %s", method, ratio, err)
        return {**row, "unreachable": str(err)}
    return {**row, "flops_ratio": made.flops_ratio, **finetune_and_measure(made, bench), **widths(made.model),
            **made.extra}


def table_row(row: dict[str, Any], dense_top1: float) -> tuple[str, ...]:
    """A JSON row as printed: a latency budget is marked so that its FLOPs are not read as a FLOPs target."""
    target = f"lat {row['ratio']:.2f}" if row["budget"] == "latency" else f"{row['ratio']:.2f}"
    if "unreachable" in row:
        return (row["method"], target, "budget cannot be met", "-", "-", "-", "-", "-")
    return (row["method"], target, f"{row['flops_ratio']:.1%}", f"{row['top1']:.2f}",
            f"{row['top1'] - dense_top1:+.2f}", f"{row['latency_ms_pruned_ort_cpu_b32']:.3f}",
            f"{row['latency_ms_dense_ort_cpu_b32']:.3f}", f"{row['speedup_ort_cpu_b32']:.2f}x")


def choose_methods(asked: list[str] | None) -> list[str]:
    """The asked methods, or all of them; torch-pruning only where Torch-Pruning is installed."""
    has_tp = importlib.util.find_spec("torch_pruning") is not None
    if asked:
        if "torch-pruning" in asked and not has_tp:
            raise SystemExit(TORCH_PRUNING_MISSING)
        return asked
    if not has_tp:
        print("warning: Torch-Pruning is not installed, leaving out the torch-pruning method "
              "(pip install 'ofbdeploy[bench]')", file=sys.stderr)
    return [m for m in METHODS if has_tp or m != "torch-pruning"]


def load_teacher(args: argparse.Namespace, classes: int, loader: DataLoader) -> nn.Module:
    """The dense teacher, trained once per data/model/epochs/seed and cached under --cache."""
    torch.manual_seed(args.seed)
    teacher = build_dense(args.model, num_classes=classes, img_size=args.img_size)
    key = hashlib.sha256(json.dumps([args.data, args.model, args.img_size, args.teacher_epochs, args.limit_train,
                                     args.seed]).encode()).hexdigest()[:12]
    cached = args.cache / f"teacher-{key}.safetensors"
    if cached.is_file():
        teacher.load_state_dict(load_file(str(cached)))
    else:
        train_classifier(teacher, loader, TrainSettings(epochs=args.teacher_epochs, lr=4e-3, min_lr=1e-5,
                                                        weight_decay=0.05, warmup_epochs=1, label_smoothing=0.1),
                         Dist(), seed=args.seed, progress=False)
        save_weights(teacher, cached)
    return teacher.eval()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="fashion_mnist", choices=["fashion_mnist", "digits"])
    parser.add_argument("--model", default="ofb_vit_micro_patch4_32")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--ratio", action="append", type=float, help="budget: FLOPs (latency for ofb-latency) ratio")
    parser.add_argument("--method", action="append", choices=METHODS)
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--search-epochs", type=int, default=10)
    parser.add_argument("--finetune-epochs", type=int, default=15)
    parser.add_argument("--prune-step", type=float, default=0.01, help="width fraction per Torch-Pruning step")
    parser.add_argument("--limit-train", type=int, default=None)
    parser.add_argument("--cache", type=Path, default=Path("runs/bench_cache"), help="teacher weights, LUTs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="digits, 1-2 epochs each: checks the tool runs")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.smoke:
        args.data, args.model, args.img_size = "digits", "ofb_vit_pico_patch4_32", 16
        args.teacher_epochs, args.search_epochs, args.finetune_epochs, args.prune_step = 2, 2, 1, 0.05
    return args


def main() -> None:
    args = parse_args()
    methods = choose_methods(args.method)
    logging.basicConfig(level=logging.WARNING)
    train, val, classes = build_datasets(DataSpec(kind=args.data, img_size=args.img_size, seed=args.seed,
                                                  limit_train=args.limit_train, crop_padding=2))
    loader = build_loader(train, batch_size=64, train=True, seed=args.seed)
    val_loader = build_loader(val, batch_size=256, train=False)
    teacher = load_teacher(args, classes, loader)
    dense_top1 = evaluate(teacher, val_loader, Dist())["top1"]
    # the LUT's probe models: the recipe defaults, or few and briefly timed for the smoke run
    lut_probes = {"embed_points": 2, "width_points": 1, "random_points": 4, "repeats": 5} if args.smoke else {}
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(
            teacher=teacher, loader=loader, val_loader=val_loader, model_name=args.model, img_size=args.img_size,
            seed=args.seed,
            search=SearchCfg(target_flops_ratio=0.5, epochs=args.search_epochs, arch_lr=0.5, lr=5e-4,
                             loss_weights={"flops": 50.0}),
            latency=LatencyTargetCfg(target_ratio=0.5, backend=PROFILE.backends[0], batch=PROFILE.batches[0],
                                     cache_dir=str(args.cache / "lut"), **lut_probes),
            prune_step=args.prune_step,
            finetune=TrainSettings(epochs=args.finetune_epochs, lr=4e-3, min_lr=1e-5, weight_decay=0.05,
                                   warmup_epochs=0, label_smoothing=0.1, distill_alpha=0.5, distill_temperature=2.0),
            export_dir=Path(tmp),
            dense_onnx=export_models({"dense": teacher}, Path(tmp) / "dense", EXPORT, img_size=args.img_size))
        rows = []
        for ratio in args.ratio or [0.5]:
            for method in methods:
                rows.append({**run_method(method, ratio, bench), "top1_dense": dense_top1})
                write_rows(args, rows)  # kept as they come: a long run stopped late still leaves its rows
    table = [("dense", "-", "100.0%", f"{dense_top1:.2f}", "-", "-", "-", "1.00x")]
    print(format_table(("method", "target", "FLOPs", "top-1 %", "vs dense", "ORT CPU b32 ms", "dense ms", "speedup"),
                       table + [table_row(row, dense_top1) for row in rows]))


def write_rows(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """The raw rows and how they were made, written atomically to --json (when given)."""
    if args.json is not None:
        meta = {"date": date.today().isoformat(), "command": "python tools/bench_accuracy.py " + " ".join(sys.argv[1:])}
        atomic_write_text(args.json, json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
