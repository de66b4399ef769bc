"""Process-wide numeric switches that training and deployment share (one TF32 policy for both)."""

from __future__ import annotations

import torch


def set_tf32(enabled: bool) -> str:
    """TF32 for torch's fp32 matrix products and cuDNN convolutions (CUDA only); returns 'tf32' or 'ieee'.

    TF32 keeps fp32's range with a 10-bit mantissa in the products: roughly 2-8x faster on Ampere and later
    and accurate enough for training and inference. CPU products are IEEE fp32 whatever this says.

    cuDNN is switched with the legacy ``allow_tf32`` only, because torch itself (``cudnn.flags()``,
    ``cudnn.set_flags()``, torch.export and inductor's convolution templates) reads that flag, and on torch >= 2.9
    reading it raises once the newer ``fp32_precision`` spelling was used (its per-operator flags then disagree
    with the legacy one). Any such setting is first handed back to the legacy flag (``"none"``).
    """
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    cudnn = torch.backends.cudnn
    if hasattr(cudnn, "fp32_precision"):
        cudnn.fp32_precision = "none"
    cudnn.allow_tf32 = enabled
    return "tf32" if enabled else "ieee"
