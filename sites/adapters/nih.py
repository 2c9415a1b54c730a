"""NIH ChestX-ray14 (NIH Clinical Center): `kind: nih`.

Layout (the official release, or any part of it):

    root/Data_Entry_2017_v2020.csv      (or Data_Entry_2017.csv; option `csv` names another)
    root/images/00000001_000.png        or root/images_001/images/..., root/images_002/images/...
    root/train_val_list.txt             optional: the official patient-wise split
    root/test_list.txt                  optional

Labels come from torchxrayvision's NIH_Dataset (its 14 findings, from 'Finding Labels'), plus
'No Finding' (the table's 'No Finding' string). NIH annotates these 15; the rest of the label
space is NaN. Rows of the table whose image file is not under root are left out (and counted), so a
partial download works. With the official lists present, `official_split` is 'train' or 'test'
(images in neither list have none, and then the splitter makes its own patient-wise split).

Options:
    csv: the label table, relative to root (default: Data_Entry_2017*.csv at root, newest first)
    views: which 'View Position' values to keep, from PA and AP (default both)
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from chestfed.common.labels import INDEX, NO_FINDING
from chestfed.sites.adapters import xrv_tables
from chestfed.sites.adapters.base import SiteRecords, register
from chestfed.sites.adapters.csv_tables import check_columns, read_table, table_path
from chestfed.sites.adapters.files import (FileAdapter, Options, empty_after_filters, index_images,
                                  require_root, to_common)
from chestfed.sites.adapters.metadata import make_meta, norm_age, norm_sex, norm_view

log = logging.getLogger(__name__)

REQUIRED = ("Image Index", "Finding Labels", "Patient ID", "Patient Age", "View Position")
NIH_FINDINGS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema",
                "Fibrosis", "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening",
                "Pneumonia", "Pneumothorax")


class NIHOptions(Options):
    csv: str | None = None
    views: list[Literal["PA", "AP"]] = Field(default_factory=lambda: ["PA", "AP"], min_length=1)


@register
class NIHAdapter(FileAdapter):
    kind = "nih"
    Opts = NIHOptions

    def _load(self) -> tuple[SiteRecords, list[Path]]:
        root = require_root(self)
        csv = table_path(self, root, self.opts.csv,
                         ["Data_Entry_2017_v2020.csv", "Data_Entry_2017_v2020.csv.gz",
                          "Data_Entry_2017*.csv", "Data_Entry_2017*.csv.gz"], "NIH label table")
        self._sources = [csv]
        head = read_table(self, csv, nrows=0)
        required = list(REQUIRED)
        required.append("Patient Sex" if "Patient Sex" in head.columns else "Patient Gender")
        check_columns(self, head, required, csv)
        n_table = len(read_table(self, csv, usecols=["Image Index"]))

        ds = xrv_tables.nih(self.where, csv, root, list(self.opts.views))
        table = ds.csv
        if len(table) == 0:
            raise empty_after_filters(self, {"views": list(self.opts.views)}, n_table)
        self._check_names(table["Finding Labels"])

        names = xrv_tables.names(ds)
        labels, annotated = to_common(names, xrv_tables.labels(ds))
        no_finding = table["Finding Labels"].astype(str).str.strip() == NO_FINDING
        labels[:, INDEX[NO_FINDING]] = no_finding.to_numpy(dtype=np.float32)
        annotated[INDEX[NO_FINDING]] = True

        folders = [root / "images", *sorted(root.glob("images_*/images")),
                   *sorted(p for p in root.glob("images_*") if p.is_dir()), root]
        files = index_images(root, folders)
        ids = table["Image Index"].astype(str)
        has_file = ids.map(lambda n: n in files).to_numpy(dtype=bool)
        if not has_file.any():
            raise empty_after_filters(
                self, {"views": list(self.opts.views)}, n_table,
                f"none of the {len(table)} images in the table is under {root}/images, "
                f"{root}/images_*/images or {root}")
        if not has_file.all():
            log.warning("%s: %d of %d images in %s are not under %s; they are left out",
                        self.where, int((~has_file).sum()), len(table), csv.name, root)
        table = table[has_file].reset_index(drop=True)
        labels = labels[has_file]
        ids = table["Image Index"].astype(str)

        sex_col = "Patient Gender" if "Patient Gender" in table.columns else "Patient Sex"
        meta = make_meta(
            ids, table["Patient ID"].astype(str),
            age=norm_age(table["Patient Age"], self.where, "Patient Age"),
            sex=norm_sex(table[sex_col]),
            view=norm_view(table["View Position"]),
            official_split=self._official(root, ids),
        )
        log.info("%s: %d images, %d patients from %s", self.where, len(meta),
                 meta["patient_id"].nunique(), csv.name)
        return SiteRecords(meta, labels, annotated), [files[n] for n in ids]

    def _check_names(self, finding_labels) -> None:
        known = set(NIH_FINDINGS) | {NO_FINDING}
        tokens = finding_labels.astype(str).str.split("|").explode().str.strip()
        unknown = sorted(set(tokens) - known)
        if unknown:
            log.warning("%s: 'Finding Labels' names %s, which are not NIH findings; ignored",
                        self.where, unknown[:10])

    def _official(self, root: Path, ids) -> list[str | None]:
        train_list, test_list = root / "train_val_list.txt", root / "test_list.txt"
        if not (train_list.is_file() and test_list.is_file()):
            return [None] * len(ids)
        train = set(train_list.read_text().split())
        test = set(test_list.read_text().split())
        both = train & test
        if both:
            log.warning("%s: %d images are in both train_val_list.txt and test_list.txt; they "
                        "count as test", self.where, len(both))
        out = ["test" if n in test else "train" if n in train else None for n in ids]
        missing = sum(o is None for o in out)
        if missing:
            log.warning("%s: %d images are in neither official list; the official split is not "
                        "used", self.where, missing)
        return out
