"""CheXpert (Stanford): `kind: chexpert`, for CheXpert-v1.0 and CheXpert-v1.0-small.

Layout: `root` is the dataset folder (or the folder holding exactly one `CheXpert-v1.0*` folder):

    root/train.csv, root/valid.csv
    root/train/patient00001/study1/view1_frontal.jpg ...

The tables' paths are relative to root's parent ('CheXpert-v1.0-small/train/patient00001/...'),
so their first component is replaced by root. The patient id is the path's 'patientNNNNN'.

Labels come from torchxrayvision's CheX_Dataset (13 observations; where 'No Finding' is 1 every
pathology but Support Devices is set to 0). Its 11 findings in the common label space and
'No Finding' (1 where the table says 1, else 0) are annotated; 'Pleural Other' and 'Support
Devices' have no place in it and are dropped.

Options:
    views: keep images whose view is in this list: 'frontal', 'lateral' (the Frontal/Lateral
           column) and/or 'PA', 'AP', 'LL', 'RL' (the AP/PA column), or '*' (default ['frontal'])
    uncertain: the policy for CheXpert's uncertain label -1: 'ignore' (NaN: masked, the default;
               torchxrayvision's convention), 'ones' (U-Ones, Bajwa et al.) or 'zeros' (U-Zeros)
    blank: observations the report does not mention: 'nan' (unknown, masked; the default) or
           'zeros' (absent)
    valid_as_test: the radiologist-labelled valid.csv is the official test split and train.csv
           the official train split (default true; Bajwa et al.). false: both tables are pooled and
           split patient-wise like any site.
    train_csv, valid_csv: table names relative to root (defaults train.csv, valid.csv); a missing
           valid.csv is a warning, and the split is then made from train.csv alone.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from chestfed.common.labels import INDEX, NO_FINDING
from chestfed.sites.adapters import xrv_tables
from chestfed.sites.adapters.base import SiteDataError, SiteRecords, register
from chestfed.sites.adapters.csv_tables import check_columns, read_table
from chestfed.sites.adapters.files import (FileAdapter, Options, empty_after_filters, require_root,
                                  show_value, to_common)
from chestfed.sites.adapters.metadata import make_meta, norm_age, norm_sex, norm_view
from chestfed.sites.imageio import join_inside

log = logging.getLogger(__name__)

VIEW_TOKENS = ("frontal", "lateral", "PA", "AP", "LL", "RL", "*")
REQUIRED = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding")


class CheXpertOptions(Options):
    views: list[str] = Field(default_factory=lambda: ["frontal"], min_length=1)
    uncertain: Literal["ignore", "ones", "zeros"] = "ignore"
    blank: Literal["nan", "zeros"] = "nan"
    valid_as_test: bool = True
    train_csv: str = "train.csv"
    valid_csv: str = "valid.csv"

    @field_validator("views")
    @classmethod
    def _views(cls, v: list[str]) -> list[str]:
        for t in v:
            if t not in VIEW_TOKENS:
                raise ValueError(f"unknown view '{t}'; use {', '.join(VIEW_TOKENS)}")
        return v


@register
class CheXpertAdapter(FileAdapter):
    kind = "chexpert"
    Opts = CheXpertOptions

    def _dataset_root(self) -> Path:
        root = require_root(self)
        if (root / self.opts.train_csv).is_file() or (root / self.opts.valid_csv).is_file():
            return root
        inner = [p for p in sorted(root.glob("CheXpert-v1.0*")) if p.is_dir()
                 and ((p / self.opts.train_csv).is_file() or (p / self.opts.valid_csv).is_file())]
        if len(inner) == 1:
            return inner[0]
        raise SiteDataError(f"{self.where}: no {self.opts.train_csv} or {self.opts.valid_csv} in "
                            f"'{root}'; point root at the CheXpert-v1.0(-small) folder")

    def _load(self) -> tuple[SiteRecords, list[Path]]:
        root = self._dataset_root()
        parts = []
        for table_name, official in ((self.opts.train_csv, "train"),
                                     (self.opts.valid_csv, "test")):
            path = root / table_name
            if not path.is_file():
                log.warning("%s: %s not found; using %s only", self.where, path,
                            self.opts.valid_csv if official == "train" else self.opts.train_csv)
                continue
            self._sources.append(path)
            parts.append(self._table(root, path, official if self.opts.valid_as_test else None))
        n_rows = sum(p[3] for p in parts)
        keep_parts = [p for p in parts if len(p[0])]
        if not keep_parts:
            raise empty_after_filters(self, {"views": self.opts.views}, n_rows)
        meta = pd.concat([p[0] for p in keep_parts], ignore_index=True)
        labels = np.concatenate([p[1] for p in keep_parts])
        annotated = keep_parts[0][2]
        self._image_root = root
        # lexical check here (fast for 223,414 rows); symlinks are checked as images are read
        base = str(root)
        paths = [join_inside(base, rel, root) for rel in meta.pop("_rel").tolist()]
        if len(set(meta["image_id"])) != len(meta):
            dup = meta["image_id"][meta["image_id"].duplicated()].iloc[0]
            raise SiteDataError(f"{self.where}: image '{dup}' is listed twice")
        if self.opts.valid_as_test and len(keep_parts) == 1:
            meta["official_split"] = None
        log.info("%s: %d images, %d patients (uncertain=%s)", self.where, len(meta),
                 meta["patient_id"].nunique(), self.opts.uncertain)
        return SiteRecords(meta, labels, annotated), paths

    def _table(self, root: Path, path: Path, official: str | None
               ) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, int]:
        head = read_table(self, path, nrows=0)
        check_columns(self, head, REQUIRED, path)
        ds = xrv_tables.chexpert(self.where, path, root)
        table = ds.csv
        n_rows = len(table)
        keep = self._view_mask(table)
        table = table[keep].reset_index(drop=True)

        names = xrv_tables.names(ds)
        raw_cols = [xrv_tables.CHEXPERT_RAW_COLUMN.get(n, n) for n in names]
        check_columns(self, table, raw_cols, path)
        raw = table[raw_cols].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float32)
        self._check_domain(table[raw_cols], path)
        # torchxrayvision's own matrix must be what we read, except for the uncertain values.
        xl = xrv_tables.labels(ds)[keep]
        certain = ~np.isnan(xl)
        if not np.array_equal(xl[certain], raw[certain]):
            raise AssertionError("torchxrayvision's CheXpert labels disagree with the table")
        values = raw.copy()
        uncertain = values == -1
        values[uncertain] = {"ignore": np.nan, "ones": 1.0, "zeros": 0.0}[self.opts.uncertain]
        if self.opts.blank == "zeros":
            values[np.isnan(raw)] = 0.0
        labels, annotated = to_common(names, values)
        labels[:, INDEX[NO_FINDING]] = (pd.to_numeric(table["No Finding"], errors="coerce")
                                        == 1).to_numpy(dtype=np.float32)
        annotated[INDEX[NO_FINDING]] = True

        rel = self._relative(table["Path"].astype(str), root.name)
        patient = table["Path"].astype(str).str.extract(r"(patient\d+)", expand=False)
        if patient.isna().any():
            bad = table["Path"][patient.isna()].iloc[0]
            raise SiteDataError(f"{self.where}: cannot find a 'patientNNNNN' folder in the path "
                                f"'{bad}' of {path.name}")
        age = norm_age(table["Age"], self.where, "Age")
        age = age.where(age > 0)  # CheXpert writes 0 for an unknown age
        meta = make_meta(table["Path"].astype(str), patient, age=age,
                         sex=norm_sex(table["Sex"]), view=norm_view(table["view"]),
                         official_split=official)
        meta["_rel"] = rel.to_numpy()
        return meta, labels, annotated, n_rows

    def _view_mask(self, table: pd.DataFrame) -> np.ndarray:
        views = set(self.opts.views)
        if "*" in views:
            return np.ones(len(table), dtype=bool)
        fl = table["Frontal/Lateral"].astype(str).str.lower()
        mask = np.zeros(len(table), dtype=bool)
        if "frontal" in views:
            mask |= (fl == "frontal").to_numpy()
        if "lateral" in views:
            mask |= (fl == "lateral").to_numpy()
        named = views & {"PA", "AP", "LL", "RL"}
        if named:
            mask |= table["view"].isin(named).to_numpy()
        return mask

    def _check_domain(self, raw: pd.DataFrame, path: Path) -> None:
        for col in raw.columns:
            vals = pd.to_numeric(raw[col], errors="coerce")
            bad = (raw[col].notna() & vals.isna()) | ~(vals.isin([1, 0, -1]) | vals.isna())
            if bad.any():
                raise SiteDataError(f"{self.where}: column '{col}' of {path.name} has the value "
                                    f"{show_value(raw[col][bad].iloc[0])}; CheXpert labels are "
                                    "1, 0, -1 or blank")

    @staticmethod
    def _relative(paths: pd.Series, root_name: str) -> pd.Series:
        """The tables' paths relative to root: their first part is the dataset folder's name."""
        p = paths.str.replace("\\", "/", regex=False)
        parts = p.str.split("/", n=1, expand=True)
        if parts.shape[1] < 2:
            return p
        first, rest = parts[0], parts[1]
        strip = rest.notna() & (first.str.startswith("CheXpert-v1.0") | (first == root_name))
        return rest.where(strip, p)
