"""Decode a site's images to size x size uint8: the work of the cache-building processes.

Apart from sites/cache.py so that a decode worker, started fresh (spawn), imports numpy, Pillow
and the adapter's reader, not torch: each worker then costs tens of MB whatever the site's size
(sites/cache.py says why the workers are not forked).
"""
from __future__ import annotations

import pickle
from typing import Callable

import numpy as np
from PIL import Image

from chestfed.sites.adapters.base import BadImageError


def fit_to_square(img: np.ndarray, size: int, policy: str) -> np.ndarray:
    """Resize a 2-D uint8 image to size x size: squash, center_crop (keep aspect) or pad."""
    if img.shape == (size, size):
        return img
    h, w = img.shape
    if policy == "center_crop" and h != w:
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        img = img[top:top + s, left:left + s]
    elif policy == "pad" and h != w:
        s = max(h, w)
        canvas = np.zeros((s, s), dtype=np.uint8)
        top, left = (s - h) // 2, (s - w) // 2
        canvas[top:top + h, left:left + w] = img
        img = canvas
    # Pillow's reducing_gap makes large downscales both fast and alias-free.
    out = Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(out, dtype=np.uint8)


def decode_one(reader: Callable[[int, int], np.ndarray], i: int, size: int,
               policy: str) -> tuple[int, np.ndarray | None, str | None]:
    try:
        img = reader(i, size)
        if img.ndim != 2 or img.dtype != np.uint8:
            raise BadImageError(f"adapter returned {img.dtype} {img.shape}, not 2-D uint8")
        return i, fit_to_square(img, size, policy), None
    except BadImageError as exc:
        return i, None, str(exc)
    except Exception as exc:  # a decoder's own errors (truncated files, odd formats)
        return i, None, f"{type(exc).__name__}: {exc}"


def decode_chunk(reader: Callable[[int, int], np.ndarray], idx: list[int], size: int,
                 policy: str) -> list[tuple[int, np.ndarray | None, str | None]]:
    return [decode_one(reader, i, size, policy) for i in idx]


# The reader reaches each worker process once (at start-up), not once per chunk: a file-based
# reader holds every image path (~7 MB for NIH's 112,120), and pickling it per 64-image chunk
# would cost gigabytes. It travels as a file that the worker loads, not inside the spawn message:
# CPython's spawn writes that message while holding the pipe's read end itself, so a worker that
# dies before reading all of a message over the pipe buffer (64 KB) leaves its parent blocked
# forever instead of reporting a broken pool.
_WORKER_READER: Callable[[int, int], np.ndarray] | None = None


def init_worker(reader_file: str) -> None:
    global _WORKER_READER
    with open(reader_file, "rb") as f:
        _WORKER_READER = pickle.load(f)


def decode_chunk_in_worker(idx: list[int], size: int, policy: str
                           ) -> list[tuple[int, np.ndarray | None, str | None]]:
    assert _WORKER_READER is not None, "worker started without init_worker"
    return decode_chunk(_WORKER_READER, idx, size, policy)
