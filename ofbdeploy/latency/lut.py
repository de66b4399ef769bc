"""A latency model of the target: measured on the device, fitted, usable inside the search loss.

Latency is modelled as a non-negative combination of the work counts the model family names
(``shape.latency_features``): for a ViT, the stem-and-head's fixed cost and width, and per block its
attention GEMMs, attention matmuls, softmax, MLP GEMMs and activation; for a Swin the same kinds of work
counted with each stage's tokens and window, plus its patch mergings. The coefficients are fitted to whole
probe models exported and timed through the same backends and protocol as the final models: uniform ones
on a coarse grid of widths, and random uneven ones like the architectures a search ends with. Every probe
is timed alternately with the dense model and enters the fit as a fraction of it, so a machine that is
busier or quieter from one probe to the next does not bend the table. The fitted model interpolates (and
extrapolates) smoothly to every width the search can choose, aligned or not, from a few dozen measured
models.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import nnls
from torch import Tensor
from tqdm import tqdm

from ofbdeploy.arch import ArchSpec, BlockSpec, ModelShape
from ofbdeploy.deploy.config import ExportCfg, ProfileCfg
from ofbdeploy.deploy.measure import measure_pair
from ofbdeploy.deploy.runtimes import registry
from ofbdeploy.deploy.workflow import DeployArtifacts, export_models, make_runner, with_random_weights
from ofbdeploy.errors import OfbError
from ofbdeploy.families import family_of, shape_from_dict
from ofbdeploy.io import atomic_write_text, read_json

log = logging.getLogger("ofbdeploy.lut")

LUT_FORMAT = "ofbdeploy.lut/2"


@dataclass(frozen=True)
class LutKey:
    """What a table is valid for: the same device, backend, precision, batch and model family."""

    device: str
    backend: str
    precision: str
    batch: int
    img_size: int
    family: str

    def filename(self, shape: ModelShape) -> str:
        """The cache file of this key for models of ``shape`` (a digest of the latency-relevant shape keeps,
        e.g., a layer-scale variant apart; the classifier's width is left out, see :func:`latency_shape`)."""
        slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{self.family}-{self.img_size}-{self.backend}-{self.precision}-"
                                              f"b{self.batch}-{self.device}").strip("-")
        fields = dataclasses.asdict(latency_shape(shape))
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
        return f"{slug}-{digest}.json"


def latency_shape(shape: ModelShape) -> ModelShape:
    """``shape`` without its number of classes: the classifier is one E x classes product next to
    billions of multiply-accumulates, so a table measured with a 1000-class head serves a 10-class model of
    the same family (and `ofbdeploy lut build` serves a recipe that finetunes to its own classes)."""
    return dataclasses.replace(shape, num_classes=0)


@dataclass
class LatencyLUT:
    """Fitted part latencies (ms) of one model family on one device/backend/precision/batch.

    ``coefficients`` weigh the family's work counts (:attr:`features`, from ``shape.latency_feature_names``).
    ``probes`` keeps every measured model (as a fraction of dense, times ``dense_ms``), so a table can be
    re-fitted and audited.
    """

    key: LutKey
    shape: Any  # the family's dense shape (a ModelShape)
    coefficients: list[float]
    dense_ms: float  # median of every dense measurement taken while building
    probes: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    fit_error: dict[str, float] = dataclasses.field(default_factory=dict)  # relative, on the probes
    points: int = 0
    build_seconds: float = 0.0
    threads: int | None = None  # the probes' runtime threads (None: the runtime's own count)
    # The fastest dense measurement while building: the quiet host's, by which the latency loop tells a loaded host
    # before its first round (on a shared VM the median can be a loaded one: 60.4 ms median, 51 ms quiet).
    quiet_dense_ms: float | None = None

    def __post_init__(self) -> None:
        if len(self.coefficients) != len(self.features):
            raise OfbError(f"latency table: expected {len(self.features)} coefficients for a {self.shape.family} "
                           f"model, got {len(self.coefficients)}")

    @property
    def features(self) -> tuple[str, ...]:
        """The names of the work counts the coefficients weigh."""
        return self.shape.latency_feature_names

    # -- evaluation -----------------------------------------------------------------------------
    def predict(self, spec: ArchSpec) -> float:
        """Predicted latency (ms) of an architecture of this family."""
        return float(arch_features(spec) @ np.asarray(self.coefficients))

    # -- learning -------------------------------------------------------------------------------
    def learn(self, spec: ArchSpec, fraction: float, source: str = "fit") -> bool:
        """Add a measured model (its latency as a ``fraction`` of dense, measured alternately with it) to the
        probes and fit the coefficients again on all of them, so the next prediction on this device starts
        from what was measured. Too few models for the coefficients (a hand-made table without probes) keep
        them as they are; returns whether the table was fitted again."""
        self.probes.append({**_probe_record(spec), "ms": self.dense_ms * fraction, "source": source})
        specs = [ArchSpec(self.shape, p["embed"], tuple(BlockSpec(*blk) for blk in p["blocks"])) for p in self.probes]
        if len(specs) < len(self.features):
            return False
        self.coefficients, errors = fit_coefficients(specs, [p["ms"] for p in self.probes])
        for probe, err in zip(self.probes, errors, strict=True):
            probe["fit_error"] = float(err)
        self.fit_error = {"median_abs": float(np.median(np.abs(errors))), "max_abs": float(np.max(np.abs(errors)))}
        self.points = len(specs)
        return True

    # -- storage --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": LUT_FORMAT, "key": dataclasses.asdict(self.key), "family": self.shape.family,
                "shape": dataclasses.asdict(self.shape), "features": list(self.features),
                "coefficients": self.coefficients, "dense_ms": self.dense_ms,
                "fit_error": self.fit_error, "points": self.points, "build_seconds": self.build_seconds,
                "threads": self.threads, "quiet_dense_ms": self.quiet_dense_ms,
                "probes": self.probes}

    def save(self, path: Path) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> LatencyLUT:
        """Read and validate a table file; anything malformed is one :class:`OfbError` naming the file."""
        path = Path(path)
        if not path.is_file():
            raise OfbError(f"latency table not found: {path}")
        data = read_json(path, "latency table")
        if data.get("format") != LUT_FORMAT:
            raise OfbError(f"{path}: not an ofbdeploy latency table of format {LUT_FORMAT} (found "
                           f"{str(data.get('format'))[:40]!r}); rebuild it with `ofbdeploy lut build`")
        try:
            return cls._from_dict(data)
        except (OfbError, KeyError, TypeError, ValueError) as err:
            reason = f"missing field {err.args[0]!r}" if isinstance(err, KeyError) else str(err)
            raise OfbError(f"{path}: not a valid latency table ({reason})"[:400]) from None

    @classmethod
    def _from_dict(cls, data: dict[str, Any]) -> LatencyLUT:
        key, shape = data["key"], data["shape"]
        if not isinstance(key, dict) or set(key) != {f.name for f in dataclasses.fields(LutKey)}:
            raise OfbError("key: expected device, backend, precision, batch, img_size and family")
        for name in ("device", "backend", "precision", "family"):
            _expect(isinstance(key[name], str), f"key.{name}: expected a string")
        for name in ("batch", "img_size"):
            _expect(_is_int(key[name]) and key[name] >= 1, f"key.{name}: expected a positive integer")
        shape = shape_from_dict(data.get("family", "vit"), shape)  # tables of format 2 before Swin: ViTs
        coefficients = data["coefficients"]
        _expect(isinstance(coefficients, list) and all(_is_number(c) and c >= 0 for c in coefficients),
                "coefficients: expected a list of non-negative numbers")
        _expect(_is_number(data["dense_ms"]) and data["dense_ms"] > 0, "dense_ms: expected a positive number")
        _expect(isinstance(data.get("probes", []), list), "probes: expected a list")
        fit_error = data.get("fit_error", {})
        _expect(isinstance(fit_error, dict) and all(_is_number(v) for v in fit_error.values()),
                "fit_error: expected an object of numbers")
        _expect(_is_int(data.get("points", 0)), "points: expected an integer")
        _expect(_is_number(data.get("build_seconds", 0.0)), "build_seconds: expected a number")
        threads = data.get("threads")
        _expect(threads is None or (_is_int(threads) and threads >= 1), "threads: expected a positive integer or null")
        quiet = data.get("quiet_dense_ms")
        _expect(quiet is None or (_is_number(quiet) and quiet > 0),
                "quiet_dense_ms: expected a positive number or null")
        fields = {k: data[k] for k in ("coefficients", "dense_ms", "probes", "fit_error", "points", "build_seconds",
                                       "threads", "quiet_dense_ms")
                  if k in data}
        return cls(LutKey(**key), shape, **fields)

    def check_fits(self, shape: ModelShape, backend: str, precision: str, batch: int, source: str) -> None:
        """Refuse a table of another model family or target than the search it is given to."""
        k = self.key
        if latency_shape(self.shape) != latency_shape(shape):
            s = self.shape
            raise OfbError(f"{source}: the latency table is for {s.model_name or 'another model'} ({s.family}, "
                           f"{'/'.join(map(str, s.embed_dims))} wide, {s.depth} deep, {s.img_size} px), "
                           f"not for this run's model")
        if (k.backend, k.precision, k.batch) != (backend, precision, batch):
            raise OfbError(f"{source}: the latency table was measured on {k.backend} {k.precision} batch {k.batch}, "
                           f"the recipe targets {backend} {precision} batch {batch}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise OfbError(message)


def _probe_record(spec: ArchSpec) -> dict[str, Any]:
    return {"embed": list(spec.embed_dims), "blocks": [[b.heads, b.head_dim, b.mlp_dim] for b in spec.blocks]}


def arch_features(spec: ArchSpec) -> np.ndarray:
    """The work counts the latency model weighs for ``spec`` (the family's ``latency_features``: the same
    function the search's expected latency evaluates, so the fit and the search cannot disagree)."""
    blocks = spec.blocks
    counts = spec.base.latency_features([float(e) for e in spec.embed_dims],
                                        [(float(b.heads), float(b.attn_dim)) for b in blocks],
                                        [float(b.mlp_dim) for b in blocks])
    return np.asarray(counts, dtype=float)


def fit_coefficients(specs: Sequence[ArchSpec], latency_ms: Sequence[float]) -> tuple[list[float], np.ndarray]:
    """Non-negative least squares of the latency model on measured whole models, in relative error.

    Non-negative because no unit of work makes a model faster (a noisy probe cannot turn a slope
    negative); relative because a 1 ms miss matters more on a 10 ms model than on a 100 ms one. Columns
    are scaled to unit size first so the solver sees a well-conditioned problem. Returns the coefficients
    and the relative error of the fit on each model.
    """
    x = np.stack([arch_features(s) for s in specs])
    y = np.asarray(latency_ms, float)
    scale = np.maximum(np.abs(x).max(axis=0), 1e-12)
    coef, _ = nnls(x / scale / y[:, None], np.ones_like(y))
    coef = coef / scale
    return coef.tolist(), x @ coef / y - 1


# -- building -------------------------------------------------------------------------------------
def _pick(values: Sequence, at: float) -> Any:
    """The value at relative position ``at`` (0 narrowest, 1 widest) of a grid (attention cells by size)."""
    ordered = sorted(dict.fromkeys(values), key=lambda v: v[0] * v[1] if isinstance(v, tuple) else v)
    return ordered[round(float(np.clip(at, 0.0, 1.0)) * (len(ordered) - 1))]


def sample_arch(shape: ModelShape, space: Any, fraction: float, rng: np.random.Generator,
                spread: float = 0.3) -> ArchSpec:
    """A random uneven architecture around ``fraction`` of each grid (0 narrowest, 1 dense), every stage's
    embedding at ``fraction`` of its own grid.

    Searched models differ block to block; fitting and checking the table on such models, rather than on
    uniform ones only, tests it where it is used.
    """
    def jitter() -> float:
        return fraction + rng.uniform(-spread, spread)

    spaces = space.stage_spaces
    blocks = []
    for i in range(shape.depth):
        grids = spaces[shape.stage_of(i)]
        blocks.append(BlockSpec(*_pick(grids.attention, jitter()), _pick(grids.mlp, jitter())))
    return ArchSpec(shape, tuple(_pick(s.embedding, fraction) for s in spaces), tuple(blocks))


def _spec_at(shape: ModelShape, space: Any, embed: float, heads: float, width: float, mlp: float) -> ArchSpec:
    """Every stage at the same relative positions of its own grids (0 narrowest, 1 widest) and all blocks
    of a stage alike: a uniform model, whatever the stages' sizes."""
    spaces = space.stage_spaces
    blocks = []
    for i in range(shape.depth):
        grids = spaces[shape.stage_of(i)]
        cell = (_pick([n for n, _ in grids.attention], heads), _pick([c for _, c in grids.attention], width))
        blocks.append(BlockSpec(*cell, _pick(grids.mlp, mlp)))
    return ArchSpec(shape, tuple(_pick(s.embedding, embed) for s in spaces), tuple(blocks))


def spec_runner(spec: ArchSpec, backend: str, precision: str, batch: int, tmp: Path, threads: int | None = None,
                model: torch.nn.Module | None = None, images: Tensor | None = None, export: ExportCfg | None = None):
    """A runner of ``model`` (default: a model of ``spec`` with random weights) on the backend, exported and
    checked like any deployed model: an int8 target runs the int8 file, calibrated on ``images`` (real images
    for a trained model; random ones otherwise) and checked on them. ``export`` is the run's export section,
    so that the files timed are laid out as the run's own (opset, int8 layout, calibration method)."""
    model = model if model is not None else with_random_weights(spec, family_of(spec.base).build_plain)
    artifacts = DeployArtifacts()
    tmp = Path(tempfile.mkdtemp(dir=tmp))  # its own file: ONNX Runtime sessions open the file in prepare()
    artifact = registry.get(backend).artifact
    if artifact != "module":
        engine = artifact == "engine"
        cfg = (export or ExportCfg()).model_copy(update={
            "fp16": precision == "fp16", "int8": precision == "int8", "trt": engine, "check_images": 2,
            "trt_precisions": [precision] if engine else ["fp16"], "batch_range": (batch, batch, batch)})
        b = spec.base
        images = images if images is not None else torch.randn(2, b.in_chans, b.img_size, b.img_size)
        int8 = precision == "int8"  # its check needs every image; the others' export checks are cheaper on two
        artifacts = export_models({"probe": model}, tmp, cfg, img_size=b.img_size, in_chans=b.in_chans,
                                  check_images=images if int8 else images[:2],
                                  calibration=images.numpy() if int8 else None)
    return make_runner(backend, "probe", {"probe": model}, artifacts,
                       ProfileCfg(backends=[backend], precision=precision, batches=[batch], threads=threads))


def _positions(grid: Sequence, count: int) -> list[float]:
    """Relative positions of up to ``count`` values spread evenly over ``grid``, both ends included."""
    n = min(count, len(set(grid)))
    return [0.0] if n == 1 else [k / (n - 1) for k in range(n)]


def probe_set(shape: ModelShape, space: Any, embed_points: int = 4, width_points: int = 3,
              random_points: int = 16, seed: int = 0) -> list[ArchSpec]:
    """The models a table is fitted on: the narrowest, uniform ones on a coarse grid (every head count of
    the first stage's grid times ``width_points`` head widths with the narrowest MLP, and ``width_points``
    MLP widths with the narrowest attention, at each of ``embed_points`` embedding widths; a Swin's stages
    at the same relative positions of their grids) and ``random_points`` uneven ones from narrow to dense."""
    first = space.stage_spaces[0]
    embed = _positions(first.embedding, embed_points)
    heads = _positions([n for n, _ in first.attention], len(first.attention))
    widths = _positions([c for _, c in first.attention], width_points)
    mlp = _positions(first.mlp, width_points)
    specs = [_spec_at(shape, space, e, n, c, 0.0) for e in embed for n in heads for c in widths]
    specs += [_spec_at(shape, space, e, 0.0, 0.0, k) for e in embed for k in mlp[1:]]
    rng = np.random.default_rng(seed)
    specs += [sample_arch(shape, space, float(f), rng) for f in np.linspace(0.0, 1.0, random_points)]
    return [ArchSpec.narrowest(shape, space), *specs]


def build_lut(shape: ModelShape, space: Any, *, backend: str, precision: str, batch: int,
              embed_points: int = 4, width_points: int = 3, random_points: int = 16, repeats: int = 20,
              threads: int | None = None, progress: bool = True) -> LatencyLUT:
    """Measure the probes on this machine and return the fitted table (keyed by the device they ran on).

    Each probe is timed alternately with the dense model (the protocol's paired mode) and recorded as
    its fraction of that dense measurement times the median dense latency of the whole build, so slow
    and fast spells of a shared machine cancel in the ratios.
    """
    specs = probe_set(shape, space, embed_points, width_points, random_points)
    features = shape.latency_feature_names
    if len(specs) + 1 < len(features):  # the dense model is measured too
        raise OfbError(f"latency table: {len(specs) + 1} probe models cannot fit {len(features)} coefficients; "
                       "raise random_points (or embed_points, width_points)")
    dense = ArchSpec.dense(shape)
    t0 = time.perf_counter()
    log.info("latency table for %s on %s %s batch %d: %d probe models, each timed against the dense model",
             shape.model_name, backend, precision, batch, len(specs))
    fractions, dense_ms, device = [], [], ""
    with tempfile.TemporaryDirectory() as tmp:
        dense_runner = spec_runner(dense, backend, precision, batch, Path(tmp), threads)
        for spec in tqdm(specs, desc="lut", disable=None if progress else True):  # None: only on a terminal
            runner = spec_runner(spec, backend, precision, batch, Path(tmp), threads)
            d, p = measure_pair(dense_runner, runner, batch, warmup=max(3, repeats // 5), repeats=repeats)
            fractions.append(p.median_ms / d.median_ms)
            dense_ms.append(d.median_ms)
            device = p.device
    reference = float(np.median(dense_ms))
    specs, measured = [dense, *specs], [reference, *(reference * f for f in fractions)]
    coefficients, errors = fit_coefficients(specs, measured)
    probes = [{**_probe_record(s), "ms": ms, "fit_error": float(err)}
              for s, ms, err in zip(specs, measured, errors, strict=True)]
    lut = LatencyLUT(LutKey(device, backend, precision, batch, shape.img_size, shape.model_name), shape,
                     coefficients, reference, probes,
                     {"median_abs": float(np.median(np.abs(errors))), "max_abs": float(np.max(np.abs(errors)))},
                     points=len(specs), build_seconds=time.perf_counter() - t0, threads=threads,
                     quiet_dense_ms=float(min(dense_ms)))
    log.info("latency table built: %d models measured in %.1f s; dense %.3f ms; fit error median %.1f%%, max %.1f%%",
             lut.points, lut.build_seconds, reference, 100 * lut.fit_error["median_abs"],
             100 * lut.fit_error["max_abs"])
    return lut


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "ofbdeploy" / "lut"


def load_or_build(shape: ModelShape, space: Any, *, backend: str, precision: str, batch: int,
                  cache_dir: Path | None = None, **options: Any) -> LatencyLUT:
    """The cached table for this device/backend/precision/batch/family, built and cached when missing (or
    when the cached file is of an older format or another model)."""
    cache_dir = cache_dir or default_cache_dir()
    wanted = LutKey(_this_device(backend), backend, precision, batch, shape.img_size, shape.model_name)
    path = cache_dir / wanted.filename(shape)
    if path.is_file():
        try:
            lut = LatencyLUT.load(path)
        except (OfbError, ValueError, KeyError, TypeError) as err:
            log.warning("latency table cache %s unusable (%s): measuring a new one", path, err)
        else:
            if 0 < lut.points < len(lut.features):  # 0: a table that does not say (hand-made)
                log.warning("latency table cache %s was fitted on %d models for %d coefficients: measuring a new "
                            "one", path, lut.points, len(lut.features))
            elif lut.key == wanted and latency_shape(lut.shape) == latency_shape(shape):
                log.info("latency table from cache: %s", path)
                return lut
    lut = build_lut(shape, space, backend=backend, precision=precision, batch=batch, **options)
    lut.save(cache_dir / lut.key.filename(shape))
    return lut


def _this_device(backend: str) -> str:
    """The machine a table measured on ``backend`` here describes."""
    return registry.get(backend).device_name()
