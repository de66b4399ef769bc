"""The export and profile sections of a recipe, and the backend and precision names they accept."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, WithJsonSchema, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ofbdeploy.config import MAX_REPEATS, MAX_THREADS, BatchSize, Strict
from ofbdeploy.deploy.runtimes import registry


def _registered(name: str) -> str:
    """A runtime name the registry knows, refused with pydantic's own one-line listing of the names otherwise."""
    if name not in registry.names():
        *first, last = (repr(n) for n in registry.names())
        raise PydanticCustomError("literal_error", "Input should be {expected}",
                                  {"expected": f"{', '.join(first)} or {last}"})
    return name


Backend = Annotated[str, AfterValidator(_registered), WithJsonSchema({"enum": registry.names(), "type": "string"})]
Precision = Literal[registry.PRECISIONS]
OnnxPrecision = Literal[registry.ONNX_PRECISIONS]


class ExportCfg(Strict):
    """ONNX (always checked in ONNX Runtime against torch) and, optionally, TensorRT engines built from it.

    Every precision is decided in the ONNX graph: fp32, fp16 (LayerNorm kept in fp32) and int8 as an explicitly
    quantised Q/DQ graph. TensorRT builds strongly typed engines from those files, so one int8 artifact runs on
    ONNX Runtime CPU (where its accuracy is measured) and on TensorRT alike.
    """

    enabled: bool = True
    opset: int = Field(17, ge=17, le=30, description=">= 17: LayerNorm as one op (no fp16 overflow in TensorRT)")
    fp16: bool = Field(False, description="also write an fp16 ONNX graph (LayerNorm kept in fp32)")
    int8: bool = Field(False, description="also write an int8 Q/DQ ONNX graph (ONNX Runtime quantize_static)")
    int8_attention: Literal["cpu", "all", "none"] = Field(
        "cpu", description="which int8 files also quantise the attention products (q @ k^T, attn @ v): cpu, the "
                           "ONNX Runtime/OpenVINO file (faster on OpenVINO CPU, the same on ONNX Runtime CPU); all, "
                           "the TensorRT file too (not yet run on TensorRT); none. true/false mean all/none")
    simplify: bool = True
    check_images: int = Field(64, ge=1, le=100_000, description="validation images for the parity checks")
    trt: bool = Field(False, description="build TensorRT engines (needs the trt extra / Docker image)")
    trt_precisions: list[OnnxPrecision] = Field(
        default_factory=lambda: ["fp16"], description="engines to build; each from the ONNX graph of its precision")
    batch_range: tuple[BatchSize, BatchSize, BatchSize] = Field(
        (1, 16, 64), description="TensorRT profile: min, opt, max batch")
    calibration_images: int = Field(
        512, ge=1, le=1_000_000, description="int8 calibration: a seeded, class-balanced sample of the training "
                                             "split through the eval transform")
    calibration_method: Literal["minmax", "percentile", "entropy"] = Field(
        "minmax", description="how int8 activation ranges are taken from the calibration images")
    accuracy_images: int | None = Field(
        None, ge=1, description="validation images (a seeded random sample) for the ONNX Runtime CPU top-1/top-5 "
                                "of every exported file; default: the whole validation split")

    @field_validator("int8_attention", mode="before")
    @classmethod
    def _attention_flag(cls, value: Any) -> Any:
        """``true``/``false`` (the option's first form) mean every file or none."""
        return {True: "all", False: "none"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _ordered_range(self) -> ExportCfg:
        low, opt, high = self.batch_range
        if not low <= opt <= high:
            raise ValueError(f"batch_range: expected min <= opt <= max, got {list(self.batch_range)}")
        return self

    def onnx_precisions(self) -> list[str]:
        """The ONNX graphs to write: fp32 always, fp16/int8 when asked for or when an engine of that precision is."""
        wanted = {"fp32"} | {p for p, on in (("fp16", self.fp16), ("int8", self.int8)) if on}
        wanted |= set(self.trt_precisions) if self.trt else set()
        return [p for p in registry.ONNX_PRECISIONS if p in wanted]


class ProfileCfg(Strict):
    """Latency of dense and pruned, measured alternately in one process on each backend and precision."""

    enabled: bool = True
    backends: list[Backend] = Field(default_factory=lambda: ["ort-cpu"])
    precisions: list[Precision] = Field(
        default_factory=lambda: ["fp32"], description="each measured on every backend that runs it (int8: the Q/DQ "
                                                      "ONNX or engine); `precision: x` is read as [x]")
    batches: list[BatchSize] = Field(default_factory=lambda: [1, 32], min_length=1)
    warmup: int = Field(10, ge=0, le=MAX_REPEATS)
    repeats: int = Field(50, ge=5, le=MAX_REPEATS)
    threads: int | None = Field(None, ge=1, le=MAX_THREADS,
                                description="CPU threads for ORT/OpenVINO/torch (default: the process's share)")
    tf32: bool = Field(True, description="one TF32 policy for every GPU backend: torch matmul/cuDNN, ORT CUDA's "
                                         "use_tf32 and TensorRT's TF32 builder flag (engines are built with it)")

    @model_validator(mode="before")
    @classmethod
    def _one_precision(cls, data: Any) -> Any:
        """``precision: fp16`` (one precision, as recipes and callers wrote it before) means ``precisions: [fp16]``."""
        if isinstance(data, dict) and "precision" in data:
            if "precisions" in data:
                raise ValueError("give one of precision and precisions, not both")
            data = {**data, "precisions": [data["precision"]]}
            del data["precision"]
        return data
