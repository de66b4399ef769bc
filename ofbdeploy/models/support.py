"""Which timm ViTs ofbdeploy can prune: blocks of timm's own Attention and Mlp, and the variants around them
that the ViT family models (prefix tokens, position embeddings with or without a class slot, pre-norms,
LayerScale, GELU variants, pooling heads).

Whatever the search has no unit for (hybrid CNN stems, parallel blocks, gated or SwiGLU MLPs, rotary or
differential attention, q/k norms, norms other than LayerNorm, ...) is named in one line, never a traceback:
every check reads attributes with ``getattr`` so that an unexpected module answers with its class name.
"""

from __future__ import annotations

from timm.layers import GELU, GELUTanh, LayerScale, Mlp, PatchEmbed, QuickGELU
from timm.layers.attention import Attention
from timm.layers.attention_pool import AttentionPoolLatent
from timm.models.vision_transformer import Block, ResPostBlock
from torch import nn

from ofbdeploy.errors import ModelError

BLOCKS = {"Block": Block, "ResPostBlock": ResPostBlock}
POOLS = ("token", "avg", "max", "avgmax", "map")
# What timm's ViT blocks use that has a name here; an MLP in the registry's SwiGLU/GLU classes is refused.
_GATED_MLPS = ("SwiGLU", "SwiGLUPacked", "GluMlp", "GatedMlp")
_PARALLEL_BLOCKS = ("ParallelScalingBlock", "ParallelThingsBlock", "DiffParallelScalingBlock")


def activation_name(act: nn.Module) -> str | None:
    """The name timm's ``get_act_layer`` rebuilds ``act`` from, or None for an activation we do not rebuild."""
    if type(act) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    return {GELU: "gelu", GELUTanh: "gelu_tanh", QuickGELU: "quick_gelu"}.get(type(act))


def _kind(module: object) -> str:
    return type(module).__name__


def norm_problems(model: nn.Module) -> list[str]:
    """What every family needs of its norms: affine LayerNorms, one eps (the records keep one)."""
    problems = []
    norms = [m for m in model.modules() if "Norm" in _kind(m) and not isinstance(m, nn.LayerNorm)]
    if norms:
        problems.append(f"norm layer {_kind(norms[0])} (supported: LayerNorm)")
    layer_norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    if any(m.weight is None or m.bias is None for m in layer_norms):
        problems.append("layer norm without affine weight and bias")
    if len({m.eps for m in layer_norms}) > 1:
        problems.append("layer norms with different eps")
    return problems


def _block_problems(i: int, block: nn.Module) -> list[str]:
    kind = _kind(block)
    if kind in _PARALLEL_BLOCKS:
        return [f"parallel attention and MLP branches ({kind})"]
    if type(block) not in BLOCKS.values():
        return [f"block {i}: {kind} is not timm's Block or ResPostBlock"]
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    problems = []
    if type(attn) is not Attention:
        problems.append(f"rotary position embedding ({_kind(attn)})" if "Rope" in _kind(attn)
                        else f"attention {_kind(attn)} is not timm's Attention")
    else:
        problems += [reason for reason, bad in (
            ("q/k norm", not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.k_norm, nn.Identity)),
            ("attention output norm (scale_attn_norm)", not isinstance(attn.norm, nn.Identity)),
            ("gated attention", getattr(attn, "gate", None) is not None),
        ) if bad]
    if _kind(mlp) in _GATED_MLPS:
        problems.append(f"gated MLP ({_kind(mlp)})")
    elif type(mlp) is not Mlp:
        problems.append(f"MLP {_kind(mlp)} is not timm's Mlp")
    else:
        act = activation_name(mlp.act)
        problems += [reason for reason, bad in (
            ("MLP hidden norm (scale_mlp_norm)", not isinstance(mlp.norm, nn.Identity)),
            (f"MLP activation {_kind(mlp.act)} (supported: GELU, tanh GELU, QuickGELU)", act is None),
            ("MLP as 1x1 convolutions", not isinstance(mlp.fc1, nn.Linear)),
        ) if bad]
    scales = [getattr(block, name, nn.Identity()) for name in ("ls1", "ls2")]
    if not all(isinstance(s, LayerScale | nn.Identity) for s in scales):
        problems.append(f"block {i}: layer scale other than timm's LayerScale")
    return [p if p.startswith("block") else f"block {i}: {p}" for p in problems]


def _pool_problems(model: nn.Module) -> list[str]:
    pool = getattr(model, "attn_pool", None)
    if pool is None:
        return []
    if type(pool) is not AttentionPoolLatent:
        return [f"attention pooling {_kind(pool)} (supported: AttentionPoolLatent, SigLIP's 'map')"]
    return [reason for reason, bad in (
        ("attention pool with several latents", pool.latent_len != 1),
        ("attention pool with its own position embedding", pool.pos_embed is not None),
        ("attention pool with q/k norm", not isinstance(pool.q_norm, nn.Identity)),
        ("attention pool without a query projection", not isinstance(pool.q, nn.Linear)),
        ("attention pool without its MLP", pool.mlp is None),
        ("attention pool other than token pooling", pool.pool != "token"),
    ) if bad]


def vit_problems(model: nn.Module) -> list[str]:
    """Every feature of a timm ViT that the ViT family cannot prune, most telling first (empty: prunable)."""
    embed = getattr(model, "patch_embed", None)
    if type(embed) is not PatchEmbed:
        name = _kind(embed)
        return [f"hybrid CNN stem ({name})" if "Hybrid" in name else f"patch embedding {name} is not timm's PatchEmbed"]
    if len(model.blocks) == 0:
        return ["it has no transformer blocks (depth 0)"]
    problems = []
    for i, block in enumerate(model.blocks):
        problems += _block_problems(i, block)
        if problems:
            return problems  # one block's reason is enough; the rest would repeat it
    pool = model.global_pool
    problems += [reason for reason, bad in (
        (f"global_pool {pool!r} (supported: {', '.join(POOLS)})", pool not in POOLS),
        ("dynamic image padding", getattr(embed, "dynamic_img_pad", False)),
        ("patch embedding that is not a convolution", not isinstance(getattr(embed, "proj", None), nn.Conv2d)),
        ("classifier that is not a Linear layer", not isinstance(model.head, nn.Linear | nn.Identity)),
        ("distillation classifier that is not a Linear layer",
         not isinstance(getattr(model, "head_dist", nn.Identity()), nn.Linear | nn.Identity)),
    ) if bad]
    problems += _pool_problems(model)
    if hasattr(model, "dist_token") and model.reg_token is not None:
        problems.append("register tokens in a distilled model (timm's VisionTransformerDistilled ignores them)")
    blocks = list(model.blocks)
    uniform = {(b.attn.num_heads, b.attn.head_dim, b.mlp.fc1.out_features, b.attn.qkv.bias is not None,
                b.attn.proj.bias is not None, activation_name(b.mlp.act),
                isinstance(getattr(b, "ls1", None), LayerScale), type(b)) for b in blocks}
    if len(uniform) > 1:
        problems.append("blocks of different widths or options (ofbdeploy prunes uniform dense models)")
    proj_bias = blocks[0].attn.proj.bias is not None
    if any((b.mlp.fc1.bias is not None) != proj_bias or (b.mlp.fc2.bias is not None) != proj_bias for b in blocks):
        problems.append("MLP biases that differ from the attention projection's")
    problems += norm_problems(model)
    if not isinstance(model.norm, nn.Identity) and not isinstance(model.fc_norm, nn.Identity):
        problems.append("both a final norm and an fc-norm")
    if (embed.proj.bias is not None) == (not isinstance(model.norm_pre, nn.Identity)):
        problems.append("patch embedding bias not as timm builds it (present exactly when there is no pre-norm)")
    return problems


def check_supported(model: nn.Module) -> None:
    """Raise :class:`ModelError` naming the first feature of ``model`` that cannot be pruned (any family)."""
    from ofbdeploy.families import read_shape

    read_shape(model)


def refuse(problems: list[str], what: str = "ViT") -> None:
    """One line for the first problem; nothing when there is none."""
    if problems:
        raise ModelError(f"this {what} cannot be pruned by ofbdeploy: {problems[0]}")
