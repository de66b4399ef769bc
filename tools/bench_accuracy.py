"""Accuracy of OFB against simple structured-pruning baselines at equal FLOPs, same finetune, same data.

A dense teacher is trained once (cached by its settings), then compressed to each FLOPs ratio by:
  ofb      the OFB search (this project), from the teacher's weights
  uniform  the same width fraction in every group (the widest one that fits), units kept by L1 magnitude
  l1       L1-magnitude importance of the same units, widths allocated by the budget enforcement
  random   random importance, widths allocated by the budget enforcement
Every pruned model is materialised and finetuned with the same epochs and distillation from the teacher,
then evaluated, and its latency is measured against the dense model on ONNX Runtime CPU in one run.
(Torch-Pruning's ViT pruning is not wired in yet.)

    python tools/bench_accuracy.py --data fashion_mnist --ratio 0.5 --ratio 0.3 --json docs/benchmarks/acc.json
    python tools/bench_accuracy.py --smoke          # seconds, on digits: what the test runs
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch
from safetensors.torch import load_file

import ofbdeploy.models.zoo  # noqa: F401  (the small ofb_vit_* configs)
from ofbdeploy.arch import ArchSpec
from ofbdeploy.deploy.workflow import export_models, profile_models
from ofbdeploy.materialize import materialize
from ofbdeploy.models.dense import build_dense
from ofbdeploy.models.pruned import save_weights
from ofbdeploy.recipe import ExportCfg, ProfileCfg, SearchCfg
from ofbdeploy.search.budget import enforce_budget
from ofbdeploy.search.engine import run_search
from ofbdeploy.search.searchable import SearchableViT
from ofbdeploy.table import format_table
from ofbdeploy.train.data import DataSpec, build_datasets, build_loader
from ofbdeploy.train.distributed import Dist
from ofbdeploy.train.trainer import TrainSettings, evaluate, train_classifier

log = logging.getLogger("bench_accuracy")
METHODS = ("ofb", "uniform", "l1", "random")


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


def compress(method: str, teacher: torch.nn.Module, ratio: float, loader, search_cfg: SearchCfg, seed: int):
    """A decided SearchableViT at ``ratio`` of the teacher's FLOPs, by ``method``."""
    torch.manual_seed(seed)
    model = SearchableViT(copy.deepcopy(teacher), model_name="bench")
    target = ratio * ArchSpec.dense(model.shape).macs()
    if method == "ofb":
        run_search(model, loader, search_cfg.model_copy(update={"target_flops_ratio": ratio}), Dist(), seed=seed,
                   progress=False)
        return model
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
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="fashion_mnist", choices=["fashion_mnist", "digits"])
    parser.add_argument("--model", default="ofb_vit_micro_patch4_32")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--ratio", action="append", type=float)
    parser.add_argument("--method", action="append", choices=METHODS)
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--search-epochs", type=int, default=10)
    parser.add_argument("--finetune-epochs", type=int, default=15)
    parser.add_argument("--limit-train", type=int, default=None)
    parser.add_argument("--cache", type=Path, default=Path("runs/bench_cache"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="digits, 1-2 epochs each: checks the tool runs")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.smoke:
        args.data, args.model, args.img_size = "digits", "ofb_vit_pico_patch4_32", 16
        args.teacher_epochs, args.search_epochs, args.finetune_epochs = 2, 2, 1
    logging.basicConfig(level=logging.WARNING)
    train, val, classes = build_datasets(DataSpec(kind=args.data, img_size=args.img_size, seed=args.seed,
                                                  limit_train=args.limit_train, crop_padding=2))
    loader = build_loader(train, batch_size=64, train=True, seed=args.seed)
    val_loader = build_loader(val, batch_size=256, train=False)
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
    teacher.eval()
    dense_top1 = evaluate(teacher, val_loader, Dist())["top1"]
    search_cfg = SearchCfg(target_flops_ratio=0.5, epochs=args.search_epochs, arch_lr=0.5, lr=5e-4,
                           loss_weights={"flops": 50.0})
    finetune = TrainSettings(epochs=args.finetune_epochs, lr=4e-3, min_lr=1e-5, weight_decay=0.05, warmup_epochs=0,
                             label_smoothing=0.1, distill_alpha=0.5, distill_temperature=2.0)
    rows, table = [], [("dense", "-", "100.0%", f"{dense_top1:.2f}", "-", "1.00x")]
    for ratio in args.ratio or [0.5]:
        for method in args.method or METHODS:
            searchable = compress(method, teacher, ratio, loader, search_cfg, args.seed)
            pruned, spec = materialize(searchable.eval())
            pruned.train()
            train_classifier(pruned, loader, finetune, Dist(), teacher=teacher, seed=args.seed, progress=False)
            pruned.eval()
            top1 = evaluate(pruned, val_loader, Dist())["top1"]
            achieved = spec.macs() / ArchSpec.dense(spec.base).macs()
            models = {"dense": teacher, "pruned": pruned}
            with tempfile.TemporaryDirectory() as tmp:
                artifacts = export_models(models, Path(tmp), ExportCfg(check_images=4), img_size=args.img_size)
                latency, _ = profile_models(models, artifacts, ProfileCfg(batches=[32], repeats=20), achieved)
            speedup = latency[0]["speedup"]
            rows.append({"method": method, "ratio": ratio, "flops_ratio": achieved, "top1": top1,
                         "top1_dense": dense_top1, "speedup_ort_cpu_b32": speedup,
                         "embed_dim": spec.embed_dim,
                         "blocks": [(b.heads, b.head_dim, b.mlp_dim) for b in spec.blocks]})
            table.append((method, f"{ratio:.2f}", f"{achieved:.1%}", f"{top1:.2f}", f"{top1 - dense_top1:+.2f}",
                          f"{speedup:.2f}x"))
    print(format_table(("method", "target", "FLOPs", "top-1 %", "vs dense", "ORT CPU b32 speedup"), table))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"date": date.today().isoformat(), "command": "python tools/bench_accuracy.py " + " ".join(sys.argv[1:])}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
