"""Export a (pruned) timm ViT to ONNX and prove, on every export, that ONNX Runtime computes what torch computes.

Choices, and why:

* **Exporter: the TorchScript one** (``torch.onnx.export(..., dynamo=False)``). On torch 2.14 both exporters
  handle per-block head counts and timm's fused attention, and both emit ``LayerNormalization``, but the
  ``torch.export`` one implements only opset >= 18 and reaches 17 through ONNX's version converter (which
  warns that it "may not be successful"), takes ~5x longer (DeiT-S: 14 s against 3 s), and needs
  ``onnxscript``, which is not a dependency. The TorchScript exporter writes opset 17 natively on every
  torch this package supports (>= 2.4). It is deprecated upstream; the tests pin its behaviour.
* **Opset >= 17**, so LayerNorm is one ``LayerNormalization`` node: decomposed into ReduceMean/Pow it
  overflows in TensorRT fp16.
* **fp16**: the exported fp32 graph is converted with ONNX Runtime's own converter (shipped inside the
  ``onnxruntime`` wheel, CPU and GPU alike); every weight and activation becomes fp16 except LayerNorm, which
  stays fp32 between Casts (TensorRT builds these graphs strongly typed, computing each layer in its input
  type, and a ViT's LayerNorm statistics overflow fp16), while the graph's input ``images`` and output
  ``logits`` stay fp32 (one Cast each), so callers feed and read the same arrays for either precision.
  (int8 is made from the checked fp32 file by :mod:`ofbdeploy.deploy.quantize`.)
* **Simplification** with onnxslim (constant folding, dead nodes, shape arithmetic) when it works; it is
  an optimisation, so a failure only logs a warning and keeps the exported graph.
* **Parity check, always**, on ONNX Runtime's CPU provider (deterministic; no TF32) against the fp32
  torch model on CPU. The inputs run as a batch of 1 and then the rest, so every file proves its dynamic
  batch axis. Real images are the better check (a random-weight or random-input check has near-ties in
  the logits); the pipeline passes validation images, and without them seeded random images are used.
  Default tolerance: :mod:`ofbdeploy.deploy.parity`'s per-precision table (relative to the logit scale,
  with a top-1 agreement floor); fp16 quality is judged mostly by top-1 agreement. On CPU, ONNX Runtime
  runs fp16 nodes that lack CPU kernels in fp32 between Casts, so the check measures fp16 storage of
  weights and activations; the TensorRT step checks real fp16 arithmetic against ONNX Runtime.
"""

from __future__ import annotations

import copy
import inspect
import io
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from ofbdeploy.deploy.parity import Parity, compare, tolerance_for
from ofbdeploy.errors import OfbError
from ofbdeploy.io import atomic_write

log = logging.getLogger(__name__)

MIN_OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
DEFAULT_CHECK_IMAGES = 8
FP32_OPS_IN_FP16 = ("LayerNormalization",)  # kept in fp32 inside fp16 graphs
_CHECK_BATCH = 32  # bounds the check's memory when many validation images are passed
_DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


class ExportError(OfbError, RuntimeError):
    """An ONNX export that failed, or whose graph does not compute what the torch model computes."""


@dataclass(frozen=True)
class ExportResult:
    """Where the graph went, how it was made, and how closely ONNX Runtime matched torch on the check inputs."""

    path: Path
    opset: int
    fp16: bool
    simplified: bool
    max_abs_diff: float
    top1_agreement: float
    check_images: int
    tolerance: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for reports and run records."""
        return {**asdict(self), "path": str(self.path)}


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    img_size: int,
    in_chans: int = 3,
    opset: int = 17,
    fp16: bool = False,
    simplify: bool = True,
    check_inputs: Tensor | None = None,
    max_abs_diff: float | None = None,
    min_top1_agreement: float | None = None,
) -> ExportResult:
    """Export a CPU fp32 eval copy of ``model`` (the caller's is untouched) and write ``path`` only if it
    passes the parity check; ``max_abs_diff`` and ``min_top1_agreement`` replace the precision's defaults."""
    path = Path(path)
    if opset < MIN_OPSET:
        raise ExportError(
            f"{path}: opset {opset} is too old; use >= {MIN_OPSET} so LayerNorm exports as LayerNormalization "
            "(decomposed, it overflows in TensorRT fp16)"
        )
    images = _check_images(check_inputs, img_size, in_chans, path)
    reference = copy.deepcopy(model).float().cpu().eval().requires_grad_(False)
    want = _run_torch(reference, images)
    default = tolerance_for("fp16" if fp16 else "fp32")
    tolerance = default.max_abs_diff(want) if max_abs_diff is None else max_abs_diff
    floor = default.min_top1_agreement if min_top1_agreement is None else min_top1_agreement
    graph = _trace(reference, torch.zeros(2, in_chans, img_size, img_size), opset, path)
    simplified = False
    if simplify:
        graph, simplified = _simplify(graph, path)
    if fp16:
        graph = to_fp16(graph)
    measured: list[tuple[float, float]] = []

    def write_checked(tmp: Path) -> None:
        """The check runs on the very file that lands; raising here leaves nothing at ``path``."""
        tmp.write_bytes(graph.SerializeToString())
        parity = check_onnx(tmp, images, want, "fp16" if fp16 else "fp32", tolerance, floor, path)
        measured.append((parity.max_abs_diff, parity.top1_agreement))

    atomic_write(path, write_checked)
    result = ExportResult(
        path=path,
        opset=_opset_of(graph),
        fp16=fp16,
        simplified=simplified,
        max_abs_diff=measured[0][0],
        top1_agreement=measured[0][1],
        check_images=len(images),
        tolerance=tolerance,
    )
    log.info(
        "%s: opset %d, %s, %s; max |ORT - torch| %.3g (tolerance %.3g), top-1 agreement %.3f on %d images",
        path,
        result.opset,
        "fp16" if fp16 else "fp32",
        "simplified" if simplified else "not simplified",
        result.max_abs_diff,
        result.tolerance,
        result.top1_agreement,
        result.check_images,
    )
    return result


def ort_session(path: str | Path, providers: list[str] | None = None) -> ort.InferenceSession:
    """A session on the first of CUDA and CPU that this onnxruntime offers, unless told otherwise (TensorRT's
    provider is opt-in: it builds an engine on first use, which takes minutes)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: ONNX file not found")
    if providers is None:
        available = ort.get_available_providers()
        providers = [name for name in _DEFAULT_PROVIDERS if name in available]
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: notes on fp16 nodes run in fp32 on CPU are expected
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as err:  # onnxruntime's errors share no base class below Exception
        raise ExportError(f"{path}: ONNX Runtime cannot load it: {_first_line(err)}") from None


def check_onnx(path: Path, images: Tensor, want: np.ndarray, precision: str, tolerance: float, floor: float,
               name: Path | None = None) -> Parity:
    """ONNX Runtime (CPU) on ``path`` against the torch logits ``want``; raises ExportError when they disagree."""
    parity = compare(_run_onnx(path, images), want, tolerance, floor)
    if not parity.ok:  # NaN fails too
        raise ExportError(f"{name or path}: ONNX Runtime disagrees with torch ({precision}): {parity.describe()}; "
                          "file not written")
    return parity


def check_against_torch(model: nn.Module, path: Path, precision: str, *, img_size: int, in_chans: int = 3,
                        check_inputs: Tensor | None = None, name: Path | None = None) -> Parity:
    """An existing file of ``precision`` (an int8 Q/DQ graph, say) against ``model``'s fp32 torch logits."""
    images = _check_images(check_inputs, img_size, in_chans, path)
    want = _run_torch(copy.deepcopy(model).float().cpu().eval().requires_grad_(False), images)
    limits = tolerance_for(precision)
    return check_onnx(path, images, want, precision, limits.max_abs_diff(want), limits.min_top1_agreement, name)


def _check_images(check_inputs: Tensor | None, img_size: int, in_chans: int, path: Path) -> Tensor:
    """The caller's images as CPU fp32, or seeded random ones (always the same, so runs compare)."""
    if check_inputs is None:
        generator = torch.Generator().manual_seed(0)
        return torch.randn(DEFAULT_CHECK_IMAGES, in_chans, img_size, img_size, generator=generator)
    shape = tuple(check_inputs.shape)
    if len(shape) != 4 or shape[0] < 1 or shape[1:] != (in_chans, img_size, img_size):
        raise ExportError(f"{path}: check_inputs must be (N>=1, {in_chans}, {img_size}, {img_size}), got {shape}")
    return check_inputs.detach().float().cpu()


def _batches(images: Tensor) -> list[Tensor]:
    """A batch of 1, then the rest in bounded batches: every check also exercises the dynamic batch axis."""
    rest = images[1:]
    return [images[:1], *(rest.split(_CHECK_BATCH) if len(rest) else ())]


@torch.no_grad()
def _run_torch(model: nn.Module, images: Tensor) -> np.ndarray:
    return torch.cat([model(batch) for batch in _batches(images)]).numpy()


def _run_onnx(path: Path, images: Tensor) -> np.ndarray:
    """On CPU: deterministic, and free of the TF32 matmuls a GPU provider may use."""
    session = ort_session(path, ["CPUExecutionProvider"])
    return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: b.numpy()})[0] for b in _batches(images)])


def _trace(model: nn.Module, example: Tensor, opset: int, path: Path) -> onnx.ModelProto:
    """The TorchScript exporter's graph with a dynamic batch axis (batch 2 example: no size-1 special cases)."""
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # this exporter, and parts of it
            # timm's image-size assert and attention-mask test become constants: right for a fixed input size.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(
                model,
                (example,),
                buffer,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                **_torchscript_exporter(),
            )
    except Exception as err:  # the tracer and the symbolic functions raise many types
        raise ExportError(f"{path}: torch.onnx.export failed: {_first_line(err)}") from err
    return onnx.load_from_string(buffer.getvalue())


def _torchscript_exporter() -> dict[str, bool]:
    """torch 2.4 has no ``dynamo`` argument (only this exporter); from 2.9 on it must be turned off."""
    return {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}


def _simplify(graph: onnx.ModelProto, path: Path) -> tuple[onnx.ModelProto, bool]:
    """onnxslim's graph, or the given one and a warning: simplifying is an optimisation, never a reason to fail."""
    try:
        import onnxslim

        original = onnx.ModelProto()
        original.CopyFrom(graph)  # onnxslim edits its argument; a failure must not leave a half-edited graph
        slim = onnxslim.slim(original)
        if not isinstance(slim, onnx.ModelProto):
            raise TypeError(f"onnxslim.slim returned {type(slim).__name__}")
    except Exception as err:  # any failure of an optional optimisation, ImportError included
        log.warning("%s: graph not simplified (%s); exporting it as traced", path, _first_line(err))
        return graph, False
    return slim, True


def to_fp16(graph: onnx.ModelProto, keep: tuple[str, ...] = ()) -> onnx.ModelProto:
    """fp16 weights and activations but LayerNorm (and the ``keep`` ops, between Casts); the graph's input and
    output stay fp32 (one Cast each). The fp16 export and the int8 file for TensorRT are both made by this."""
    # Imported here: importing onnxruntime.transformers appends its folder to sys.path.
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    return convert_float_to_float16(graph, keep_io_types=True,
                                    op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP32_OPS_IN_FP16, *keep])


def _opset_of(graph: onnx.ModelProto) -> int:
    return next(entry.version for entry in graph.opset_import if entry.domain in ("", "ai.onnx"))


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def graph_precision(graph: onnx.GraphProto) -> str:
    """The precision a file was made in: int8 (Q/DQ nodes), fp16 (fp16 weights) or fp32.

    The graph's input says nothing: every export keeps fp32 ``images`` and ``logits``.
    """
    if any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in graph.node):
        return "int8"
    types = {init.data_type for init in graph.initializer}
    return "fp16" if onnx.TensorProto.FLOAT16 in types else "fp32"
