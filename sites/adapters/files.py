"""What the file-based adapters share: option checking, tables, metadata clean-up, image lookup.

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
import pandas as pd
from pydantic import BaseModel, ConfigDict, ValidationError

from common.labels import FINDINGS, INDEX, LabelError, finding_index
from sites.adapters.base import (META_COLUMNS, BadImageError, SiteAdapter, SiteDataError,
                                 SiteRecords)
from sites.dicom import DICOM_EXTENSIONS
from sites.imageio import check_inside, read_grayscale

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


def table_path(adapter: SiteAdapter, root: Path, given: str | None, patterns: Sequence[str],
               what: str) -> Path:
    """The label table: `given` (relative to root, or absolute) or the first match of `patterns`."""
    where = f"site '{adapter.name}' ({adapter.kind})"
    if given:
        p = Path(given).expanduser()
        p = p if p.is_absolute() else root / p
        if not p.is_file():
            raise SiteDataError(f"{where}: {what} '{p}' not found")
        return p
    for pattern in patterns:
        hits = sorted(root.glob(pattern))
        hits = [h for h in hits if h.is_file()]
        if hits:
            return hits[-1]
    raise SiteDataError(f"{where}: no {what} in '{root}' (looked for {', '.join(patterns)})")


CSV_OPTIONS = ("sep", "encoding", "quotechar", "decimal", "comment", "skiprows")
_CSV_ALIASES = {"separator": "sep", "seperator": "sep", "delimiter": "sep", "delim": "sep",
                "charset": "encoding", "codec": "encoding", "quote": "quotechar"}
_SEPARATORS = (",", ";", "\t")
_FALLBACK_ENCODINGS = ("cp1252", "latin-1")  # what spreadsheets export when not UTF-8
_SNIFF_BYTES = 1 << 16


def read_table(adapter: SiteAdapter, path: Path, required: Iterable[str] = (),
               **kw: Any) -> pd.DataFrame:
    """Read a CSV with a clear error for unreadable files and missing columns.

    Spreadsheet exports vary; unless the site's option `csv_options` says otherwise ({sep: ';',
    encoding: latin-1, ...}, passed to pandas.read_csv), the separator is the most frequent of
    ',', ';' and tab on the header line, a UTF-8 byte-order mark is dropped, and a file that is
    not UTF-8 is read as Windows-1252 (Latin-1 with the typographic quotes and the euro sign),
    with a warning.
    """
    where = f"site '{adapter.name}' ({adapter.kind})"
    given = _csv_options(adapter)
    kw = {**kw, **given}
    hint = ("; if the file is not comma-separated UTF-8, set the site's option csv_options, e.g. "
            "csv_options: {sep: ';', encoding: latin-1}")
    head = _head_text(path) if ("sep" not in given or "encoding" not in given) else None
    if "sep" not in kw and head is not None:
        kw["sep"] = _guess_separator(head)
    if "encoding" not in kw:
        kw["encoding"] = "utf-8"
    try:
        try:
            df = pd.read_csv(path, **kw)
        except UnicodeDecodeError:
            if "encoding" in given:
                raise
            df = None
            for enc in _FALLBACK_ENCODINGS:
                try:
                    df = pd.read_csv(path, **{**kw, "encoding": enc})
                except UnicodeDecodeError:
                    continue
                log.warning("%s: '%s' is not UTF-8; read it as %s (set csv_options: {encoding: "
                            "...} if names look wrong)", where, path.name,
                            {"cp1252": "Windows-1252"}.get(enc, enc))
                break
            assert df is not None  # latin-1 decodes any byte
    except pd.errors.EmptyDataError:
        raise SiteDataError(f"{where}: '{path}' is empty (not even a header line)") from None
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SiteDataError(f"{where}: cannot read '{path}': {text}{hint}") from None
    check_columns(adapter, df, required, path)
    return df


def _csv_options(adapter: SiteAdapter) -> dict[str, Any]:
    """The site's `csv_options` (adapters whose options have that field), checked."""
    given = getattr(getattr(adapter, "opts", None), "csv_options", None) or {}
    where = f"site '{adapter.name}' ({adapter.kind})"
    for key in given:
        if key not in CSV_OPTIONS:
            close = ([_CSV_ALIASES[str(key).lower()]] if str(key).lower() in _CSV_ALIASES
                     else difflib.get_close_matches(str(key), CSV_OPTIONS, n=1))
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise SiteDataError(f"{where}: option 'csv_options': unknown key '{key}'{hint}; known: "
                                f"{', '.join(CSV_OPTIONS)}")
    if "encoding" in given:
        import codecs

        try:
            codecs.lookup(str(given["encoding"]))
        except LookupError:
            raise SiteDataError(f"{where}: option 'csv_options': unknown encoding "
                                f"'{given['encoding']}' (e.g. utf-8, latin-1, cp1252)") from None
    return dict(given)


def _head_text(path: Path) -> str | None:
    """The start of the file as text (any 8-bit encoding will do for finding separators)."""
    try:
        if path.suffix.lower() == ".gz":
            import gzip

            with gzip.open(path, "rb") as fh:
                raw = fh.read(_SNIFF_BYTES)
        elif path.suffix.lower() in (".csv", ".tsv", ".txt", ""):
            with open(path, "rb") as fh:
                raw = fh.read(_SNIFF_BYTES)
        else:  # .zip, .bz2, ...: pandas' own default
            return None
    except OSError:
        return None
    return raw.removeprefix(b"\xef\xbb\xbf").decode("latin-1")


def _guess_separator(head: str) -> str:
    """The most frequent of ',', ';', tab on the header line, outside quotes (ties: ',')."""
    line = head.splitlines()[0] if head else ""
    outside = re.sub(r'"[^"]*"', "", line)
    counts = {sep: outside.count(sep) for sep in _SEPARATORS}
    best = max(_SEPARATORS, key=lambda sep: (counts[sep], sep == ","))
    return best if counts[best] > 0 else ","


def check_columns(adapter: SiteAdapter, df: pd.DataFrame, required: Iterable[str],
                  path: Path | str) -> None:
    where = f"site '{adapter.name}' ({adapter.kind})"
    cols = [str(c) for c in df.columns]
    for col in required:
        if col not in cols:
            close = difflib.get_close_matches(col, cols, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            if len(cols) == 1 and any(sep in cols[0] for sep in (";", "\t", ",", "|")):
                hint += (" (the whole header is one column: set the site's option csv_options: "
                         "{sep: ...} to the file's separator)")
            raise SiteDataError(f"{where}: '{path}' has no column '{col}'{hint}; its columns: "
                                f"{', '.join(cols[:30])}{' ...' if len(cols) > 30 else ''}")


# --- metadata ------------------------------------------------------------------------------

_SEX = {"m": "M", "male": "M", "man": "M", "f": "F", "female": "F", "woman": "F"}
_DICOM_AGE = re.compile(r"^\s*(\d{1,3})\s*([YMWDymwd])\s*$")
_AGE_UNIT = {"Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}


def norm_sex(values: pd.Series) -> pd.Series:
    """'M'/'F'/None from M/F/Male/Female (any case); others ('O', 'Unknown', blank) -> None."""
    low = values.astype("string").str.strip().str.lower()
    out = low.map(lambda v: _SEX.get(v) if isinstance(v, str) else None)
    return out.astype(object).where(out.notna(), None)


def norm_view(values: pd.Series) -> pd.Series:
    """'PA'/'AP'/'LATERAL'/None. AP supine/horizontal are AP; L/LL/RL/lateral are LATERAL."""
    def one(v: object) -> str | None:
        if not isinstance(v, str):
            return None
        s = v.strip().upper().replace("_", " ")
        if s in ("PA", "POSTEROANTERIOR", "P-A"):
            return "PA"
        if s in ("AP", "ANTEROPOSTERIOR", "A-P") or s.startswith("AP "):
            return "AP"
        if s in ("L", "LL", "RL", "LAT", "LATERAL") or s.startswith("LATERAL"):
            return "LATERAL"
        return None
    return values.map(one).astype(object)


def norm_age(values: pd.Series, where: str, column: str) -> pd.Series:
    """Age in years (float); DICOM ages ('057Y', '006M') understood; outside 0..120 -> NaN."""
    num = pd.to_numeric(values, errors="coerce")
    text = values.astype("string")
    dicom = text.str.extract(_DICOM_AGE)
    has = dicom[0].notna()
    if has.any():
        num = num.where(~has, dicom[0].astype(float) * dicom[1].str.upper().map(_AGE_UNIT))
    bad = num.isna() & values.notna() & (text.str.strip() != "")
    if bad.any():
        log.warning("%s: %d values of column '%s' are not ages (e.g. %r); they count as unknown",
                    where, int(bad.sum()), column, values[bad].iloc[0])
    out_of_range = (num < 0) | (num > 120)
    if out_of_range.any():
        log.warning("%s: %d ages in column '%s' outside 0..120 count as unknown", where,
                    int(out_of_range.sum()), column)
        num = num.where(~out_of_range)
    return num.astype(float)


def make_meta(image_id: Iterable[Any], patient_id: Iterable[Any], age: Any = np.nan,
              sex: Any = None, view: Any = None, official_split: Any = None) -> pd.DataFrame:
    ids = [str(v) for v in image_id]
    n = len(ids)

    def col(v: Any, dtype: Any) -> Any:
        if isinstance(v, (pd.Series, np.ndarray, list, tuple)):
            arr = np.asarray(v.to_numpy() if isinstance(v, pd.Series) else v, dtype=dtype)
            return arr
        return np.full(n, v, dtype=dtype)

    meta = pd.DataFrame({
        "image_id": np.asarray(ids, dtype=object),
        "patient_id": np.asarray([str(p) for p in patient_id], dtype=object),
        "age": col(age, float),
        "sex": col(sex, object),
        "view": col(view, object),
        "official_split": col(official_split, object),
    })
    for c in ("sex", "view", "official_split"):
        meta[c] = meta[c].astype(object).where(meta[c].notna(), None)
    return meta[list(META_COLUMNS)]


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
