"""Read any chest X-ray file a site holds as one 2-D uint8 grayscale array; join paths safely.

Conversion rules (each is tested on pixel values in tests/test_adapters_imageio.py):

- 8-bit grayscale ('L'): unchanged. Bilevel ('1'): 0/255.
- 16-bit and 32-bit integer grayscale ('I;16*', 'I'): scaled by the image's bit depth, not
  stretched. The bit depth N is the smallest N >= 8 with max(pixel) < 2**N, raised to `bits`
  when the caller knows the nominal depth (PadChest's table has BitsStored_DICOM = 10 or 12).
  The output is round(v * 255 / (2**N - 1)). So a 12-bit image (values up to 4095) and a 16-bit
  image (up to 65535) both reach 255 at their full scale, and a dark image stays dark instead of
  being contrast-stretched. Integers below 0 or above 65535 are min-max scaled instead. For a
  full-range 16-bit image this is within 1 gray level of the usual v >> 8.
- Floating point ('F'): min-max scaled to 0..255 (a constant image becomes 0).
- RGB (and CMYK, YCbCr, ...): luminance by ITU-R 601-2, L = 0.299 R + 0.587 G + 0.114 B (Pillow's
  'L' conversion), e.g. pure red -> 76, pure green -> 150, pure blue -> 29.
- RGBA / LA / palette with transparency: the luminance composited onto black, round(L * A / 255):
  a transparent pixel carries no signal, and black is 'no attenuation' on a radiograph.
  (Pillow's own convert('L') drops alpha instead; an opaque image gives the same either way.)

Every mode, at any size, is tested to be within 1 gray level of Pillow's standard conversion
(with alpha composited onto black) in tests/test_adapters_imageio.py.

DICOM files ('.dcm', or any file with the DICM marker) are read by sites/dicom.py (modality
and VOI LUTs, MONOCHROME1 inverted, first frame; its docstring has the rules).

Unreadable files (missing, truncated, not an image, bad chunk) raise BadImageError naming the path
and the reason; the cache counts them in bad_images.csv or stops, per `data.on_bad_image`.
"""
from __future__ import annotations

import errno
import functools
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from chestfed.sites.adapters.base import BadImageError, SiteDataError
from chestfed.sites.dicom import DICOM_EXTENSIONS, is_dicom, read_dicom
from chestfed.sites.pixels import to_gray8

def read_grayscale(path: str | os.PathLike[str], min_size: int | None = None,
                   bits: int | None = None) -> np.ndarray:
    """The image at `path` as a 2-D uint8 array (see the module docstring for the rules).

    min_size: for JPEG, let the decoder scale down by a power of two in the DCT domain while both
              sides stay >= min_size (much faster for large CheXpert files at small cache sizes).
    bits: the nominal bit depth of a high-bit-depth image, if known (a floor, see above).
    """
    p = Path(path)
    if p.suffix.lower() in DICOM_EXTENSIONS:
        return read_dicom(p)
    try:
        with Image.open(p) as im:
            if min_size and im.format == "JPEG":
                im.draft("L", (int(min_size), int(min_size)))
            im.load()
            return to_gray8(im, bits)
    except BadImageError:
        raise
    except FileNotFoundError:
        raise BadImageError(f"{p}: file not found") from None
    except IsADirectoryError:
        raise BadImageError(f"{p}: is a directory, not an image") from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, zlib.error, ...
        if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
            raise BadImageError(f"{p}: a symlink loop (too many levels of symbolic links)") \
                from None
        reason = str(exc) or type(exc).__name__
        if "cannot identify image file" in reason:
            if is_dicom(p):  # a DICOM file without the .dcm extension
                return read_dicom(p)
            kind = _signature(p)
            reason = (f"a truncated or corrupt {kind} file" if kind
                      else "not an image file Pillow can read")
        raise BadImageError(f"{p}: cannot be decoded ({type(exc).__name__}: {reason})") from None


_SIGNATURES = ((b"\x89PNG", "PNG"), (b"\xff\xd8", "JPEG"), (b"II*\x00", "TIFF"),
               (b"MM\x00*", "TIFF"), (b"BM", "BMP"), (b"GIF8", "GIF"))


def _signature(p: Path) -> str | None:
    """The image format a file's first bytes announce, if any (to tell truncated from foreign)."""
    try:
        with open(p, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return None
    return next((name for magic, name in _SIGNATURES if head.startswith(magic)), None)


# --- paths ---------------------------------------------------------------------------------

_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


@functools.lru_cache(maxsize=64)
def _real_root(root: str) -> str:
    return os.path.realpath(root)


def safe_join(root: str | os.PathLike[str], rel: str | os.PathLike[str],
              resolve: bool = True) -> Path:
    """`root / rel`, refusing anything that leads outside `root`.

    Refused with SiteDataError: absolute paths (also 'C:\\...' and '\\\\server\\...'), '..' that
    climbs above the root, and (with `resolve`) symlinks anywhere along the path whose target is
    outside the root. '..' that stays inside the root, and symlinks inside it, are fine.

    resolve=True returns the resolved path (it stats every component: ~50 us a path).
    resolve=False is the lexical check only (a few us a path), for tables of 100,000s of rows;
    those adapters check symlinks when the image is read (`check_inside`).
    """
    text = os.fspath(rel)
    if not isinstance(text, str):
        text = os.fsdecode(text)
    joined = join_inside(os.path.abspath(os.fspath(root)), text, root)
    if not resolve:
        return Path(joined)
    return check_inside(root, joined, text)


def join_inside(base: str, text: str, shown_root: object = None) -> str:
    """The lexical half of safe_join, on strings: `base` must be absolute and normalized."""
    if not text or text.isspace():
        raise SiteDataError(f"empty image path (site root '{shown_root or base}')")
    if text[0] in "/\\" or _DRIVE.match(text):
        raise SiteDataError(f"image path '{text}' is absolute; paths must be relative to the site "
                            f"root '{shown_root or base}'")
    joined = base + os.sep + text
    if ".." in text or "//" in text or "/./" in text or text.startswith("./"):
        joined = os.path.normpath(joined)
        if not _within(joined, base):
            raise SiteDataError(f"image path '{text}' leads outside the site root "
                                f"'{shown_root or base}' (through '..'); refusing to read it")
    return joined


def check_inside(root: str | os.PathLike[str], path: str | os.PathLike[str],
                 shown: str | None = None) -> Path:
    """The resolved `path`, or SiteDataError if following its symlinks leaves `root`."""
    real_root = _real_root(os.fspath(root))
    full = os.path.realpath(path)
    if not _within(full, real_root):
        raise SiteDataError(f"image path '{shown or path}' leads outside the site root '{root}' "
                            "(through a symlink); refusing to read it")
    return Path(full)


def inside_root(root: str | os.PathLike[str], path: str | os.PathLike[str],
                folders: dict[str, str] | None = None) -> bool:
    """Whether `path`, its symlinks followed, stays inside `root` (as `check_inside` reads it).
    `folders` caches each folder's real path, so a table of 100,000 images in a few folders
    costs one lstat per image, not one realpath."""
    real_root = _real_root(os.fspath(root))
    path = os.fspath(path)
    if os.path.islink(path):
        return _within(os.path.realpath(path), real_root)
    folder = os.path.dirname(path)
    if folders is None:
        return _within(os.path.realpath(folder), real_root)
    if folder not in folders:
        folders[folder] = os.path.realpath(folder)
    return _within(folders[folder], real_root)


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)
