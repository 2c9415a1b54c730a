"""Pixels to one 2-D uint8 grayscale array, by the rules in sites/imageio.py's docstring:
bit depth scaling (not stretching), ITU-R 601-2 luminance, alpha composited onto black.

Its own module so that sites/imageio.py (files) and sites/dicom.py (DICOM pixel data) both use
the rules without importing each other.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from chestfed.sites.adapters.base import BadImageError

_SIXTEEN = {"I;16", "I;16L", "I;16B", "I;16N", "I;16S"}


def to_gray8(im: Image.Image, bits: int | None = None) -> np.ndarray:
    """A decoded Pillow image as 2-D uint8 (the rules in the module docstring)."""
    mode = im.mode
    if mode == "L":
        return np.array(im, dtype=np.uint8)
    if mode == "1":
        return np.array(im.convert("L"), dtype=np.uint8)
    if mode in _SIXTEEN or mode in ("I", "I;32", "I;32L", "I;32B"):
        return scale_to_uint8(np.asarray(im), bits)
    if mode == "F":
        return _minmax(np.asarray(im, dtype=np.float64))
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode == "PA":
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode == "LA":
        lum = np.asarray(im.getchannel("L"), dtype=np.float64)
        alpha = np.asarray(im.getchannel("A"), dtype=np.float64)
        return _composite(lum, alpha)
    if mode in ("RGBA", "RGBa"):
        if mode == "RGBa":
            im = im.convert("RGBA")
        alpha = np.asarray(im.getchannel("A"), dtype=np.float64)
        lum = np.asarray(im.convert("RGB").convert("L"), dtype=np.float64)
        return _composite(lum, alpha)
    if mode != "RGB":
        im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, I;16 variants Pillow may add
    return np.array(im.convert("L"), dtype=np.uint8)


def array_to_gray8(arr: np.ndarray, bits: int | None = None) -> np.ndarray:
    """The same rules for an in-memory array: [H, W] or [H, W, 3|4] (MedMNIST, generated data)."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        if arr.dtype == np.uint8:
            return arr
        if np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool:
            return scale_to_uint8(arr.astype(np.int64), bits)
        return _minmax(arr.astype(np.float64))
    if arr.ndim == 3 and arr.shape[2] in (3, 4) and arr.dtype == np.uint8:
        mode = "RGB" if arr.shape[2] == 3 else "RGBA"
        return to_gray8(Image.fromarray(np.ascontiguousarray(arr), mode=mode))
    raise BadImageError(f"array of shape {arr.shape} and dtype {arr.dtype} is not a grayscale, "
                        "RGB or RGBA image")


def scale_to_uint8(arr: np.ndarray, bits: int | None = None) -> np.ndarray:
    """Integer pixels to uint8 by bit depth (N >= max(8, bits) with max < 2**N), see above."""
    arr = np.asarray(arr)
    if arr.size == 0:
        return arr.astype(np.uint8)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > 65535:
        return _minmax(arr.astype(np.float64))
    depth = max(8, hi.bit_length(), int(bits or 0))
    depth = min(depth, 16)
    scale = 255.0 / float(2 ** depth - 1)
    return np.rint(arr.astype(np.float64) * scale).clip(0, 255).astype(np.uint8)


def _minmax(arr: np.ndarray) -> np.ndarray:
    finite = np.isfinite(arr)
    if not finite.any():
        return np.zeros(arr.shape, dtype=np.uint8)
    lo, hi = float(arr[finite].min()), float(arr[finite].max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    out = (np.where(finite, arr, lo) - lo) * (255.0 / (hi - lo))
    return np.rint(out).clip(0, 255).astype(np.uint8)


def _composite(lum: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return np.rint(lum * alpha / 255.0).clip(0, 255).astype(np.uint8)
