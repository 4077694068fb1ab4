"""The tolerance rule every comparison of fcconv uses, on numpy arrays.

An output passes when ``max |actual - expected| <= atol + rtol * max |expected|``:
the error is measured against the reference's largest magnitude, so that scores
near zero do not make a relative error meaningless. ``fcconv verify`` compares in
torch (:func:`fcconv.verify.compare_reading`) with these tolerances; ``fcconv
check`` compares in numpy with :func:`compare_arrays`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["DEFAULT_RTOL", "RTOL_BY_DTYPE_NAME", "Comparison", "compare_arrays"]

DEFAULT_RTOL = 1e-4
# Reduced precision rounds each product and partial sum; the defaults allow for it and are reported.
RTOL_BY_DTYPE_NAME = {"float64": 1e-8, "float32": DEFAULT_RTOL, "float16": 5e-3, "bfloat16": 3e-2}


@dataclass(frozen=True)
class Comparison:
    """The largest absolute error, it relative to the reference's largest magnitude, and the allowed error."""

    max_abs: float
    max_rel: float
    tolerance: float
    passed: bool


def compare_arrays(expected: np.ndarray, actual: np.ndarray, rtol: float, atol: float) -> Comparison:
    """``actual`` against ``expected`` in float64; a NaN or infinity anywhere, or another shape, fails."""
    expected, actual = np.asarray(expected, np.float64), np.asarray(actual, np.float64)
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    tolerance = atol + rtol * scale
    if expected.shape != actual.shape:
        return Comparison(math.inf, math.inf, tolerance, False)
    diff = np.abs(actual - expected)
    finite = bool(np.isfinite(diff).all())
    max_abs = float(diff.max()) if finite and diff.size else (0.0 if finite else math.inf)
    return Comparison(max_abs, max_abs / (scale if scale > 0 else 1.0), tolerance, finite and max_abs <= tolerance)
