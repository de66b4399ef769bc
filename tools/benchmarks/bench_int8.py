"""int8 against fp32, dense against pruned, on CPU runtimes (ONNX Runtime, OpenVINO): what quantisation buys.

    python tools/benchmarks/bench_int8.py --arch docs/benchmarks/deit_s_cpu_flops_target_report_run5.json \\
        --batch 1 --batch 32 --backend ort-cpu --backend openvino --json docs/benchmarks/int8_deit_s_cpu.json

The pruned architecture is read from a run's report.json (``arch``: the widths an OFB search ended with); both
models get seeded random weights (latency does not depend on the values). Each is exported to fp32 ONNX and
quantised by :func:`ofbdeploy.deploy.quantize.quantize_int8` (the pipeline's CPU int8 file: weight and attention
products, per-channel symmetric int8, Q/DQ on inputs) on seeded random calibration images. ``--variants`` also
times the pruned model quantised three other ways, to show what each CPU runtime needs:
  u8-asym     uint8 asymmetric activations (ONNX Runtime's advice for x86; not valid for TensorRT)
  all-qdq     every MatMul quantised (attention products too) with Q/DQ on outputs as well (a plain
              ``quantize_static`` QDQ setup); its softmax then runs as QLinearSoftmax
  weights     the pipeline's file with ``export.int8_attention: none`` (``quantize_int8(attention=False)``): the
              weight products only, the attention products in float
All files of a batch size, on every ``--backend``, are timed alternately in one process (the profile protocol,
``measure_group``), so each ratio is measured in one run; the table gives every file against dense fp32 on the
same runtime and against dense fp32 on the first runtime, and the FLOPs limit (dense / pruned MACs). The CPU's
model and ISA flags (AVX2, AVX-512, VNNI, BF16, AMX) are in every row's ``device``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
import torch

from ofbdeploy.arch import ArchSpec, BlockSpec
from ofbdeploy.deploy.measure import measure_group
from ofbdeploy.deploy.onnx_export import export_onnx
from ofbdeploy.deploy.quantize import QUANTISED_OPS, CalibrationReader, quantize_int8, weight_products
from ofbdeploy.deploy.runtimes.registry import create_runner
from ofbdeploy.deploy.workflow import with_random_weights
from ofbdeploy.families.vit.shape import ViTShape
from ofbdeploy.families.vit.support import read_vit_shape
from ofbdeploy.models.dense import build_dense
from ofbdeploy.models.pruned import build_plain
from ofbdeploy.table import format_table


def pruned_spec(shape: ViTShape, report: Path) -> ArchSpec:
    arch = json.loads(report.read_text())["arch"]
    return ArchSpec(shape, arch["embed_dim"], tuple(BlockSpec(**b) for b in arch["blocks"]))


def variant(source: Path, target: Path, calibration: np.ndarray, kind: str) -> Path:
    """The pruned fp32 file quantised another way (study only: the pipeline writes the default)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    nodes = weight_products(onnx.load(str(source)))
    settings = {
        "u8-asym": {"activation_type": QuantType.QUInt8, "nodes_to_quantize": nodes,
                    "extra_options": {"ActivationSymmetric": False, "WeightSymmetric": True,
                                      "OpTypesToExcludeOutputQuantization": list(QUANTISED_OPS)}},
        "all-qdq": {"activation_type": QuantType.QInt8,
                    "extra_options": {"ActivationSymmetric": True, "WeightSymmetric": True}},
    }[kind]
    quantize_static(str(source), str(target), CalibrationReader(calibration), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(QUANTISED_OPS), per_channel=True, weight_type=QuantType.QInt8,
                    **settings)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--arch", type=Path, required=True, help="a report.json whose arch is the pruned model")
    parser.add_argument("--batch", type=int, action="append", help="batch sizes (repeatable; default 1)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--calibration-images", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--variants", action="store_true", help="also time the u8-asym, all-qdq and weights files")
    parser.add_argument("--backend", action="append", choices=["ort-cpu", "openvino"],
                        help="CPU runtimes to time the files on (repeatable; default ort-cpu)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--keep", type=Path, default=None, help="write the ONNX files here (for timing them again)")
    args = parser.parse_args()

    dense_model = build_dense(args.model)
    shape = read_vit_shape(dense_model, args.model)
    specs = {"dense": ArchSpec.dense(shape), "pruned": pruned_spec(shape, args.arch)}
    size = shape.img_size
    calibration = np.random.default_rng(0).standard_normal(
        (args.calibration_images, shape.in_chans, size, size)).astype(np.float32)
    rows, table = [], []
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        files: dict[tuple[str, str], Path] = {}
        for name, spec in specs.items():
            fp32 = export_onnx(with_random_weights(spec, build_plain), Path(tmp) / f"{name}.onnx", img_size=size,
                               check_inputs=torch.randn(2, shape.in_chans, size, size)).path
            files[(name, "fp32")] = fp32
            files[(name, "int8")] = quantize_int8(fp32, Path(tmp) / f"{name}-int8.onnx", calibration,
                                                  attention=True).path
        if args.variants:
            for kind in ("u8-asym", "all-qdq"):
                files[("pruned", kind)] = variant(files[("pruned", "fp32")], Path(tmp) / f"pruned-{kind}.onnx",
                                                  calibration, kind)
            files[("pruned", "weights")] = quantize_int8(files[("pruned", "fp32")], Path(tmp) / "pruned-weights.onnx",
                                                         calibration).path
        backends = args.backend or ["ort-cpu"]
        flops = specs["pruned"].macs() / specs["dense"].macs()
        for batch in args.batch or [1]:
            timed = [(backend, name, kind, path) for backend in backends for (name, kind), path in files.items()]
            runners = [create_runner(backend, onnx_path=path, precision="fp32" if kind == "fp32" else "int8",
                                     threads=args.threads) for backend, _, kind, path in timed]
            stats = measure_group(runners, batch, warmup=args.warmup, repeats=args.repeats)
            dense_fp32 = {b: s.median_ms for (b, name, kind, _), s in zip(timed, stats, strict=True)
                          if name == "dense" and kind == "fp32"}
            first = dense_fp32[backends[0]]
            for (backend, name, kind, _), s in zip(timed, stats, strict=True):
                rows.append({"backend": backend, "model": name, "file": kind, "batch": batch, "median_ms": s.median_ms,
                             "p90_ms": s.p90_ms, "repeats": s.repeats,
                             "speedup_vs_dense_fp32": dense_fp32[backend] / s.median_ms,
                             f"speedup_vs_{backends[0]}_dense_fp32": first / s.median_ms,
                             "flops_limit": 1 / flops if name == "pruned" else 1.0, "device": s.device})
                table.append((backend, name, kind, batch, f"{s.median_ms:.2f}",
                              f"{dense_fp32[backend] / s.median_ms:.2f}x", f"{first / s.median_ms:.2f}x",
                              f"{1 / flops if name == 'pruned' else 1.0:.2f}x"))
    print(f"{args.model}, pruned to {flops:.1%} of dense FLOPs ({rows[0]['device']})")
    print(format_table(("runtime", "model", "file", "batch", "median ms", "vs dense fp32",
                        f"vs {backends[0]} dense fp32", "FLOPs limit"), table))
    if args.json:
        meta = {"date": date.today().isoformat(), "model": args.model, "flops_ratio": flops,
                "machine": platform.machine(), "arch_from": str(args.arch)}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
