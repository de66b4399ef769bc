"""Torch-Pruning (``method: torch-pruning``): its isomorphic global pruning with group L2 magnitude.

An optional extra (``pip install 'ofbdeploy[bench]'``): a recipe that names it without the package is refused
before the run directory is written. Torch-Pruning prunes a plain copy of the teacher, ``prune_step`` of every
width at a time, until its FLOPs fit. Groups: each block's whole heads, its qkv channels (Torch-Pruning's
head_dims mode), its MLP neurons, and the embedding (residual channels through every block, norm, token and
position embedding); the classifier's outputs are left alone. Isomorphic ranking compares a group only with
groups of the same structure, so widths may differ per block as in OFB.

Torch-Pruning slices weights and never changes their values, so the units it kept are read back from the
rows it kept, and the searchable model is cut to exactly those units of the teacher. From there the run is
the same as for any method (materialise, finetune, export), and the shared budget enforcement makes the
analytic FLOPs count, not only Torch-Pruning's measured one, meet the budget.
"""

from __future__ import annotations

import copy
import importlib
import time
from types import ModuleType

import torch
from timm.layers import Attention, LayerScale
from torch import Tensor, nn

from ofbdeploy.arch import ArchSpec, BlockSpec
from ofbdeploy.arch.cost import measure_macs
from ofbdeploy.errors import OfbError
from ofbdeploy.families.vit.searchable import SearchableViT
from ofbdeploy.prune.budget import enforce_budget, resolve_target
from ofbdeploy.prune.config import TORCH_PRUNING, TorchPruningCfg
from ofbdeploy.prune.method import Job
from ofbdeploy.prune.result import SearchResult


def _torch_pruning() -> ModuleType:
    """The optional package (the registry refuses a recipe that names this method without it)."""
    return importlib.import_module(TORCH_PRUNING)


def _attentions(model: nn.Module) -> list[Attention]:
    """timm's attention modules, in block order."""
    return [m for m in model.modules() if isinstance(m, Attention)]


def _sync_shapes(attentions: list[Attention], num_heads: dict[nn.Module, int]) -> None:
    """Torch-Pruning slices qkv/proj but leaves timm's shape attributes, which the forward reshapes by."""
    for attn in attentions:
        attn.num_heads = num_heads[attn.qkv]
        attn.head_dim = attn.qkv.out_features // (3 * attn.num_heads)
        attn.attn_dim = attn.num_heads * attn.head_dim


def _unwrapped(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """Parameters outside the layers Torch-Pruning knows, with their embedding axis: tokens, position
    embedding, and LayerScale's gammas (DINOv2, DeiT-III), which scale the residual stream channel by channel."""
    owned = [(p, p.dim() - 1) for p in model.parameters(recurse=False)]
    return owned + [(m.gamma, 0) for m in model.modules() if isinstance(m, LayerScale)]


def prune_plain(model: nn.Module, ratio: float, img_size: int, step: float, heads: bool) -> nn.Module:
    """Prune ``model`` in place, ``step`` of every width at a time, until its measured FLOPs are <= ``ratio``.

    With ``heads``, every step removes at least one head: Torch-Pruning 1.6 leaves its global head threshold
    unset on a step that removes none and crashes, so the step is at least one head's share of all heads.
    """
    tp = _torch_pruning()
    attentions = _attentions(model)
    if heads:
        step = max(step, 1 / sum(a.num_heads for a in attentions))
    in_chans = model.patch_embed.proj.in_channels
    images = torch.randn(1, in_chans, img_size, img_size, generator=torch.Generator().manual_seed(0))
    dense = measure_macs(model, img_size, in_chans)
    steps = max(1, round(0.9 / step))
    pruner = tp.pruner.BasePruner(
        model, images.to(next(model.parameters()).device), importance=tp.importance.MagnitudeImportance(p=2),
        global_pruning=True, isomorphic=True, pruning_ratio=steps * step, iterative_steps=steps,
        ignored_layers=[model.head], num_heads={a.qkv: a.num_heads for a in attentions},
        prune_num_heads=heads, head_pruning_ratio=steps * step if heads else 0.0, prune_head_dims=True,
        unwrapped_parameters=_unwrapped(model))
    for _ in range(steps):
        pruner.step()
        _sync_shapes(attentions, pruner.num_heads)
        macs = measure_macs(model, img_size, in_chans)
        if macs <= ratio * dense:
            return model
    raise OfbError(f"torch-pruning: {steps * step:.0%} of every width removed and FLOPs still {macs / dense:.1%} "
                   f"of dense, above the {ratio:.0%} budget")


def _match(dense: Tensor, kept: Tensor, what: str) -> list[int]:
    """Indices of the rows of ``dense`` that ``kept`` holds, in order (rows compared bit for bit)."""
    where: dict[bytes, list[int]] = {}
    for i, row in enumerate(dense.detach().float().cpu().contiguous()):
        where.setdefault(row.numpy().tobytes(), []).append(i)
    found = []
    for row in kept.detach().float().cpu().contiguous():
        rows = where.get(row.numpy().tobytes())
        if not rows:
            raise OfbError(f"torch-pruning: a kept {what} row is not a row of the dense model (weights changed)")
        found.append(rows.pop(0))
    return found


def kept_spec(dense: nn.Module, pruned: nn.Module, shape) -> ArchSpec:
    """The architecture, with the dense units it keeps, of a model Torch-Pruning cut from ``dense``."""
    embed = _match(dense.patch_embed.proj.weight.flatten(1), pruned.patch_embed.proj.weight.flatten(1), "embedding")
    blocks = []
    for i, (d, p) in enumerate(zip(dense.blocks, pruned.blocks, strict=True)):
        dense_qkv, kept_qkv = d.attn.qkv.weight[:, embed].chunk(3), p.attn.qkv.weight.chunk(3)
        q, k, v = (_match(a, b, f"blocks.{i}.attn.qkv") for a, b in zip(dense_qkv, kept_qkv, strict=True))
        if not q == k == v:
            raise OfbError(f"torch-pruning: blocks.{i} keeps different q, k and v channels, which a timm "
                           f"attention cannot hold")
        kept_heads = sorted({c // shape.head_dim for c in q})
        channels = [tuple(c % shape.head_dim for c in q if c // shape.head_dim == h) for h in kept_heads]
        if len({len(c) for c in channels}) != 1:
            raise OfbError(f"torch-pruning: blocks.{i} keeps heads of different widths")
        mlp = _match(d.mlp.fc1.weight[:, embed], p.mlp.fc1.weight, f"blocks.{i}.mlp.fc1")
        blocks.append(BlockSpec(heads=len(kept_heads), head_dim=len(channels[0]), mlp_dim=len(mlp),
                                kept_heads=tuple(kept_heads), kept_channels=tuple(channels), kept_mlp=tuple(mlp)))
    return ArchSpec(shape, (len(embed),), tuple(blocks), (tuple(embed),))


def decide(model: SearchableViT, cfg: TorchPruningCfg, job: Job) -> SearchResult:
    """Torch-Pruning on a copy of the teacher; the searchable model is cut to the units it kept.

    Should Torch-Pruning's global head ranking fail (1.6's threshold, unset on a step without heads),
    heads are left whole, and the result's state says so.
    """
    t0 = time.perf_counter()
    dense = ArchSpec.dense(model.shape).macs()
    target = resolve_target(cfg, model.shape)
    teacher = job.teacher().eval()
    heads = True
    try:
        pruned = prune_plain(copy.deepcopy(teacher), target / dense, model.shape.img_size, cfg.prune_step, heads)
    except UnboundLocalError as err:
        job.log.warning("torch-pruning: head pruning failed (%s); pruning widths only", err)
        heads = False
        pruned = prune_plain(copy.deepcopy(teacher), target / dense, model.shape.img_size, cfg.prune_step, heads)
    model.set_mix(0.0)
    model.apply_arch(kept_spec(teacher, pruned, model.shape))
    model.decide_widest()
    steps = enforce_budget(model, target)
    spec = model.arch_spec()
    job.log.info("torch-pruning decided %.4f GMACs (%.1f%% of dense) against target %.4f GMACs%s", spec.macs() / 1e9,
                 100 * spec.macs() / dense, target / 1e9, "" if heads else " (heads left whole)")
    return SearchResult(spec=spec, target_macs=target, achieved_macs=spec.macs(), dense_macs=dense, epochs_run=0,
                        decided_epoch=None, seconds=time.perf_counter() - t0, method=cfg.method,
                        budget_steps=[s.describe() for s in steps],
                        state={"head_pruning": heads, "prune_step": cfg.prune_step})
