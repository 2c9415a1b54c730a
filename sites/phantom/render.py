"""Rendering one phantom frontal chest radiograph.

The phantom is analytic: every structure is an implicit shape in a normalised "body frame"
(u across, v down, image half-width = 1), so one image costs a few dozen vectorised numpy
operations at any size and the same patient looks the same at 64 and at 256 px.

Conventions: radiographic display (bright = dense), patient's right on the image LEFT, so the
heart bulges to the image right. Side 0 = patient right (u < 0), side 1 = patient left (u > 0).

Pipeline: anatomy + findings -> in-patient devices -> [acquisition] rotation -> blur -> contrast
curve -> noise -> collimation -> burned-in marker -> uint8. Everything before the acquisition is
fixed by the row (its `anatomy_seed` and severities); the per-image `rng` only drives acquisition
randomness (tilt, collimation, noise, device jitter), always with the same number of draws.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from scipy import ndimage

from sites.phantom.spec import MODELLED, AcquisitionSpec, MarkerSpec

log = logging.getLogger(__name__)

# Bump whenever the pixels for the same options would change (it enters the cache fingerprint).
RENDER_VERSION = 1

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


# --- cached grids and small helpers -------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1).astype(np.float32)
    return c[None, :], c[:, None]  # broadcastable X (1,S), Y (S,1)


@functools.lru_cache(maxsize=32)
def _interp(n: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pos = (np.arange(size) + 0.5) / size * (n - 1)
    i0 = np.clip(np.floor(pos).astype(int), 0, n - 2)
    w = (pos - i0).astype(np.float32)
    return i0, i0 + 1, w


def _upsample(f: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of a small square field to size x size."""
    i0, i1, w = _interp(f.shape[0], size)
    rows = f[i0] * (1 - w)[:, None] + f[i1] * w[:, None]
    return rows[:, i0] * (1 - w)[None, :] + rows[:, i1] * w[None, :]


def _ramp(x: np.ndarray | float, e: float) -> np.ndarray:
    """Soft step: 0 for x << 0, 0.5 at 0, 1 for x >> 0 (edge width e)."""
    return np.clip(np.asarray(x) / e + 0.5, 0.0, 1.0)


def _bbox(size: int, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice] | None:
    """Pixel slices covering image-frame box [x0,x1]x[y0,y1] (None if empty)."""
    j0 = max(int(math.floor((x0 + 1) / 2 * size)) - 1, 0)
    j1 = min(int(math.ceil((x1 + 1) / 2 * size)) + 1, size)
    i0 = max(int(math.floor((y0 + 1) / 2 * size)) - 1, 0)
    i1 = min(int(math.ceil((y1 + 1) / 2 * size)) + 1, size)
    if j0 >= j1 or i0 >= i1:
        return None
    return slice(i0, i1), slice(j0, j1)


@functools.lru_cache(maxsize=16)
def _centred(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = np.arange(size, dtype=np.float32) - (size - 1) / 2
    return c[None, :], c[:, None]


def _rotate(img: np.ndarray, degrees: float) -> np.ndarray:
    """Bilinear in-plane rotation about the centre, zeros outside (~4x faster than ndimage)."""
    size = img.shape[0]
    t = math.radians(degrees)
    c, s = np.float32(math.cos(t)), np.float32(math.sin(t))
    x, y = _centred(size)
    half = (size - 1) / 2 + 1  # +1: coordinates in the zero-padded image
    sx = c * x + s * y + half
    sy = c * y - s * x + half
    np.clip(sx, 0, size + 0.999, out=sx)
    np.clip(sy, 0, size + 0.999, out=sy)
    x0, y0 = sx.astype(np.int32), sy.astype(np.int32)
    fx, fy = sx - x0, sy - y0
    p = np.pad(img, 1)
    w = size + 2
    flat = p.ravel()
    i00 = y0 * w + x0
    top = flat[i00] * (1 - fx) + flat[i00 + 1] * fx
    bot = flat[i00 + w] * (1 - fx) + flat[i00 + w + 1] * fx
    return (top * (1 - fy) + bot * fy).astype(np.float32)


def _where(cond: np.ndarray, x: float, y: float) -> np.ndarray:
    """np.where for two scalars, kept float32 (np.where on Python floats gives float64)."""
    return np.where(cond, np.float32(x), np.float32(y))


def _combine(o: np.ndarray, sl: tuple[slice, slice] | None, add: np.ndarray) -> None:
    """Opacities combine like independent absorbers: 1 - (1-a)(1-b)."""
    if sl is None:
        return
    o[sl] = 1 - (1 - o[sl]) * (1 - add)


@functools.lru_cache(maxsize=32)
def _disk(radius: float) -> tuple[np.ndarray, np.ndarray]:
    r = max(radius, 0.5)
    n = int(math.ceil(r))
    dy, dx = np.mgrid[-n:n + 1, -n:n + 1]
    keep = dx**2 + dy**2 <= r * r + 0.25
    return dy[keep], dx[keep]


def _stamp(canvas: np.ndarray, xs: np.ndarray, ys: np.ndarray, radius: float, value: float) -> None:
    """Draw a thick polyline given by dense points (pixel coords): max(canvas, value) on a disk."""
    dy, dx = _disk(radius)
    xi = (np.rint(xs)[:, None] + dx[None, :]).ravel().astype(int)
    yi = (np.rint(ys)[:, None] + dy[None, :]).ravel().astype(int)
    s = canvas.shape[0]
    ok = (xi >= 0) & (xi < s) & (yi >= 0) & (yi < s)
    xi, yi = xi[ok], yi[ok]
    canvas[yi, xi] = np.maximum(canvas[yi, xi], value)


def _bezier(p: np.ndarray, n: int) -> np.ndarray:
    """Cubic Bezier through 4 control points p [4,2], n samples -> [n,2]."""
    t = np.linspace(0, 1, n)[:, None]
    return ((1 - t) ** 3 * p[0] + 3 * (1 - t) ** 2 * t * p[1] + 3 * (1 - t) * t**2 * p[2]
            + t**3 * p[3])


# --- 5x7 font for burned-in text markers (built in, so pixels never depend on system fonts) ---

_FONT: dict[str, str] = {
    "A": "01110100011000111111100011000110001", "B": "11110100011000111110100011000111110",
    "C": "01110100011000010000100001000101110", "D": "11110100011000110001100011000111110",
    "E": "11111100001000011110100001000011111", "F": "11111100001000011110100001000010000",
    "G": "01110100011000010111100011000101111", "H": "10001100011000111111100011000110001",
    "I": "01110001000010000100001000010001110", "J": "00111000100001000010000101001001100",
    "K": "10001100101010011000101001001010001", "L": "10000100001000010000100001000011111",
    "M": "10001110111010110101100011000110001", "N": "10001100011100110101100111000110001",
    "O": "01110100011000110001100011000101110", "P": "11110100011000111110100001000010000",
    "Q": "01110100011000110001101011001001101", "R": "11110100011000111110101001001010001",
    "S": "01111100001000001110000010000111110", "T": "11111001000010000100001000010000100",
    "U": "10001100011000110001100011000101110", "V": "10001100011000110001100010101000100",
    "W": "10001100011000110101101011010101010", "X": "10001100010101000100010101000110001",
    "Y": "10001100011000101010001000010000100", "Z": "11111000010001000100010001000011111",
    "0": "01110100011001110101110011000101110", "1": "00100011000010000100001000010001110",
    "2": "01110100010000100010001000100011111", "3": "11111000100010000010000011000101110",
    "4": "00010001100101010010111110001000010", "5": "11111100001111000001000011000101110",
    "6": "00110010001000011110100011000101110", "7": "11111000010001000100010000100001000",
    "8": "01110100011000101110100011000101110", "9": "01110100011000101111000010001001100",
    " ": "0" * 35, "-": "00000000000000011111000000000000000", ".": "00000000000000000000000000110001100",
}


@functools.lru_cache(maxsize=64)
def text_mask(text: str, height: int) -> np.ndarray:
    """Float mask [height, w] of `text` in the built-in 5x7 font, scaled to `height` px."""
    glyphs = [np.array([int(b) for b in _FONT.get(ch, _FONT[" "])], dtype=np.float32).reshape(7, 5)
              for ch in text.upper()]
    gap = np.zeros((7, 1), np.float32)
    m = np.concatenate([x for g in glyphs for x in (g, gap)][:-1], axis=1)
    m = np.pad(m, 1)  # room for the interpolation to fall off
    scale = max(height, 3) / 9.0
    out = ndimage.zoom(m, scale, order=1, prefilter=False, grid_mode=True, mode="grid-constant")
    return np.clip(out, 0, 1)


@functools.lru_cache(maxsize=64)
def _marker_mask(kind: str, text: str, height: int) -> np.ndarray:
    h = max(height, 3)
    if kind == "text":
        return text_mask(text, h)
    yy, xx = np.mgrid[0:h, 0:h].astype(np.float32)
    c = (h - 1) / 2.0
    if kind == "square":
        return np.ones((h, h), np.float32)
    r = np.hypot(xx - c, yy - c)
    return np.clip(c + 0.5 - r, 0, 1)  # circle


def _place_marker(img: np.ndarray, m: MarkerSpec, margins: tuple[int, int, int, int]) -> None:
    """Burn the marker into the configured corner, inside the collimated field."""
    if m.kind == "none":
        return
    size = img.shape[0]
    mask = _marker_mask(m.kind, m.text, int(round(m.size * size)))
    mh, mw = mask.shape
    mw = min(mw, size // 2)
    mh = min(mh, size // 2)
    mask = mask[:mh, :mw]
    top, bottom, left, right = margins
    pad = max(1, int(round(0.03 * size)))
    y0 = top + pad if m.position.startswith("top") else size - bottom - pad - mh
    x0 = left + pad if m.position.endswith("left") else size - right - pad - mw
    y0, x0 = min(max(y0, 0), size - mh), min(max(x0, 0), size - mw)
    sl = (slice(y0, y0 + mh), slice(x0, x0 + mw))
    img[sl] = np.maximum(img[sl], 0.97 * mask)


# --- the phantom ------------------------------------------------------------------------------

def _phantom(a: Anatomy, size: int) -> np.ndarray:
    """The anatomical phantom with its findings, float32 [size,size], ~[0,1], bright = dense."""
    X, Y = _grid(size)
    e = 5.0 / size  # edge softness: ~2.5 px at any size
    vals = a.vals
    u = (X - a.cx) / a.k  # (1,S)
    v = (Y - a.cy) / a.k  # (S,1)
    au = np.abs(u)
    left = u > 0  # patient left (image right)
    s = np.broadcast_to(au, (size, size))
    rng_fields = np.random.default_rng([int(vals[47] * 2**31), 0x464C44])
    coarse = _upsample(rng_fields.standard_normal((9, 9)).astype(np.float32), size)
    mid = _upsample(rng_fields.standard_normal((20, 20)).astype(np.float32), size)
    fine = _upsample(rng_fields.standard_normal((44, 44)).astype(np.float32), size)

    # Body: trunk with sloping shoulders plus the neck; soft tissue thicker in the middle.
    Bv = a.B + 0.07 * np.exp(-(((v + 0.70) / 0.22) ** 2)) - 0.05 * np.clip(v - 0.4, 0, 1)
    shoulder = -0.95 + 0.20 * (au / a.B) ** 2
    trunk = _ramp(Bv - au, e) * _ramp(v - shoulder, e)
    body = np.maximum(trunk, _ramp(0.19 - au, e))
    uB = u / Bv
    thick = np.sqrt(np.clip(1 - uB * uB, 0, 1))
    img = body * (0.30 + 0.42 * thick)
    # Humeral heads in the upper corners.
    hq_ = ((au - (a.B + 0.03)) / 0.10) ** 2 + ((v + 0.70) / 0.11) ** 2
    img = img + 0.14 * _ramp(1 - hq_, 0.3) * trunk

    # Lungs: upper part elliptic (apex), lower part bounded laterally at T, floor = dome.
    sa, ra, hy = (a.T + a.s_med) / 2, (a.T - a.s_med) / 2, a.y_w - a.y_apex
    q = ((s - sa) / ra) ** 2 + (np.minimum(v - a.y_w, 0) / hy) ** 2
    eq = 2.0 * e / ra
    lung_lat = _ramp(1 - q, eq)
    peak, wd = 0.42 * a.T, 0.58 * a.T
    bd = np.abs((s - peak) / wd)
    bump = np.clip(1 - bd * bd * np.sqrt(bd), 0, 1)
    y_cpa = _where(left, a.y_cpa[1], a.y_cpa[0])
    dome = y_cpa - a.H * bump
    lung = lung_lat * _ramp(dome - v, e)
    depth = np.sqrt(np.clip(1 - q, 0, 1))

    # Heart (asymmetric ellipse, sheared so the apex points down-left) and mediastinum.
    uh = u - a.hx - 0.22 * (v - a.yc)
    half = _where(uh < 0, HEART_SPLIT * a.W, (1 - HEART_SPLIT) * a.W)
    hb = _where(v < a.yc, 1.35 * a.hb, a.hb)  # gentler upper (left atrial/pulmonary) contour
    hq = (uh / half) ** 2 + ((v - a.yc) / hb) ** 2
    heart = _ramp(1 - hq, 1.2 * e / a.W)  # ~1 px edge: the CTR is measured on it
    # The mediastinum widens into the heart so the cardiac outline grows out of it.
    mw = np.clip((v - (a.yc - 0.45)) / 0.4, 0, 1)
    med_half = 0.10 + 0.015 * vals[9] + 0.04 * mw * mw
    med = _ramp(med_half - np.abs(u - 0.01 - 0.5 * a.hx), 2 * e)
    knob_q = ((u - 0.07 - a.hx) / 0.075) ** 2 + ((v - (a.yc - 0.50)) / 0.07) ** 2
    central = np.maximum(np.maximum(heart, med), _ramp(1 - knob_q, 0.3))

    # Hila and lung markings: vessels radiate from each hilum and thin out to the periphery.
    v_hil = _where(left, a.yc - 0.36, a.yc - 0.32)
    ds, dv = s - 0.11, v - v_hil
    r_hil = np.sqrt(ds * ds + dv * dv)
    theta = np.arctan2(dv, ds)
    # Meandering radial vessels of roughly constant physical width that taper outwards and
    # merge into the hilum: cos(n*theta) thresholded at a level that scales with 1/r^2.
    r2 = r_hil * r_hil + 1e-4
    taper = np.exp(-r_hil / 0.30)
    w1 = (11.0 * 0.016) ** 2 / 2 * taper / r2
    c1 = np.cos(11.0 * theta + 1.3 * coarse + 5.0 * r_hil)
    v1 = np.clip((c1 - 1 + w1) / w1, 0, 1)
    w2 = (23.0 * 0.010) ** 2 / 2 * taper / r2
    c2 = np.cos(23.0 * theta - 1.0 * mid + 4.0 * r_hil)
    v2 = np.clip((c2 - 1 + w2) / w2, 0, 1) * np.clip(r_hil * 4 - 0.6, 0, 1)
    vessels = np.maximum(v1, 0.7 * v2) * np.clip(0.75 + 0.5 * fine, 0, 1) * np.clip(1.3 - r_hil, 0, 1)
    vessels = np.maximum(vessels, 0.6 * np.exp(-((ds - 0.06) ** 2 / 0.004 + dv * dv / 0.02)))  # hilar density
    sev = a.sev

    # Lung opacities (fraction of air replaced by fluid/tissue), combined as absorbers.
    opac = np.zeros((size, size), np.float32)
    markings = np.ones((size, size), np.float32)

    def side_mask(side: int) -> np.ndarray:
        return _ramp(u if side == 1 else -u, e)

    def to_img(side: int, sv: float, vv: float) -> tuple[float, float]:
        uu = sv if side == 1 else -sv
        return a.cx + a.k * uu, a.cy + a.k * vv

    lung_h = a.y_cpa[0] - a.y_apex

    # Effusion: fluid in the costophrenic angle, meniscus rising laterally; hides the dome.
    if sev["Effusion"] > 0:
        r = vals[10]
        sides = [0] if r < 0.4 else [1] if r < 0.7 else [0, 1]
        for side in sides:
            h = (0.07 + 0.38 * sev["Effusion"]) * lung_h * (0.7 if len(sides) == 2 else 1.0)
            if a.view == "AP":
                h *= 0.6  # supine: fluid layers posteriorly, less meniscus...
            base = a.y_cpa[side]
            rel = np.clip((s - a.s_med) / (a.T - a.s_med), 0, 1)
            level = base - h * (0.35 + 0.65 * rel * rel)
            fluid = lung_lat * _ramp(v - level, 0.06) * side_mask(side)
            if a.view == "AP":  # ...and a veil over the whole hemithorax
                fluid = np.maximum(fluid, 0.35 * sev["Effusion"] * lung_lat * side_mask(side))
            opac = 1 - (1 - opac) * (1 - 0.95 * fluid)

    # Consolidation: dense airspace opacity filling part of one lobe, sharply bounded by its
    # fissure, fading elsewhere, with air bronchograms.
    if sev["Consolidation"] > 0:
        sv_, side = sev["Consolidation"], int(vals[11] < 0.5)
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
        in_lobe = _ramp(-fiss, 2 * e)
        patch = in_lobe * np.clip((1 - d2) * 1.8 + 0.5 * coarse, 0, 1)
        dens = np.clip(0.65 + 0.35 * coarse + 0.25 * mid, 0, 1) * (0.55 + 0.40 * sv_)
        bronch = 1 - 0.55 * vessels * (r_hil > 0.15)  # air-filled bronchi stay dark
        opac = 1 - (1 - opac) * (1 - dens * patch * bronch * side_mask(side))

    # Pneumonia: multifocal, patchier and fainter than consolidation, sometimes bilateral.
    if sev["Pneumonia"] > 0:
        sv_ = sev["Pneumonia"]
        g = np.zeros((size, size), np.float32)
        for f in range(3):
            side = int(vals[14 + f] < 0.5) if f < 2 or vals[17] < 0.4 else int(vals[14] < 0.5)
            sc = 0.25 + 0.35 * vals[18 + f]
            vc = -0.35 + 0.7 * vals[21 + f]
            r = (0.07 + 0.09 * sv_) * (1.0 if f == 0 else 0.75)
            xc, yc_img = to_img(side, sc, vc)
            ext = 2.2 * r * a.k
            sl = _bbox(size, xc - ext, xc + ext, yc_img - ext, yc_img + ext)
            if sl is None:
                continue
            d2 = ((s[sl] - sc) ** 2 + (v[sl[0]] - vc) ** 2) / r**2
            g[sl] = np.maximum(g[sl], np.exp(-d2) * side_mask(side)[:, sl[1]])
        patchy = np.clip((g * (0.8 + 0.5 * mid + 0.8 * fine) - 0.30) * 1.4, 0, 1)
        opac = 1 - (1 - opac) * (1 - (0.30 + 0.30 * sv_) * patchy)

    # Nodule: small round well-defined opacity.
    if sev["Nodule"] > 0:
        sv_, side = sev["Nodule"], int(vals[24] < 0.5)
        sc, vc = 0.22 + 0.45 * vals[25], a.y_apex + 0.20 + 0.75 * vals[26]
        r = 0.022 + 0.02 * sv_
        xc, yc_img = to_img(side, sc, vc)
        ext = 1.3 * r * a.k
        sl = _bbox(size, xc - ext, xc + ext, yc_img - ext, yc_img + ext)
        if sl is not None:
            d2 = ((s[sl] - sc) ** 2 + (v[sl[0]] - vc) ** 2) / r**2
            _combine(opac, sl, (0.55 + 0.35 * sv_) * np.sqrt(np.clip(1 - d2, 0, 1)) ** 0.5)

    # Mass: larger, lobulated round opacity.
    if sev["Mass"] > 0:
        sv_, side = sev["Mass"], int(vals[27] < 0.5)
        sc, vc = 0.25 + 0.30 * vals[28], -0.45 + 0.60 * vals[29]
        r = 0.07 + 0.08 * sv_
        xc, yc_img = to_img(side, sc, vc)
        ext = 1.4 * r * a.k
        sl = _bbox(size, xc - ext, xc + ext, yc_img - ext, yc_img + ext)
        if sl is not None:
            dx_, dy_ = s[sl] - sc, v[sl[0]] - vc
            ang = np.arctan2(dy_, dx_)
            rr = r * (1 + 0.12 * np.cos(3 * ang + 6.28 * vals[31]) + 0.07 * np.cos(5 * ang + 6.28 * vals[32]))
            d2 = (dx_**2 + dy_**2) / rr**2
            _combine(opac, sl, (0.75 + 0.2 * sv_) * np.clip((1 - d2) * 4, 0, 1) ** 0.6)

    # Atelectasis: a plate/wedge opacity in the lower zone (its dome was raised in anatomy()).
    if sev["Atelectasis"] > 0:
        sv_, side = sev["Atelectasis"], int(vals[30] < 0.55)
        v0 = a.y_cpa[side] - a.H - 0.10 - 0.12 * vals[33]
        p0 = (0.18, v0 + 0.05)
        p1 = (0.18 + 0.40 * (0.8 + 0.2 * vals[34]), v0 - 0.06 + 0.10 * vals[35])
        xa, ya = to_img(side, *p0)
        xb, yb = to_img(side, *p1)
        ext = 0.12
        sl = _bbox(size, min(xa, xb) - ext, max(xa, xb) + ext, min(ya, yb) - ext, max(ya, yb) + ext)
        if sl is not None:
            d = (p1[0] - p0[0], p1[1] - p0[1])
            ss, vv = s[sl] - p0[0], v[sl[0]] - p0[1]
            t = np.clip((ss * d[0] + vv * d[1]) / (d[0] ** 2 + d[1] ** 2), 0, 1)
            dist = np.sqrt((ss - t * d[0]) ** 2 + (vv - t * d[1]) ** 2)
            thick_ = (0.015 + 0.035 * sv_) * (1 + 0.8 * sv_ * (1 - t))  # wedge towards the hilum
            band = _ramp(thick_ - dist + 0.01 * mid[sl], 3 * e) * side_mask(side)[:, sl[1]]
            _combine(opac, sl, (0.55 + 0.35 * sv_) * band)

    # Edema: bilateral perihilar haze (bat-wing), vessels blurred out.
    if sev["Edema"] > 0:
        sv_ = sev["Edema"]
        haze = np.exp(-(ds**2 / (0.05 + 0.04 * sv_) + dv**2 / (0.09 + 0.05 * sv_)))
        opac = 1 - (1 - opac) * (1 - (0.25 + 0.45 * sv_) * haze)
        markings = markings * (1 + 0.8 * sv_ * np.exp(-r_hil / 0.3))

    # Pneumothorax: the lung collapses towards its hilum; the rim is air with no markings,
    # bounded by a thin visceral pleural line.
    ptx_gap = None
    if sev["Pneumothorax"] > 0:
        sv_, side = sev["Pneumothorax"], int(vals[36] < 0.5)
        f = 1 - (0.07 + 0.30 * sv_)
        sh, vh = 0.16, a.yc - 0.05
        s2 = sh + (s - sh) / f
        v2 = vh + (v - vh) / f
        q2 = ((s2 - sa) / ra) ** 2 + (np.minimum(v2 - a.y_w, 0) / hy) ** 2
        this = side_mask(side)
        collapsed = _ramp(1 - q2, eq)
        ptx_gap = lung * (1 - collapsed) * this
        markings = markings * (1 - ptx_gap)
        opac = 1 - (1 - opac) * (1 - 0.15 * sv_ * collapsed * this)
        reach = np.clip(np.hypot(s - sh, v - vh) / 0.45 - 0.3, 0, 1)
        pleura = np.exp(-((q2 - 1) / 0.06) ** 2) * lung * this * reach

    air = lung * (1 - 0.85 * central) * (1 - opac)
    base_fade = 1 - 0.15 * np.clip((v - a.y_w) / (a.y_cpa[0] - a.y_w), 0, 1)  # thinner lung at the bases
    img = img - 0.50 * air * (0.80 + 0.20 * depth) * base_fade
    img = img + 0.12 * vessels * markings * lung * (1 - 0.8 * central) * (1 - opac)
    img = img + 0.07 * heart * _ramp(dome - v, e)
    if ptx_gap is not None:
        img = img - 0.06 * ptx_gap + 0.16 * pleura

    # Spine with vertebral bodies and disc spaces; trachea as a dark air column.
    spine = _ramp(0.062 - au, e) * _ramp(v + 0.95, e)
    img = img + 0.10 * spine * (0.7 + 0.3 * np.cos(2 * np.pi * v / 0.09) ** 2)
    trachea = _ramp(0.028 - np.abs(u - 0.005), e) * _ramp((a.yc - 0.60) - v, e)
    img = img - 0.12 * trachea

    # Ribs: posterior arcs (strong) and anterior ribs (faint), spacing widening downwards.
    sr = s / a.T
    vr = v - (-0.22 * sr + 0.50 * sr * sr) - (a.y_apex - 0.06)
    spacing = 0.105 * (1 + 0.25 * np.clip(vr, 0, 2))
    rib = np.clip((np.cos(2 * np.pi * vr / spacing) - 0.3) / 0.7, 0, 1)
    rib = np.sqrt(rib) + 0.6 * rib * (1 - rib)  # brighter cortical margins
    cage = (_ramp(a.T + 0.07 - s, e) * _ramp(s - 0.07, e) * _ramp(vr, e) * _ramp(v - a.y_apex + 0.08, 0.05)
            * (0.3 + 0.7 * _ramp(dome + 0.05 - v, 0.06)))
    va = v - (a.y_apex + 0.15) + 0.35 * (sr - 1.0)
    ant = np.clip((np.cos(2 * np.pi * va / 0.13) - 0.5) / 0.5, 0, 1) * _ramp(sr - 0.35, 0.1)
    img = img + (0.085 * rib + 0.035 * ant) * cage * (1 - 0.6 * central)

    # Clavicles (higher and flatter on AP), scapulae overlapping the lungs on AP only.
    ap = a.view == "AP"
    vcl = (-0.76 - (0.06 if ap else 0.0)) - (0.10 if ap else 0.18) * s + 0.10 * s * s
    clav = _ramp(0.026 - np.abs(v - vcl), e) * _ramp(s - 0.04, e) * _ramp(0.62 - s, e)
    img = img + 0.16 * clav
    s_scap = (0.50 if ap else a.T + 0.03) + 0.25 * np.clip(v + 0.75, 0, 1)
    scap = _ramp(s - s_scap, 2 * e) * _ramp(v + 0.78, e) * _ramp(-0.05 - v, 0.08) * _ramp(a.B - 0.02 - s, e)
    img = img + 0.05 * scap

    # Breast shadows (female), gastric air bubble under the left hemidiaphragm.
    if a.female:
        bq = ((s - 0.50 * a.T) / 0.36) ** 2 + ((v - (a.y_cpa[0] - 0.05)) / 0.26) ** 2
        img = img + 0.10 * np.sqrt(np.clip(1 - bq, 0, 1)) * _ramp(a.B - s, e)
    bub = ((u - 0.32) / 0.08) ** 2 + ((v - (a.y_cpa[1] - a.H + 0.12)) / 0.045) ** 2
    img = img - 0.12 * _ramp(1 - bub, 0.4)

    img = img + 0.015 * fine * body  # faint soft-tissue texture
    return (img * body).astype(np.float32)


def _devices(img: np.ndarray, a: Anatomy, kind: str, jitter: np.ndarray) -> None:
    """Draw an in-patient device (shortcut) into the phantom, in place."""
    size = img.shape[0]

    def px(pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = (a.cx + a.k * pts[:, 0] + 1) / 2 * size - 0.5
        y = (a.cy + a.k * pts[:, 1] + 1) / 2 * size - 0.5
        return x, y

    n = 3 * size
    canvas = np.zeros_like(img)
    if kind == "chest_drain":
        # Enters the lateral chest wall low and runs up towards the apex, on the PTX side.
        side = int(a.vals[36] < 0.5) if a.sev["Pneumothorax"] > 0 else int(a.vals[37] < 0.5)
        sg = 1.0 if side == 1 else -1.0
        j = (jitter - 0.5) * 0.04
        ctrl = np.array([[a.B + 0.15, 0.45 + j[0]], [a.T - 0.05, 0.30 + j[1]],
                         [a.T - 0.06, -0.25 + j[2]], [0.42 + j[3], a.y_apex + 0.16]])
        ctrl[:, 0] *= sg
        x, y = px(_bezier(ctrl, n))
        _stamp(canvas, x, y, 1.3 * size / 256, 0.32)
        img += canvas
    elif kind == "pacemaker":
        x, y = px(_bezier(np.array([[0.44, -0.55], [0.05, -0.66], [-0.05, -0.15],
                                    [a.hx + 0.15, a.yc + 0.12]]), n))
        _stamp(canvas, x, y, 0.8 * size / 256, 0.45)
        X, Y = _grid(size)
        gu, gv = 0.48, -0.58
        gq = ((X - (a.cx + a.k * gu)) / (0.075 * a.k)) ** 4 + ((Y - (a.cy + a.k * gv)) / (0.055 * a.k)) ** 4
        np.maximum(canvas, 0.75 * _ramp(1 - gq, 0.3), out=canvas)
        img += canvas
    elif kind == "marker":
        # A radiopaque skin token (ring with a dot) near the right shoulder.
        X, Y = _grid(size)
        r = np.hypot(X - (a.cx - a.k * 0.55), Y - (a.cy - a.k * 0.80)) / a.k
        e = 5.0 / size
        ring = _ramp(0.012 - np.abs(r - 0.04), e) + _ramp(0.012 - r, e)
        img += 0.6 * np.clip(ring, 0, 1)


def render(row: Mapping[str, Any], acquisition: AcquisitionSpec, size: int,
           rng: np.random.Generator) -> np.ndarray:
    """Render one image for a population row: uint8 [size, size].

    `row` needs the population columns (view, sex, sev_<Finding>, device, anatomy_seed; missing
    severities count as 0). `rng` drives only the acquisition's randomness.
    """
    size = int(size)
    if size < 8:
        raise ValueError(f"phantom images need size >= 8, got {size}")
    a = anatomy(row)
    # Fixed number of draws whatever the options, so the noise field stays put when e.g.
    # rotation is switched on.
    u_rot, u_col, u_dev = rng.random(), rng.random(4), rng.random(4)
    img = _phantom(a, size)
    device = str(row.get("device", "") or "")
    if device and bool(row.get("shortcut_device", True)):
        _devices(img, a, device, u_dev)

    acq = acquisition
    if acq.rotation > 0:
        angle = (2 * u_rot - 1) * acq.rotation
        img = _rotate(img, angle)
    sigma = math.hypot(acq.blur, 0.5) * size / 256 if acq.blur > 0 else 0.0
    if sigma >= 0.3:
        img = ndimage.gaussian_filter(img, sigma, mode="nearest", truncate=3.0)
    img = np.clip(img, 0.0, 1.0)
    if acq.gamma != 1.0:
        img = img ** np.float32(acq.gamma)
    if acq.contrast != 1.0 or acq.brightness != 0.0:
        img = (img - 0.5) * np.float32(acq.contrast) + np.float32(0.5 + acq.brightness)
    if acq.noise > 0:
        img = img + np.float32(acq.noise) * rng.standard_normal((size, size), dtype=np.float32)
    margins = (0, 0, 0, 0)
    if acq.collimation > 0:
        frac = acq.collimation * (0.5 + 0.5 * u_col)
        margins = tuple(int(round(f * size)) for f in frac)  # top, bottom, left, right
        t, b, l, r = margins
        img[:t] = 0
        img[size - b:] = 0
        img[:, :l] = 0
        img[:, size - r:] = 0
    _place_marker(img, acq.marker, margins)
    return (np.clip(img, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
