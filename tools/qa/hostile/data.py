"""Datasets: missing roots, one class, a corrupt image, an empty folder, a batch larger than the split."""

from __future__ import annotations

import json
from pathlib import Path

from .harness import TINY, Proc, Workspace, case, consistent


def imagefolder(ws: Workspace, name: str, classes: int, corrupt: bool = False) -> Path:
    import numpy as np
    from PIL import Image

    root = ws.new_dir(name) / "images"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(12):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
                    root / split / f"class{c}" / f"{i}.jpg")
    if corrupt:
        (root / "train" / "class0" / "3.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def data_case(ws: Workspace, name: str, data: dict) -> tuple[Proc, bool, str]:
    where = ws.new_dir(name)
    out = where / "run"
    result = ws.cli("run", ws.recipe(where, data=data, export={"enabled": False}, profile={"enabled": False},
                                     budget={}))
    ok, note = consistent(out) if out.exists() else (True, "nothing written")
    report = out / "report.json"
    if report.is_file():
        top1 = json.loads(report.read_text()).get("top1_pruned")
        note += f"; finished with top-1 {top1}"
    return result, ok, note


case("data", "fashion_mnist root missing", 2)(
    lambda ws: data_case(ws, "fmnist", {"kind": "fashion_mnist", "root": "/nonexistent/fmnist"}))
case("data", "imagefolder root missing", 2)(
    lambda ws: data_case(ws, "if-missing", {"kind": "imagefolder", "root": "/nonexistent/images"}))
case("data", "imagefolder with one class (issue 10 refuses it)", 2)(
    lambda ws: data_case(ws, "if-one", {"kind": "imagefolder", "root": str(imagefolder(ws, "one", 1)),
                                        "batch_size": 4, "eval_batch_size": 4}))
case("data", "imagefolder with a corrupt JPEG (issue 10: skipped and counted, or refused)", (0, 2))(
    lambda ws: data_case(ws, "if-corrupt", {"kind": "imagefolder", "root": str(imagefolder(ws, "bad", 2, True)),
                                            "batch_size": 4, "eval_batch_size": 4}))
case("data", "imagefolder that is empty", 2)(
    lambda ws: data_case(ws, "if-empty", {"kind": "imagefolder", "root": str(ws.new_dir("emptyimgs"))}))
case("data", "batch_size larger than the training split", 2)(
    lambda ws: data_case(ws, "bigbatch", {**TINY["data"], "batch_size": 4096}))
