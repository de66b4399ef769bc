"""How closely a deployed file must match its reference, per precision: one table for ONNX and engine checks.

The logit tolerance is relative to the logit scale, ``rtol * max(1, max |reference logit|)``: absolute for small
logits and relative for large ones, because reduced precision rounds relative to the magnitude of what it rounds
(fp16 keeps ~3 significant digits, TF32 the same mantissa, int8 a step of its per-tensor scale). The top-1
agreement floor is what the precision is really judged on; int8's logits can move by a fair part of their scale
while its predictions (and its measured accuracy, reported beside it) hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ofbdeploy.errors import OfbError


@dataclass(frozen=True)
class Tolerance:
    """Allowed max |diff| relative to the logit scale, and the minimum top-1 agreement."""

    rtol: float
    min_top1_agreement: float

    def max_abs_diff(self, reference: np.ndarray) -> float:
        return self.rtol * max(1.0, float(np.abs(reference).max()))


TOLERANCES = {
    "fp32": Tolerance(rtol=1e-3, min_top1_agreement=0.99),
    "tf32": Tolerance(rtol=2e-2, min_top1_agreement=0.98),  # fp32 engines built with TensorRT's TF32 flag
    "fp16": Tolerance(rtol=5e-2, min_top1_agreement=0.98),
    "int8": Tolerance(rtol=0.25, min_top1_agreement=0.90),
}


def tolerance_for(precision: str, *, tf32: bool = False) -> Tolerance:
    """The row of ``TOLERANCES`` for a file of ``precision`` (fp32 computed with TF32 when ``tf32``)."""
    key = "tf32" if precision == "fp32" and tf32 else precision
    if key not in TOLERANCES:
        raise OfbError(f"parity: no tolerance for precision {precision!r}; known: fp32, fp16, int8")
    return TOLERANCES[key]


@dataclass(frozen=True)
class Parity:
    """One comparison's figures; ``ok`` when within ``tolerance`` (non-finite outputs never are)."""

    max_abs_diff: float
    top1_agreement: float
    tolerance: float
    min_top1_agreement: float
    images: int

    @property
    def ok(self) -> bool:
        finite = bool(np.isfinite(self.max_abs_diff))  # inf or NaN outputs fail whatever the tolerance
        return finite and self.max_abs_diff <= self.tolerance and self.top1_agreement >= self.min_top1_agreement

    def describe(self) -> str:
        return (f"max |diff| {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g}), top-1 agreement "
                f"{self.top1_agreement:.3f} (minimum {self.min_top1_agreement:.3f}) on {self.images} images")


def compare(got: np.ndarray, reference: np.ndarray, max_abs_diff: float, min_top1_agreement: float) -> Parity:
    """Max absolute difference and the fraction of rows whose argmax agrees, against the two limits."""
    got64, ref64 = np.asarray(got, np.float64), np.asarray(reference, np.float64)
    if got64.shape != ref64.shape:
        raise OfbError(f"parity: output shape {got64.shape}, reference {ref64.shape}")
    diff = float(np.abs(got64 - ref64).max()) if np.isfinite(got64).all() else float("inf")
    agreement = float((got64.argmax(axis=1) == ref64.argmax(axis=1)).mean())
    return Parity(diff, agreement, max_abs_diff, min_top1_agreement, len(ref64))
