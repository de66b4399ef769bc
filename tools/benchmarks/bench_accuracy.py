"""Accuracy and latency of OFB against structured-pruning baselines at equal budgets, same finetune, same data.

A dense teacher is made once (cached by its settings): trained from scratch, or, with ``--checkpoint``, from
pretrained weights (e.g. the DINOv2 ViT-S/14 backbone of tools/scripts/convert_dinov2.py) with a fresh head trained
together with the backbone on the task. It is then compressed to each budget ratio, once per seed, by the
pruning methods registered in ``ofbdeploy.prune`` (what a recipe's ``search.method`` runs):
  ofb            the OFB search (this project) to the ratio of the teacher's FLOPs, from the teacher's weights
  ofb-latency    the OFB search to the ratio of the teacher's latency on ONNX Runtime CPU at batch 32, steered
                 by a measured latency table (cached under --cache/lut), then closed on measurements as a run's
                 fit stage closes it (--latency-rounds); its FLOPs are whatever that gives
  uniform        the same width fraction in every group (the widest one that fits), units kept by L1 magnitude
  l1             L1-magnitude importance of the same units, widths allocated by the budget enforcement
  random         random importance, widths allocated by the budget enforcement
  ofb-arch       diagnostic, only when named: OFB's searched widths and unit ranking cut from the teacher's
                 unscaled weights and finetuned as the one-shot baselines are. It separates the architecture
                 the search finds from the training the search gives the weights; it sees the search's
                 images on top of the finetune's, so it is not a like-for-like row
  ofb-restart    diagnostic, only when named: as ofb-arch, but finetuned for OFB's own finetune epochs, so
                 it sees as many images as OFB (the search's, then the finetune's): like-for-like with ofb
  torch-pruning  Torch-Pruning's isomorphic global pruning with group L2 magnitude (whole heads, per-head qkv
                 channels, MLP neurons, embedding), in small steps until the FLOPs fit (needs
                 `pip install 'ofbdeploy[bench]'`)
Every method sees the same number of training images: OFB's search epochs plus its finetune epochs. The
one-shot baselines spend them all as finetune, from the teacher's weights as they are (their scores rank
units, they do not scale them); an OFB search that decides early spends the epochs it did not
use as finetune too. Every pruned model is a plain timm ViT, evaluated before and after the same finetune
(distillation from the teacher), exported to ONNX and timed against the dense model on ONNX Runtime CPU at
batch 32 in one run (alternating, the profile protocol).

Rows are keyed by (tag, method, ratio, seed) and written to --json as each finishes; a rerun with the same
--json skips the rows it already has, so a stopped run resumes (settings must match: they are recorded).
``--search-set key=value`` changes the OFB search settings (ablations; give them a --tag).

    python tools/scripts/convert_dinov2.py --img-size 56 --out weights/dinov2_vits14_56.safetensors
    python tools/benchmarks/bench_accuracy.py --model vit_small_patch14_dinov2 --img-size 56 \\
        --checkpoint weights/dinov2_vits14_56.safetensors --limit-train 10000 --ratio 0.5 --ratio 0.3 \\
        --seed 0 --seed 1 --seed 2 --json docs/benchmarks/acc_dinov2.json --plot docs/benchmarks/acc_dinov2.png
    python tools/benchmarks/bench_accuracy.py --smoke          # a minute, on digits: what the test runs
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader

import ofbdeploy.models.zoo  # noqa: F401  (the small ofb_vit_* configs)
from ofbdeploy.arch import ArchSpec
from ofbdeploy.arch.cost import count_params
from ofbdeploy.deploy.measure import QuietHost
from ofbdeploy.deploy.workflow import DeployArtifacts, export_models, profile_models
from ofbdeploy.errors import OfbError
from ofbdeploy.families.vit.searchable import SearchableViT
from ofbdeploy.io import atomic_write_text
from ofbdeploy.models.dense import build_dense, load_weights
from ofbdeploy.models.materialize import materialize
from ofbdeploy.models.pruned import save_weights
from ofbdeploy.models.resize import resize
from ofbdeploy.prune.budget import resolve_target
from ofbdeploy.prune.config import MethodCfg
from ofbdeploy.prune.fit import fill_flops
from ofbdeploy.prune.method import Job
from ofbdeploy.prune.ofb.objective import build_objective
from ofbdeploy.prune.registry import METHODS as REGISTERED
from ofbdeploy.prune.registry import get_method
from ofbdeploy.prune.result import SearchResult
from ofbdeploy.recipe import ExportCfg, LatencyTargetCfg, ProfileCfg, SearchCfg
from ofbdeploy.run.fit import CALIBRATION_IMAGES, close_latency, quiet_reference
from ofbdeploy.table import format_table
from ofbdeploy.train.data import DataSpec, build_datasets, build_loader, calibration_batch
from ofbdeploy.train.distributed import Dist
from ofbdeploy.train.trainer import TrainSettings, evaluate, train_classifier

log = logging.getLogger("bench_accuracy")


@dataclass(frozen=True)
class Method:
    """A row kind: the registered pruning method that decides (``ofbdeploy.prune``), and how its budget and its
    training images are counted here."""

    prune: str  # the name in ofbdeploy.prune.registry.METHODS
    by_latency: bool = False  # its budget is a latency ratio; otherwise a FLOPs ratio
    keeps_weights: bool = True  # finetunes the weights the method left; otherwise the searched units, cut again
    search_is_training: bool = False  # the search's images count against its finetune
    diagnostic: bool = False  # run only when named


_REGISTERED = {name: Method(name, search_is_training=m.trains) for name, m in REGISTERED.items()}
# a row kind per registered method (a new method is benchmarked as it is registered), the latency-budget OFB
# after OFB, and the diagnostics
METHODS = {
    "ofb": _REGISTERED.pop("ofb"),
    "ofb-latency": Method("ofb", by_latency=True, search_is_training=True),
    **_REGISTERED,
    "ofb-arch": Method("ofb", keeps_weights=False, diagnostic=True),
    "ofb-restart": Method("ofb", keeps_weights=False, search_is_training=True, diagnostic=True),
}

EXPORT = ExportCfg(check_images=4)
PROFILE = ProfileCfg(backends=["ort-cpu"], batches=[32], repeats=20)
FORMAT = "ofbdeploy.bench_accuracy/2"


class BadInput(Exception):
    """An option, file or budget the tool cannot work with: one line on stderr, exit code 2."""


@dataclass
class Bench:
    """What every method shares: the teacher, the training data and the compression and finetune settings."""

    teacher: nn.Module
    loader: DataLoader
    val_loader: DataLoader
    model_name: str
    img_size: int
    search: SearchCfg
    latency: LatencyTargetCfg  # the LUT settings of ofb-latency (its target_ratio is set per ratio)
    method_options: dict[str, dict[str, Any]]  # per registered method, its config keys besides the budget
    finetune: TrainSettings  # its epochs are the finetune epochs of OFB; baselines get the search epochs on top
    export_dir: Path
    dense_onnx: DeployArtifacts  # the teacher is exported once and timed against every pruned model


@dataclass
class Compressed:
    """A pruned plain model, its FLOPs as a fraction of the teacher's, and method-specific JSON fields."""

    model: nn.Module
    flops_ratio: float
    extra: dict[str, Any] = field(default_factory=dict)
    quiet: dict[tuple[str, int, str], QuietHost] = field(default_factory=dict)  # a closed latency loop's reference

# -- one method through the registry, then the shared evaluate / finetune / export / profile -----------------
def method_config(method: str, bench: Bench, ratio: float) -> MethodCfg:
    """The method's own config section at ``ratio`` of the teacher's FLOPs (of its latency for ofb-latency)."""
    kind = METHODS[method]
    if kind.prune == "ofb":
        if kind.by_latency:
            target = bench.latency.model_copy(update={"target_ratio": ratio})
            return bench.search.model_copy(update={"target_flops_ratio": None, "latency": target})
        return bench.search.model_copy(update={"target_flops_ratio": ratio})
    return get_method(kind.prune).config.model_validate(
        {"target_flops_ratio": ratio, **bench.method_options.get(kind.prune, {})})


def _on_teacher_weights(spec: ArchSpec, teacher: nn.Module, model_name: str) -> SearchableViT:
    """The teacher cut to the units ``spec`` keeps, unscaled: a searched architecture without its training."""
    model = SearchableViT(copy.deepcopy(teacher), model_name=model_name)
    model.set_mix(0.0)
    model.apply_arch(spec)
    model.decide_widest()
    return model


def _extra(result: SearchResult, trains: bool, by_latency: bool) -> dict[str, Any]:
    """What the decision did, for the JSON row: the search's epochs and repairs, the method's own state."""
    extra: dict[str, Any] = dict(result.state)
    if trains:
        extra.update(search_epochs_run=result.epochs_run, decided_epoch=result.decided_epoch,
                     forced_groups=len(result.forced_groups), budget_steps=len(result.budget_steps),
                     search_seconds=result.seconds)
    if by_latency:
        extra.update(target_latency_ms=result.target_latency_ms, predicted_latency_ms=result.predicted_latency_ms,
                     predicted_dense_latency_ms=result.predicted_dense_latency_ms)
    return extra


def compress(method: str, bench: Bench, ratio: float, seed: int) -> Compressed:
    """A plain pruned copy of the teacher at ``ratio`` of its FLOPs (latency for ofb-latency), decided by the
    registered method from the teacher's weights, as a recipe's ``search.method`` would."""
    torch.manual_seed(seed)
    kind, registered = METHODS[method], get_method(METHODS[method].prune)
    model = SearchableViT(copy.deepcopy(bench.teacher), model_name=bench.model_name)
    cfg = method_config(method, bench, ratio)
    latency = build_objective(cfg.latency_target, model, progress=False) if kind.by_latency else None
    job = Job(teacher=lambda: copy.deepcopy(bench.teacher), loader=bench.loader, seed=seed, progress=False,
              latency=latency)
    result = registered.decide(model, cfg, job)
    if not kind.keeps_weights:
        model = _on_teacher_weights(model.arch_spec(), bench.teacher, bench.model_name)
    pruned, spec = materialize(model.eval())
    extra = _extra(result, registered.trains, kind.by_latency)
    quiet: dict[tuple[str, int, str], QuietHost] = {}
    if kind.by_latency and latency is not None and cfg.latency_target.max_rounds > 0:
        # the run's fit stage: the latency budget closed on measurements, the searched weights kept
        train, val = bench.loader.dataset, bench.val_loader.dataset  # the images the fit stage would use
        images = calibration_batch(train, val, min(CALIBRATION_IMAGES, len(train)), seed)
        fit, _ = close_latency(cfg.latency_target, latency.lut, pruned, spec, bench.teacher, model.space,
                               images=images, threads=PROFILE.threads)
        if fit.spec != spec:
            pruned, spec = resize(pruned, spec, bench.teacher, fit.spec), fit.spec
        extra.update(latency_fit_met=fit.met, latency_fit_kept_round=fit.kept_round,
                     latency_fit_rounds=[vars(r) for r in fit.rounds], latency_quiet_dense_ms=fit.quiet_dense_ms)
        quiet = quiet_reference(cfg.latency_target, fit)  # the profile after the finetune tells a loaded host by it
    elif kind.search_is_training and kind.keeps_weights:
        # the run's fit stage: a FLOPs budget filled from below
        pruned, spec, steps = fill_flops(pruned, spec, bench.teacher, model.space, resolve_target(cfg, spec.base))
        extra["fill_steps"] = len(steps)
    return Compressed(pruned, spec.macs() / ArchSpec.dense(spec.base).macs(), extra, quiet)


def widths(model: nn.Module) -> dict[str, Any]:
    """Embedding width and per-block (heads, head width, MLP width), read from the module itself."""
    return {"embed_dim": model.patch_embed.proj.out_channels,
            "blocks": [(b.attn.num_heads, b.attn.head_dim, b.mlp.fc1.out_features) for b in model.blocks]}


def finetune_epochs(method: str, bench: Bench, made: Compressed) -> int:
    """Equal training images for all: OFB's finetune plus the search epochs it did not run; the others get the
    search epochs as finetune."""
    if METHODS[method].search_is_training:
        return bench.finetune.epochs + bench.search.epochs - made.extra["search_epochs_run"]
    return bench.finetune.epochs + bench.search.epochs


def finetune_and_measure(method: str, made: Compressed, bench: Bench, seed: int) -> dict[str, Any]:
    """Evaluate, distil from the teacher, evaluate, export to ONNX and time against the dense model."""
    pruned = made.model
    top1_before = evaluate(pruned, bench.val_loader, Dist())["top1"]
    epochs = finetune_epochs(method, bench, made)
    settings = dataclasses.replace(bench.finetune, epochs=epochs)
    trained = train_classifier(pruned.train(), bench.loader, settings, Dist(), teacher=bench.teacher, seed=seed,
                               progress=False)
    pruned.eval()
    top1 = evaluate(pruned, bench.val_loader, Dist())["top1"]
    with tempfile.TemporaryDirectory(dir=bench.export_dir) as tmp:
        own = export_models({"pruned": pruned}, Path(tmp), EXPORT, img_size=bench.img_size)
        both = DeployArtifacts(onnx={**bench.dense_onnx.onnx, **own.onnx}, checks=bench.dense_onnx.checks + own.checks)
        latency = profile_models({"dense": bench.teacher, "pruned": pruned}, both, PROFILE, made.flops_ratio,
                                 made.quiet)[0][0]
    return {"top1_before_finetune": top1_before, "top1": top1, "finetune_epochs": epochs,
            "finetune_seconds": trained.seconds, "params": count_params(pruned),
            "latency_ms_pruned_ort_cpu_b32": latency["latency_ms_pruned"],
            "latency_ms_dense_ort_cpu_b32": latency["latency_ms_dense"], "speedup_ort_cpu_b32": latency["speedup"],
            "latency_measurements_ort_cpu_b32": latency["measurements"]}


def run_method(method: str, ratio: float, seed: int, bench: Bench) -> dict[str, Any]:
    """One JSON row: compress, then the shared finetune and measurements, and the widths reached. A budget
    the method cannot meet (e.g. a latency below the narrowest architecture's) is a row saying so."""
    row = {"method": method, "budget": "latency" if METHODS[method].by_latency else "flops", "ratio": ratio,
           "seed": seed}
    try:
        made = compress(method, bench, ratio, seed)
    except OfbError as err:
        log.warning("%s at %.2f: %s", method, ratio, err)
        return {**row, "unreachable": str(err)}
    return {**row, "flops_ratio": made.flops_ratio, **finetune_and_measure(method, made, bench, seed),
            **widths(made.model), **made.extra}


# -- aggregation: mean and spread over seeds -------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single seed)."""
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (tag, method, ratio): mean and std over seeds of each measured figure."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        if "unreachable" not in row:
            groups.setdefault((row.get("tag", ""), row["method"], row["ratio"]), []).append(row)
    summary = []
    for (tag, method, ratio), members in groups.items():
        entry: dict[str, Any] = {"tag": tag, "method": method, "ratio": ratio, "budget": members[0]["budget"],
                                 "seeds": sorted(r["seed"] for r in members)}
        for key in ("top1", "top1_before_finetune", "flops_ratio", "params", "speedup_ort_cpu_b32"):
            entry[key], entry[f"{key}_std"] = _mean_std([float(r[key]) for r in members])
        # against each row's own teacher (rows of one file may come from re-made teachers: --new-teacher)
        entry["top1_dense"] = sorted({r["top1_dense"] for r in members})
        entry["vs_dense"], entry["vs_dense_std"] = _mean_std([r["top1"] - r["top1_dense"] for r in members])
        summary.append(entry)
    return summary


def summary_table(summary: list[dict[str, Any]], dense_top1: float, dense_params: int | None = None,
                  markdown: bool = False) -> str:
    """One line per (tag, method, budget): means ± sample std over seeds; vs dense against each row's teacher."""
    def pm(entry: dict[str, Any], key: str, fmt: str, scale: float = 1.0) -> str:
        return f"{scale * entry[key]:{fmt}} ± {scale * entry[key + '_std']:{fmt.lstrip('+')}}"

    params = "-" if dense_params is None else f"{dense_params / 1e6:.2f}"
    teachers = sorted({t for e in summary for t in e["top1_dense"]}) or [dense_top1]
    rows = [("dense", "", "-", "100.0", params, "-", " / ".join(f"{t:.2f}" for t in teachers), "-", "-", "1.00x")]
    for e in summary:
        rows.append((e["method"], e["tag"], target_label(e["budget"], e["ratio"]), pm(e, "flops_ratio", ".1f", 100),
                     f"{e['params'] / 1e6:.2f}",
                     pm(e, "top1_before_finetune", ".2f"), pm(e, "top1", ".2f"), pm(e, "vs_dense", "+.2f"),
                     str(len(e["seeds"])), pm(e, "speedup_ort_cpu_b32", ".2f") + "x"))
    return format_table(("method", "tag", "target", "FLOPs % of dense", "params (M)", "top-1 before ft",
                         "top-1", "vs dense", "seeds", "ORT CPU b32 speedup"), rows, markdown=markdown)


def target_label(budget: str, ratio: float) -> str:
    """"30%" for a FLOPs budget, "latency 30%" for a latency one."""
    return f"latency {100 * ratio:.0f}%" if budget == "latency" else f"{100 * ratio:.0f}%"


def per_seed_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Top-1 after finetune of every seed, per (tag, method, budget): the raw numbers behind the means."""
    groups: dict[tuple[str, str, str, float], list[dict[str, Any]]] = {}
    for row in rows:
        if "top1" in row:
            groups.setdefault((row.get("tag", ""), row["method"], row["budget"], row["ratio"]), []).append(row)
    return [f"- {method}{f' [{tag}]' if tag else ''} at {target_label(budget, ratio)}: "
            + " / ".join(f"{r['top1']:.2f}" for r in sorted(members, key=lambda r: r["seed"]))
            + f" (seeds {', '.join(str(r['seed']) for r in sorted(members, key=lambda r: r['seed']))})"
            for (tag, method, budget, ratio), members in groups.items()]


def plot(summary: list[dict[str, Any]], dense_top1: float, path: Path) -> None:
    """Top-1 against achieved FLOPs for every method, with error bars over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8))
    colours = plt.get_cmap("tab20").colors  # one colour per line however many ablations there are
    for i, key in enumerate(sorted({(e["tag"], e["method"]) for e in summary}, key=lambda k: (k[0] != "", k))):
        points = sorted((e for e in summary if (e["tag"], e["method"]) == key), key=lambda e: e["flops_ratio"])
        label = key[1] + (f" [{key[0]}]" if key[0] else "")
        ax.errorbar([100 * e["flops_ratio"] for e in points], [e["top1"] for e in points],
                    xerr=[100 * e["flops_ratio_std"] for e in points], yerr=[e["top1_std"] for e in points],
                    marker="s" if key[0] else "o", linestyle="--" if key[0] else "-", capsize=3, label=label,
                    color=colours[(2 * i + i // 10) % 20])  # tab20's dark shades first, then its light ones
    ax.axhline(dense_top1, color="grey", linestyle="--", label="dense")
    ax.set_xlabel("FLOPs, % of dense (ofb-latency: whatever its latency budget gave)")
    ax.set_ylabel("top-1 % after finetune (mean ± std over seeds)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes, never over a point
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- setup ---------------------------------------------------------------------------------------------------
def _missing(method: str) -> str | None:
    """Why the registered method behind ``method`` cannot run here (an optional package), or None."""
    try:
        get_method(METHODS[method].prune).check("vit")
    except OfbError as err:
        return str(err)
    return None


def choose_methods(asked: list[str] | None) -> list[str]:
    """The asked methods, or all of them; those whose optional package is missing only when named (refused)."""
    if asked:
        for method in asked:
            if _missing(method):
                raise BadInput(_missing(method))
        return asked
    chosen = []
    for method, kind in METHODS.items():
        if kind.diagnostic:
            continue
        if _missing(method):
            print(f"warning: leaving out {method}: {_missing(method)}", file=sys.stderr)
        else:
            chosen.append(method)
    return chosen


def _weights_digest(path: Path | None) -> str | None:
    """What the start weights are, not where they were made: a safetensors file's digest covers its tensors
    (names, dtypes, shapes, bytes) and not its header metadata, which may name the converter's paths."""
    if path is None:
        return None
    if path.suffix != ".safetensors":
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(str(path)).items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def load_data(args: argparse.Namespace) -> tuple[DataLoader, DataLoader, int]:
    """The training and test loaders every row (and the teacher) uses, and the number of classes."""
    train, val, classes = build_datasets(DataSpec(kind=args.data, img_size=args.img_size, seed=args.data_seed,
                                                  limit_train=args.limit_train, limit_val=args.limit_val,
                                                  crop_padding=2))
    loader = build_loader(train, batch_size=args.batch_size, train=True, seed=args.data_seed)
    return loader, build_loader(val, batch_size=256, train=False), classes


def load_teacher(args: argparse.Namespace, classes: int, loader: DataLoader) -> nn.Module:
    """The dense teacher, made once per data/model/start weights/epochs and cached under --cache."""
    torch.manual_seed(args.data_seed)
    teacher = build_dense(args.model, num_classes=classes, img_size=args.img_size)
    key = hashlib.sha256(json.dumps([args.data, args.model, args.img_size, args.teacher_epochs, args.teacher_lr,
                                     args.limit_train, args.data_seed, _weights_digest(args.checkpoint)]).encode())
    cached = args.cache / f"teacher-{key.hexdigest()[:12]}.safetensors"
    if cached.is_file():
        teacher.load_state_dict(load_file(str(cached)))
        return teacher.eval()
    if args.checkpoint is not None:
        load_weights(teacher, args.checkpoint)
    train_classifier(teacher, loader, TrainSettings(epochs=args.teacher_epochs, lr=args.teacher_lr, min_lr=1e-6,
                                                    weight_decay=0.05, warmup_epochs=min(1, args.teacher_epochs - 1),
                                                    label_smoothing=0.1), Dist(), seed=args.data_seed,
                     progress=False)
    save_weights(teacher, cached)
    return teacher.eval()


def search_settings(args: argparse.Namespace) -> SearchCfg:
    """The OFB search of every seed: short-schedule defaults, then --search-set overrides, validated."""
    data: dict[str, Any] = {"target_flops_ratio": 0.5, "epochs": args.search_epochs, "arch_lr": 0.5,
                            "lr": args.search_lr, "loss_weights": {"flops": 50.0}}
    for item in args.search_set:
        key, sep, raw = item.partition("=")
        if not sep:
            raise BadInput(f"--search-set {item!r}: expected key=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    try:
        return SearchCfg.model_validate(data)
    except ValueError as err:
        raise BadInput(f"--search-set: {err}") from None


def settings_record(args: argparse.Namespace) -> dict[str, Any]:
    """What the rows of one --json must share, so that a resumed run adds like to like."""
    return {"data": args.data, "model": args.model, "img_size": args.img_size, "limit_train": args.limit_train,
            "limit_val": args.limit_val, "checkpoint_tensors_sha256": _weights_digest(args.checkpoint),
            "teacher_epochs": args.teacher_epochs, "teacher_lr": args.teacher_lr, "finetune_lr": args.lr,
            "finetune_epochs": args.finetune_epochs, "search_epochs": args.search_epochs,
            "batch_size": args.batch_size, "data_seed": args.data_seed}


def read_rows(path: Path | None, settings: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows an earlier run of the same settings left in ``path``, and the commands that made them (none when
    there is no such file)."""
    if path is None or not path.is_file():
        return [], []
    data = json.loads(path.read_text())
    meta = data.get("meta", {})
    if meta.get("settings") != settings:
        raise BadInput(f"{path}: holds rows of other settings ({meta.get('settings')}); use another --json")
    return data["rows"], meta.get("commands", [])


def check_same_teacher(rows: list[dict[str, Any]], dense_top1: float, path: Path | None, accept: bool) -> None:
    """A resumed file keeps one teacher unless told otherwise: a teacher re-made (cache lost; float training
    is not bitwise reproducible across machines) that scores differently would mix rows distilled from two
    models. With ``accept`` the mix is allowed and visible: every row records its own teacher's top-1."""
    earlier = {row["top1_dense"] for row in rows}
    if earlier and earlier != {dense_top1}:
        if not accept:
            raise BadInput(f"{path}: its rows were distilled from a teacher at {sorted(earlier)}% top-1, this "
                           f"teacher scores {dense_top1}%; use another --json, the earlier --cache, or "
                           "--new-teacher to add rows from this one")
        log.warning("%s: earlier rows come from a teacher at %s%% top-1, the new ones from one at %s%%",
                    path, sorted(earlier), dense_top1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="fashion_mnist", choices=["fashion_mnist", "digits"])
    parser.add_argument("--model", default="ofb_vit_micro_patch4_32")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="pretrained weights to start the teacher from (its head is trained on the task)")
    parser.add_argument("--ratio", action="append", type=float, help="budget: FLOPs (latency for ofb-latency) ratio")
    parser.add_argument("--method", action="append", choices=list(METHODS))
    parser.add_argument("--seed", action="append", type=int, help="compression/finetune seed (repeatable)")
    parser.add_argument("--data-seed", type=int, default=0, help="training subset and teacher: one for all rows")
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--teacher-lr", type=float, default=4e-3, help="per 256 images")
    parser.add_argument("--search-epochs", type=int, default=10)
    parser.add_argument("--search-lr", type=float, default=5e-4, help="OFB weights lr per 256 images")
    parser.add_argument("--search-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override an OFB search setting, e.g. pmim.enabled=false (repeatable)")
    parser.add_argument("--tag", default="", help="names the rows of an ablation (search settings)")
    parser.add_argument("--latency-rounds", type=int, default=LatencyTargetCfg.model_fields["max_rounds"].default,
                        help="ofb-latency: measured rounds of the fit stage's closed loop, as "
                             "search.latency.max_rounds (0: the search's table alone decides)")
    parser.add_argument("--finetune-epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=4e-3, help="finetune lr per 256 images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--prune-step", type=float, default=0.01, help="width fraction per Torch-Pruning step")
    parser.add_argument("--limit-train", type=int, default=None)
    parser.add_argument("--limit-val", type=int, default=None)
    parser.add_argument("--new-teacher", action="store_true",
                        help="add rows to a --json whose rows came from a teacher that scored differently (a lost "
                             "cache re-made); each row keeps its own teacher's top-1")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="the summary table (Markdown) and the per-seed top-1, rewritten as rows finish")
    parser.add_argument("--render", action="store_true",
                        help="only write --plot / --markdown again from the rows in --json (nothing is trained)")
    parser.add_argument("--cache", type=Path, default=Path("runs/bench_cache"), help="teacher weights, LUTs")
    parser.add_argument("--smoke", action="store_true", help="digits, 1-2 epochs each: checks the tool runs")
    parser.add_argument("--json", type=Path, default=None, help="rows, written as they finish; resumed from")
    parser.add_argument("--plot", type=Path, default=None, help="top-1 vs FLOPs with error bars (PNG)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.data, args.model, args.img_size = "digits", "ofb_vit_pico_patch4_32", 16
        args.teacher_epochs, args.search_epochs, args.finetune_epochs, args.prune_step = 2, 2, 1, 0.05
        args.latency_rounds = min(args.latency_rounds, 2)
    args.seed = args.seed or [0]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render:
        render(args)
        return
    methods = choose_methods(args.method)
    # one greppable line per stage and per row on stdout (these runs take hours in the background);
    # stderr keeps warnings and the one-line errors
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    settings = settings_record(args)
    rows, commands = read_rows(args.json, settings)
    command = "python tools/benchmarks/bench_accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv)
    commands = [*commands, command] if command not in commands else commands
    done = {(r.get("tag", ""), r["method"], r["ratio"], r["seed"]) for r in rows}
    loader, val_loader, classes = load_data(args)
    teacher = load_teacher(args, classes, loader)
    dense_top1 = evaluate(teacher, val_loader, Dist())["top1"]
    check_same_teacher(rows, dense_top1, args.json, args.new_teacher)
    ledger = Ledger(settings, commands, dense_top1, count_params(teacher))
    # the LUT's probe models: the recipe defaults, or few and briefly timed for the smoke run
    lut_probes = {"embed_points": 2, "width_points": 1, "random_points": 4, "repeats": 5} if args.smoke else {}
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(
            teacher=teacher, loader=loader, val_loader=val_loader, model_name=args.model, img_size=args.img_size,
            search=search_settings(args),
            latency=LatencyTargetCfg(target_ratio=0.5, backend=PROFILE.backends[0], batch=PROFILE.batches[0],
                                     cache_dir=str(args.cache / "lut"), max_rounds=args.latency_rounds,
                                     **lut_probes),
            method_options={"torch-pruning": {"prune_step": args.prune_step}},
            finetune=TrainSettings(epochs=args.finetune_epochs, lr=args.lr, min_lr=1e-6, weight_decay=0.05,
                                   warmup_epochs=0, label_smoothing=0.1, distill_alpha=0.5, distill_temperature=2.0),
            export_dir=Path(tmp),
            dense_onnx=export_models({"dense": teacher}, Path(tmp) / "dense", EXPORT, img_size=args.img_size))
        todo = [(ratio, seed, method) for ratio in args.ratio or [0.5] for seed in args.seed for method in methods
                if (args.tag, method, ratio, seed) not in done]
        log.info("%d rows to run (%d already in %s)", len(todo), len(done), args.json)
        for i, (ratio, seed, method) in enumerate(todo, 1):
            t0 = time.perf_counter()
            row = run_method(method, ratio, seed, bench)
            rows.append({**row, "tag": args.tag, "top1_dense": dense_top1})
            write_rows(args, ledger, rows)  # each row as it comes: a stopped run resumes
            log.info("row %d/%d done in %.0f s: %s at %.2f seed %d: top-1 %s, FLOPs ratio %s", i, len(todo),
                     time.perf_counter() - t0, method, ratio, seed, row.get("top1"), row.get("flops_ratio"))
    write_rows(args, ledger, rows)
    print(summary_table(aggregate(rows), dense_top1, ledger.dense_params))


@dataclass
class Ledger:
    """What a --json holds besides its rows: how they were made, and the teacher they are measured against."""

    settings: dict[str, Any]
    commands: list[str]
    dense_top1: float
    dense_params: int


def write_rows(args: argparse.Namespace, ledger: Ledger, rows: list[dict[str, Any]]) -> None:
    """The raw rows, their summary and how they were made, written atomically to --json (and the plot and the
    Markdown table, where asked for)."""
    summary = aggregate(rows)
    if args.json is not None:
        meta = {"format": FORMAT, "date": date.today().isoformat(), "settings": ledger.settings,
                "commands": ledger.commands, "top1_dense": ledger.dense_top1, "params_dense": ledger.dense_params}
        atomic_write_text(args.json, json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=1) + "\n")
    if args.plot is not None and summary:
        plot(summary, ledger.dense_top1, args.plot)
    if args.markdown is not None and summary:
        table = summary_table(summary, ledger.dense_top1, ledger.dense_params, markdown=True)
        lines = "\n".join(per_seed_lines(rows))
        atomic_write_text(args.markdown, f"{table}\n\nTop-1 after finetune, per seed:\n\n{lines}\n")


def render(args: argparse.Namespace) -> None:
    """--render: the plot and the Markdown table again from the rows in --json, nothing trained."""
    if args.json is None or not args.json.is_file():
        raise BadInput("--render needs an existing --json")
    data = json.loads(args.json.read_text())
    meta = data.get("meta", {})
    ledger = Ledger(meta.get("settings", {}), meta.get("commands", []), meta["top1_dense"], meta.get("params_dense"))
    write_rows(args, ledger, data["rows"])
    print(summary_table(aggregate(data["rows"]), ledger.dense_top1, ledger.dense_params))


if __name__ == "__main__":
    try:
        main()
    except BadInput as err:
        print(f"bench_accuracy: {err}", file=sys.stderr)
        sys.exit(2)
