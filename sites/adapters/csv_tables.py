"""Finding and reading a site's tables: the label table under the root, read as the export
that it is (separator and encoding sniffed, `csv_options` for the rest: sep, encoding, ...),
and the columns an adapter needs, each missing one named with a did-you-mean."""
from __future__ import annotations

import codecs
import difflib
import gzip
import logging
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from chestfed.sites.adapters.base import SiteAdapter, SiteDataError

log = logging.getLogger(__name__)


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
    # the head's bytes (read once, as latin-1 text) also tell a UTF-16 file
    utf16 = _utf16(head.encode("latin-1")) if head is not None and "encoding" not in given \
        else None
    if utf16 is not None:
        head = head.encode("latin-1").decode(utf16, errors="replace")
    if "sep" not in kw and head is not None:
        kw["sep"] = _guess_separator(head)
    if "encoding" not in kw:
        kw["encoding"] = utf16 or "utf-8"
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
                name = {"cp1252": "Windows-1252"}.get(enc, enc)
                bom = "\xef\xbb\xbf".encode("latin-1").decode(enc)  # the UTF-8 BOM, read as enc
                if df.columns.size and str(df.columns[0]).startswith(bom):
                    # a UTF-8 byte-order mark on a file that is not UTF-8 throughout (an editor
                    # added it, or rows of two exports were pasted together): drop it, say so
                    df = df.rename(columns={df.columns[0]: str(df.columns[0])[len(bom):]})
                    log.warning("%s: '%s' starts with a UTF-8 byte-order mark but is not UTF-8 "
                                "throughout (mixed encodings?); read it as %s (set csv_options: "
                                "{encoding: ...} if names look wrong)", where, path.name, name)
                else:
                    log.warning("%s: '%s' is not UTF-8; read it as %s (set csv_options: "
                                "{encoding: ...} if names look wrong)", where, path.name, name)
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


def _utf16(raw: bytes) -> str | None:
    """'utf-16' for a file whose first bytes `raw` are a UTF-16 byte-order mark (Excel's
    "Unicode text"), or 'utf-16-le' / 'utf-16-be' for one without a mark whose ASCII header has
    every other byte zero; else None."""
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "utf-16"
    if len(raw) >= 8 and raw[1:8:2] == b"\0\0\0\0" and b"\0" not in raw[0:8:2]:
        return "utf-16-le"
    if len(raw) >= 8 and raw[0:8:2] == b"\0\0\0\0" and b"\0" not in raw[1:8:2]:
        return "utf-16-be"
    return None


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
