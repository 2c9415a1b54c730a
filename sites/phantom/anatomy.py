"""The phantom patient's anatomy: per-row measurements in the normalised body frame.

The body frame has u across, v down and the image half-width = 1 (see render.py). Everything
here is fixed by the row (its `anatomy_seed`, view, sex and severities), never by acquisition.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from chestfed.sites.phantom.spec import MODELLED

AP_MAGNIFICATION = 1.08  # the heart is further from the detector on an AP film
CTR_NORMAL = (0.41, 0.48)  # cardiothoracic ratio of a normal heart (PA)
CTR_ENLARGED = (0.50, 0.66)  # CTR for cardiomegaly severity 0+ .. 1 (PA), linear in severity
HEART_SPLIT = 0.36  # share of the heart width right of the heart's axis

_N_VALS = 48  # scalar anatomy draws per patient (fixed, so adding one never shifts the others)


def ctr_for_severity(sev: float) -> float:
    """PA cardiothoracic ratio of an enlarged heart with this cardiomegaly severity (> 0)."""
    lo, hi = CTR_ENLARGED
    return lo + (hi - lo) * float(sev)


# --- per-patient anatomy -----------------------------------------------------------------------

@dataclass(frozen=True)
class Anatomy:
    """Everything the renderer needs from a row, in body-frame units."""

    view: str
    female: bool
    cx: float  # body centre and scale in the image frame
    cy: float
    k: float
    T: float  # thorax half-width (lateral lung margin)
    B: float  # body half-width
    s_med: float
    y_apex: float
    y_w: float  # where the lung reaches full width
    y_cpa: tuple[float, float]  # costophrenic angle height per side (after volume loss)
    H: float  # diaphragm dome height
    mag: float
    ctr_pa: float
    W: float  # heart width (apparent, with magnification)
    hx: float  # heart axis
    yc: float  # heart's widest row
    hb: float  # heart half-height
    sev: dict[str, float]
    vals: tuple[float, ...]  # the patient's uniform draws, used for lesion placement


def _sev(row: Mapping[str, Any], finding: str) -> float:
    try:
        v = float(row.get(f"sev_{finding}", 0.0))
    except (TypeError, ValueError):
        return 0.0
    return 0.0 if not math.isfinite(v) else min(max(v, 0.0), 1.0)


def anatomy(row: Mapping[str, Any]) -> Anatomy:
    seed = int(row.get("anatomy_seed", 0))
    # Python floats, not numpy scalars: a float64 scalar would promote every float32 array.
    vals = tuple(np.random.default_rng([seed, 0x414E41]).random(_N_VALS).tolist())
    sev = {f: _sev(row, f) for f in MODELLED}
    ap = str(row.get("view", "PA")).upper() == "AP"
    T = 0.64 + 0.05 * vals[3]
    y_cpa = 0.56 + 0.04 * vals[6] - (0.08 if ap else 0.0)  # supine AP: lower lung volumes
    # Atelectasis: volume loss raises the hemidiaphragm on its side.
    atel_side = int(vals[30] < 0.55)  # left lower lobe collapse is the commonest
    raise_ = 0.11 * sev["Atelectasis"]
    y_cpa_r = y_cpa - 0.03 - (raise_ if atel_side == 0 else 0.0)  # the liver lifts the right dome
    y_cpa_l = y_cpa - (raise_ if atel_side == 1 else 0.0)
    H = 0.16 + 0.04 * vals[7]
    c = sev["Cardiomegaly"]
    ctr_pa = ctr_for_severity(c) if c > 0 else CTR_NORMAL[0] + (CTR_NORMAL[1] - CTR_NORMAL[0]) * vals[8]
    mag = AP_MAGNIFICATION if ap else 1.0
    W = ctr_pa * 2 * T * mag
    # Mediastinum shifts towards the collapsed side.
    hx = 0.02 + (-1 if atel_side == 0 else 1) * 0.04 * sev["Atelectasis"]
    yc = (y_cpa - H) - 0.08
    return Anatomy(
        view="AP" if ap else "PA", female=str(row.get("sex", "M")).upper() == "F",
        cx=(vals[0] - 0.5) * 0.06, cy=(vals[1] - 0.5) * 0.05, k=0.96 + 0.08 * vals[2],
        T=T, B=T + 0.12 + 0.04 * vals[4], s_med=0.05, y_apex=-0.80 + 0.05 * vals[5], y_w=-0.05,
        y_cpa=(y_cpa_r, y_cpa_l), H=H, mag=mag, ctr_pa=ctr_pa, W=W, hx=hx, yc=yc,
        hb=0.27 + 0.05 * c, sev=sev, vals=vals,
    )


def geometry(row: Mapping[str, Any], size: int) -> dict[str, float]:
    """The measurements the renderer uses for this row, in pixels at `size` (before acquisition).

    heart_width / thorax_width are widths at their widest rows; ctr is their ratio as drawn
    (AP views include the magnification); ctr_pa is the true PA-equivalent ratio.
    """
    a = anatomy(row)
    px = a.k * size / 2.0  # body-frame unit -> pixels

    def col(u: float) -> float:
        return (a.cx + a.k * u + 1.0) / 2.0 * size - 0.5

    def rowpx(v: float) -> float:
        return (a.cy + a.k * v + 1.0) / 2.0 * size - 0.5

    return {
        "heart_width": a.W * px,
        "thorax_width": 2 * a.T * px,
        "ctr": a.W / (2 * a.T),
        "ctr_pa": a.ctr_pa,
        "magnification": a.mag,
        "heart_left": col(a.hx - HEART_SPLIT * a.W),
        "heart_right": col(a.hx + (1 - HEART_SPLIT) * a.W),
        "heart_row": rowpx(a.yc),
        "thorax_left": col(-a.T),
        "thorax_right": col(a.T),
        "midline": col(0.0),
    }
