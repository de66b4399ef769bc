"""Every ONNX file meant for TensorRT is one TensorRT's ONNX parser takes as explicit quantisation (issue 23, defects 2
and 3), checked on a real exported model without TensorRT:

* each ``DequantizeLinear`` reads an int8 (or fp8 / int4) tensor: TensorRT's dequantize takes no int32 bias;
* every scale is a positive initialiser and every zero point an initialiser of zeros (symmetric);
* weights are quantised per channel on the output axis of the product that reads them;
* the opset is one TensorRT 10 and 11 parse;
* in the int8 file for TensorRT, everything but the weight products, their Q/DQ and LayerNorm is fp16.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from onnx import TensorProto, numpy_helper

import ofbdeploy.models.zoo  # noqa: F401  (registers the pico ViT)
from ofbdeploy.deploy import parity, quantize, workflow
from ofbdeploy.deploy.config import ExportCfg
from ofbdeploy.deploy.onnx_export import FP32_OPS_IN_FP16
from ofbdeploy.deploy.runtimes import registry
from ofbdeploy.deploy.runtimes.ort import disabled_optimizers

QUANTISED_TYPES = {TensorProto.INT8, TensorProto.FLOAT8E4M3FN, TensorProto.INT4}
TENSORRT_OPSETS = range(13, 21)  # per-channel Q/DQ (13) up to the newest opset both TensorRT 10.x and 11 parse


def _output_axis(consumer: onnx.NodeProto, weight_index: int, rank: int) -> int:
    """The axis of a weight that indexes the product's output channels."""
    if consumer.op_type == "Conv":
        return 0
    if consumer.op_type == "Gemm":
        trans_b = next((a.i for a in consumer.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    assert consumer.op_type == "MatMul" and weight_index == 1, consumer.op_type
    return rank - 1


def tensorrt_contract(path: Path) -> list[str]:
    """What in ``path`` TensorRT would refuse or mis-build as explicit quantisation (empty: nothing)."""
    model = onnx.load(str(path))
    graph = model.graph
    weights = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    types = {init.name: init.data_type for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    problems = []
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset not in TENSORRT_OPSETS:
        problems.append(f"opset {opset}")
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale, zero = node.input[1], node.input[2] if len(node.input) > 2 else None
        if scale not in weights or not (weights[scale] > 0).all():
            problems.append(f"{node.name}: scale {scale} is not a positive initialiser")
        if zero is None or zero not in weights or weights[zero].any():
            problems.append(f"{node.name}: zero point is not an initialiser of zeros")
        if node.op_type == "QuantizeLinear":
            continue
        source = node.input[0]
        kind = types.get(source) if source in weights else types.get(producers[source].input[2])
        if kind not in QUANTISED_TYPES:
            problems.append(f"{node.name}: dequantises {TensorProto.DataType.Name(kind)}, not int8/fp8/int4")
        if source in weights and weights[source].ndim >= 2:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            for consumer in _through_casts(node.output[0], consumers):
                want = _output_axis(consumer, list(consumer.input).index(_fed(consumer, node, consumers)),
                                     weights[source].ndim)
                if axis % weights[source].ndim != want or weights[scale].size != weights[source].shape[want]:
                    problems.append(f"{node.name}: weight not per channel on the output axis of {consumer.name}")
    return problems


def _through_casts(name: str, consumers: dict[str, list[onnx.NodeProto]]) -> list[onnx.NodeProto]:
    """The nodes that read ``name``, looking through Casts (the fp16 file casts dequantised weights)."""
    found = []
    for node in consumers.get(name, []):
        found += _through_casts(node.output[0], consumers) if node.op_type == "Cast" else [node]
    return found


def _fed(consumer: onnx.NodeProto, dq: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]]) -> str:
    """The input name of ``consumer`` that carries ``dq``'s output (possibly through a Cast)."""
    names = {dq.output[0]} | {c.output[0] for c in consumers.get(dq.output[0], []) if c.op_type == "Cast"}
    return next(name for name in consumer.input if name in names)


def _export(directory: Path, cfg: ExportCfg) -> workflow.DeployArtifacts:
    """The files ``cfg`` asks for of a real (tiny) model, through the export users run."""
    model = timm.create_model("ofb_vit_pico_patch4_32", img_size=16).eval()
    calibration = np.random.default_rng(0).standard_normal((16, 3, 16, 16)).astype(np.float32)
    images = torch.from_numpy(np.random.default_rng(1).standard_normal((16, 3, 16, 16)).astype(np.float32))
    with pytest.MonkeyPatch.context() as patch:  # random weights: near-tied logits; the int8 gate is test_quantize's
        patch.setitem(parity.TOLERANCES, "int8", parity.Tolerance(rtol=1.0, min_top1_agreement=0.0))
        return workflow.export_models({"pruned": model}, directory, cfg, img_size=16, check_images=images,
                                      calibration=calibration)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> workflow.DeployArtifacts:
    """fp32, fp16 and both int8 files (the default settings)."""
    return _export(tmp_path_factory.mktemp("export"), ExportCfg(fp16=True, int8=True, simplify=False))


def _int8_operands(path: str, names: set[str]) -> set[bool]:
    """Per node named in ``names``: whether both its operands (not a bias) are dequantised from int8 (through
    Casts)."""
    graph = onnx.load(path).graph
    producers = {out: node for node in graph.node for out in node.output}

    def source(name: str) -> str:
        node = producers.get(name)
        if node is None:
            return "initializer"
        return source(node.input[0]) if node.op_type == "Cast" else node.op_type

    found = {all(source(i) == "DequantizeLinear" for i in node.input[:2]) for node in graph.node
             if node.name in names}
    assert len({node.name for node in graph.node if node.name in names}) == len(names)  # every one still there
    return found


@pytest.mark.parametrize("attention", ["cpu", "all", "none"])
def test_the_attention_products_are_int8_in_the_files_asked_for(tmp_path: Path, attention: str) -> None:
    """By default the CPU file quantises the attention products and the TensorRT file keeps them in fp16 (its
    Q/DQ pairs there removed); ``all`` keeps them int8 in both, ``none`` in neither. Either way the TensorRT
    file keeps the contract."""
    artifacts = _export(tmp_path, ExportCfg(int8=True, simplify=False, int8_attention=attention))
    names = set(quantize.attention_products(onnx.load(artifacts.onnx["pruned"])))
    assert names
    assert _int8_operands(artifacts.onnx["pruned-int8"], names) == {attention != "none"}
    assert _int8_operands(artifacts.onnx["pruned-int8-fp16"], names) == {attention == "all"}
    assert tensorrt_contract(Path(artifacts.onnx["pruned-int8-fp16"])) == []
    weights = set(quantize.weight_products(onnx.load(artifacts.onnx["pruned"])))
    assert _int8_operands(artifacts.onnx["pruned-int8-fp16"], weights) == {True}  # the weight products stay int8
    entry = next(c for c in artifacts.checks if c["model"] == "pruned-int8-fp16")
    assert entry["int8_attention"] == (attention == "all")


@pytest.mark.parametrize("backend", ["tensorrt", "ort-trt"])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_every_file_meant_for_tensorrt_keeps_the_contract(exported: workflow.DeployArtifacts, backend: str,
                                                          precision: str) -> None:
    path = Path(exported.onnx[workflow.onnx_key("pruned", registry.get(backend).file_precision(precision))])
    assert tensorrt_contract(path) == []


def test_the_int8_file_for_tensorrt_is_fp16_but_products_and_layernorm(exported: workflow.DeployArtifacts) -> None:
    path = Path(exported.onnx[workflow.onnx_key("pruned", registry.get("tensorrt").file_precision("int8"))])
    assert path.name == "pruned-int8-fp16.onnx"
    graph = onnx.load(str(path)).graph
    kept = {"QuantizeLinear", "DequantizeLinear", *FP32_OPS_IN_FP16}
    fp32_inputs = {name for node in graph.node if node.op_type in kept for name in node.input}
    floats = [init for init in graph.initializer if init.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]
    assert {i.name for i in floats if i.data_type == TensorProto.FLOAT} <= fp32_inputs
    assert any(i.data_type == TensorProto.FLOAT16 for i in floats)  # weights of the rest (biases, LayerNorm-free)
    products = [n for n in graph.node if n.op_type in ("MatMul", "Gemm", "Conv")]
    assert any(n.op_type == "Softmax" for n in graph.node) and products


def test_the_onnx_runtime_int8_file_keeps_its_int32_biases_and_fails_the_contract(
        exported: workflow.DeployArtifacts) -> None:
    """The file whose head ONNX Runtime's CPU provider fuses into QGemm (which reads the int32 bias) is named apart
    and never handed to TensorRT; it is also what TensorRT was given before, and the contract catches it."""
    path = Path(exported.onnx["pruned-int8"])
    assert any("not int8/fp8/int4" in problem for problem in tensorrt_contract(path))
    assert all(registry.get(b).file_precision("int8") != "int8" for b in ("tensorrt", "ort-trt"))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path.with_suffix(".cpu-optimised.onnx"))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=disabled_optimizers("int8"))
    fused = {node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node}
    assert {"QGemm", "MatMulIntegerToFloat"} <= fused  # the head's int8 Gemm needs its int32 bias
