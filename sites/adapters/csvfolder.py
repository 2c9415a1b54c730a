"""Any folder of images plus a CSV: `kind: csv`. This is how a hospital brings its own data.

    sites:
      - name: st_mary
        kind: csv
        root: /data/st_mary                 # the images live under here
        options:
          csv: labels.csv                   # relative to root (or absolute)
          path_column: file                 # image path relative to root
          # labels: one or more of these four
          labels: {pneumonia: Pneumonia, effusion: Effusion}   # column -> finding, values 1/0/blank
          findings_column: findings         # one column of '|'-separated finding names,
                                            #   'No Finding' for a normal image
          abnormal_column: abnormal         # 1 / 0 / blank: the binary target directly
          constant_labels: {Pneumonia: 1}   # every row has these (an export of positives only)
          values: {NORMAL: No Finding, PNEUMONIA: Pneumonia, Inconclusive: unknown}
          # rows to keep
          where: {modality: [CR, DX]}       # column -> the values to keep
          views: [PA, AP]                   # needs view_column
          # metadata
          patient_column: patient           # optional; without it each image is its own patient
          age_column: age                   # optional: years, or DICOM ages like '057Y'
          sex_column: sex                   # optional: M/F/Male/Female; anything else is unknown
          view_column: view                 # optional: PA/AP/AP supine/L/lateral
          split_column: split               # optional: train/val/test (the site's own split)

Labels (README "Your own data (csv)" has the full table):
- `labels` and `findings_column` exclude each other; `abnormal_column` and `constant_labels` go
  alone or with either. Where two of them say different things about one image, that is an
  error naming the CSV line.
- Per-label column values must be 1, 0 or blank (blank: not known, masked), or a text mapped by
  `values`: to the column's own finding (1), to 'No Finding' (0) or to 'unknown' (blank).
  Anything else is an error naming the column, the value and its first CSV line.
- `findings_column` names must be in the label space (case, '_' and spaces do not matter:
  'pleural thickening' is 'Pleural_Thickening'; 'Pleural Effusion' is 'Effusion'), or mapped by
  `values` (keys trimmed, case-insensitive; a whole cell is looked up first, then each
  '|'-separated part). A name that is neither is an error with a did-you-mean. A blank cell, or
  one mapped to 'unknown', is an image with unknown labels; a cell naming findings and an
  'unknown' part has those findings 1 and the others unknown. The site annotates the findings
  named in `annotates` (default: every finding that occurs in the column, plus No Finding): for
  those, a finding not listed is 0.
- `abnormal_column` 1 is 'No Finding' = 0 (abnormal), 0 is 'No Finding' = 1; `values` apply
  (a finding is 1, 'No Finding' 0, 'unknown' blank).
- `constant_labels`: {finding or 'Abnormal': 1 or 0} for every row.

`values` keys and `where` values that YAML read as booleans (an unquoted yes / no) match every
spelling of them (yes, y, true, on / no, n, false, off).

Rows to keep and image paths are read as every table site reads them (sites/adapters/table_adapter.py).
"""
from __future__ import annotations

import difflib
import json
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from chestfed.common.labels import ABNORMAL, FINDINGS, INDEX, NO_FINDING, LabelError
from chestfed.sites.adapters.base import SiteDataError, register
from chestfed.sites.adapters.files import canonical_finding
from chestfed.sites.adapters.table_adapter import TableAdapter, TableOptions, cell_keys, cell_text

log = logging.getLogger(__name__)

UNKNOWN = "unknown"


class CSVOptions(TableOptions):
    labels: dict[str, str] | None = None
    findings_column: str | None = None
    separator: str = "|"
    annotates: list[str] | None = None
    values: dict[bool | str | int | float, str] | None = None
    abnormal_column: str | None = None
    constant_labels: dict[str, Literal[0, 1]] | None = None


# A label source's labels: [N, len(FINDINGS)] (NaN unknown), its annotated mask, and its name.
_Source = tuple[np.ndarray, np.ndarray, str]


@register
class CSVAdapter(TableAdapter):
    kind = "csv"
    Opts = CSVOptions

    def __init__(self, name: str, root: str | None, options: dict[str, Any]):
        super().__init__(name, root, options)
        o = self.opts
        if o.labels is not None and o.findings_column is not None:
            raise SiteDataError(f"{self.where}: the options 'labels' and 'findings_column' "
                                "exclude each other; set one of them")
        if (o.labels is None and o.findings_column is None and o.abnormal_column is None
                and not o.constant_labels):
            raise SiteDataError(f"{self.where}: no labels: set one of the options 'labels' "
                                "({column: finding}), 'findings_column', 'abnormal_column' or "
                                "'constant_labels'")
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
        # raw text (trimmed, lower case) -> finding, 'No Finding', or None for unknown
        self.values: dict[str, str | None] = {}
        for raw, target in (o.values or {}).items():
            if str(target).strip().lower() == UNKNOWN:
                finding = None
            else:
                try:
                    finding = canonical_finding(str(target))
                except LabelError as exc:
                    raise SiteDataError(f"{self.where}: option 'values': {cell_text(raw)!r} -> "
                                        f"{exc}; or map it to 'unknown'") from None
            for key in cell_keys(raw):
                self.values[key] = finding
        self.constant: dict[str, int] = {}
        for name, v in (o.constant_labels or {}).items():
            if str(name).strip().lower() == ABNORMAL.lower():
                # Abnormal is 'not marked normal': it lives in the 'No Finding' column.
                target, value = NO_FINDING, 1 - int(v)
            else:
                try:
                    target, value = canonical_finding(str(name)), int(v)
                except LabelError as exc:
                    raise SiteDataError(f"{self.where}: option 'constant_labels': {exc}; or "
                                        f"'{ABNORMAL}'") from None
            if target in self.constant:
                raise SiteDataError(f"{self.where}: option 'constant_labels' sets {target} twice")
            self.constant[target] = value

    # --- label sources, each [N, FINDINGS] with NaN for unknown ------------------------------

    def make_labels(self, df: pd.DataFrame, csv: Path
                    ) -> tuple[np.ndarray, np.ndarray, dict[str, pd.DataFrame]]:
        o = self.opts
        sources: list[_Source] = []
        if o.findings_column is not None:
            sources.append(self._from_findings(df, csv))
        if self.mapping:
            sources.append(self._from_label_columns(df, csv))
        if o.abnormal_column is not None:
            self._need_column(df, o.abnormal_column, csv, "abnormal_column")
            y = self._binary(df[o.abnormal_column], o.abnormal_column, csv, positive=None)
            vals = self._empty(len(df))
            vals[:, INDEX[NO_FINDING]] = 1.0 - y
            sources.append((vals, self._mask([NO_FINDING]),
                            f"abnormal_column '{o.abnormal_column}'"))
        if self.constant:
            vals = self._empty(len(df))
            for name, v in self.constant.items():
                vals[:, INDEX[name]] = v
            sources.append((vals, self._mask(list(self.constant)), "constant_labels"))
        return (*self._merge(sources), {})

    @staticmethod
    def _empty(n: int) -> np.ndarray:
        return np.full((n, len(FINDINGS)), np.nan, dtype=np.float32)

    @staticmethod
    def _mask(names: list[str]) -> np.ndarray:
        m = np.zeros(len(FINDINGS), dtype=bool)
        m[[INDEX[n] for n in names]] = True
        return m

    def _merge(self, sources: list[_Source]) -> tuple[np.ndarray, np.ndarray]:
        labels, annotated, said_by = sources[0][0].copy(), sources[0][1].copy(), [sources[0][2]]
        for vals, ann, name in sources[1:]:
            both = ~np.isnan(labels) & ~np.isnan(vals)
            clash = both & (labels != vals)
            if clash.any():
                i, j = (int(k[0]) for k in np.nonzero(clash))
                finding = FINDINGS[j]

                def say(v: float) -> str:
                    return (f"{ABNORMAL} = {1 - v:g}" if finding == NO_FINDING
                            else f"{finding} = {v:g}")
                raise SiteDataError(
                    f"{self.where}: {self._csv_name} line {self.line(i)}: {name} says "
                    f"{say(vals[i, j])} but {' / '.join(said_by)} says {say(labels[i, j])} "
                    f"({int(clash.any(axis=1).sum())} such rows)")
            labels = np.where(np.isnan(labels), vals, labels)
            annotated |= ann
            said_by.append(name)
        return labels.astype(np.float32), annotated

    def _from_label_columns(self, df: pd.DataFrame, csv: Path) -> _Source:
        labels = self._empty(len(df))
        for col, finding in self.mapping.items():
            self._need_column(df, col, csv, "labels")
            labels[:, INDEX[finding]] = self._binary(df[col], col, csv, positive=finding)
        return labels, self._mask(list(self.mapping.values())), "option 'labels'"

    def _binary(self, s: pd.Series, col: str, csv: Path, positive: str | None) -> np.ndarray:
        """1 / 0 / NaN from 1, 0, blank, or a text mapped by `values`: to `positive` (any finding
        when positive is None: an abnormal column) 1, to 'No Finding' 0, to 'unknown' NaN."""
        text = s.astype(object).where(s.notna(), "").astype(str).str.strip()
        num = pd.to_numeric(text.where(text != ""), errors="coerce").astype(float)
        if self.values:
            low = text.str.lower()
            mapped = low.isin(list(self.values))
            for key in set(low[mapped]):
                target = self.values[key]
                if target is None:
                    v = np.nan
                elif target == NO_FINDING:
                    v = 0.0
                elif positive is None or target == positive:
                    v = 1.0
                else:
                    i = int(np.flatnonzero((low == key).to_numpy())[0])
                    raise SiteDataError(
                        f"{self.where}: column '{col}' of {csv.name} has the value "
                        f"{text.iloc[i]!r} on line {self.line(i)}, which option 'values' maps to "
                        f"'{target}'; this column holds {positive} (map it to '{positive}', "
                        f"'{NO_FINDING}' or 'unknown')")
                num[(low == key).to_numpy()] = v
            unmapped = ~mapped
        else:
            unmapped = pd.Series(True, index=text.index)
        bad = unmapped & (((text != "") & num.isna()) | ~(num.isin([0, 1]) | num.isna()))
        if bad.any():
            first = int(np.flatnonzero(bad.to_numpy())[0])
            raise SiteDataError(f"{self.where}: column '{col}' of {csv.name} has the value "
                                f"{text.iloc[first]!r} on line {self.line(first)} "
                                f"({int(bad.sum())} such values); labels must be 1, 0 or blank, "
                                "or a text mapped by option 'values'")
        return num.to_numpy(dtype=np.float32)

    def _name(self, token: str) -> tuple[bool, str | None]:
        """(known, finding-or-None-for-unknown) of one findings-column token."""
        key = token.strip().lower()
        if key in self.values:
            return True, self.values[key]
        try:
            return True, canonical_finding(token)
        except LabelError:
            return False, None

    def _from_findings(self, df: pd.DataFrame, csv: Path) -> _Source:
        col, sep = self.opts.findings_column, self.opts.separator
        self._need_column(df, col, csv, "findings_column")
        cells = df[col].astype(object).where(df[col].notna(), "").astype(str).str.strip()
        parsed: list[tuple[list[str], bool] | None] = []  # (names, has an 'unknown' part)
        seen: set[str] = set()
        bad: dict[str, int] = {}  # unknown value -> first row
        n_bad_rows = 0
        for i, cell in enumerate(cells):
            if cell == "":
                parsed.append(None)
                continue
            known, name = self._name(cell) if cell.lower() in self.values else (False, None)
            tokens = [cell] if known else [t.strip() for t in cell.split(sep) if t.strip()]
            names, unknown, row_bad = [], False, False
            for token in tokens:
                known, name = self._name(token)
                if not known:
                    bad.setdefault(token, i)
                    row_bad = True
                elif name is None:
                    unknown = True
                elif name not in names:
                    names.append(name)
            n_bad_rows += row_bad
            parsed.append(None if (not names and unknown) else (names, unknown))
            seen.update(names)
        if bad:
            raise self._unmapped(bad, n_bad_rows, col, csv)
        annot_names = self.annotates if self.annotates is not None else sorted(
            seen | {NO_FINDING}, key=FINDINGS.index)
        if self.annotates is not None:
            extra = seen - set(self.annotates)
            if extra:
                raise SiteDataError(f"{self.where}: column '{col}' names {sorted(extra)}, which "
                                    "option 'annotates' leaves out; add them to 'annotates'")
        annotated = self._mask(annot_names)
        labels = self._empty(len(df))
        blank = 0
        for i, row in enumerate(parsed):
            if row is None:
                blank += 1
                continue
            names, unknown = row
            if not unknown:
                labels[i, annotated] = 0.0
            for n in names:
                labels[i, INDEX[n]] = 1.0
        if blank:
            log.warning("%s: %d rows have a blank or unknown '%s'; their labels are unknown",
                        self.where, blank, col)
        return labels, annotated, f"findings_column '{col}'"

    def _unmapped(self, bad: dict[str, int], rows: int, col: str, csv: Path) -> SiteDataError:
        value, i = min(bad.items(), key=lambda kv: kv[1])
        close = difflib.get_close_matches(value, FINDINGS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        others = [v for v in bad if v != value]
        more = (f"; {len(others)} more unmapped value(s): "
                + ", ".join(repr(v) for v in others[:5]) + (" ..." if len(others) > 5 else "")
                if others else "")
        return SiteDataError(
            f"{self.where}: column '{col}' of {csv.name} has the value {value!r} on line "
            f"{self.line(i)}, which is not a finding{hint}; map it with option 'values', e.g. "
            f"values: {{{json.dumps(value)}: Pneumonia}}, or {{{json.dumps(value)}: unknown}} "
            f"({rows} rows unmapped{more})")
