"""Prove that ONNX Runtime's GPU providers load and compute: a session on each, run, compared with the CPU provider.

    docker run --gpus all --entrypoint python ofbdeploy -m ofbdeploy.deploy.provider_check

Listing ``get_available_providers()`` only says which providers were compiled in; a provider whose CUDA, cuDNN or
TensorRT libraries do not match the machine still fails when a session starts (or silently falls back to the CPU).
This builds a tiny MatMul + Add + Softmax model, opens one session per provider with no fallback, checks that the
provider really took the session, runs it and compares the result with the CPU provider's. Exit status 0 when
every provider asked for works, 1 otherwise, with one line per provider either way.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


@dataclass(frozen=True)
class ProviderResult:
    provider: str
    ok: bool
    detail: str


def tiny_model(path: Path) -> Path:
    """y = softmax(x @ W + b) with a dynamic batch: small, but a real kernel on every provider."""
    rng = np.random.default_rng(0)
    weight = helper.make_tensor("W", TensorProto.FLOAT, (16, 8), rng.standard_normal((16, 8)).ravel().tolist())
    bias = helper.make_tensor("b", TensorProto.FLOAT, (8,), rng.standard_normal(8).tolist())
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["z"]),
             helper.make_node("Softmax", ["z"], ["y"], axis=-1)]
    graph = helper.make_graph(nodes, "provider_check",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ("batch", 16))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ("batch", 8))], [weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime this package supports
    onnx.save(model, str(path))
    return path


def check_provider(model: Path, provider: str, options: dict[str, str] | None = None) -> ProviderResult:
    """Open a session on ``provider`` alone, run it, and compare with the CPU provider."""
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    reference = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    try:
        session = ort.InferenceSession(str(model), providers=[(provider, options or {})])
        if session.get_providers()[0] != provider:
            return ProviderResult(provider, False, f"session fell back to {session.get_providers()}")
        got = session.run(None, {"x": x})[0]
    except Exception as err:  # onnxruntime raises its own exception types when a provider cannot start
        lines = str(err).strip().splitlines()
        return ProviderResult(provider, False, f"{type(err).__name__}: {lines[0] if lines else ''}")
    diff = float(np.abs(got - reference).max())
    if not diff <= 1e-3:
        return ProviderResult(provider, False, f"ran, but max |diff| against the CPU provider is {diff:.3g}")
    return ProviderResult(provider, True, f"ran; max |diff| against the CPU provider {diff:.2e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", action="append", choices=[*GPU_PROVIDERS, "CPUExecutionProvider"],
                        help=f"provider to prove (repeatable; default {', '.join(GPU_PROVIDERS)})")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_model(Path(tmp) / "tiny.onnx")
        cache = {"trt_engine_cache_enable": "True", "trt_engine_cache_path": tmp}
        results = [check_provider(model, p, cache if p == "TensorrtExecutionProvider" else None)
                   for p in args.provider or GPU_PROVIDERS]
    print(f"onnxruntime {ort.__version__}")
    for result in results:
        print(f"{result.provider}: {'ok' if result.ok else 'FAILED'}: {result.detail}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
