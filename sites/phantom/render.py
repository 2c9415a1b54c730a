"""Rendering one phantom frontal chest radiograph.

The phantom is analytic: every structure is an implicit shape in a normalised "body frame"
(u across, v down, image half-width = 1), so one image costs a few dozen vectorised numpy
operations at any size and the same patient looks the same at 64 and at 256 px.

Conventions: radiographic display (bright = dense), patient's right on the image LEFT, so the
heart bulges to the image right. Side 0 = patient right (u < 0), side 1 = patient left (u > 0).

Pipeline: anatomy (anatomy.py, chest.py) + findings (findings.py) -> in-patient devices ->
[acquisition] rotation -> blur -> contrast curve -> noise -> collimation -> burned-in marker
(markers.py) -> uint8. Everything before the acquisition is fixed by the row (its
`anatomy_seed` and severities); the per-image `rng` only drives acquisition randomness (tilt,
collimation, noise, device jitter), always with the same number of draws.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import numpy as np
from scipy import ndimage

from chestfed.sites.phantom import chest
from chestfed.sites.phantom.anatomy import Anatomy, anatomy, ctr_for_severity
from chestfed.sites.phantom.findings import Opacities, lung_opacities
from chestfed.sites.phantom.markers import place_marker
from chestfed.sites.phantom.raster import bezier, grid, ramp, rotate, stamp
from chestfed.sites.phantom.spec import AcquisitionSpec

log = logging.getLogger(__name__)

# ctr_for_severity lives in anatomy.py; the CTR test knows it as the renderer's threshold.
__all__ = ["RENDER_VERSION", "ctr_for_severity", "render"]

# Bump whenever the pixels for the same options would change (it enters the cache fingerprint,
# and tests/test_phantom_pixels.py pins the bytes of RENDER_VERSION 1).
RENDER_VERSION = 1


# --- the phantom: named anatomical steps, in drawing order ------------------------------------

def _phantom(a: Anatomy, size: int) -> np.ndarray:
    """The anatomical phantom with its findings, float32 [size,size], ~[0,1], bright = dense."""
    f = chest.frame(a, size)
    body, img = chest.body_outline(f, a)
    lungs = chest.lungs(f, a)
    heart, central = chest.heart_and_mediastinum(f, a)
    hila = chest.hila_and_vessels(f, a)
    opacities = lung_opacities(f, a, lungs, hila)
    img = _lung_fields(img, f, a, lungs, heart, central, hila, opacities)
    img = chest.spine_and_trachea(img, f, a)
    img = chest.ribs(img, f, a, lungs.dome, central)
    img = chest.shoulder_girdle(img, f, a)
    img = chest.breasts_and_gastric_bubble(img, f, a)
    img = img + 0.015 * f.fine * body  # faint soft-tissue texture
    return (img * body).astype(np.float32)


def _lung_fields(img: np.ndarray, f: chest.Frame, a: Anatomy, lungs: chest.Lungs, heart: np.ndarray,
                 central: np.ndarray, hila: chest.Hila, o: Opacities) -> np.ndarray:
    """Air darkens the lungs except where the heart or an opacity lies in front; vessel markings
    where air is; the heart's density below the dome; a pneumothorax's air rim and pleural line."""
    v, lung = f.v, lungs.lung
    air = lung * (1 - 0.85 * central) * (1 - o.opac)
    base_fade = 1 - 0.15 * np.clip((v - a.y_w) / (a.y_cpa[0] - a.y_w), 0, 1)  # thinner lung at the bases
    img = img - 0.50 * air * (0.80 + 0.20 * lungs.depth) * base_fade
    img = img + 0.12 * hila.vessels * o.markings * lung * (1 - 0.8 * central) * (1 - o.opac)
    img = img + 0.07 * heart * ramp(lungs.dome - v, f.e)
    if o.ptx_gap is not None:
        img = img - 0.06 * o.ptx_gap + 0.16 * o.pleura
    return img


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
        x, y = px(bezier(ctrl, n))
        stamp(canvas, x, y, 1.3 * size / 256, 0.32)
        img += canvas
    elif kind == "pacemaker":
        x, y = px(bezier(np.array([[0.44, -0.55], [0.05, -0.66], [-0.05, -0.15],
                                    [a.hx + 0.15, a.yc + 0.12]]), n))
        stamp(canvas, x, y, 0.8 * size / 256, 0.45)
        X, Y = grid(size)
        gu, gv = 0.48, -0.58
        gq = ((X - (a.cx + a.k * gu)) / (0.075 * a.k)) ** 4 + ((Y - (a.cy + a.k * gv)) / (0.055 * a.k)) ** 4
        np.maximum(canvas, 0.75 * ramp(1 - gq, 0.3), out=canvas)
        img += canvas
    elif kind == "marker":
        # A radiopaque skin token (ring with a dot) near the right shoulder.
        X, Y = grid(size)
        r = np.hypot(X - (a.cx - a.k * 0.55), Y - (a.cy - a.k * 0.80)) / a.k
        e = 5.0 / size
        ring = ramp(0.012 - np.abs(r - 0.04), e) + ramp(0.012 - r, e)
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
    return _acquire(img, acquisition, u_rot, u_col, rng)


def _acquire(img: np.ndarray, acq: AcquisitionSpec, u_rot: float, u_col: np.ndarray,
             rng: np.random.Generator) -> np.ndarray:
    """The site's machine and post-processing: tilt, blur, contrast curve, noise, collimation
    and the burned-in marker, then uint8."""
    size = img.shape[0]
    if acq.rotation > 0:
        angle = (2 * u_rot - 1) * acq.rotation
        img = rotate(img, angle)
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
    place_marker(img, acq.marker, margins)
    return (np.clip(img, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
