"""Any folder of images plus a CSV: `kind: csv`. This is how a hospital brings its own data.

    sites:
      - name: st_mary
        kind: csv
        root: /data/st_mary                 # the images live under here
        options:
          csv: labels.csv                   # relative to root (or absolute)
          path_column: file                 # image path relative to root
          labels: {pneumonia: Pneumonia, effusion: Effusion}   # column -> finding, values 1/0/blank
          # or: findings_column: findings   # one column of '|'-separated finding names,
          #                                   'No Finding' for a normal image
          patient_column: patient           # optional; without it each image is its own patient
          age_column: age                   # optional: years, or DICOM ages like '057Y'
          sex_column: sex                   # optional: M/F/Male/Female; anything else is unknown
          view_column: view                 # optional: PA/AP/AP supine/L/lateral
          split_column: split               # optional: train/val/test (the site's own split)

Label values must be 1, 0 or blank (blank: not known, masked); anything else is an error naming
the column, the value and its CSV line. With `findings_column`, names must be in the label space
(case, '_' and spaces do not matter: 'pleural thickening' is 'Pleural_Thickening'; 'Pleural
Effusion' is 'Effusion'); an unknown name is an error with a did-you-mean. A blank cell is an
image with unknown labels. The site annotates the findings named in `annotates` (default: every
finding that occurs in the column, plus No Finding): for those, a finding not listed is 0.

Image paths must stay inside root: absolute paths and '..' above root are errors naming the CSV
line; a symlink leading out of root is refused when the image is read (it counts as an unreadable
image: listed in the cache's bad_images.csv with data.on_bad_image: skip, fatal with error).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common.labels import FINDINGS, INDEX, NO_FINDING, LabelError
from sites.adapters.base import SiteDataError, SiteRecords, register
from sites.adapters.files import (FileAdapter, Options, canonical_finding, check_columns,
                                  make_meta, norm_age, norm_sex, norm_view, read_table,
                                  require_root)
from sites.imageio import join_inside

log = logging.getLogger(__name__)

_SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                "validation": "val", "dev": "val", "test": "test", "testing": "test"}


class TableOptions(Options):
    csv: str
    csv_options: dict[str, str | int] | None = None  # pandas.read_csv: sep, encoding, ... (files.py)
    path_column: str
    patient_column: str | None = None
    age_column: str | None = None
    sex_column: str | None = None
    view_column: str | None = None
    split_column: str | None = None


class CSVOptions(TableOptions):
    labels: dict[str, str] | None = None
    findings_column: str | None = None
    separator: str = "|"
    annotates: list[str] | None = None


class TableAdapter(FileAdapter):
    """A CSV of image paths (and metadata) under root; subclasses turn rows into labels."""

    def label_columns(self) -> list[str]:
        return []

    def make_labels(self, df: pd.DataFrame, csv: Path
                    ) -> tuple[np.ndarray, np.ndarray, dict[str, pd.DataFrame]]:
        raise NotImplementedError

    def _load(self) -> tuple[SiteRecords, list[Path]]:
        o = self.opts
        root = require_root(self)
        csv = Path(o.csv).expanduser()
        csv = csv if csv.is_absolute() else root / csv
        if not csv.is_file():
            raise SiteDataError(f"{self.where}: option 'csv': '{csv}' not found")
        self._sources = [csv]
        df = read_table(self, csv, dtype=str, keep_default_na=False, na_values=[""])
        named = {"path_column": o.path_column, "patient_column": o.patient_column,
                 "age_column": o.age_column, "sex_column": o.sex_column,
                 "view_column": o.view_column, "split_column": o.split_column}
        for option, col in named.items():
            if col is not None:
                self._need_column(df, col, csv, option)
        if len(df) == 0:
            raise SiteDataError(f"{self.where}: '{csv}' has no rows")

        rel = df[o.path_column]
        blank = rel.isna() | (rel.astype(str).str.strip() == "")
        if blank.any():
            raise SiteDataError(f"{self.where}: column '{o.path_column}' of {csv.name} is blank on "
                                f"line {int(np.flatnonzero(blank.to_numpy())[0]) + 2}")
        rel = rel.astype(str).str.strip()
        dup = rel.duplicated()
        if dup.any():
            raise SiteDataError(f"{self.where}: image '{rel[dup].iloc[0]}' is listed twice in "
                                f"{csv.name} (line {int(np.flatnonzero(dup.to_numpy())[0]) + 2})")
        paths, base = [], str(root)
        for i, r in enumerate(rel.tolist()):
            try:  # lexical here; symlinks leading out are refused as each image is read
                paths.append(join_inside(base, r, root))
            except SiteDataError as exc:
                raise SiteDataError(f"{self.where}: {csv.name} line {i + 2}: {exc}") from None

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
                                    f"{v!r} on line {i + 2}; splits are train, val or test")
            out.append(name)
        if any(s is None for s in out) and not all(s is None for s in out):
            log.warning("%s: %d rows have no '%s' value; the site's split is then not used",
                        self.where, sum(s is None for s in out), col)
        return out


@register
class CSVAdapter(TableAdapter):
    kind = "csv"
    Opts = CSVOptions

    def __init__(self, name: str, root: str | None, options: dict[str, Any]):
        super().__init__(name, root, options)
        o = self.opts
        if (o.labels is None) == (o.findings_column is None):
            raise SiteDataError(f"{self.where}: set exactly one of the options 'labels' "
                                "({column: finding}) and 'findings_column'")
        if o.labels is not None and not o.labels:
            raise SiteDataError(f"{self.where}: option 'labels' is empty")
        self.mapping: dict[str, str] = {}
        for col, finding in (o.labels or {}).items():
            try:
                self.mapping[col] = canonical_finding(finding)
            except LabelError as exc:
                raise SiteDataError(f"{self.where}: option 'labels': column '{col}': "
                                    f"{exc}") from None
        targets = list(self.mapping.values())
        dup = {t for t in targets if targets.count(t) > 1}
        if dup:
            raise SiteDataError(f"{self.where}: option 'labels' maps several columns to "
                                f"{sorted(dup)}")
        self.annotates: list[str] | None = None
        if o.annotates is not None:
            try:
                self.annotates = [canonical_finding(n) for n in o.annotates]
            except LabelError as exc:
                raise SiteDataError(f"{self.where}: option 'annotates': {exc}") from None

    def make_labels(self, df: pd.DataFrame, csv: Path
                    ) -> tuple[np.ndarray, np.ndarray, dict[str, pd.DataFrame]]:
        if self.opts.findings_column is not None:
            return self._from_findings(df, csv)
        labels = np.full((len(df), len(FINDINGS)), np.nan, dtype=np.float32)
        annotated = np.zeros(len(FINDINGS), dtype=bool)
        for col, finding in self.mapping.items():
            self._need_column(df, col, csv, "labels")
            labels[:, INDEX[finding]] = self._binary(df[col], col, csv)
            annotated[INDEX[finding]] = True
        return labels, annotated, {}

    def _binary(self, s: pd.Series, col: str, csv: Path) -> np.ndarray:
        text = s.astype(object).where(s.notna(), "").astype(str).str.strip()
        num = pd.to_numeric(text.where(text != ""), errors="coerce")
        bad = ((text != "") & num.isna()) | ~(num.isin([0, 1]) | num.isna())
        if bad.any():
            first = int(np.flatnonzero(bad.to_numpy())[0])
            raise SiteDataError(f"{self.where}: column '{col}' of {csv.name} has the value "
                                f"{text.iloc[first]!r} on line {first + 2} ({int(bad.sum())} such "
                                "values); labels must be 1, 0 or blank")
        return num.to_numpy(dtype=np.float32)

    def _from_findings(self, df: pd.DataFrame, csv: Path
                       ) -> tuple[np.ndarray, np.ndarray, dict[str, pd.DataFrame]]:
        col, sep = self.opts.findings_column, self.opts.separator
        self._need_column(df, col, csv, "findings_column")
        cells = df[col].astype(object).where(df[col].notna(), "").astype(str).str.strip()
        parsed: list[list[str] | None] = []
        seen: set[str] = set()
        for i, cell in enumerate(cells):
            if cell == "":
                parsed.append(None)
                continue
            names = []
            for token in (t.strip() for t in cell.split(sep)):
                if not token:
                    continue
                try:
                    names.append(canonical_finding(token))
                except LabelError as exc:
                    raise SiteDataError(f"{self.where}: column '{col}' of {csv.name}, line "
                                        f"{i + 2}: {exc}") from None
            parsed.append(names)
            seen.update(names)
        annot_names = self.annotates if self.annotates is not None else sorted(
            seen | {NO_FINDING}, key=FINDINGS.index)
        if self.annotates is not None:
            extra = seen - set(self.annotates)
            if extra:
                raise SiteDataError(f"{self.where}: column '{col}' names {sorted(extra)}, which "
                                    "option 'annotates' leaves out; add them to 'annotates'")
        annotated = np.zeros(len(FINDINGS), dtype=bool)
        annotated[[INDEX[n] for n in annot_names]] = True
        labels = np.full((len(df), len(FINDINGS)), np.nan, dtype=np.float32)
        blank = 0
        for i, names in enumerate(parsed):
            if names is None:
                blank += 1
                continue
            labels[i, annotated] = 0.0
            for n in names:
                labels[i, INDEX[n]] = 1.0
        if blank:
            log.warning("%s: %d rows have a blank '%s'; their labels are unknown", self.where,
                        blank, col)
        return labels, annotated, {}
