"""A CSV of image paths and metadata under a site's root: the table reading every table site
shares (`kind: csv` in csvfolder.py, `kind: reports` in reports.py); subclasses turn rows into
labels (`make_labels`).

Rows: `where` keeps rows whose column (trimmed, case-insensitive) is one of the listed values;
`views` keeps rows whose `view_column`, read as PA / AP / LATERAL, is listed (unknown views are
dropped too). `describe` shows how many rows each rule dropped (`self.row_filters`).

Image paths must stay inside root: absolute paths and '..' above root are errors naming the CSV
line, and so is an image listed twice (naming both lines); a symlink leading out of root is
refused when the image is read (it counts as an unreadable image: listed in the cache's
bad_images.csv with data.on_bad_image: skip, fatal with error). `self.lines[i]` is the CSV line
of record i, for messages (sites/preflight.py names the line of a missing image).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from chestfed.sites.adapters.base import SiteDataError, SiteRecords
from chestfed.sites.adapters.csv_tables import check_columns, read_table
from chestfed.sites.adapters.files import FileAdapter, Options, empty_after_filters, require_root
from chestfed.sites.adapters.metadata import make_meta, norm_age, norm_sex, norm_view
from chestfed.sites.imageio import join_inside

log = logging.getLogger(__name__)

_SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                "validation": "val", "dev": "val", "test": "test", "testing": "test"}


# YAML 1.1 reads an unquoted yes / no / on / off as a boolean: match any of its spellings.
_YAML_BOOL = {True: ("true", "yes", "y", "on"), False: ("false", "no", "n", "off")}


def cell_text(v: Any) -> str:
    """A YAML scalar as the CSV would hold it: 1 not 1.0, True as 'true'."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


def cell_keys(v: Any) -> tuple[str, ...]:
    """The lower-case cell texts a YAML key or value stands for (a boolean: all its spellings)."""
    return _YAML_BOOL[v] if isinstance(v, bool) else (cell_text(v).lower(),)


class TableOptions(Options):
    csv: str
    csv_options: dict[str, str | int] | None = None  # pandas.read_csv: sep, encoding, ... (csv_tables.py)
    path_column: str
    patient_column: str | None = None
    age_column: str | None = None
    sex_column: str | None = None
    view_column: str | None = None
    split_column: str | None = None
    where: dict[str, list[bool | str | int | float] | bool | str | int | float] | None = None
    views: list[Literal["PA", "AP", "LATERAL"]] | None = Field(None, min_length=1)


class TableAdapter(FileAdapter):
    """A CSV of image paths (and metadata) under root; subclasses turn rows into labels."""

    def __init__(self, name: str, root: str | None, options: dict[str, Any]):
        super().__init__(name, root, options)
        if self.opts.views is not None and self.opts.view_column is None:
            raise SiteDataError(f"{self.where}: option 'views' needs 'view_column' (the column "
                                "that holds PA / AP / lateral)")
        self.lines: np.ndarray = np.zeros(0, dtype=int)  # CSV line of each record
        self.row_filters: list[tuple[str, int]] = []  # (rule, rows it dropped), in order
        self._csv_name = ""

    def make_labels(self, df: pd.DataFrame, csv: Path
                    ) -> tuple[np.ndarray, np.ndarray, dict[str, pd.DataFrame]]:
        raise NotImplementedError

    def line(self, i: int) -> int:
        """The CSV line of row i of the (filtered) table: header is line 1."""
        return int(self.lines[i])

    def locate(self, i: int) -> str:
        self.records()
        return f"{self._csv_name} line {self.line(i)} ('{self._records.meta['image_id'][i]}')"

    def _load(self) -> tuple[SiteRecords, list[Path]]:
        o = self.opts
        root = require_root(self)
        csv = Path(o.csv).expanduser()
        csv = csv if csv.is_absolute() else root / csv
        if not csv.is_file():
            raise SiteDataError(f"{self.where}: option 'csv': '{csv}' not found")
        self._sources = [csv]
        self._csv_name = csv.name
        df = read_table(self, csv, dtype=str, keep_default_na=False, na_values=[""])
        named = {"path_column": o.path_column, "patient_column": o.patient_column,
                 "age_column": o.age_column, "sex_column": o.sex_column,
                 "view_column": o.view_column, "split_column": o.split_column}
        for option, col in named.items():
            if col is not None:
                self._need_column(df, col, csv, option)
        if len(df) == 0:
            raise SiteDataError(f"{self.where}: '{csv}' has no rows")
        df = self._filter_rows(df, csv)
        self.lines = df.index.to_numpy() + 2
        df = df.reset_index(drop=True)

        rel = df[o.path_column]
        blank = rel.isna() | (rel.astype(str).str.strip() == "")
        if blank.any():
            raise SiteDataError(f"{self.where}: column '{o.path_column}' of {csv.name} is blank on "
                                f"line {self.line(int(np.flatnonzero(blank.to_numpy())[0]))}")
        rel = rel.astype(str).str.strip()
        dup = rel.duplicated()
        if dup.any():
            second = int(np.flatnonzero(dup.to_numpy())[0])
            first = int(np.flatnonzero((rel == rel[second]).to_numpy())[0])
            raise SiteDataError(f"{self.where}: image '{rel[second]}' is listed twice in "
                                f"{csv.name}, on lines {self.line(first)} and "
                                f"{self.line(second)} ({int(dup.sum())} duplicate rows)")
        paths, base = [], str(root)
        for i, r in enumerate(rel.tolist()):
            try:  # lexical here; symlinks leading out are refused as each image is read
                paths.append(join_inside(base, r, root))
            except SiteDataError as exc:
                raise SiteDataError(f"{self.where}: {csv.name} line {self.line(i)}: "
                                    f"{exc}") from None

        labels, annotated, extras = self.make_labels(df, csv)

        if o.patient_column:
            pid = df[o.patient_column].astype(object)
            missing = pid.isna() | (pid.astype(str).str.strip() == "")
            if missing.any():
                log.warning("%s: %d rows have no '%s'; each counts as its own patient",
                            self.where, int(missing.sum()), o.patient_column)
                pid = pid.where(~missing, "image:" + rel)
        else:
            log.warning("%s: no patient_column: each image counts as its own patient, so splits "
                        "cannot keep one patient's images together", self.where)
            pid = rel
        meta = make_meta(
            rel, pid.astype(str),
            age=norm_age(df[o.age_column], self.where, o.age_column) if o.age_column else np.nan,
            sex=norm_sex(df[o.sex_column]) if o.sex_column else None,
            view=norm_view(df[o.view_column]) if o.view_column else None,
            official_split=self._splits(df, csv) if o.split_column else None,
        )
        log.info("%s: %d images, %d patients from %s", self.where, len(meta),
                 meta["patient_id"].nunique(), csv.name)
        return SiteRecords(meta, labels, annotated, extras), paths

    def _filter_rows(self, df: pd.DataFrame, csv: Path) -> pd.DataFrame:
        """Apply `where`, then `views`; record how many rows each dropped. Keeps df's index."""
        o = self.opts
        before = len(df)
        self.row_filters = []
        for col, wanted in (o.where or {}).items():
            self._need_column(df, col, csv, "where")
            wanted = wanted if isinstance(wanted, list) else [wanted]
            keep_values = {k for v in wanted for k in cell_keys(v)}
            cells = df[col].astype(object).where(df[col].notna(), "").astype(str)
            keep = cells.str.strip().str.lower().isin(keep_values)
            shown = ", ".join(cell_text(v) for v in wanted)
            self.row_filters.append((f"where {col} in [{shown}]", int((~keep).sum())))
            df = df[keep]
        if o.views is not None:
            keep = norm_view(df[o.view_column]).isin(list(o.views))
            self.row_filters.append((f"views [{', '.join(o.views)}] (column '{o.view_column}')",
                                     int((~keep).sum())))
            df = df[keep]
        for rule, dropped in self.row_filters:
            log.info("%s: %s dropped %d rows", self.where, rule, dropped)
        if len(df) == 0:
            filters = {**{f"where.{k}": v for k, v in (o.where or {}).items()},
                       **({"views": list(o.views)} if o.views else {})}
            raise empty_after_filters(self, filters, before, "; ".join(
                f"{r} dropped {n}" for r, n in self.row_filters))
        return df

    def _need_column(self, df: pd.DataFrame, col: str, csv: Path, option: str) -> None:
        try:
            check_columns(self, df, [col], csv)
        except SiteDataError as exc:
            raise SiteDataError(f"{exc} (option '{option}')") from None

    def _splits(self, df: pd.DataFrame, csv: Path) -> list[str | None]:
        col = self.opts.split_column
        out: list[str | None] = []
        for i, v in enumerate(df[col]):
            if v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() == "":
                out.append(None)
                continue
            name = _SPLIT_NAMES.get(str(v).strip().lower())
            if name is None:
                raise SiteDataError(f"{self.where}: column '{col}' of {csv.name} has the value "
                                    f"{v!r} on line {self.line(i)}; splits are train, val or test")
            out.append(name)
        if any(s is None for s in out) and not all(s is None for s in out):
            log.warning("%s: %d rows have no '%s' value; the site's split is then not used",
                        self.where, sum(s is None for s in out), col)
        return out
