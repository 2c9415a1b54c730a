"""The phantom's normal anatomy, one function per structure, in the normalised body frame.

Each step either returns the masks later steps need (lungs, heart, hila) or adds its density to
the image; render._phantom calls them in a fixed order (the order of the additions is part of
the pixels: tests/test_phantom_pixels.py pins them). Findings live in findings.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from chestfed.sites.phantom.anatomy import HEART_SPLIT, Anatomy
from chestfed.sites.phantom.raster import grid, ramp, upsample, where32


@dataclass(frozen=True)
class Frame:
    """Body-frame coordinates of every pixel and the patient's smooth texture fields."""

    size: int
    e: float  # edge softness: ~2.5 px at any size
    u: np.ndarray  # across, (1,S)
    v: np.ndarray  # down, (S,1)
    au: np.ndarray  # |u|
    left: np.ndarray  # patient left (image right)
    s: np.ndarray  # |u| broadcast to (S,S): distance from the midline
    coarse: np.ndarray  # standard-normal fields upsampled from 9, 20 and 44 knots
    mid: np.ndarray
    fine: np.ndarray

    def side_mask(self, side: int) -> np.ndarray:
        """Soft mask of one side (0 = patient right, 1 = patient left)."""
        return ramp(self.u if side == 1 else -self.u, self.e)


def frame(a: Anatomy, size: int) -> Frame:
    X, Y = grid(size)
    u = (X - a.cx) / a.k  # (1,S)
    v = (Y - a.cy) / a.k  # (S,1)
    au = np.abs(u)
    rng_fields = np.random.default_rng([int(a.vals[47] * 2**31), 0x464C44])
    coarse = upsample(rng_fields.standard_normal((9, 9)).astype(np.float32), size)
    mid = upsample(rng_fields.standard_normal((20, 20)).astype(np.float32), size)
    fine = upsample(rng_fields.standard_normal((44, 44)).astype(np.float32), size)
    return Frame(size=size, e=5.0 / size, u=u, v=v, au=au, left=u > 0,
                 s=np.broadcast_to(au, (size, size)), coarse=coarse, mid=mid, fine=fine)


def body_outline(f: Frame, a: Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """Trunk with sloping shoulders plus the neck, soft tissue thicker in the middle, and the
    humeral heads in the upper corners. Returns (body mask, image so far)."""
    e, u, v, au = f.e, f.u, f.v, f.au
    Bv = a.B + 0.07 * np.exp(-(((v + 0.70) / 0.22) ** 2)) - 0.05 * np.clip(v - 0.4, 0, 1)
    shoulder = -0.95 + 0.20 * (au / a.B) ** 2
    trunk = ramp(Bv - au, e) * ramp(v - shoulder, e)
    body = np.maximum(trunk, ramp(0.19 - au, e))
    uB = u / Bv
    thick = np.sqrt(np.clip(1 - uB * uB, 0, 1))
    img = body * (0.30 + 0.42 * thick)
    hq_ = ((au - (a.B + 0.03)) / 0.10) ** 2 + ((v + 0.70) / 0.11) ** 2
    img = img + 0.14 * ramp(1 - hq_, 0.3) * trunk
    return body, img


@dataclass(frozen=True)
class Lungs:
    sa: float  # centre, half-width and apex height of the upper (elliptic) lung
    ra: float
    hy: float
    q: np.ndarray  # elliptic distance (< 1 inside)
    eq: float  # edge softness in q units
    lung_lat: np.ndarray  # inside the lateral/apical outline, ignoring the diaphragm
    dome: np.ndarray  # diaphragm height per column
    lung: np.ndarray  # aerated lung: the outline above the dome
    depth: np.ndarray  # lung thickness towards the centre of each lung


def lungs(f: Frame, a: Anatomy) -> Lungs:
    """Upper part elliptic (apex), lower part bounded laterally at T, floor = the diaphragm's dome."""
    s, v, e = f.s, f.v, f.e
    sa, ra, hy = (a.T + a.s_med) / 2, (a.T - a.s_med) / 2, a.y_w - a.y_apex
    q = ((s - sa) / ra) ** 2 + (np.minimum(v - a.y_w, 0) / hy) ** 2
    eq = 2.0 * e / ra
    lung_lat = ramp(1 - q, eq)
    dome = diaphragm(f, a)
    return Lungs(sa=sa, ra=ra, hy=hy, q=q, eq=eq, lung_lat=lung_lat, dome=dome,
                 lung=lung_lat * ramp(dome - v, e), depth=np.sqrt(np.clip(1 - q, 0, 1)))


def diaphragm(f: Frame, a: Anatomy) -> np.ndarray:
    """Height of each hemidiaphragm's dome: peaks mid-lung, meets the costophrenic angle laterally."""
    peak, wd = 0.42 * a.T, 0.58 * a.T
    bd = np.abs((f.s - peak) / wd)
    bump = np.clip(1 - bd * bd * np.sqrt(bd), 0, 1)
    y_cpa = where32(f.left, a.y_cpa[1], a.y_cpa[0])
    return y_cpa - a.H * bump


def heart_and_mediastinum(f: Frame, a: Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """Heart (asymmetric ellipse, sheared so the apex points down-left) and the mediastinum with
    the aortic knob. Returns (heart, everything central)."""
    u, v, e = f.u, f.v, f.e
    uh = u - a.hx - 0.22 * (v - a.yc)
    half = where32(uh < 0, HEART_SPLIT * a.W, (1 - HEART_SPLIT) * a.W)
    hb = where32(v < a.yc, 1.35 * a.hb, a.hb)  # gentler upper (left atrial/pulmonary) contour
    hq = (uh / half) ** 2 + ((v - a.yc) / hb) ** 2
    heart = ramp(1 - hq, 1.2 * e / a.W)  # ~1 px edge: the CTR is measured on it
    # The mediastinum widens into the heart so the cardiac outline grows out of it.
    mw = np.clip((v - (a.yc - 0.45)) / 0.4, 0, 1)
    med_half = 0.10 + 0.015 * a.vals[9] + 0.04 * mw * mw
    med = ramp(med_half - np.abs(u - 0.01 - 0.5 * a.hx), 2 * e)
    knob_q = ((u - 0.07 - a.hx) / 0.075) ** 2 + ((v - (a.yc - 0.50)) / 0.07) ** 2
    return heart, np.maximum(np.maximum(heart, med), ramp(1 - knob_q, 0.3))


@dataclass(frozen=True)
class Hila:
    ds: np.ndarray  # offset from the hilum, across and down
    dv: np.ndarray
    r_hil: np.ndarray  # distance from the hilum
    vessels: np.ndarray  # lung markings, [0,1]


def hila_and_vessels(f: Frame, a: Anatomy) -> Hila:
    """Vessels radiate from each hilum and thin out to the periphery."""
    s, v = f.s, f.v
    v_hil = where32(f.left, a.yc - 0.36, a.yc - 0.32)
    ds, dv = s - 0.11, v - v_hil
    r_hil = np.sqrt(ds * ds + dv * dv)
    theta = np.arctan2(dv, ds)
    # Meandering radial vessels of roughly constant physical width that taper outwards and
    # merge into the hilum: cos(n*theta) thresholded at a level that scales with 1/r^2.
    r2 = r_hil * r_hil + 1e-4
    taper = np.exp(-r_hil / 0.30)
    w1 = (11.0 * 0.016) ** 2 / 2 * taper / r2
    c1 = np.cos(11.0 * theta + 1.3 * f.coarse + 5.0 * r_hil)
    v1 = np.clip((c1 - 1 + w1) / w1, 0, 1)
    w2 = (23.0 * 0.010) ** 2 / 2 * taper / r2
    c2 = np.cos(23.0 * theta - 1.0 * f.mid + 4.0 * r_hil)
    v2 = np.clip((c2 - 1 + w2) / w2, 0, 1) * np.clip(r_hil * 4 - 0.6, 0, 1)
    vessels = np.maximum(v1, 0.7 * v2) * np.clip(0.75 + 0.5 * f.fine, 0, 1) * np.clip(1.3 - r_hil, 0, 1)
    vessels = np.maximum(vessels, 0.6 * np.exp(-((ds - 0.06) ** 2 / 0.004 + dv * dv / 0.02)))  # hilar density
    return Hila(ds=ds, dv=dv, r_hil=r_hil, vessels=vessels)


def spine_and_trachea(img: np.ndarray, f: Frame, a: Anatomy) -> np.ndarray:
    """Spine with vertebral bodies and disc spaces; the trachea as a dark air column."""
    e, u, v = f.e, f.u, f.v
    spine = ramp(0.062 - f.au, e) * ramp(v + 0.95, e)
    img = img + 0.10 * spine * (0.7 + 0.3 * np.cos(2 * np.pi * v / 0.09) ** 2)
    trachea = ramp(0.028 - np.abs(u - 0.005), e) * ramp((a.yc - 0.60) - v, e)
    return img - 0.12 * trachea


def ribs(img: np.ndarray, f: Frame, a: Anatomy, dome: np.ndarray, central: np.ndarray) -> np.ndarray:
    """Posterior arcs (strong) and anterior ribs (faint), spacing widening downwards."""
    s, v, e = f.s, f.v, f.e
    sr = s / a.T
    vr = v - (-0.22 * sr + 0.50 * sr * sr) - (a.y_apex - 0.06)
    spacing = 0.105 * (1 + 0.25 * np.clip(vr, 0, 2))
    rib = np.clip((np.cos(2 * np.pi * vr / spacing) - 0.3) / 0.7, 0, 1)
    rib = np.sqrt(rib) + 0.6 * rib * (1 - rib)  # brighter cortical margins
    cage = (ramp(a.T + 0.07 - s, e) * ramp(s - 0.07, e) * ramp(vr, e) * ramp(v - a.y_apex + 0.08, 0.05)
            * (0.3 + 0.7 * ramp(dome + 0.05 - v, 0.06)))
    va = v - (a.y_apex + 0.15) + 0.35 * (sr - 1.0)
    ant = np.clip((np.cos(2 * np.pi * va / 0.13) - 0.5) / 0.5, 0, 1) * ramp(sr - 0.35, 0.1)
    return img + (0.085 * rib + 0.035 * ant) * cage * (1 - 0.6 * central)


def shoulder_girdle(img: np.ndarray, f: Frame, a: Anatomy) -> np.ndarray:
    """Clavicles (higher and flatter on AP), scapulae overlapping the lungs on AP only."""
    s, v, e = f.s, f.v, f.e
    ap = a.view == "AP"
    vcl = (-0.76 - (0.06 if ap else 0.0)) - (0.10 if ap else 0.18) * s + 0.10 * s * s
    clav = ramp(0.026 - np.abs(v - vcl), e) * ramp(s - 0.04, e) * ramp(0.62 - s, e)
    img = img + 0.16 * clav
    s_scap = (0.50 if ap else a.T + 0.03) + 0.25 * np.clip(v + 0.75, 0, 1)
    scap = ramp(s - s_scap, 2 * e) * ramp(v + 0.78, e) * ramp(-0.05 - v, 0.08) * ramp(a.B - 0.02 - s, e)
    return img + 0.05 * scap


def breasts_and_gastric_bubble(img: np.ndarray, f: Frame, a: Anatomy) -> np.ndarray:
    """Breast shadows (female), gastric air bubble under the left hemidiaphragm."""
    s, v, e = f.s, f.v, f.e
    if a.female:
        bq = ((s - 0.50 * a.T) / 0.36) ** 2 + ((v - (a.y_cpa[0] - 0.05)) / 0.26) ** 2
        img = img + 0.10 * np.sqrt(np.clip(1 - bq, 0, 1)) * ramp(a.B - s, e)
    bub = ((f.u - 0.32) / 0.08) ** 2 + ((v - (a.y_cpa[1] - a.H + 0.12)) / 0.045) ** 2
    return img - 0.12 * ramp(1 - bub, 0.4)
