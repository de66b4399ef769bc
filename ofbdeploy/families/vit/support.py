"""Which timm ViTs ofbdeploy can prune, and reading the :class:`ViTShape` of one: blocks of timm's own
Attention and Mlp, and the variants around them that the ViT family models (prefix tokens, position
embeddings with or without a class slot, pre-norms, LayerScale, GELU variants, pooling heads).

Whatever the search has no unit for (hybrid CNN stems, parallel blocks, gated or SwiGLU MLPs, rotary or
differential attention, q/k norms, norms other than LayerNorm, ...) is named in one line, never a traceback:
every check reads attributes with ``getattr`` so that an unexpected module answers with its class name.
"""

from __future__ import annotations

from timm.layers import GELU, GELUTanh, LayerScale, Mlp, PatchEmbed, QuickGELU
from timm.layers.attention import Attention
from timm.layers.attention_pool import AttentionPoolLatent
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer
from torch import nn

from ofbdeploy.families.base import kind, norm_problems, refuse
from ofbdeploy.families.vit.shape import VIT_POOLS, ViTShape

MODEL_TYPES = (VisionTransformer, VisionTransformerDistilled)  # exact types: subclasses differ
BLOCKS = {"Block": Block, "ResPostBlock": ResPostBlock}
# What timm's ViT blocks use that has a name here; an MLP in the registry's SwiGLU/GLU classes is refused.
_GATED_MLPS = ("SwiGLU", "SwiGLUPacked", "GluMlp", "GatedMlp")
_PARALLEL_BLOCKS = ("ParallelScalingBlock", "ParallelThingsBlock", "DiffParallelScalingBlock")


def activation_name(act: nn.Module) -> str | None:
    """The name timm's ``get_act_layer`` rebuilds ``act`` from, or None for an activation we do not rebuild."""
    if type(act) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    return {GELU: "gelu", GELUTanh: "gelu_tanh", QuickGELU: "quick_gelu"}.get(type(act))


def _block_problems(i: int, block: nn.Module) -> list[str]:
    name = kind(block)
    if name in _PARALLEL_BLOCKS:
        return [f"parallel attention and MLP branches ({name})"]
    if type(block) not in BLOCKS.values():
        return [f"block {i}: {name} is not timm's Block or ResPostBlock"]
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    problems = []
    if type(attn) is not Attention:
        problems.append(f"rotary position embedding ({kind(attn)})" if "Rope" in kind(attn)
                        else f"attention {kind(attn)} is not timm's Attention")
    else:
        problems += [reason for reason, bad in (
            ("q/k norm", not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.k_norm, nn.Identity)),
            ("attention output norm (scale_attn_norm)", not isinstance(attn.norm, nn.Identity)),
            ("gated attention", getattr(attn, "gate", None) is not None),
        ) if bad]
    if kind(mlp) in _GATED_MLPS:
        problems.append(f"gated MLP ({kind(mlp)})")
    elif type(mlp) is not Mlp:
        problems.append(f"MLP {kind(mlp)} is not timm's Mlp")
    else:
        act = activation_name(mlp.act)
        problems += [reason for reason, bad in (
            ("MLP hidden norm (scale_mlp_norm)", not isinstance(mlp.norm, nn.Identity)),
            (f"MLP activation {kind(mlp.act)} (supported: GELU, tanh GELU, QuickGELU)", act is None),
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
        return [f"attention pooling {kind(pool)} (supported: AttentionPoolLatent, SigLIP's 'map')"]
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
        name = kind(embed)
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
        (f"global_pool {pool!r} (supported: {', '.join(VIT_POOLS)})", pool not in VIT_POOLS),
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


def read_vit_shape(model: nn.Module, model_name: str = "") -> ViTShape:
    """The shape of a timm ViT, or a one-line :class:`ModelError` naming what the search cannot prune."""
    if type(model) not in MODEL_TYPES:
        refuse([f"expected a timm VisionTransformer, got {type(model).__name__}"], "ViT")
    refuse(vit_problems(model), "ViT")
    block = model.blocks[0]
    img, patch = model.patch_embed.img_size, model.patch_embed.patch_size
    if img[0] != img[1] or patch[0] != patch[1]:
        refuse([f"only square images and patches are supported, got img {img} patch {patch}"], "ViT")
    pool = model.attn_pool
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    return ViTShape(
        img_size=int(img[0]),
        patch_size=int(patch[0]),
        in_chans=int(model.patch_embed.proj.in_channels),
        num_classes=int(model.num_classes),
        embed_dim=int(model.embed_dim),
        depth=len(model.blocks),
        num_heads=int(block.attn.num_heads),
        head_dim=int(block.attn.head_dim),
        mlp_dim=int(block.mlp.fc1.out_features),
        qkv_bias=block.attn.qkv.bias is not None,
        class_token=model.cls_token is not None,
        global_pool=str(model.global_pool),
        fc_norm=not isinstance(model.fc_norm, nn.Identity),
        layer_scale=not isinstance(getattr(block, "ls1", nn.Identity()), nn.Identity),
        model_name=model_name,
        reg_tokens=int(model.num_reg_tokens),
        distilled=type(model) is VisionTransformerDistilled,
        pos_embed=model.pos_embed is not None,
        no_embed_class=bool(model.no_embed_class),
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        patch_norm=not isinstance(model.patch_embed.norm, nn.Identity),
        final_norm=not (isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.Identity)),
        act=activation_name(block.mlp.act) or "",
        norm_eps=float(norms[0].eps) if norms else 1e-6,
        proj_bias=block.attn.proj.bias is not None,
        block=type(block).__name__,
        pool_include_prefix=bool(model.pool_include_prefix),
        dynamic_img_size=bool(model.dynamic_img_size),
        pool_heads=int(pool.num_heads) if pool is not None else 0,
        pool_mlp_dim=int(pool.mlp.fc1.out_features) if pool is not None else 0,
    )
