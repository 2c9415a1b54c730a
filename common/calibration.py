"""Cohen et al.'s calibration and agreement between two models (2020, section 3, Fig. 4).

`calibrate` is Eq. 1, the piecewise-linear map that sends a model's optimal operating point
(max TPR - FPR on the test set being evaluated, i.e. the oracle Youden threshold) to 0.5:
    f(x) = x / (2 opt)                     for x <= opt
    f(x) = 1 - (1 - x) / (2 (1 - opt))     otherwise,
so two models' outputs can be compared on one scale. Thresholding f(x) at 0.5 is thresholding x
at opt, so the kappa of calibrated outputs at 0.5 is the kappa at both oracle points.

`bland_altman` summarises the agreement of two calibrated outputs on the same images as
aggregates only: the mean difference (bias), its sd, and a 2-D histogram of (mean, difference)
on a fixed grid. A deployed site suppresses cells holding 1 .. min_cell - 1 images, by the
same rule as its confusion counts (common/privacy/disclosure.py); per-image points never leave a site.
Everything runs at the site (sites/scoring.py); the report draws the plot from the histogram.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

MEAN_BINS = 10  # (a + b) / 2 in [0, 1]
DIFF_BINS = 10  # a - b in [-1, 1]


def calibrate(x: Any, opt: float) -> np.ndarray:
    """Eq. 1 of Cohen et al.: scores in [0, 1] -> calibrated scores with `opt` at 0.5 (monotone,
    piecewise linear; 0 -> 0, 1 -> 1). `opt` is clipped into (0, 1) so both pieces exist."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    o = min(max(float(opt), 1e-6), 1 - 1e-6)
    return np.where(x <= o, x / (2 * o), 1 - (1 - x) / (2 * (1 - o)))


def suppress_cells(counts: Any, min_cell: int) -> list[float]:
    """Histogram counts from 1 to min_cell - 1 -> NaN (0 is kept), as
    common.disclosure.suppress_counts does for confusion counts."""
    out = [float(c) for c in np.asarray(counts, dtype=np.float64).ravel()]
    if min_cell <= 1:
        return out
    return [math.nan if 0 < c < min_cell else c for c in out]


def bland_altman(a: Any, b: Any) -> dict[str, Any]:
    """Aggregates of the agreement of calibrated scores a and b (same images; NaN pairs left
    out): n, bias = mean(a - b), sd of a - b, and `hist`, counts [MEAN_BINS x DIFF_BINS] of
    ((a + b) / 2, a - b), flattened row-major by mean bin (NaN where fewer than 2 images)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    d, m = a[ok] - b[ok], (a[ok] + b[ok]) / 2
    hist, _, _ = np.histogram2d(m, d, bins=[MEAN_BINS, DIFF_BINS], range=[[0, 1], [-1, 1]])
    n = int(ok.sum())
    return {"n": float(n), "bias": float(d.mean()) if n else math.nan,
            "sd": float(d.std(ddof=1)) if n >= 2 else math.nan, "hist": hist.ravel().tolist()}


def limits_of_agreement(bias: float, sd: float) -> tuple[float, float]:
    """Bland and Altman's 95 % limits: bias -/+ 1.96 sd."""
    return bias - 1.96 * sd, bias + 1.96 * sd
