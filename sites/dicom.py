"""Read a DICOM file (what hospitals export) as one 2-D uint8 grayscale array, with pydicom.

The steps, in the order the DICOM standard's display pipeline applies them:

1. Pixel data: the first frame (a multi-frame file gives its first frame only). Compressed
   transfer syntaxes are decoded by whatever pydicom has a decoder for here: RLE and deflate
   always, JPEG baseline through Pillow, JPEG lossless / JPEG-LS through pylibjpeg-libjpeg.
   One without a decoder is an unreadable image whose reason names the transfer syntax (the cache
   lists it in bad_images.csv, or stops, per data.on_bad_image).
2. Modality LUT: RescaleSlope / RescaleIntercept (or a Modality LUT Sequence), pydicom's
   `apply_modality_lut`.
3. VOI LUT: the VOI LUT Sequence if present, else the first WindowCenter / WindowWidth (pydicom's
   `apply_voi_lut`, which prefers the LUT, as the standard does).
4. To 8-bit, once: with a VOI step, the VOI's own output range maps linearly onto 0..255 (the
   window's lower edge is 0, its upper edge 255; values outside are clipped by the window). Without
   one, min-max over the image's valid pixels (those not equal to PixelPaddingValue): the darkest
   becomes 0 and the brightest 255 (a constant image is all 0). Padding pixels become 0.
5. MONOCHROME1 (high values dark) is inverted, 255 - v, so that bone is bright as in MONOCHROME2
   and in every PNG/JPEG source.

Color DICOMs (RGB, YBR_*; rare for radiographs) become luminance by the same ITU-R 601-2 rule
as PNG/JPEG images (sites/imageio.py).
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np

from chestfed.sites.adapters.base import BadImageError
from chestfed.sites.pixels import array_to_gray8, scale_to_uint8

DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic")


def is_dicom(path: str | os.PathLike[str]) -> bool:
    """By extension, or by the 'DICM' marker after the 128-byte preamble."""
    p = os.fspath(path)
    if p.lower().endswith(DICOM_EXTENSIONS):
        return True
    try:
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def read_dicom(path: str | os.PathLike[str]) -> np.ndarray:
    """The DICOM file at `path` as 2-D uint8 (the steps in the module docstring)."""
    p = Path(path)
    try:
        import pydicom  # optional: the ImportError is handled here
        from pydicom.errors import InvalidDicomError  # optional: the ImportError is handled here
    except ImportError:  # a dependency, but say what to do if an install lacks it
        raise BadImageError(f"{p}: is DICOM, and pydicom is not installed (pip install pydicom)") \
            from None
    try:
        try:
            ds = pydicom.dcmread(p)
        except InvalidDicomError:
            # Older exports lack the 128-byte preamble; `force` reads them, and anything that is
            # not DICOM at all then has no pixel data (refused below).
            ds = pydicom.dcmread(p, force=True)
    except FileNotFoundError:
        raise BadImageError(f"{p}: file not found") from None
    except IsADirectoryError:
        raise BadImageError(f"{p}: is a directory, not an image") from None
    except Exception as exc:  # truncated header, garbage
        raise BadImageError(f"{p}: cannot be read as DICOM ({type(exc).__name__}: "
                            f"{str(exc) or 'no detail'})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise BadImageError(f"{p}: not a DICOM image (no pixel data)")
    try:
        return dataset_to_gray8(ds)
    except BadImageError as exc:
        raise BadImageError(f"{p}: {exc}") from None
    except Exception as exc:  # decoder errors: truncated pixel data, no handler, odd values
        raise BadImageError(f"{p}: {_decode_reason(ds, exc)}") from None


def dataset_to_gray8(ds) -> np.ndarray:  # ds: pydicom.Dataset
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        ds.pixel_array_options(index=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about odd-but-readable files
        raw = ds.pixel_array
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples == 3 or raw.ndim == 3:
        if raw.ndim != 3 or raw.shape[-1] != 3:
            raise BadImageError(f"pixel data of shape {raw.shape} is not one image")

        rgb = raw if raw.dtype == np.uint8 else _scale_channels(raw)
        return array_to_gray8(rgb)
    if raw.ndim != 2:
        raise BadImageError(f"pixel data of shape {raw.shape} is not one 2-D image")

    padding = ds.get("PixelPaddingValue")
    valid = None if padding is None else raw != int(padding)
    if np.issubdtype(raw.dtype, np.integer) and raw.size:
        # Every step is per value: run it once per stored value (<= 65,536 of them) and look the
        # pixels up, instead of four float passes over millions of pixels (~5x faster).
        r_lo = int(raw.min())
        span = int(raw.max()) - r_lo + 1
        if span <= 1 << 17:
            idx = np.subtract(raw, r_lo, dtype=np.int32)
            counts = np.bincount((idx if valid is None else idx[valid]).ravel(), minlength=span)
            table = _to_gray(np.arange(r_lo, r_lo + span, dtype=np.int64), ds, counts > 0)
            gray = table[idx]
        else:
            gray = _to_gray(raw, ds, valid)
    else:
        gray = _to_gray(raw, ds, valid)
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    if valid is not None:
        gray[~valid] = 0
    return gray


def _to_gray(raw: np.ndarray, ds, counted: np.ndarray | None) -> np.ndarray:
    """Stored values -> modality LUT -> VOI LUT or window -> 0..255 (uint8, same shape).

    counted: which entries count for the min-max used when there is no VOI step (None: all).
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut  # lazy: pydicom loads only when this runs

    values = np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)
    out, lo, hi = None, None, None
    use_lut = _has_voi_lut(ds)
    if use_lut or _has_window(ds):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = np.asarray(apply_voi_lut(values if not use_lut else
                                               np.rint(values).astype(np.int64), ds),
                                 dtype=np.float64)
                lo, hi = _voi_range(ds, use_lut)
        except Exception:  # a broken window (width <= 0) or LUT: fall back to min-max
            out = None
    if out is None or hi is None or lo is None or hi <= lo:
        out = values
        pick = values if counted is None else values[counted]
        lo, hi = (float(pick.min()), float(pick.max())) if pick.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros(raw.shape, dtype=np.uint8)
    return np.rint((out - lo) * (255.0 / (hi - lo))).clip(0, 255).astype(np.uint8)


def _has_voi_lut(ds) -> bool:
    seq = ds.get("VOILUTSequence")
    if not seq:
        return False
    item = seq[0]
    return item.get("LUTDescriptor") is not None and item.get("LUTData") is not None


def _has_window(ds) -> bool:
    return ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None


def _voi_range(ds, use_lut: bool) -> tuple[float, float]:
    """The output range of the VOI step: the LUT's entries, or the window's two asymptotes."""
    # lazy: pydicom loads only when this runs
    from pydicom.pixels.processing import apply_voi, apply_windowing

    if use_lut:
        desc = ds.VOILUTSequence[0].LUTDescriptor
        n, first = int(desc[0]) or 2 ** 16, int(desc[1])
        table = apply_voi(np.arange(first, first + n, dtype=np.int64), ds)
        return float(table.min()), float(table.max())
    ends = apply_windowing(np.array([-1e30, 1e30], dtype=np.float64), ds)
    return float(ends[0]), float(ends[1])


def _scale_channels(arr: np.ndarray) -> np.ndarray:
    """A >8-bit color image to uint8 by its bit depth (as sites/pixels.scale_to_uint8)."""

    return np.stack([scale_to_uint8(arr[..., c]) for c in range(3)], axis=-1)


def _decode_reason(ds, exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    try:
        ts = ds.file_meta.TransferSyntaxUID
    except AttributeError:
        ts = None
    if ts is not None and getattr(ts, "is_compressed", False):
        low = str(exc).lower()
        if "unable to decode" in low or "no pixel data decoders" in low or "missing required" \
                in low or "plugins" in low:
            hint = (" (pip install pylibjpeg-libjpeg pylibjpeg-openjpeg may add one)"
                    if "JPEG" in ts.name.upper() else "")
            return f"compressed as {ts.name} ({ts}), which no installed decoder can read{hint}"
        return f"compressed pixel data ({ts.name}) cannot be decoded ({type(exc).__name__}: {text})"
    short = re.search(r"less than expected \((\d+) vs (\d+) bytes\)", text)
    if short:
        return (f"DICOM pixel data cannot be decoded: the file is truncated ({short[1]} of "
                f"{short[2]} bytes of pixel data)")
    return f"DICOM pixel data cannot be decoded ({type(exc).__name__}: {text})"
