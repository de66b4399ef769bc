"""What an OFB search starts from, and which loss steers its width decisions: a diagnostic.

For the teacher that ``bench_accuracy.py`` makes (same options, same cache), at step 0 of a search to the
first ``--ratio``, it prints
  * the top-1 of the teacher and of the soft-masked search model before any step (``--limit-val`` images),
    with the method's start and with ``--search-set widest_logit=...`` if given;
  * the gradient norm over every group's sparsity logits from the task (+ PMIM) loss, the one-hot losses
    and the FLOPs loss. Adam divides each logit's step by its own gradient RMS, so the loss with by far
    the largest gradient sets the direction of the decisions.

    python tools/benchmarks/search_start.py --model vit_small_patch14_dinov2 --img-size 56 \\
        --checkpoint weights/dinov2_vits14_56.safetensors --limit-train 10000 --teacher-epochs 2 \\
        --teacher-lr 2e-4 --search-epochs 1 --search-lr 2e-4 --ratio 0.3 --limit-val 2000
"""

from __future__ import annotations

import copy
import logging
import sys

import bench_accuracy as bench
import torch
from torch import Tensor, nn

from ofbdeploy.arch import ArchSpec
from ofbdeploy.errors import OfbError
from ofbdeploy.families.vit.searchable import SearchableViT
from ofbdeploy.prune.budget import check_budget
from ofbdeploy.prune.ofb.engine import Search
from ofbdeploy.train.distributed import Dist
from ofbdeploy.train.trainer import evaluate

GRADIENT_BATCHES = 4


def logit_gradient_norm(model: SearchableViT, loss: Tensor) -> float:
    """Norm of ``loss``'s gradient over all sparsity logits (the other gradients are dropped)."""
    alphas = [group.alpha for _, group in model.groups()]
    grads = torch.autograd.grad(loss, alphas, allow_unused=True)
    return float(torch.sqrt(sum((g ** 2).sum() for g in grads if g is not None)))


def main(argv: list[str] | None = None) -> None:
    args = bench.parse_args(argv)
    loader, val_loader, classes = bench.load_data(args)
    teacher: nn.Module = bench.load_teacher(args, classes, loader)
    cfg = bench.search_settings(args).model_copy(update={"target_flops_ratio": (args.ratio or [0.5])[0]})
    torch.manual_seed((args.seed or [0])[0])
    model = SearchableViT(copy.deepcopy(teacher), model_name=args.model)
    search = Search(model, loader, cfg, Dist(), 0, "off", logging.getLogger("search_start"), None)
    check_budget(search.target, model.space, model.shape)  # the budget run_search would refuse, refused here
    keep = search.schedules(0)
    model.start_logits_(cfg.logit_init, cfg.widest_logit)
    mix = float(model.embed_group.mix)
    print(f"teacher top-1 {evaluate(teacher, val_loader, Dist())['top1']:.2f}%")
    print(f"search model at step 0 (mixing weight {mix:.2f}, logit_init {cfg.logit_init}, widest_logit "
          f"{cfg.widest_logit:g}): top-1 "
          f"{evaluate(model, val_loader, Dist())['top1']:.2f}%, expected MACs "
          f"{float(model.expected_macs().detach()) / ArchSpec.dense(model.shape).macs():.1%} of dense")
    model.train()
    batches = iter(loader)
    task = [logit_gradient_norm(model, search.micro_loss(*next(batches), keep)[2]) for _ in range(GRADIENT_BATCHES)]
    onehot, budget = search.regulariser()
    print("gradient norm over the sparsity logits at step 0:")
    print(f"  task + PMIM loss  {min(task):.3g} - {max(task):.3g} ({GRADIENT_BATCHES} batches of {args.batch_size})")
    print(f"  one-hot losses    {logit_gradient_norm(model, onehot):.3g}")
    print(f"  FLOPs loss        {logit_gradient_norm(model, budget):.3g}")


if __name__ == "__main__":
    try:
        main()
    except (bench.BadInput, OfbError) as err:
        print(f"search_start: {err}", file=sys.stderr)
        sys.exit(2)
