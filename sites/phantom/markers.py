"""Burned-in markers: the built-in 5x7 font for text and the corner placement inside the field."""
from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage

from chestfed.sites.phantom.spec import MarkerSpec

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


def place_marker(img: np.ndarray, m: MarkerSpec, margins: tuple[int, int, int, int]) -> None:
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
