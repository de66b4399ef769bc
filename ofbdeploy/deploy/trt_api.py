"""Every TensorRT call the package makes, in one module, against the API that TensorRT 10 and 11 share.

TensorRT 11 removed weak typing and implicit int8: ``BuilderFlag.FP16``/``INT8``, ``IBuilderConfig.int8_calibrator``,
``set_calibration_profile`` and the ``IInt8*Calibrator`` classes. So every network here is created
``STRONGLY_TYPED``: its precision is the ONNX graph's (fp32, fp16 with LayerNorm in fp32, or int8 Q/DQ) and the
builder is never asked to choose one. The only builder flag used is ``TF32``, a compute mode (not a type) that
both majors keep.

Keeping the calls here makes the attribute names the code uses discoverable: tests/deploy/test_trt_api.py reads this
file's syntax tree and checks every name against the names compiled into TensorRT 10.11's and 11.4's binding
modules (tests/data, made by tools/scripts/trt_api_names.py). Only TensorRT objects are used through attributes in this
module (names rooted at an import, such as ``importlib``, are not TensorRT's and are not checked).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from ofbdeploy.errors import OfbError

SUPPORTED_MAJORS = (10, 11)


class TensorRTUnavailable(OfbError):
    """TensorRT's Python package cannot be imported on this machine, or is a major this code was not written for."""


def load() -> ModuleType:
    """Import TensorRT on first use, so that CPU-only installs never need it."""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError:
        raise TensorRTUnavailable(
            "TensorRT is not installed: run inside the Docker image (docker build -t ofbdeploy . ; "
            "docker run --gpus all ...) or pip install '.[trt]'"
        ) from None
    major = int(str(trt.__version__).split(".")[0])
    if major not in SUPPORTED_MAJORS:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} is not supported: expected major 10 or 11")
    return trt


def version(trt: ModuleType) -> str:
    return str(trt.__version__)


def build(
    trt: ModuleType,
    onnx_path: str,
    *,
    input_name: str,
    shapes: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]],
    workspace_bytes: int,
    tf32: bool,
    timing_cache: bytes,
) -> tuple[Any, bytes]:
    """Parse ``onnx_path`` into a strongly typed network and build it: (serialized engine, updated timing cache).

    ``shapes`` is the min/opt/max input shape of the one optimisation profile. Raises with the parser's or the
    builder's reason; a timing cache from another TensorRT or GPU is replaced by a fresh one.
    """
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        raise OfbError(f"{onnx_path}: TensorRT cannot parse the ONNX model: "
                       + "; ".join(f"node {e.node()}: {e.desc()}" for e in errors))
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    found = [(tensor.name, tuple(tensor.shape)) for tensor in inputs]
    if [name for name, _ in found] != [input_name]:
        raise OfbError(f"{onnx_path}: expected one input named {input_name!r}, found {found}")
    shape = found[0][1]
    fixed = shapes[0][0] == shapes[2][0] == shape[0]
    if len(shape) != 4 or shape[1:] != shapes[0][1:] or not (shape[0] == -1 or fixed):
        raise OfbError(f"{onnx_path}: input {input_name!r} has shape {shape}, expected (batch, "
                       f"{', '.join(map(str, shapes[0][1:]))}) with a dynamic batch axis (export with dynamic_axes)")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if tf32:
        config.set_flag(trt.BuilderFlag.TF32)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, *shapes)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise OfbError(f"{onnx_path}: TensorRT could not build the engine (see its messages above)")
    return serialized, bytes(cache.serialize())


class Engine:
    """A deserialized engine with one execution context, one input and one output (what the exports have)."""

    def __init__(self, trt: ModuleType, data: bytes, source: str) -> None:
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(data)
        if engine is None:
            raise OfbError(f"TensorRT could not load {source} (built by another TensorRT version or GPU?)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise OfbError(f"{source} has inputs {inputs} and outputs {outputs}; expected one of each")
        dtypes = {trt.DataType.FLOAT: "fp32", trt.DataType.HALF: "fp16", trt.DataType.BF16: "bf16"}
        self.input, self.output = inputs[0], outputs[0]
        self.dtypes = {n: dtypes[engine.get_tensor_dtype(n)] for n in names}
        self.sample_shape = tuple(engine.get_tensor_shape(self.input))[1:]
        low, _, high = engine.get_tensor_profile_shape(self.input, 0)
        self.batch_range = (int(low[0]), int(high[0]))
        self._engine = engine
        self._context = engine.create_execution_context()

    def bind(self, input_address: int, output_address: int) -> None:
        """Point the context at the device buffers (the output one sized by ``set_batch``'s shape)."""
        self._context.set_tensor_address(self.input, input_address)
        self._context.set_tensor_address(self.output, output_address)

    def set_batch(self, batch: int) -> tuple[int, ...]:
        """Fix the input batch; returns the output shape at it."""
        shape = (batch, *self.sample_shape)
        if not self._context.set_input_shape(self.input, shape):
            raise OfbError(f"engine input {self.input} does not accept shape {shape}")
        return tuple(self._context.get_tensor_shape(self.output))

    def enqueue(self, stream_handle: int) -> None:
        """Queue one inference on the CUDA stream ``stream_handle`` (an int address); returns at once."""
        if not self._context.execute_async_v3(stream_handle):
            raise OfbError("TensorRT failed to enqueue the engine")
