"""The phantom's findings inside the lungs, one function per finding.

Each adds the fraction of air it replaces with fluid or tissue to a shared opacity map
(opacities combine like independent absorbers, 1 - (1-a)(1-b)), and may hide lung markings.
Cardiomegaly is not here: it is the heart's size, set in anatomy.py. Where a finding sits is
read from the patient's fixed draws (`Anatomy.vals`), so it stays put across acquisitions.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from chestfed.sites.phantom.anatomy import Anatomy
from chestfed.sites.phantom.chest import Frame, Hila, Lungs
from chestfed.sites.phantom.raster import bbox, combine, ramp


@dataclass
class Opacities:
    opac: np.ndarray  # fraction of air replaced, [0,1]
    markings: np.ndarray  # multiplier on the lung markings (0 where a pneumothorax has none)
    ptx_gap: np.ndarray | None = None  # pneumothorax: air rim between lung and chest wall
    pleura: np.ndarray | None = None  # pneumothorax: the visceral pleural line


def _to_img(f: Frame, a: Anatomy, side: int, sv: float, vv: float) -> tuple[float, float]:
    """Image-frame position of body-frame point (distance from midline sv, height vv) on a side."""
    uu = sv if side == 1 else -sv
    return a.cx + a.k * uu, a.cy + a.k * vv


def effusion(o: Opacities, f: Frame, a: Anatomy, lu: Lungs, hi: Hila) -> None:
    """Fluid in the costophrenic angle, meniscus rising laterally; hides the dome."""
    s, v, vals = f.s, f.v, a.vals
    lung_h = a.y_cpa[0] - a.y_apex
    r = vals[10]
    sides = [0] if r < 0.4 else [1] if r < 0.7 else [0, 1]
    for side in sides:
        h = (0.07 + 0.38 * a.sev["Effusion"]) * lung_h * (0.7 if len(sides) == 2 else 1.0)
        if a.view == "AP":
            h *= 0.6  # supine: fluid layers posteriorly, less meniscus...
        base = a.y_cpa[side]
        rel = np.clip((s - a.s_med) / (a.T - a.s_med), 0, 1)
        level = base - h * (0.35 + 0.65 * rel * rel)
        fluid = lu.lung_lat * ramp(v - level, 0.06) * f.side_mask(side)
        if a.view == "AP":  # ...and a veil over the whole hemithorax
            fluid = np.maximum(fluid, 0.35 * a.sev["Effusion"] * lu.lung_lat * f.side_mask(side))
        o.opac = 1 - (1 - o.opac) * (1 - 0.95 * fluid)


def consolidation(o: Opacities, f: Frame, a: Anatomy, lu: Lungs, hi: Hila) -> None:
    """Dense airspace opacity filling part of one lobe, sharply bounded by its fissure, fading
    elsewhere, with air bronchograms."""
    s, v, e, vals = f.s, f.v, f.e, a.vals
    sv_, side = a.sev["Consolidation"], int(vals[11] < 0.5)
    lobe = vals[12]
    if lobe < 0.5:  # lower lobe: below an oblique fissure rising laterally
        fiss = (a.yc - 0.02 - 0.22 * s / a.T) - v
        sc, vc = 0.5 * a.T, a.y_cpa[side] - 0.6 * a.H - 0.08
    elif lobe < 0.75:  # upper lobe: above a horizontal-ish fissure
        fiss = v - (a.y_apex + 0.55 + 0.08 * s)
        sc, vc = 0.45 * a.T, a.y_apex + 0.30
    else:  # middle zone, against the heart border (silhouette sign)
        fiss = np.abs(v - (a.yc - 0.10)) - 0.14
        sc, vc = 0.30 * a.T, a.yc - 0.10
    R = 0.16 + 0.30 * sv_
    d2 = ((s - sc) ** 2 + (v - vc) ** 2) / (R * R)
    in_lobe = ramp(-fiss, 2 * e)
    patch = in_lobe * np.clip((1 - d2) * 1.8 + 0.5 * f.coarse, 0, 1)
    dens = np.clip(0.65 + 0.35 * f.coarse + 0.25 * f.mid, 0, 1) * (0.55 + 0.40 * sv_)
    bronch = 1 - 0.55 * hi.vessels * (hi.r_hil > 0.15)  # air-filled bronchi stay dark
    o.opac = 1 - (1 - o.opac) * (1 - dens * patch * bronch * f.side_mask(side))


def pneumonia(o: Opacities, f: Frame, a: Anatomy, lu: Lungs, hi: Hila) -> None:
    """Multifocal, patchier and fainter than consolidation, sometimes bilateral."""
    s, v, size, vals = f.s, f.v, f.size, a.vals
    sv_ = a.sev["Pneumonia"]
    g = np.zeros((size, size), np.float32)
    for k in range(3):
        side = int(vals[14 + k] < 0.5) if k < 2 or vals[17] < 0.4 else int(vals[14] < 0.5)
        sc = 0.25 + 0.35 * vals[18 + k]
        vc = -0.35 + 0.7 * vals[21 + k]
        r = (0.07 + 0.09 * sv_) * (1.0 if k == 0 else 0.75)
        xc, yc_img = _to_img(f, a, side, sc, vc)
        ext = 2.2 * r * a.k
        sl = bbox(size, xc - ext, xc + ext, yc_img - ext, yc_img + ext)
        if sl is None:
            continue
        d2 = ((s[sl] - sc) ** 2 + (v[sl[0]] - vc) ** 2) / r**2
        g[sl] = np.maximum(g[sl], np.exp(-d2) * f.side_mask(side)[:, sl[1]])
    patchy = np.clip((g * (0.8 + 0.5 * f.mid + 0.8 * f.fine) - 0.30) * 1.4, 0, 1)
    o.opac = 1 - (1 - o.opac) * (1 - (0.30 + 0.30 * sv_) * patchy)


def nodule(o: Opacities, f: Frame, a: Anatomy, lu: Lungs, hi: Hila) -> None:
    """Small round well-defined opacity."""
    s, v, vals = f.s, f.v, a.vals
    sv_, side = a.sev["Nodule"], int(vals[24] < 0.5)
    sc, vc = 0.22 + 0.45 * vals[25], a.y_apex + 0.20 + 0.75 * vals[26]
    r = 0.022 + 0.02 * sv_
    xc, yc_img = _to_img(f, a, side, sc, vc)
    ext = 1.3 * r * a.k
    sl = bbox(f.size, xc - ext, xc + ext, yc_img - ext, yc_img + ext)
    if sl is not None:
        d2 = ((s[sl] - sc) ** 2 + (v[sl[0]] - vc) ** 2) / r**2
        combine(o.opac, sl, (0.55 + 0.35 * sv_) * np.sqrt(np.clip(1 - d2, 0, 1)) ** 0.5)


def mass(o: Opacities, f: Frame, a: Anatomy, lu: Lungs, hi: Hila) -> None:
    """Larger, lobulated round opacity."""
    s, v, vals = f.s, f.v, a.vals
    sv_, side = a.sev["Mass"], int(vals[27] < 0.5)
    sc, vc = 0.25 + 0.30 * vals[28], -0.45 + 0.60 * vals[29]
    r = 0.07 + 0.08 * sv_
    xc, yc_img = _to_img(f, a, side, sc, vc)
    ext = 1.4 * r * a.k
    sl = bbox(f.size, xc - ext, xc + ext, yc_img - ext, yc_img + ext)
    if sl is not None:
        dx_, dy_ = s[sl] - sc, v[sl[0]] - vc
        ang = np.arctan2(dy_, dx_)
        rr = r * (1 + 0.12 * np.cos(3 * ang + 6.28 * vals[31]) + 0.07 * np.cos(5 * ang + 6.28 * vals[32]))
        d2 = (dx_**2 + dy_**2) / rr**2
        combine(o.opac, sl, (0.75 + 0.2 * sv_) * np.clip((1 - d2) * 4, 0, 1) ** 0.6)


def atelectasis(o: Opacities, f: Frame, a: Anatomy, lu: Lungs, hi: Hila) -> None:
    """A plate/wedge opacity in the lower zone (its dome was raised in anatomy())."""
    s, v, e, vals = f.s, f.v, f.e, a.vals
    sv_, side = a.sev["Atelectasis"], int(vals[30] < 0.55)
    v0 = a.y_cpa[side] - a.H - 0.10 - 0.12 * vals[33]
    p0 = (0.18, v0 + 0.05)
    p1 = (0.18 + 0.40 * (0.8 + 0.2 * vals[34]), v0 - 0.06 + 0.10 * vals[35])
    xa, ya = _to_img(f, a, side, *p0)
    xb, yb = _to_img(f, a, side, *p1)
    ext = 0.12
    sl = bbox(f.size, min(xa, xb) - ext, max(xa, xb) + ext, min(ya, yb) - ext, max(ya, yb) + ext)
    if sl is not None:
        d = (p1[0] - p0[0], p1[1] - p0[1])
        ss, vv = s[sl] - p0[0], v[sl[0]] - p0[1]
        t = np.clip((ss * d[0] + vv * d[1]) / (d[0] ** 2 + d[1] ** 2), 0, 1)
        dist = np.sqrt((ss - t * d[0]) ** 2 + (vv - t * d[1]) ** 2)
        thick_ = (0.015 + 0.035 * sv_) * (1 + 0.8 * sv_ * (1 - t))  # wedge towards the hilum
        band = ramp(thick_ - dist + 0.01 * f.mid[sl], 3 * e) * f.side_mask(side)[:, sl[1]]
        combine(o.opac, sl, (0.55 + 0.35 * sv_) * band)


def edema(o: Opacities, f: Frame, a: Anatomy, lu: Lungs, hi: Hila) -> None:
    """Bilateral perihilar haze (bat-wing), vessels blurred out."""
    sv_ = a.sev["Edema"]
    haze = np.exp(-(hi.ds**2 / (0.05 + 0.04 * sv_) + hi.dv**2 / (0.09 + 0.05 * sv_)))
    o.opac = 1 - (1 - o.opac) * (1 - (0.25 + 0.45 * sv_) * haze)
    o.markings = o.markings * (1 + 0.8 * sv_ * np.exp(-hi.r_hil / 0.3))


def pneumothorax(o: Opacities, f: Frame, a: Anatomy, lu: Lungs, hi: Hila) -> None:
    """The lung collapses towards its hilum; the rim is air with no markings, bounded by a thin
    visceral pleural line."""
    s, v = f.s, f.v
    sv_, side = a.sev["Pneumothorax"], int(a.vals[36] < 0.5)
    fc = 1 - (0.07 + 0.30 * sv_)
    sh, vh = 0.16, a.yc - 0.05
    s2 = sh + (s - sh) / fc
    v2 = vh + (v - vh) / fc
    q2 = ((s2 - lu.sa) / lu.ra) ** 2 + (np.minimum(v2 - a.y_w, 0) / lu.hy) ** 2
    this = f.side_mask(side)
    collapsed = ramp(1 - q2, lu.eq)
    o.ptx_gap = lu.lung * (1 - collapsed) * this
    o.markings = o.markings * (1 - o.ptx_gap)
    o.opac = 1 - (1 - o.opac) * (1 - 0.15 * sv_ * collapsed * this)
    reach = np.clip(np.hypot(s - sh, v - vh) / 0.45 - 0.3, 0, 1)
    o.pleura = np.exp(-((q2 - 1) / 0.06) ** 2) * lu.lung * this * reach


# In drawing order (the order is part of the pixels). Cardiomegaly is the heart's size.
DRAWN = (("Effusion", effusion), ("Consolidation", consolidation), ("Pneumonia", pneumonia),
         ("Nodule", nodule), ("Mass", mass), ("Atelectasis", atelectasis), ("Edema", edema),
         ("Pneumothorax", pneumothorax))


def lung_opacities(f: Frame, a: Anatomy, lu: Lungs, hi: Hila) -> Opacities:
    """Every finding present in the row (severity > 0), combined into one opacity map."""
    o = Opacities(opac=np.zeros((f.size, f.size), np.float32),
                  markings=np.ones((f.size, f.size), np.float32))
    for finding, draw in DRAWN:
        if a.sev[finding] > 0:
            draw(o, f, a, lu, hi)
    return o
