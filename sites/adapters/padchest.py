"""PadChest (Hospital San Juan, Alicante): `kind: padchest`.

Layout:

    root/PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv[.gz]   (option `csv` names another)
    root/<ImageDir>/<ImageID>.png     the release's folders 0..54 (the table's ImageDir column);
                                      root/images/<ImageID> and root/<ImageID> are also searched

Labels come from torchxrayvision's PC_Dataset, which maps PadChest's 174 findings onto its
pathology names (e.g. 'alveolar pattern', 'infiltrates', ... -> Infiltration). The 15 of them in the
common label space are annotated, plus 'No Finding' (1 where PadChest's labels include 'normal').
Lung Lesion, Lung Opacity and Enlarged Cardiomediastinum are not annotated (NaN). A row whose label
list is empty ("['']") has unknown labels (NaN), not 'every finding absent'.

PC_Dataset keeps only rows with labels, drops 21 files known to be missing or broken and patients
born 10 or fewer years before 2019 (and unknown birth years): counts are below the table's.
Rows whose image file is not under root are left out and counted (a partial download works).

Images are 16-bit PNGs holding 10- or 12-bit data (BitsStored_DICOM) or data rescaled to 16 bits;
each is scaled by max(BitsStored_DICOM, the bits its largest value needs) (sites/imageio.py).

Meta: age = study year - birth year; sex from PatientSex_DICOM ('O' is unknown); view from
Projection (PA; AP and AP Supine -> AP; L -> LATERAL; COSTAL, EXCLUDE, UNK -> none).

Options:
    csv: the table, relative to root
    views: PC_Dataset view names to keep: PA, AP, 'AP Supine', L, COSTAL, EXCLUDE, UNK, or '*'
           (default PA, AP, AP Supine: the frontal images)
    drop_exclude: drop rows whose labels include 'exclude' (default true): PadChest's marker for
           a study its annotators excluded, which would otherwise read as 'no finding mapped'
    bits: force the nominal bit depth of every image (default: BitsStored_DICOM per image)
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from chestfed.common.labels import INDEX, NO_FINDING
from chestfed.sites.adapters import xrv_tables
from chestfed.sites.adapters.base import SiteRecords, register
from chestfed.sites.adapters.csv_tables import check_columns, read_table, table_path
from chestfed.sites.adapters.files import (FileAdapter, Options, empty_after_filters, index_images,
                                  require_root, to_common)
from chestfed.sites.adapters.metadata import make_meta, norm_sex, norm_view

log = logging.getLogger(__name__)

TABLE = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
REQUIRED = ("ImageID", "PatientID", "Projection", "Labels", "PatientBirth", "PatientSex_DICOM",
            "StudyDate_DICOM")
VIEWS = ("PA", "AP", "AP Supine", "L", "COSTAL", "EXCLUDE", "UNK", "*")


class PadChestOptions(Options):
    csv: str | None = None
    views: list[str] = Field(default_factory=lambda: ["PA", "AP", "AP Supine"], min_length=1)
    drop_exclude: bool = True
    bits: int | None = Field(None, ge=8, le=16)

    @field_validator("views")
    @classmethod
    def _views(cls, v: list[str]) -> list[str]:
        for t in v:
            if t not in VIEWS:
                raise ValueError(f"unknown view '{t}'; use {', '.join(VIEWS)}")
        return v


@register
class PadChestAdapter(FileAdapter):
    kind = "padchest"
    Opts = PadChestOptions

    def _load(self) -> tuple[SiteRecords, list[Path]]:
        root = require_root(self)
        csv = table_path(self, root, self.opts.csv, [TABLE, TABLE + ".gz", "PADCHEST*.csv",
                                                     "PADCHEST*.csv.gz"], "PadChest label table")
        self._sources = [csv]
        head = read_table(self, csv, nrows=0)
        check_columns(self, head, REQUIRED, csv)
        ds = xrv_tables.padchest(self.where, csv, root, list(self.opts.views))
        table = ds.csv
        names = xrv_tables.names(ds)
        values = xrv_tables.labels(ds)
        filters = {"views": list(self.opts.views)}
        if self.opts.drop_exclude:
            excluded = table["Labels"].astype(str).str.contains(r"'exclude'", regex=True).to_numpy()
            if excluded.any():
                log.info("%s: %d rows labelled 'exclude' are left out", self.where,
                         int(excluded.sum()))
            table, values = table[~excluded].reset_index(drop=True), values[~excluded]
            filters["drop_exclude"] = True
        if len(table) == 0:
            raise empty_after_filters(self, filters, self._n_rows(csv),
                                      "torchxrayvision's PC_Dataset also drops unlabelled rows "
                                      "and patients aged 10 or less")

        labels, annotated = to_common(names, values)
        normal = table["Labels"].astype(str).str.contains(r"'normal'", regex=True)
        labels[:, INDEX[NO_FINDING]] = normal.to_numpy(dtype=np.float32)
        annotated[INDEX[NO_FINDING]] = True
        # "['']": a report with no label at all is unknown, not 'every finding absent'
        empty = table["Labels"].astype(str).str.fullmatch(r"\[\s*(''\s*)?\]").to_numpy(dtype=bool)
        if empty.any():
            labels[empty] = np.nan
            log.info("%s: %d rows have an empty label list; their labels are unknown",
                     self.where, int(empty.sum()))

        folders = [root / "images", root]
        if "ImageDir" in table.columns:
            dirs = sorted({str(d).split(".")[0] for d in table["ImageDir"].dropna()})
            folders = [root / d for d in dirs if re.fullmatch(r"[\w-]+", d)] + folders
        files = index_images(root, folders)
        ids = table["ImageID"].astype(str)
        has = ids.map(lambda n: n in files).to_numpy(dtype=bool)
        if not has.any():
            raise empty_after_filters(self, filters, self._n_rows(csv),
                                      f"none of the {len(table)} images is under "
                                      f"{root}/<ImageDir>, {root}/images or {root}")
        if not has.all():
            log.warning("%s: %d of %d images in %s are not under %s; they are left out",
                        self.where, int((~has).sum()), len(table), csv.name, root)
        table, labels = table[has].reset_index(drop=True), labels[has]
        ids = table["ImageID"].astype(str)

        year = pd.to_numeric(table["StudyDate_DICOM"].astype(str).str[:4], errors="coerce")
        age = (year - pd.to_numeric(table["PatientBirth"], errors="coerce")).astype(float)
        age = age.where((age >= 0) & (age <= 120))
        meta = make_meta(ids, table["PatientID"].astype(str), age=age,
                         sex=norm_sex(table["PatientSex_DICOM"]), view=norm_view(table["view"]))
        if self.opts.bits:
            self._bits = [int(self.opts.bits)] * len(meta)
        elif "BitsStored_DICOM" in table.columns:
            b = pd.to_numeric(table["BitsStored_DICOM"], errors="coerce").fillna(8)
            self._bits = b.clip(8, 16).astype(int).tolist()
        log.info("%s: %d images, %d patients from %s", self.where, len(meta),
                 meta["patient_id"].nunique(), csv.name)
        source = pd.DataFrame({"projection": table["view"].astype(str).to_numpy(),
                               "padchest_labels": table["Labels"].astype(str).to_numpy()})
        extras = {"source": source}
        return SiteRecords(meta, labels, annotated, extras), [files[n] for n in ids]

    def _n_rows(self, csv: Path) -> int:
        return len(read_table(self, csv, usecols=["ImageID"]))
