"""Top-1/top-5 of exported files on a CPU runtime (ONNX Runtime, OpenVINO): what a deployed precision really costs.

The torch evaluation measures the models; this measures the files that ship (fp32, fp16, int8 Q/DQ) on the
runtime that runs them, so "pruned int8 loses x points against pruned fp32" is a like-for-like statement.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from ofbdeploy.deploy.runtimes import registry

RUNTIME = "ort-cpu"  # the runtime every exported file is evaluated on; others on request (profile.backends)


def file_accuracy(path: Path, batches: Iterable[tuple[Tensor, Tensor]], runtime: str = RUNTIME
                  ) -> dict[str, float | int]:
    """Top-1 and top-5 (percent) of the ONNX file ``path`` on ``runtime`` over ``(images, labels)`` batches."""
    classify = registry.get(runtime).open_classifier(path)
    top1 = top5 = seen = 0
    for images, labels in batches:
        logits = classify(np.ascontiguousarray(images.numpy(), dtype=np.float32))
        truth = labels.numpy()[:, None]
        ranked = np.argsort(-logits, axis=1)[:, :5]
        top1 += int((ranked[:, :1] == truth).sum())
        top5 += int((ranked == truth).any(axis=1).sum())
        seen += len(truth)
    return {"top1": 100.0 * top1 / max(seen, 1), "top5": 100.0 * top5 / max(seen, 1), "images": seen}


def accuracy_entry(model: str, precision: str, path: Path, batches: Iterable[tuple[Tensor, Tensor]],
                   runtime: str = RUNTIME) -> dict[str, Any]:
    """One row of report.json's ``accuracy`` list."""
    return {"model": model, "precision": precision, "runtime": runtime, **file_accuracy(path, batches, runtime),
            "path": str(path)}
