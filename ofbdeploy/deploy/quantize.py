"""Explicit int8: Q/DQ ONNX graphs made from the checked fp32 export by ONNX Runtime's ``quantize_static``.

The precision is decided here, in the graph, once, calibrated once, and written as two files named by what they
hold, so no runtime calibrates again:

* ``<model>-int8.onnx`` for ONNX Runtime (CPU, CUDA) and OpenVINO: int8 weight and attention products, fp32
  everywhere else (the CPU has no fast fp16), and the Conv/Gemm biases quantised to int32 behind a
  ``DequantizeLinear``, which is the form ONNX Runtime's CPU provider fuses into an int8 ``QGemm`` for the head
  (with a float bias the head runs as dequantise + fp32 Gemm; the patch convolution, whose output is not
  quantised, runs as dequantise + Conv either way).
* ``<model>-int8-fp16.onnx`` for TensorRT (native and ONNX Runtime's provider): the weight products' Q/DQ pairs
  with the same scales, no Q/DQ on any bias (TensorRT's dequantize takes int8/fp8/int4 only, and its ONNX
  parser fails on the int32 bias), and fp16 everywhere else but LayerNorm (kept fp32 as in the fp16 export):
  softmax, GELU and the attention products run in fp16, as a deployed int8 ViT runs them.

Choices, and why:

* **What is quantised: the weight products** (every ``MatMul`` whose second input is a weight, the head's
  ``Gemm`` and the patch ``Conv``), with per-channel symmetric int8 weights, and in the CPU file the attention
  products too (``q @ k^T``, ``attn @ v``; ``export.int8_attention``, default ``cpu``). LayerNorm, softmax and
  GELU stay in float. With Q/DQ on their inputs only, the attention products made the pruned DeiT-S 11-17%
  faster on OpenVINO CPU and left ONNX Runtime CPU the same, top-1 within 0.3 points (docs/benchmarks.md). Q/DQ
  on their outputs as well (around the softmax) makes ONNX Runtime's CPU provider run the softmax as
  ``QLinearSoftmax``, a lookup-table kernel that measured slower than the float one, so no output is quantised.
  The TensorRT file keeps the attention products in fp16, where its fused attention runs, unless ``all`` is
  asked for: that layout has not run on TensorRT yet.
* **Q/DQ on the inputs only** (``OpTypesToExcludeOutputQuantization``): NVIDIA's placement for TensorRT
  (quantise what a weighted layer reads; TensorRT fuses the rest), and the form ONNX Runtime's CPU provider
  fuses into ``MatMulIntegerToFloat`` (int8 products, float bias and output) without a dequantise/requantise
  pair between every two layers.
* **Symmetric int8 activations** (zero point 0), as TensorRT requires. On this CPU the asymmetric uint8
  activations that ONNX Runtime suggests for x86 measured no faster (docs/benchmarks.md), so both files share
  one calibration.
* **Calibration** on images the caller samples (the pipeline: a seeded, class-balanced sample of the training
  split through the eval transform); ``minmax`` by default, ``percentile``/``entropy`` on request.
* **Cached by content**: the file's record (``<name>.quant.json``) holds a key over the fp32 ONNX bytes, the
  calibration images, the settings and the ONNX Runtime version; an export that finds the same key reuses the
  calibrated file instead of calibrating again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from ofbdeploy.deploy.onnx_export import INPUT_NAME, to_fp16
from ofbdeploy.deploy.parity import Parity
from ofbdeploy.errors import OfbError
from ofbdeploy.io import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

QUANTISED_OPS = ("MatMul", "Gemm", "Conv")
INT8_TENSORRT = "int8-fp16"  # the label of the int8 file made for TensorRT: int8 products, fp16 elsewhere
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
RECORD_SUFFIX = ".quant.json"
_CALIBRATION_BATCH = 16


class QuantizeError(OfbError, RuntimeError):
    """A model that cannot be quantised as asked (no calibration images, nothing to quantise, a library error)."""


@dataclass(frozen=True)
class QuantResult:
    """What was written and how: the record kept next to the Q/DQ file."""

    path: Path
    key: str
    method: str
    calibration_images: int
    quantised_nodes: int
    reused: bool
    parity: Parity | None = None


def weight_products(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes to quantise: Conv and Gemm, and MatMul whose second input is a weight (initializer)."""
    weights = {init.name for init in model.graph.initializer}
    return [node.name for node in model.graph.node
            if node.op_type in ("Conv", "Gemm") or (node.op_type == "MatMul" and node.input[1] in weights)]


def attention_products(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul nodes between two activations: a ViT's ``q @ k^T`` and ``attn @ v``."""
    weights = {init.name for init in model.graph.initializer}
    return [node.name for node in model.graph.node if node.op_type == "MatMul" and node.input[1] not in weights]


def quantize_int8(
    source: Path,
    path: Path,
    calibration: np.ndarray | None,
    *,
    method: str = "minmax",
    attention: bool = False,
    check: Callable[[Path], Parity] | None = None,
) -> QuantResult:
    """Write the int8 Q/DQ graph of the fp32 ONNX ``source`` to ``path``, calibrated on ``calibration`` (N, C, H, W);
    ``attention`` quantises the attention products too.

    Reuses ``path`` when its record carries the same key (same fp32 bytes, images, settings, ONNX Runtime).
    ``check`` (raising on failure) runs on the file before it lands, and again on a reused one.
    """
    source, path = Path(source), Path(path)
    if method not in CALIBRATION_METHODS:
        raise QuantizeError(f"calibration method: expected one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")
    if calibration is None or calibration.ndim != 4 or len(calibration) == 0:
        shape = None if calibration is None else calibration.shape
        raise QuantizeError(f"{path}: int8 needs calibration images (N, C, H, W) from the training split, got {shape}")
    calibration = np.ascontiguousarray(calibration, dtype=np.float32)
    model = onnx.load(str(source))
    nodes = weight_products(model)
    if not nodes:
        raise QuantizeError(f"{source}: no MatMul/Gemm/Conv with weights to quantise")
    nodes += attention_products(model) if attention else []
    settings = _settings(attention)
    key = quantisation_key(source, calibration, method, attention)
    record_path = path.with_name(path.name + RECORD_SUFFIX)
    if path.is_file() and record_path.is_file() and json.loads(record_path.read_text()).get("key") == key:
        log.info("%s: calibrated int8 graph reused (key %s)", path, key[:12])
        parity = check(path) if check is not None else None
        return QuantResult(path, key, method, len(calibration), len(nodes), reused=True, parity=parity)
    checked: list[Parity] = []

    def write(tmp: Path) -> None:
        _quantize(source, tmp, calibration, nodes, method, path)
        if check is not None:
            checked.append(check(tmp))

    atomic_write(path, write)
    result = QuantResult(path, key, method, len(calibration), len(nodes), reused=False,
                         parity=checked[0] if checked else None)
    record = {"key": key, "source": str(source), "method": method, "calibration_images": len(calibration),
              "quantised_nodes": len(nodes), "settings": settings, "onnxruntime": ort.__version__}
    atomic_write_text(record_path, json.dumps(record, indent=1) + "\n")
    log.info("%s: int8 Q/DQ graph, %d products quantised (%s), %s calibration on %d images", path, len(nodes),
             settings["products"], method, len(calibration))
    return result


def quantisation_key(source: Path, calibration: np.ndarray, method: str, attention: bool = False) -> str:
    """Hex sha256 over everything the calibrated file depends on."""
    digest = hashlib.sha256()
    with Path(source).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    digest.update(str(calibration.shape).encode() + calibration.tobytes())
    settings = {"method": method, "settings": _settings(attention), "onnxruntime": ort.__version__}
    digest.update(json.dumps(settings).encode())
    return digest.hexdigest()


def _settings(attention: bool) -> dict[str, Any]:
    """The quantize_static settings a file is made with (see the module docstring)."""
    return {"format": "QDQ", "per_channel": True, "activations": "int8 symmetric", "weights": "int8 symmetric",
            "products": "weights and attention" if attention else "weights only", "outputs": "float"}


def _quantize(source: Path, target: Path, calibration: np.ndarray, nodes: list[str], method: str, name: Path) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    try:
        with _quiet_library():
            quantize_static(
                str(source), str(target), CalibrationReader(calibration), quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANTISED_OPS), nodes_to_quantize=nodes, per_channel=True,
                reduce_range=False, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                calibrate_method=methods[method],
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                               "OpTypesToExcludeOutputQuantization": list(QUANTISED_OPS)},
            )
    except Exception as err:  # the quantiser raises many types
        raise QuantizeError(f"{name}: ONNX Runtime quantize_static failed: {type(err).__name__}: {err}") from err


def tensorrt_int8(int8: Path, fp32: Path, path: Path, check: Callable[[Path], Parity] | None = None, *,
                  attention: bool = False) -> Path:
    """Write the int8 file for TensorRT (module docstring) from the ONNX Runtime one and its fp32 source.

    Each ``DequantizeLinear`` of an int32 bias is replaced by the fp32 source's bias it stands for (exactly what
    ``quantize_static`` writes with ``QuantizeBias=False``, without calibrating again). Unless ``attention``, the
    attention products read the float tensors behind their Q/DQ pairs (the pairs go; every other tensor's range
    is its own, so this is the file a weights-only calibration writes). Then everything but the Q/DQ pairs and
    LayerNorm becomes fp16. ``check`` (raising on failure) runs on the file before it lands.
    """
    model = onnx.load(str(int8))
    graph = model.graph
    source_model = onnx.load(str(fp32))
    unquantised = 0 if attention else _float_inputs(model, set(attention_products(source_model)))
    source = {init.name: init for init in source_model.graph.initializer}
    weights = {init.name: init for init in graph.initializer}
    biases = [node for node in graph.node if node.op_type == "DequantizeLinear"
              and weights.get(node.input[0], onnx.TensorProto()).data_type == onnx.TensorProto.INT32]
    for node in biases:
        graph.node.remove(node)
        for name in node.input:
            graph.initializer.remove(weights[name])
        graph.initializer.append(source[node.output[0]])
    half = to_fp16(model, keep=("QuantizeLinear", "DequantizeLinear"))

    def write(tmp: Path) -> None:
        tmp.write_bytes(half.SerializeToString())
        if check is not None:
            check(tmp)

    atomic_write(path, write)
    log.info("%s: int8 Q/DQ graph for TensorRT (%d biases back to float, %d attention inputs back to float, fp16 "
             "but LayerNorm)", path, len(biases), unquantised)
    return path


def _float_inputs(model: onnx.ModelProto, names: set[str]) -> int:
    """Make the nodes named ``names`` read the float tensors behind their activation Q/DQ pairs, and drop the
    Q/DQ nodes nothing reads any more, with their scales and zero points. Returns the number of inputs rewired."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    rewired = 0
    for node in graph.node:
        if node.name not in names:
            continue
        for k, name in enumerate(node.input):
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[k] = q.input[0]
                rewired += 1
    while True:
        read = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
        unread = [node for node in graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")
                  and not read.intersection(node.output)]
        if not unread:
            break
        for node in unread:
            graph.node.remove(node)
    for init in [i for i in graph.initializer if i.name not in read]:
        graph.initializer.remove(init)
    return rewired


class CalibrationReader:
    """ONNX Runtime's calibration reader protocol over an array, in fixed batches (the graph's batch is dynamic)."""

    def __init__(self, images: np.ndarray) -> None:
        self._batches = iter(np.array_split(images, max(1, -(-len(images) // _CALIBRATION_BATCH))))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


@contextlib.contextmanager
def _quiet_library() -> Iterator[None]:
    """quantize_static logs a suggestion to pre-process through the root logger on every call; the graph here is
    deliberately not pre-processed (ONNX Runtime's optimised graph may hold contrib ops TensorRT cannot parse)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)
