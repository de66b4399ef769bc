"""Top-1/top-5 of exported files on ONNX Runtime's CPU provider: what a deployed precision really costs.

The torch evaluation measures the models; this measures the files that ship (fp32, fp16, int8 Q/DQ) on one
runtime, so "pruned int8 loses x points against pruned fp32" is a like-for-like statement.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from ofbdeploy.deploy.onnx_export import INPUT_NAME, ort_session

RUNTIME = "ort-cpu"


def onnx_accuracy(path: Path, batches: Iterable[tuple[Tensor, Tensor]]) -> dict[str, float | int]:
    """Top-1 and top-5 (percent) of the ONNX file ``path`` over ``(images, labels)`` batches."""
    session = ort_session(path, ["CPUExecutionProvider"])
    top1 = top5 = seen = 0
    for images, labels in batches:
        logits = session.run(None, {INPUT_NAME: images.numpy().astype(np.float32)})[0]
        truth = labels.numpy()[:, None]
        ranked = np.argsort(-logits, axis=1)[:, :5]
        top1 += int((ranked[:, :1] == truth).sum())
        top5 += int((ranked == truth).any(axis=1).sum())
        seen += len(truth)
    return {"top1": 100.0 * top1 / max(seen, 1), "top5": 100.0 * top5 / max(seen, 1), "images": seen}


def accuracy_entry(model: str, precision: str, path: Path, batches: Iterable[tuple[Tensor, Tensor]]) -> dict[str, Any]:
    """One row of report.json's ``accuracy`` list."""
    return {"model": model, "precision": precision, "runtime": RUNTIME, **onnx_accuracy(path, batches),
            "path": str(path)}
