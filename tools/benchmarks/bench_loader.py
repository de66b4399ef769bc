"""Throughput of the ImageFolder input pipeline alone (JPEG decode + timm's training augmentation), in
images per second per loader worker, on an ImageFolder of ImageNet-sized JPEGs that this tool writes; also
images per CPU-second (what one dedicated core sustains, whatever else the machine is running).

No model runs: this is the CPU budget a training process needs from its loader workers. The images are
the 20 ImageNet photos that foolbox ships (random crops re-encoded at ImageNet's typical size and JPEG
quality) when foolbox is installed, else smooth synthetic pictures; the figure is only as good as that.

    python tools/benchmarks/bench_loader.py --images 512 --workers 0,1,2 --json docs/benchmarks/loader_cpu.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ofbdeploy.deploy.runtimes.base import device_name
from ofbdeploy.train.checkpoint import seed_epoch
from ofbdeploy.train.data import DataSpec, build_datasets, build_loader

IMAGENET_MEDIAN_SIZE = (500, 375)  # width x height of most ImageNet training JPEGs
JPEG_QUALITY = 90


def _sources(rng: np.random.Generator) -> tuple[list[Image.Image], str]:
    """Real photos (foolbox's ImageNet samples) when available, else smooth random colour fields."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("foolbox")
        folder = Path(spec.origin).parent / "data" if spec and spec.origin else None
    except (ImportError, ValueError):
        folder = None
    photos = sorted(folder.glob("imagenet_*")) if folder is not None and folder.is_dir() else []
    if photos:
        return [Image.open(p).convert("RGB") for p in photos], "foolbox's ImageNet photos"
    fields = []
    for _ in range(8):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        fields.append(Image.fromarray(small).resize((640, 480), Image.BICUBIC))
    return fields, "synthetic colour fields"


def write_image_folder(root: Path, images: int, classes: int, size: tuple[int, int], seed: int = 0) -> str:
    """root/{train,val}/<class>/*.JPEG of ``size``; returns where the pictures came from."""
    rng = np.random.default_rng(seed)
    sources, origin = _sources(rng)
    width, height = size
    for split, count in (("train", images), ("val", max(classes, images // 10))):
        for i in range(count):
            src = sources[int(rng.integers(len(sources)))]
            scale = rng.uniform(1.0, 1.6)
            w, h = int(width / scale), int(height / scale)
            w, h = min(w, src.width), min(h, src.height)
            left, top = int(rng.integers(0, src.width - w + 1)), int(rng.integers(0, src.height - h + 1))
            picture = src.crop((left, top, left + w, top + h)).resize(size, Image.BICUBIC)
            folder = root / split / f"class{i % classes:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            picture.save(folder / f"{i:06d}.JPEG", quality=JPEG_QUALITY)
    return origin


def _cpu_seconds() -> tuple[float, float]:
    """CPU seconds used so far by this process and by its finished children (the loader's workers).

    A wall-clock rate depends on what else the machine runs; CPU time per image does not.
    """
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time(), children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512, help="training images written (and read per repeat)")
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224, help="training crop size")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts (0: in this process)")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the data per worker count (median)")
    parser.add_argument("--randaugment", default="rand-m9-mstd0.5-inc1", help="as recipes/deit_s_50.yaml")
    parser.add_argument("--root", type=Path, default=None, help="an existing ImageFolder instead of writing one")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # "per worker" means one core each, the main process (workers 0) included
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        source = "given folder"
        if root is None:
            root = Path(tmp)
            source = write_image_folder(root, args.images, args.classes, IMAGENET_MEDIAN_SIZE)
        spec = DataSpec("imagefolder", root=str(root), img_size=args.img_size, hflip=0.5,
                        randaugment=args.randaugment, random_erasing=0.25)
        train, _, _ = build_datasets(spec)
        rows = []
        for workers in (int(w) for w in args.workers.split(",")):
            loader = build_loader(train, batch_size=args.batch, train=True, workers=workers, seed=0)
            rates, per_cpu_second = [], []
            for epoch in range(args.repeats):
                seed_epoch(0, epoch, loader)
                start, cpu = time.perf_counter(), _cpu_seconds()
                count = sum(len(labels) for _, labels in loader)  # workers exit (and are counted) at the end
                rates.append(count / (time.perf_counter() - start))
                main_cpu, worker_cpu = (after - before for after, before in zip(_cpu_seconds(), cpu, strict=True))
                per_cpu_second.append(count / (worker_cpu if workers else main_cpu))
            rate, cpu_rate = statistics.median(rates), statistics.median(per_cpu_second)
            rows.append({"workers": workers, "images_per_s": rate, "images_per_s_per_worker": rate / max(workers, 1),
                         "images_per_cpu_s": cpu_rate})
            print(f"workers {workers}: {rate:.1f} images/s ({rate / max(workers, 1):.1f} per worker); "
                  f"{cpu_rate:.1f} images per CPU-second of decoding and augmenting", flush=True)
    result = {"images": len(train), "source": source, "jpeg_size": list(IMAGENET_MEDIAN_SIZE),
              "img_size": args.img_size, "augment": f"RRC + flip + {args.randaugment} + erasing 0.25 (on device)",
              "device_name": device_name(torch.device("cpu")), "threads_per_worker": 1, "rows": rows}
    print(json.dumps(result, indent=1))
    if args.json is not None:
        result["date"] = date.today().isoformat()
        result["command"] = "python tools/benchmarks/bench_loader.py " + " ".join(sys.argv[1:])
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
