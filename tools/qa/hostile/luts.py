"""Latency tables handed to a latency-budget search: not JSON, another model or batch, negative or missing
coefficients, an older format."""

from __future__ import annotations

import json
from collections.abc import Callable

from .harness import PICO, TINY, Proc, Workspace, case


def lut_case(ws: Workspace, name: str, make: Callable[[dict], object]) -> tuple[Proc, bool, str]:
    import timm

    import ofbdeploy.models.zoo  # noqa: F401  (the pico config, when no other case imported it)
    from ofbdeploy.arch import ArchSpec
    from ofbdeploy.families.vit.support import read_vit_shape
    from ofbdeploy.latency.lut import LatencyLUT, LutKey, arch_features

    shape = read_vit_shape(timm.create_model(PICO, img_size=16), PICO)
    coefficients = [0.05, 2e-4, 1e-6, 3e-5, 4e-3, 8e-7, 2e-5]
    dense = float(arch_features(ArchSpec.dense(shape)) @ coefficients)
    good = LatencyLUT(LutKey("cpu", "ort-cpu", "fp32", 1, 16, PICO), shape, coefficients, dense).to_dict()
    where = ws.new_dir(name)
    content = make(good)
    (where / "lut.json").write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    search = {**TINY["search"], "target_flops_ratio": None,
              "latency": {"target_ratio": 0.6, "lut": str(where / "lut.json"), "backend": "ort-cpu", "batch": 1}}
    result = ws.cli("run", ws.recipe(where, search=search))
    return result, not (where / "run").exists(), "nothing written" if not (where / "run").exists() else "run dir made"


case("luts", "LUT file that is not JSON", 2)(lambda ws: lut_case(ws, "lut-json", lambda d: b"\x00\x01 not json"))
case("luts", "LUT of another model", 2)(
    lambda ws: lut_case(ws, "lut-model", lambda d: {**d, "shape": {**d["shape"], "embed_dim": 128}}))
case("luts", "LUT with negative coefficients", 2)(
    lambda ws: lut_case(ws, "lut-neg", lambda d: {**d, "coefficients": [-1.0] * 7}))
case("luts", "LUT of an older format", 2)(lambda ws: lut_case(ws, "lut-fmt", lambda d: {**d, "format": "x/1"}))
case("luts", "LUT of another batch", 2)(lambda ws: lut_case(ws, "lut-batch", lambda d: {**d, "key": {**d["key"],
                                                                                                    "batch": 8}}))
case("luts", "LUT missing its coefficients", 2)(
    lambda ws: lut_case(ws, "lut-missing", lambda d: {k: v for k, v in d.items() if k != "coefficients"}))
case("luts", "LUT of an unknown model family", 2)(
    lambda ws: lut_case(ws, "lut-family", lambda d: {**d, "family": "convnext"}))
case("luts", "LUT with a shape of the wrong family", 2)(
    lambda ws: lut_case(ws, "lut-shape", lambda d: {**d, "family": "swin"}))
