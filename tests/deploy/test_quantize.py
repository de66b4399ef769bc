"""Explicit int8: the Q/DQ graph's shape (what is quantised, how), its cache, its gate, and the calibration sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
from onnx import numpy_helper

from ofbdeploy.deploy.onnx_export import ExportError, check_against_torch, export_onnx, graph_precision
from ofbdeploy.deploy.quantize import QuantizeError, attention_products, quantize_int8, weight_products
from ofbdeploy.deploy.runtimes.registry import create_runner
from ofbdeploy.train.data import DataSpec, balanced_indices, build_datasets, calibration_batch

PICO = "ofb_vit_pico_patch4_32"


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = timm.create_model(PICO).eval()
    path = tmp_path_factory.mktemp("fp32") / "pico.onnx"
    return model, export_onnx(model, path, img_size=32).path


@pytest.fixture(scope="module")
def calibration() -> np.ndarray:
    return np.random.default_rng(3).standard_normal((24, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def int8(fp32, calibration, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quantize_int8(fp32[1], tmp_path_factory.mktemp("int8") / "pico-int8.onnx", calibration).path


def _producer(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def test_weight_products_are_quantised_and_norms_softmax_gelu_stay_float(fp32, int8) -> None:
    source = onnx.load(str(fp32[1]))
    graph = onnx.load(str(int8)).graph
    produced_by = _producer(graph)
    inits = {init.name: init for init in graph.initializer}
    wanted = set(weight_products(source))
    matmuls = [n for n in source.graph.node if n.op_type == "MatMul"]
    assert {"Conv", "Gemm"} <= {n.op_type for n in source.graph.node if n.name in wanted}
    assert 0 < len([n for n in matmuls if n.name in wanted]) < len(matmuls)  # attention products left out
    quantised = set()
    for node in graph.node:
        dequantised = [produced_by.get(i) for i in node.input]
        if any(p is not None and p.op_type == "DequantizeLinear" for p in dequantised):
            quantised.add(node.name)
            if node.op_type in ("MatMul", "Gemm", "Conv"):  # per-channel symmetric int8 weights
                weight_dq = produced_by[node.input[1]]
                scale, zero = inits[weight_dq.input[1]], inits[weight_dq.input[2]]
                assert zero.data_type == onnx.TensorProto.INT8 and not numpy_helper.to_array(zero).any()
                assert numpy_helper.to_array(scale).size > 1
    assert quantised == wanted
    for node in graph.node:
        if node.op_type == "QuantizeLinear":  # activations: int8 with zero point 0 (symmetric), as TensorRT needs
            zero = inits[node.input[2]]
            assert zero.data_type == onnx.TensorProto.INT8 and not numpy_helper.to_array(zero).any()
        if node.op_type in ("LayerNormalization", "Softmax", "Erf"):
            assert all(produced_by.get(i) is None or produced_by[i].op_type != "DequantizeLinear" for i in node.input)
    # outputs stay float: no QuantizeLinear reads a product's output
    products = {o for n in graph.node if n.name in wanted for o in n.output}
    assert not [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in products]
    assert graph_precision(graph) == "int8"


def test_int8_file_runs_on_onnxruntime_cpu_and_agrees_with_torch(fp32, int8, calibration) -> None:
    model, _ = fp32
    parity = check_against_torch(model, int8, "int8", img_size=32, check_inputs=torch.from_numpy(calibration[:16]))
    assert parity.ok and parity.max_abs_diff > 0  # really quantised, and within the int8 row of the table
    runner = create_runner("ort-cpu", onnx_path=int8, precision="int8", threads=1)
    assert runner.run_on(calibration[:2]).shape == (2, 10)
    with pytest.raises(Exception, match="supports int8, not fp32"):
        create_runner("ort-cpu", onnx_path=int8)


def test_attention_products_are_quantised_on_request_and_keyed_apart(fp32, calibration, tmp_path: Path) -> None:
    model, source = fp32
    path = tmp_path / "attn-int8.onnx"
    result = quantize_int8(source, path, calibration, attention=True)
    graph = onnx.load(str(path)).graph
    produced_by = _producer(graph)
    attention = set(attention_products(onnx.load(str(source))))
    assert attention and result.quantised_nodes == len(weight_products(onnx.load(str(source)))) + len(attention)
    for node in graph.node:
        if node.name in attention:  # both operands dequantised from int8, the output stays float
            assert all(produced_by[i].op_type == "DequantizeLinear" for i in node.input)
            assert not [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in node.output]
    parity = check_against_torch(model, path, "int8", img_size=32, check_inputs=torch.from_numpy(calibration[:16]))
    assert parity.ok
    assert result.key != quantize_int8(source, tmp_path / "plain-int8.onnx", calibration).key


def test_calibrated_file_is_reused_for_the_same_key_only(fp32, calibration, tmp_path: Path) -> None:
    path = tmp_path / "q.onnx"
    first = quantize_int8(fp32[1], path, calibration)
    stamp = path.stat().st_mtime_ns
    again = quantize_int8(fp32[1], path, calibration)
    assert not first.reused and again.reused and again.key == first.key and path.stat().st_mtime_ns == stamp
    other = quantize_int8(fp32[1], path, calibration[:16])
    assert not other.reused and other.key != first.key
    assert quantize_int8(fp32[1], path, calibration[:16], method="percentile").key != other.key


def test_a_failed_check_or_missing_calibration_writes_nothing(fp32, calibration, tmp_path: Path) -> None:
    def refuse(candidate: Path):
        raise ExportError(f"{candidate}: disagrees")

    with pytest.raises(ExportError, match="disagrees"):
        quantize_int8(fp32[1], tmp_path / "q.onnx", calibration, check=refuse)
    with pytest.raises(QuantizeError, match="needs calibration images"):
        quantize_int8(fp32[1], tmp_path / "q.onnx", None)
    with pytest.raises(QuantizeError, match="calibration method"):
        quantize_int8(fp32[1], tmp_path / "q.onnx", calibration, method="mse")
    assert list(tmp_path.iterdir()) == []


def test_calibration_batch_is_class_balanced_seeded_and_unaugmented() -> None:
    spec = DataSpec(kind="digits", img_size=8, seed=0, crop_padding=2, hflip=0.5, random_erasing=0.5)
    train, val, classes = build_datasets(spec)
    batch = calibration_batch(train, val, 50, seed=4)
    assert batch.shape == (50, 3, 8, 8)
    assert torch.equal(batch, calibration_batch(train, val, 50, seed=4))
    assert not torch.equal(batch, calibration_batch(train, val, 50, seed=5))
    indices = balanced_indices(train.targets.numpy(), 50, 4)
    counts = np.bincount(train.targets.numpy()[indices], minlength=classes)
    assert counts.min() == counts.max() == 5  # every class alike, unlike the first 50 of a class-sorted set
    plain = (train.images[indices].float() / 255 - train.mean) / train.std  # the eval transform: no augmentation
    torch.testing.assert_close(batch, plain.repeat(1, 3, 1, 1))


def test_int8_session_at_a_fixed_batch_keeps_the_integer_matmuls(calibration, tmp_path: Path) -> None:
    """Sessions are specialised to their batch; ONNX Runtime's MatMulAddFusion must not turn the Q/DQ products
    into dequantise + fp32 Gemm first (what made int8 slower than fp32). Models as the pipeline builds them."""
    import onnxruntime as ort

    from ofbdeploy.arch import ArchSpec
    from ofbdeploy.deploy.runtimes.ort import disabled_optimizers
    from ofbdeploy.deploy.workflow import with_random_weights
    from ofbdeploy.families.vit.support import read_vit_shape
    from ofbdeploy.models.pruned import build_plain

    shape = read_vit_shape(timm.create_model(PICO), PICO)
    dense = with_random_weights(ArchSpec.dense(shape), build_plain)
    fp32 = export_onnx(dense, tmp_path / "plain.onnx", img_size=32).path
    int8 = quantize_int8(fp32, tmp_path / "plain-int8.onnx", calibration).path

    def fused(disabled: list[str]) -> set[str]:
        options = ort.SessionOptions()
        options.add_free_dimension_override_by_name("batch", 1)
        options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
        ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
        return {node.op_type for node in onnx.load(str(tmp_path / "optimised.onnx")).graph.node}

    assert "MatMulIntegerToFloat" not in fused([])  # the trap, as ONNX Runtime 1.32 sets it
    assert "MatMulIntegerToFloat" in fused(disabled_optimizers("int8"))
    assert disabled_optimizers("fp32") == []
