"""Cost of an OFB search step (bi-masks + PMIM + one-hot/FLOPs losses + three optimisers) against a plain
training step of the dense model, same model, batch and device; with --latency-lut, also the step of the
latency-targeted search (the table's expected latency added to the loss); with --distill, also the step of a
search that distils from the dense model (``search.distill``: one more dense forward); and, on CUDA, the projected
GPU-hours of a DeiT-S ImageNet search with the paper's schedule.

Under torchrun both steps run under DDP (the dense one as the trainer wraps it, the search as the search
does), so the ratio includes the gradient all-reduce; --batch is per process.

    python tools/benchmarks/bench_search_cost.py --model deit_small_patch16_224 --batch 8 --steps 5 \
        --latency-lut docs/benchmarks/lut_deit_s_ort_cpu_b1.json
    torchrun --standalone --nproc_per_node 2 tools/benchmarks/bench_search_cost.py --model deit_small_patch16_224 \
        --batch 8
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import ofbdeploy.models.zoo  # noqa: F401  (the small ofb_vit_* configs, for smoke runs)
from ofbdeploy.deploy.runtimes.base import device_name
from ofbdeploy.families.vit.searchable import SearchableViT
from ofbdeploy.latency.lut import LatencyLUT
from ofbdeploy.numerics import set_tf32
from ofbdeploy.prune.ofb.engine import Search
from ofbdeploy.prune.ofb.objective import LatencyObjective
from ofbdeploy.recipe import SearchCfg
from ofbdeploy.train.amp import amp_dtype, autocast
from ofbdeploy.train.distributed import barrier, init_distributed, wrap_ddp

IMAGENET_TRAIN = 1_281_167
PAPER_EPOCHS = 100


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _one(step, ctx) -> float:
    _sync(ctx.device)
    barrier(ctx)  # every rank starts the step together: the times are of steps, not of waiting
    start = time.perf_counter()
    step()
    _sync(ctx.device)
    return time.perf_counter() - start


def _timed_alternately(steps: dict, repeats: int, warmup: int, ctx) -> dict[str, list[float]]:
    """Each kind of step once per round, round after round: a machine getting busier or quieter over the
    run weighs on every kind alike, so their ratio holds (the deploy protocol's paired mode)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(_one(step, ctx))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--latency-lut", type=Path, default=None,
                        help="a latency table file: also time the latency-targeted search step (50%% of dense)")
    parser.add_argument("--distill", action="store_true",
                        help="also time the search step that distils from the dense model (search.distill)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    ctx = init_distributed(args.device)
    device = ctx.device
    fp32_matmul = set_tf32(True) if device.type == "cuda" else "ieee (cpu)"
    torch.manual_seed(ctx.rank)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    torch.manual_seed(0)
    model = timm.create_model(args.model, img_size=args.img_size).to(device).train()
    dense = wrap_ddp(model, ctx)
    labels = torch.randint(0, model.num_classes, (args.batch,), device=device)
    optimizer = torch.optim.AdamW(dense.parameters(), lr=1e-4)

    def dense_step() -> None:
        with autocast(amp_dtype(args.amp, device), device):
            loss = F.cross_entropy(dense(images).float(), labels, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def search_step(latency_lut: Path | None, distill: bool = False):
        """One step of a fresh search: FLOPs-targeted, or latency-targeted with the given table; distilling
        from the dense model (in eval mode) when ``distill``."""
        searchable = SearchableViT(timm.create_model(args.model, img_size=args.img_size), model_name=args.model)
        searchable.to(device).train()
        loader = torch.utils.data.DataLoader([(images[0].cpu(), 0)] * args.batch, batch_size=args.batch)
        cfg, objective = SearchCfg(target_flops_ratio=0.5, epochs=100, distill={"enabled": distill}), None
        if latency_lut is not None:
            cfg = SearchCfg(epochs=100, latency={"target_ratio": 0.5, "lut": str(latency_lut)})
            objective = LatencyObjective(LatencyLUT.load(latency_lut), target_ratio=0.5)
        teacher = timm.create_model(args.model, img_size=args.img_size).to(device).eval() if distill else None
        search = Search(searchable, loader, cfg, ctx, 0, args.amp, logging.getLogger("bench"), objective,
                        teacher=teacher)
        keep = search.schedules(search.steps * 10)  # mid warm-up: PMIM hides ~10% of the patches
        return lambda: search.step([(images, labels)], keep)

    steps = {"dense": dense_step, "search": search_step(None)}
    if args.latency_lut is not None:
        steps["latency"] = search_step(args.latency_lut)
    if args.distill:
        steps["distill"] = search_step(None, distill=True)
    times = _timed_alternately(steps, args.steps, args.warmup, ctx)
    dense_s, search_s = statistics.median(times["dense"]), statistics.median(times["search"])
    world = ctx.world_size
    result = {"model": args.model, "batch": args.batch, "processes": world, "global_batch": args.batch * world,
              "img_size": args.img_size, "device": str(device), "device_name": device_name(device),
              "amp": args.amp, "fp32_matmul": fp32_matmul, "steps": args.steps, "dense_step_s": dense_s,
              "search_step_s": search_s, "ratio": search_s / dense_s,
              "ratio_median_of_rounds": statistics.median(
                  s / d for s, d in zip(times["search"], times["dense"], strict=True)),
              "dense_images_per_s": args.batch * world / dense_s, "search_images_per_s": args.batch * world / search_s}
    if args.latency_lut is not None:
        latency_s = statistics.median(times["latency"])
        result.update(latency_search_step_s=latency_s, latency_ratio=latency_s / dense_s)
    if args.distill:
        distill_s = statistics.median(times["distill"])
        result.update(distill_search_step_s=distill_s, distill_ratio=distill_s / dense_s)
    if device.type == "cuda":
        result["projected_search_gpu_hours_imagenet_100_epochs"] = (
            IMAGENET_TRAIN * PAPER_EPOCHS / (args.batch * world) * search_s * world / 3600)
    if ctx.is_main:
        print(json.dumps(result, indent=1))
    if args.json is not None and ctx.is_main:
        launcher = f"torchrun --standalone --nproc_per_node {world}" if ctx.enabled else "python"
        result["date"] = date.today().isoformat()
        result["command"] = f"{launcher} tools/benchmarks/bench_search_cost.py " + " ".join(sys.argv[1:])
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if ctx.enabled:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
