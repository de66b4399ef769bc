"""Which timm ViTs ofbdeploy can prune: plain blocks of timm's own Attention and Mlp.

Variants with parts the search has no unit for (register or distillation tokens, q/k norms, gated or
SwiGLU MLPs, attention pooling) are refused up front with the reason, instead of failing mid-search.
"""

from __future__ import annotations

from timm.layers import Attention, LayerScale, Mlp, PatchEmbed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ofbdeploy.errors import ModelError

# The rebuilt model uses timm's defaults, so the dense model must use them too.
_EPS = 1e-6


def _is_exact_gelu(act: nn.Module) -> bool:
    return type(act) is nn.GELU and act.approximate == "none"


def check_supported(model: nn.Module) -> None:
    """Raise :class:`ModelError` naming the first feature of ``model`` that cannot be pruned."""
    if type(model) is not VisionTransformer:
        raise ModelError(f"expected a timm VisionTransformer, got {type(model).__name__}")
    if type(model.patch_embed) is not PatchEmbed:  # hybrid ViTs put a CNN stem here (HybridEmbed)
        raise ModelError(f"this ViT cannot be pruned by ofbdeploy: patch embedding {type(model.patch_embed).__name__} "
                         f"(a CNN stem?) instead of timm's PatchEmbed")
    if len(model.blocks) == 0:
        raise ModelError("this ViT cannot be pruned by ofbdeploy: it has no transformer blocks (depth 0)")
    problems = {
        "register tokens": model.reg_token is not None,
        "position embedding without class slot (no_embed_class)": model.no_embed_class,
        "missing absolute position embedding": model.pos_embed is None,
        "dynamic image size": model.dynamic_img_size,
        "attention pooling": model.attn_pool is not None,
        "norm after patch embedding": not isinstance(model.patch_embed.norm, nn.Identity),
        "pre-norm before blocks": not isinstance(model.norm_pre, nn.Identity),
        f"global_pool {model.global_pool!r} (supported: 'token', 'avg')": model.global_pool not in ("token", "avg"),
        "classifier that is not a Linear layer": not isinstance(model.head, nn.Linear | nn.Identity),
    }
    for i, block in enumerate(model.blocks):
        attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
        problems.update({
            f"block {i}: not a timm Block": type(block) is not Block,
            f"block {i}: attention is not timm's Attention": type(attn) is not Attention,
            f"block {i}: MLP is not timm's Mlp": type(mlp) is not Mlp,
        })
        if type(attn) is Attention:
            problems.update({
                f"block {i}: q/k norm": not isinstance(attn.q_norm, nn.Identity),
                f"block {i}: attention output norm": not isinstance(attn.norm, nn.Identity),
                f"block {i}: gated attention": attn.gate is not None,
            })
        if type(mlp) is Mlp:
            problems.update({
                f"block {i}: MLP hidden norm": not isinstance(mlp.norm, nn.Identity),
                f"block {i}: MLP activation other than exact GELU": not _is_exact_gelu(mlp.act),
                f"block {i}: MLP without biases": mlp.fc1.bias is None or mlp.fc2.bias is None,
            })
        problems[f"block {i}: layer scale other than timm's LayerScale"] = not all(
            isinstance(ls, LayerScale | nn.Identity) for ls in (block.ls1, block.ls2)
        )
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    problems[f"layer norm eps other than {_EPS}"] = any(m.eps != _EPS for m in norms)
    found = [name for name, bad in problems.items() if bad]
    if found:
        raise ModelError(f"this ViT cannot be pruned by ofbdeploy: {found[0]}")
