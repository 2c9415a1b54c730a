"""What the file-based adapters share: option checking, the root, finding names, image lookup.
Reading their tables is in sites/adapters/csv_tables.py, cleaning their metadata in
sites/adapters/metadata.py.

`FileAdapter` keeps the absolute path of every record's image and reads it with
`sites.imageio.read_grayscale`; its cache-building reader is a small picklable object.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from chestfed.common.labels import FINDINGS, INDEX, LabelError, finding_index
from chestfed.sites.adapters.base import BadImageError, SiteAdapter, SiteDataError, SiteRecords
from chestfed.sites.dicom import DICOM_EXTENSIONS
from chestfed.sites.imageio import check_inside, read_grayscale

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class Options(BaseModel):
    """Base for adapter options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


def parse_options(site: str, kind: str, model: type[Options], options: dict[str, Any]) -> Any:
    """Validate `options` against `model`; one clear line naming the site and the key on error."""
    try:
        return model.model_validate(options or {})
    except ValidationError as err:
        e = err.errors()[0]
        key = ".".join(str(p) for p in e["loc"]) or "(options)"
        if e["type"] == "extra_forbidden":
            known = list(model.model_fields)
            close = difflib.get_close_matches(str(e["loc"][0]), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise SiteDataError(f"site '{site}' ({kind}): unknown option '{key}'{hint}; known "
                                f"options: {', '.join(known)}") from None
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if got is None or isinstance(got, dict) else f" (got {got!r})"
        raise SiteDataError(f"site '{site}' ({kind}): option '{key}': {msg}{shown}") from None


def require_root(adapter: SiteAdapter, *, files_ok: bool = False) -> Path:
    """The adapter's root, which must exist (a folder; or a file if `files_ok`)."""
    where = f"site '{adapter.name}' ({adapter.kind})"
    if adapter.root is None:
        raise SiteDataError(f"{where}: no root given; set the site's 'root' to the dataset folder")
    root = adapter.root
    if root.is_symlink() and not root.exists():
        raise SiteDataError(f"{where}: root '{root}' is a symlink that leads nowhere (a loop or a "
                            "missing target); point the site's 'root' at the dataset folder")
    if not root.exists():
        raise SiteDataError(f"{where}: root '{root}' does not exist; point the site's 'root' at "
                            "the dataset folder")
    if root.is_file() and not files_ok:
        raise SiteDataError(f"{where}: root '{root}' is a file; it must be the dataset folder")
    return root.absolute()



# --- labels --------------------------------------------------------------------------------

def to_common(names: Sequence[str], values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Columns named `names` into the common space [N, len(FINDINGS)] (others NaN) + annotated mask.

    Names outside the label space (e.g. torchxrayvision's 'Support Devices') are dropped.
    """
    values = np.asarray(values, dtype=np.float32)
    out = np.full((values.shape[0], len(FINDINGS)), np.nan, dtype=np.float32)
    annotated = np.zeros(len(FINDINGS), dtype=bool)
    for j, name in enumerate(names):
        name = str(name)
        if name in INDEX:
            out[:, INDEX[name]] = values[:, j]
            annotated[INDEX[name]] = True
    return out, annotated


_CANON = {re.sub(r"[\s_-]+", " ", n).strip().lower(): n for n in FINDINGS}
_CANON["pleural effusion"] = "Effusion"
_CANON["normal"] = "No Finding"
_CANON["no findings"] = "No Finding"


def canonical_finding(name: str) -> str:
    """A finding name from a user's table or config: exact, or equal up to case, '_', '-', spaces
    ('pleural thickening' is 'Pleural_Thickening'; 'Pleural Effusion' is 'Effusion'). Raises
    LabelError with a did-you-mean otherwise."""
    if name in INDEX:
        return name
    key = re.sub(r"[\s_-]+", " ", str(name)).strip().lower()
    if key in _CANON:
        return _CANON[key]
    finding_index(str(name))  # raises LabelError with a did-you-mean
    raise LabelError(f"unknown finding '{name}'")  # pragma: no cover


def show_value(v: Any) -> str:
    """A table value as a user wrote it: 2 not np.float64(2.0), 'yes' with quotes."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return repr(v)


def empty_after_filters(adapter: SiteAdapter, filters: dict[str, Any], before: int,
                        detail: str = "") -> SiteDataError:
    shown = ", ".join(f"{k}={v}" for k, v in filters.items())
    extra = f" ({detail})" if detail else ""
    return SiteDataError(f"site '{adapter.name}' ({adapter.kind}): no images left after the "
                         f"filters {shown} ({before} rows before filtering){extra}; widen the "
                         "filters in the site's options")


# --- images on disk ------------------------------------------------------------------------

def index_images(root: Path, folders: Iterable[Path],
                 extensions: Sequence[str] = IMAGE_EXTENSIONS) -> dict[str, Path]:
    """File name -> path for the image files directly inside each of `folders` (first one wins).

    A symlinked file whose target lies outside `root` is refused (SiteDataError), like safe_join.
    """
    real_root = os.path.realpath(root)
    found: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        with os.scandir(folder) as it:
            for entry in it:
                name = entry.name
                if not name.lower().endswith(tuple(extensions)) or name in found:
                    continue
                if entry.is_symlink():
                    target = os.path.realpath(entry.path)
                    if not target.startswith(real_root.rstrip(os.sep) + os.sep):
                        raise SiteDataError(f"image '{entry.path}' is a symlink leading outside "
                                            f"the site root '{root}'; refusing to read it")
                found[name] = Path(entry.path)
    return found


@dataclass(frozen=True)
class PathReader:
    """Picklable image reader for the cache's worker processes: record i -> 2-D uint8.

    Each path is resolved before reading and refused (BadImageError, so the cache counts it or
    stops, per data.on_bad_image) if a symlink leads it outside the site root.
    """

    root: str
    paths: tuple[str, ...]
    bits: tuple[int, ...] | None = None

    def __call__(self, i: int, size: int) -> np.ndarray:
        try:
            real = check_inside(self.root, self.paths[i])
        except SiteDataError as exc:
            raise BadImageError(str(exc)) from None
        return read_grayscale(real, min_size=size, bits=self.bits[i] if self.bits else None)


class FileAdapter(SiteAdapter):
    """An adapter whose images are files under `root`. Subclasses implement `_load()`."""

    Opts: ClassVar[type[Options]] = Options

    def __init__(self, name: str, root: str | None, options: dict[str, Any]):
        super().__init__(name, root, options)
        self.opts = parse_options(name, self.kind, self.Opts, self.options)
        self._records: SiteRecords | None = None
        self._paths: list[str] = []
        self._bits: list[int] | None = None
        self._sources: list[Path] = []  # label tables, for the fingerprint
        self._image_root: Path | None = None  # images must stay inside (default: root)

    @property
    def where(self) -> str:
        return f"site '{self.name}' ({self.kind})"

    def _load(self) -> tuple[SiteRecords, Sequence[str | Path]]:
        raise NotImplementedError

    def records(self) -> SiteRecords:
        if self._records is None:
            rec, paths = self._load()
            if len(paths) != len(rec):
                raise AssertionError("adapter bug: paths and records differ in length")
            self._records, self._paths = rec, [str(p) for p in paths]
        return self._records

    def image_path(self, i: int) -> str:
        self.records()
        return self._paths[i]

    def locate(self, i: int) -> str:
        """Where record i comes from, for messages (a table adapter adds its CSV line)."""
        return f"'{self.image_path(i)}'"

    def read_image(self, i: int, size: int) -> np.ndarray:
        self.records()
        return PathReader(self._root_str, (self._paths[i],),
                          (self._bits[i],) if self._bits else None)(0, size)

    def worker_reader(self) -> PathReader:
        self.records()
        return PathReader(self._root_str, tuple(self._paths),
                          tuple(self._bits) if self._bits else None)

    @property
    def _root_str(self) -> str:
        return str(self._image_root or self.root)

    def fingerprint(self) -> str:
        """Kind, root, options, the ordered image list and the label tables' size and mtime."""
        self.records()
        h = hashlib.sha256()
        h.update(json.dumps({"kind": self.kind, "root": str(self.root), "options": self.options},
                            sort_keys=True, default=str).encode())
        for src in self._sources:
            try:
                st = src.stat()
                h.update(f"{src}:{st.st_size}:{st.st_mtime_ns}".encode())
            except OSError:
                h.update(str(src).encode())
        h.update("\n".join(self._paths).encode())
        if any(p.lower().endswith(DICOM_EXTENSIONS) for p in self._paths):
            h.update(b"dicom-reader-1")  # caches built before DICOM support listed them as bad
        if self._bits:
            h.update(np.asarray(self._bits, dtype=np.int16).tobytes())
        return h.hexdigest()[:16]
