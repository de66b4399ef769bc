"""A latency model of the target: measured on the device, interpolated, usable inside the search loss.

Latency of a ViT is modelled as stem-and-head(E) + sum over blocks of attention(E, heads, head width) +
MLP(E, hidden width). The parts are measured with probe ViTs (plain timm models, exported and timed
through the same backends and protocol as the final models): a depth-0 probe gives the stem and head, and
probes with uniform blocks give the per-block cost of each attention and MLP configuration against a
reference block. Points between the measured ones are linearly interpolated, so the table covers every
width the search can choose (aligned or not) while measuring only a coarse grid.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.interpolate import RegularGridInterpolator
from torch import Tensor
from tqdm import tqdm

from ofbdeploy.arch import ArchSpec, ViTShape
from ofbdeploy.errors import OfbError
from ofbdeploy.grids import SearchSpace
from ofbdeploy.io import atomic_write_text

log = logging.getLogger("ofbdeploy.lut")

LUT_FORMAT = "ofbdeploy.lut/1"


@dataclass(frozen=True)
class LutKey:
    """What a table is valid for: the same device, backend, precision, batch and model family."""

    device: str
    backend: str
    precision: str
    batch: int
    img_size: int
    family: str

    def filename(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{self.family}-{self.img_size}-{self.backend}-{self.precision}-"
                                              f"b{self.batch}-{self.device}").strip("-")
        return f"{slug}.json"


def _subsample(values: Sequence[int], count: int) -> list[int]:
    """Up to ``count`` values spread evenly over ``values``, both ends included."""
    values = sorted(set(values))
    if len(values) <= count:
        return values
    picks = np.linspace(0, len(values) - 1, count).round().astype(int)
    return sorted({values[i] for i in picks})


@dataclass
class LatencyLUT:
    """Measured part latencies (ms) on a coarse grid, with interpolation in between."""

    key: LutKey
    shape: ViTShape
    embed: list[int]
    heads: list[int]
    head_widths: list[int]
    mlp: list[int]
    stem_ms: list[float]  # [embed]
    attn_ms: list[list[list[float]]]  # [embed][heads][head_widths], relative to the reference block
    mlp_ms: list[list[float]]  # [embed][mlp]
    points: int = 0
    build_seconds: float = 0.0
    probe_depth: int = 0
    calibration: tuple[float, float] = (0.0, 1.0)  # measured = a + b * raw prediction (fit on whole models)

    def __post_init__(self) -> None:
        embed, heads = np.asarray(self.embed, float), np.asarray(self.heads, float)
        widths, mlp = np.asarray(self.head_widths, float), np.asarray(self.mlp, float)
        self._attn = _interpolator([embed, heads, widths], np.asarray(self.attn_ms, float))
        self._mlp = _interpolator([embed, mlp], np.asarray(self.mlp_ms, float))
        self._stem = _interpolator([embed], np.asarray(self.stem_ms, float))

    # -- evaluation -----------------------------------------------------------------------------
    def attention(self, embed: float, heads: float, width: float) -> float:
        return float(self._attn([[embed, heads, width]])[0])

    def mlp_part(self, embed: float, hidden: float) -> float:
        return float(self._mlp([[embed, hidden]])[0])

    def stem(self, embed: float) -> float:
        return float(self._stem([[embed]])[0])

    def raw(self, spec: ArchSpec) -> float:
        """Sum of the interpolated parts, before calibration."""
        e = spec.embed_dim
        return self.stem(e) + sum(self.attention(e, b.heads, b.head_dim) + self.mlp_part(e, b.mlp_dim)
                                  for b in spec.blocks)

    def predict(self, spec: ArchSpec) -> float:
        """Predicted latency (ms) of an architecture of this family."""
        a, b = self.calibration
        return a + b * self.raw(spec)

    def tables(self, space: SearchSpace) -> dict[str, Tensor]:
        """Per-cell tables for the differentiable expected latency of a search over ``space`` (calibrated:
        the offset sits in the stem, the scale in every part)."""
        a, b = self.calibration
        stem = [a + b * self.stem(e) for e in space.embedding]
        attn = [[b * self.attention(e, n, c) for n, c in space.attention] for e in space.embedding]
        mlp = [[b * self.mlp_part(e, k) for k in space.mlp] for e in space.embedding]
        return {"stem": torch.tensor(stem), "attn": torch.tensor(attn), "mlp": torch.tensor(mlp)}

    # -- storage --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": LUT_FORMAT, "key": dataclasses.asdict(self.key), "shape": dataclasses.asdict(self.shape),
                "embed": self.embed, "heads": self.heads, "head_widths": self.head_widths, "mlp": self.mlp,
                "stem_ms": self.stem_ms, "attn_ms": self.attn_ms, "mlp_ms": self.mlp_ms, "points": self.points,
                "build_seconds": self.build_seconds, "calibration": list(self.calibration),
                "probe_depth": self.probe_depth}

    def save(self, path: Path) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> LatencyLUT:
        if not path.is_file():
            raise OfbError(f"latency table not found: {path}")
        data = json.loads(path.read_text())
        if data.get("format") != LUT_FORMAT:
            raise OfbError(f"{path}: not an ofbdeploy latency table (format {data.get('format')!r})")
        fields = {k: data[k] for k in ("embed", "heads", "head_widths", "mlp", "stem_ms", "attn_ms", "mlp_ms",
                                       "points", "build_seconds", "probe_depth")}
        return cls(LutKey(**data["key"]), ViTShape(**data["shape"]), **fields,
                   calibration=tuple(data.get("calibration", (0.0, 1.0))))


def _interpolator(axes: list[np.ndarray], values: np.ndarray) -> RegularGridInterpolator:
    """Linear interpolation (and extrapolation) over the measured grid; an axis with a single measured
    point is held constant along it."""
    for i, axis in enumerate(axes):
        if len(axis) == 1:
            axes[i] = np.asarray([axis[0], axis[0] + 1.0])
            values = np.repeat(values, 2, axis=i)
    return RegularGridInterpolator(axes, values, bounds_error=False, fill_value=None)


# -- building -------------------------------------------------------------------------------------
def _probe(shape: ViTShape, embed: int, depth: int, attn: tuple[int, int], mlp: int) -> ArchSpec:
    """A uniform probe model of ``depth`` blocks."""
    return ArchSpec.uniform(dataclasses.replace(shape, depth=depth), embed, *attn, mlp)


def _runner(spec: ArchSpec, backend: str, precision: str, batch: int, tmp: Path, threads: int | None):
    """A runner of one probe model on the backend (exported and checked like any deployed model)."""
    from ofbdeploy.deploy.workflow import DeployArtifacts, export_models, make_runner, with_random_weights
    from ofbdeploy.recipe import ExportCfg, ProfileCfg

    model = with_random_weights(spec)
    artifacts = DeployArtifacts()
    tmp = Path(tempfile.mkdtemp(dir=tmp))  # its own file: ONNX Runtime sessions open the file in prepare()
    if not backend.startswith("torch"):
        cfg = ExportCfg(fp16=precision == "fp16", trt=backend == "tensorrt", check_images=2,
                        trt_precisions=[precision] if backend == "tensorrt" else ["fp16"],
                        batch_range=(batch, batch, batch))
        artifacts = export_models({"probe": model}, tmp, cfg, img_size=spec.base.img_size,
                                  in_chans=spec.base.in_chans, check_images=torch.randn(2, spec.base.in_chans,
                                                                                        spec.base.img_size,
                                                                                        spec.base.img_size))
    return make_runner(backend, "probe", {"probe": model}, artifacts,
                       ProfileCfg(backends=[backend], precision=precision, batches=[batch], threads=threads))


def _fit(features: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Least-squares fit of measured part latencies to a linear model in the widths, clamped at zero.

    GEMM time grows linearly with a width at a fixed embedding width; fitting a line through several
    noisy points predicts better than any single point, and no part can cost less than nothing.
    """
    coef, *_ = np.linalg.lstsq(features, values, rcond=None)
    return np.clip(features @ coef, 0.0, None)


def build_lut(shape: ViTShape, space: SearchSpace, *, backend: str, precision: str, batch: int,
              embed_points: int = 4, width_points: int = 3, repeats: int = 20, threads: int | None = None,
              probe_depth: int | None = None, progress: bool = True) -> LatencyLUT:
    """Measure the probes on this machine and return the table (keyed by the device they ran on).

    Probes have uniform blocks, ``probe_depth`` of them (default: the model's own depth, so that a block
    is timed amid as many others as in the real model: cache and memory-traffic effects included). Each
    is timed alternately with the depth-0 probe of the same embedding width (the protocol's paired mode),
    so that machine noise cancels in their difference.
    """
    depth = probe_depth or shape.depth
    from ofbdeploy.deploy.measure import measure_pair

    embed = _subsample(space.embedding, embed_points)
    heads = sorted({n for n, _ in space.attention})
    widths = _subsample([c for _, c in space.attention], width_points)
    mlp = _subsample(space.mlp, width_points)
    ref_attn, ref_mlp = (heads[0], widths[0]), mlp[0]
    attn_cells = [(n, c) for n in heads for c in widths]
    jobs = [(e, (n, c), ref_mlp) for e in embed for n, c in attn_cells]
    jobs += [(e, ref_attn, k) for e in embed for k in mlp if k != ref_mlp]
    t0 = time.perf_counter()
    log.info("latency table for %s on %s %s batch %d: %d probe models (%d embedding x %d attention x %d MLP "
             "points)", shape.model_name, backend, precision, batch, len(jobs) + len(embed), len(embed),
             len(attn_cells), len(mlp))
    per_block: dict[tuple, float] = {}
    stem: dict[int, list[float]] = {e: [] for e in embed}
    device = ""
    with tempfile.TemporaryDirectory() as tmp:
        stems = {e: _runner(_probe(shape, e, 0, ref_attn, ref_mlp), backend, precision, batch, Path(tmp), threads)
                 for e in embed}
        for job in tqdm(jobs, desc="lut", disable=not progress):
            e, attn, k = job
            probe = _runner(_probe(shape, e, depth, attn, k), backend, precision, batch, Path(tmp), threads)
            base, deep = measure_pair(stems[e], probe, batch, warmup=max(3, repeats // 5), repeats=repeats)
            per_block[job] = (deep.median_ms - base.median_ms) / depth
            stem[e].append(base.median_ms)
            device = deep.device
        attn_ms, mlp_ms = [], []
        for e in embed:
            # block(E, a, m) = P(E, a, m_ref) + P(E, a_ref, m) - P(E, a_ref, m_ref), split evenly between parts.
            ref = per_block[(e, ref_attn, ref_mlp)] / 2
            a_feat = np.array([[1.0, n * c, n] for n, c in attn_cells])
            a_vals = _fit(a_feat, np.array([per_block[(e, cell, ref_mlp)] - ref for cell in attn_cells]))
            attn_ms.append(a_vals.reshape(len(heads), len(widths)).tolist())
            m_feat = np.array([[1.0, k] for k in mlp])
            mlp_ms.append(_fit(m_feat, np.array([per_block[(e, ref_attn, k)] - ref for k in mlp])).tolist())
        key = LutKey(device, backend, precision, batch, shape.img_size, shape.model_name)
        lut = LatencyLUT(key, shape, embed, heads, widths, mlp, [float(np.median(stem[e])) for e in embed],
                         attn_ms, mlp_ms, len(jobs) + len(embed), probe_depth=depth)
        lut.calibration = _calibrate(lut, space, backend, precision, batch, Path(tmp), threads, repeats)
    lut.build_seconds = time.perf_counter() - t0
    log.info("latency table built: %d probe models measured in %.1f s; calibration %.3f + %.3f x raw",
             lut.points + 2, lut.build_seconds, *lut.calibration)
    return lut


def _calibrate(lut: LatencyLUT, space: SearchSpace, backend: str, precision: str, batch: int, tmp: Path,
               threads: int | None, repeats: int) -> tuple[float, float]:
    """Affine map from the summed parts to whole-model latency, least-squares over four whole models.

    The dense, the narrowest and two intermediate uniform architectures are each timed alternately with
    the dense model; the fit absorbs what the part sums miss (per-layer overheads, memory traffic) and,
    with four points rather than two, one noisy measurement cannot tilt the whole table.
    """
    from ofbdeploy.deploy.measure import measure_pair

    shape = lut.shape

    def uniform(fraction: float) -> ArchSpec:
        def pick(values: Sequence) -> Any:
            ordered = sorted(values, key=lambda v: v[0] * v[1] if isinstance(v, tuple) else v)
            return ordered[round(fraction * (len(ordered) - 1))]

        return _probe(shape, pick(space.embedding), shape.depth, pick(space.attention), pick(space.mlp))

    dense = ArchSpec.dense(shape)
    dense_runner = _runner(dense, backend, precision, batch, tmp, threads)
    raw, measured = [], []
    for spec in (uniform(0.0), uniform(1 / 3), uniform(2 / 3)):
        other = _runner(spec, backend, precision, batch, tmp, threads)
        big, small = measure_pair(dense_runner, other, batch, warmup=max(3, repeats // 5), repeats=repeats)
        raw += [lut.raw(dense), lut.raw(spec)]
        measured += [big.median_ms, small.median_ms]
    slope, offset = np.polyfit(np.asarray(raw), np.asarray(measured), 1)
    return (float(offset), float(slope))


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "ofbdeploy" / "lut"


def load_or_build(shape: ViTShape, space: SearchSpace, *, backend: str, precision: str, batch: int,
                  cache_dir: Path | None = None, **options: Any) -> LatencyLUT:
    """The cached table for this device/backend/precision/batch/family, built and cached when missing."""
    cache_dir = cache_dir or default_cache_dir()
    wanted = LutKey(_this_device(backend), backend, precision, batch, shape.img_size, shape.model_name)
    path = cache_dir / wanted.filename()
    if path.is_file():
        lut = LatencyLUT.load(path)
        if lut.key == wanted and lut.shape == shape:
            log.info("latency table from cache: %s", path)
            return lut
    lut = build_lut(shape, space, backend=backend, precision=precision, batch=batch, **options)
    lut.save(cache_dir / lut.key.filename())
    return lut


def _this_device(backend: str) -> str:
    from ofbdeploy.deploy.backends import device_name

    wants_cuda = backend in ("ort-cuda", "ort-trt", "tensorrt") or (backend.startswith("torch")
                                                                   and torch.cuda.is_available())
    return device_name(torch.device("cuda" if wants_cuda and torch.cuda.is_available() else "cpu"))
