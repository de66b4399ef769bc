"""What every stage of a run works with: the recipe, the run's paths, this process's place in a torchrun
group, the batch plan, and the data and models the recipe names (each built once per process).

The context knows nothing about stages or their order: the driver (:mod:`ofbdeploy.run.driver`) decides what
runs, the stage bodies (:mod:`ofbdeploy.run.stages`) do the work, and ``ofbdeploy export``/``profile`` use a
context of a finished run without any of the driver's machinery (:mod:`ofbdeploy.run.target`).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ofbdeploy.arch import ModelShape
from ofbdeploy.deploy.accuracy import RUNTIME as ACCURACY_RUNTIME
from ofbdeploy.deploy.accuracy import accuracy_entry
from ofbdeploy.deploy.quantize import INT8_TENSORRT
from ofbdeploy.deploy.runtimes import registry
from ofbdeploy.deploy.workflow import DeployArtifacts
from ofbdeploy.errors import InputError
from ofbdeploy.families import family_of, read_shape
from ofbdeploy.latency.lut import LatencyLUT
from ofbdeploy.models.dense import build_dense, load_weights
from ofbdeploy.models.hub import model_source
from ofbdeploy.models.pruned import load_pruned
from ofbdeploy.numerics import set_tf32
from ofbdeploy.prune.budget import check_budget, resolve_target
from ofbdeploy.prune.registry import get_method
from ofbdeploy.recipe import Recipe
from ofbdeploy.run.paths import RunPaths
from ofbdeploy.search.searchable import SearchableModel
from ofbdeploy.train.batching import plan_batch
from ofbdeploy.train.data import DataSpec, build_datasets, build_loader
from ofbdeploy.train.distributed import Dist, init_distributed, leave
from ofbdeploy.train.schedule import scaled_lr

log = logging.getLogger("ofbdeploy.run")

CPU_MATMUL = "ieee (cpu)"


class RunContext:
    """One process's view of a run: recipe, paths, distributed place, batch plan, data and models."""

    def __init__(self, recipe: Recipe, dist: Dist, *, resume: bool = False, progress: bool = True,
                 fp32_matmul: str = CPU_MATMUL) -> None:
        self.recipe, self.dist, self.resume, self.progress = recipe, dist, resume, progress
        self.fp32_matmul = fp32_matmul
        self.paths = RunPaths(Path(recipe.output_dir))
        self.batch = plan_batch(recipe.data.batch_size, dist.world_size, recipe.data.max_batch_per_process)
        self._data: tuple | None = None

    @classmethod
    def start(cls, recipe: Recipe, *, resume: bool = False, progress: bool = True) -> RunContext:
        """Join the torchrun group when launched by it (one voice on the console: rank 0) and set the
        recipe's fp32-product policy on a GPU."""
        dist = init_distributed(recipe.device, recipe.dist_timeout_min)
        if not dist.is_main:
            logging.getLogger("ofbdeploy").setLevel(logging.ERROR)
        fp32_matmul = set_tf32(not recipe.strict_fp32) if dist.device.type == "cuda" else CPU_MATMUL
        return cls(recipe, dist, resume=resume, progress=progress, fp32_matmul=fp32_matmul)

    def part(self) -> bool:
        """Dissolve the process group (after the last collective stage); True when this process is done."""
        main = self.dist.is_main
        self.dist = leave(self.dist)
        return not main

    # -- data ------------------------------------------------------------------------------------------
    def data(self) -> tuple:
        """Train set, val set and class count (built once per process)."""
        if self._data is None:
            d, img = self.recipe.data, self.img_size()
            spec = DataSpec(kind=d.kind, root=d.root, img_size=img, val_fraction=d.val_fraction, seed=self.recipe.seed,
                            limit_train=d.limit_train, limit_val=d.limit_val, hflip=d.augment.hflip,
                            crop_padding=d.augment.crop_padding, random_erasing=d.augment.random_erasing,
                            randaugment=d.augment.randaugment)
            self._data = build_datasets(spec)
        return self._data

    @functools.cached_property
    def source(self) -> tuple[str, Path | None]:
        """The timm architecture to build and the weights file to load (a local checkpoint or hub weights)."""
        m = self.recipe.model
        return model_source(m.name, m.checkpoint, m.pretrained)

    @functools.cached_property
    def _img_size(self) -> int:
        m = self.recipe.model
        if m.img_size is not None:
            return m.img_size
        return int(build_dense(self.source[0], **m.overrides).patch_embed.img_size[0])

    def img_size(self) -> int:
        """The model's input size: the recipe's, or the named model's own."""
        return self._img_size

    def loader(self, train: bool):
        """Training batches of the per-process micro-batch size (see :attr:`batch`), or evaluation batches."""
        train_set, val_set, _ = self.data()
        d = self.recipe.data
        size = self.batch.micro if train else d.eval_batch_size
        return build_loader(train_set if train else val_set, batch_size=size, train=train, workers=d.workers,
                            seed=self.recipe.seed, distributed=self.dist.enabled,
                            repeats=d.repeated_aug if train else 1, device=self.dist.device)

    def log_precision_and_batch(self) -> None:
        """The run log says how the batch is split and what the learning rates become, and the precision."""
        r, b = self.recipe, self.batch
        log.info("precision: amp %s, fp32 products %s%s", r.amp, self.fp32_matmul,
                 " (strict_fp32)" if r.strict_fp32 and self.dist.device.type == "cuda" else "")
        if r.amp != "off" and self.dist.device.type == "cpu":
            log.warning("amp %s on the CPU (%s): autocast runs, but without native half-precision products (AMX, "
                        "AVX512-BF16/FP16) it is several times slower than fp32", r.amp,
                        torch.backends.cpu.get_cpu_capability())
        lrs = ", ".join(f"{name} {lr:.3g} -> {scaled_lr(lr, b.global_batch):.3g}" for name, lr in
                        (("pretrain", r.pretrain.lr), *r.search.learning_rates().items(), ("finetune", r.finetune.lr)))
        (log.warning if b.global_batch != b.requested else log.info)(
            "batch: %s; learning rates per 256 images x %d/256: %s", b.describe(), b.global_batch, lrs)

    # -- models ----------------------------------------------------------------------------------------
    def build_dense_model(self) -> torch.nn.Module:
        m = self.recipe.model
        num_classes = m.num_classes or self.data()[2]
        return build_dense(self.source[0], num_classes=num_classes, img_size=self.img_size(), **m.overrides)

    def load_dense(self) -> torch.nn.Module:
        model = self.build_dense_model()
        model.load_state_dict(load_file(str(self.paths.dense_weights)))
        return model.to(self.dist.device).eval()

    def space(self, shape: ModelShape):
        return family_of(shape).space(shape, self.recipe.search.align)

    def searchable(self, dense: torch.nn.Module) -> SearchableModel:
        shape = read_shape(dense, self.source[0])
        return family_of(shape).searchable(dense, self.space(shape), self.source[0],
                                           **self.recipe.search.searchable_options())

    def deploy_models(self) -> dict[str, torch.nn.Module]:
        """The dense and the finetuned pruned model, on the CPU: the deploy code takes them from here."""
        return {"dense": self.load_dense().cpu(), "pruned": load_pruned(self.paths.finetuned)}

    def onnx_accuracy(self, artifacts: DeployArtifacts) -> list[dict[str, Any]]:
        """Top-1/top-5 of every exported ONNX file a CPU runs, over the validation split (or the recipe's sample
        of it): on ONNX Runtime CPU, and on every other CPU runtime the profile measures (OpenVINO)."""
        val = self.data()[1]
        limit = self.recipe.export.accuracy_images
        if limit is not None and limit < len(val):
            order = torch.randperm(len(val), generator=torch.Generator().manual_seed(self.recipe.seed))
            val = torch.utils.data.Subset(val, order[:limit].tolist())
        loader = build_loader(val, batch_size=self.recipe.data.eval_batch_size, train=False,
                              workers=self.recipe.data.workers, seed=self.recipe.seed)
        runtimes = [ACCURACY_RUNTIME] + [b for b in self.recipe.profile.backends
                                         if b != ACCURACY_RUNTIME and registry.get(b).classifier is not None
                                         and registry.get(b).missing() is None]
        entries = []
        for key, path in artifacts.onnx.items():
            model, _, precision = key.partition("-")
            if precision == INT8_TENSORRT:  # TensorRT's file: checked against torch at export, not run on a CPU
                continue
            for runtime in runtimes:
                entry = accuracy_entry(model, precision or "fp32", Path(path), loader, runtime)
                log.info("%s accuracy of %s: top-1 %.2f%%, top-5 %.2f%% on %d images", runtime, key, entry["top1"],
                         entry["top5"], entry["images"])
                entries.append(entry)
        return entries

    # -- inputs ----------------------------------------------------------------------------------------
    def check_inputs(self) -> None:
        """Fail in seconds, not after pretraining, and before the run directory is touched: the data is
        there, the model builds and is prunable, its checkpoint reads and fits, the budget can be met, a
        given latency table is one of this model and target."""
        try:
            self.data()
            model = self.build_dense_model()
        except (MemoryError, RuntimeError) as err:  # sizes the recipe allows but this machine cannot hold
            if not isinstance(err, MemoryError) and "allocate" not in str(err):
                raise
            raise InputError(f"model.img_size {self.recipe.model.img_size or '(the model default)'}: the data or "
                             f"the model does not fit in memory ({type(err).__name__}: {str(err)[:120]})") from None
        if self.source[1] is not None:
            load_weights(model, self.source[1])
        shape = read_shape(model, self.source[0])
        get_method(self.recipe.search.method).check(shape.family)
        check_budget(resolve_target(self.recipe.search, shape), self.space(shape), shape)
        lat = self.recipe.search.latency_target
        if lat is not None and lat.lut:
            LatencyLUT.load(Path(lat.lut)).check_fits(shape, lat.backend, lat.precision, lat.batch,
                                                      "search.latency.lut")
