"""MedMNIST chest sets (PneumoniaMNIST, ChestMNIST) from their `.npz` files: `kind: medmnist`.

`root` is the `.npz` file, or a folder holding it (option `file` names it; default
'<dataset>.npz'). The file has the keys train_images, train_labels, val_images, val_labels,
test_images, test_labels (MedMNIST v2 and MedMNIST+ at 28/64/128/224 px); the official
train/val/test split is kept as `official_split`.

Labels:
    pneumoniamnist: binary; 1 -> Pneumonia = 1, No Finding = 0; 0 -> Pneumonia = 0, No Finding = 1.
                    Every other finding is NaN (the site does not annotate it).
    chestmnist:     the 14 NIH findings in ChestMNIST's order (atelectasis, cardiomegaly, effusion,
                    infiltration, mass, nodule, pneumonia, pneumothorax, consolidation, edema,
                    emphysema, fibrosis, pleural (thickening), hernia), and No Finding = 1 where
                    all 14 are 0 (NIH's 'No Finding' means exactly that).

No patient ids exist in MedMNIST: each image is its own patient (`patient_id` = `image_id` =
'<split>/<index>'). Patient-wise splitting therefore cannot be guaranteed by ChestFed; use the
official split (the default), which MedMNIST made from its source's own splits.

Options:
    dataset: 'pneumoniamnist' or 'chestmnist' (default: from the file name)
    file: the .npz name when root is a folder
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from chestfed.common.labels import INDEX, NO_FINDING
from chestfed.sites.adapters.base import SiteAdapter, SiteDataError, SiteRecords, register
from chestfed.sites.adapters.files import Options, parse_options, require_root, show_value, to_common
from chestfed.sites.adapters.metadata import make_meta
from chestfed.sites.pixels import array_to_gray8

log = logging.getLogger(__name__)

SPLIT_KEYS = ("train", "val", "test")
CHESTMNIST_LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
                     "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema",
                     "Fibrosis", "Pleural_Thickening", "Hernia")
DATASETS = ("pneumoniamnist", "chestmnist")


class MedMNISTOptions(Options):
    dataset: Literal["pneumoniamnist", "chestmnist"] | None = None
    file: str | None = None


# Worker processes load each file once and keep its arrays (keyed by path and mtime).
_ARRAYS: dict[tuple[str, int], dict[str, np.ndarray]] = {}


def _images(path: str, mtime: int) -> dict[str, np.ndarray]:
    key = (path, mtime)
    if key not in _ARRAYS:
        with np.load(path) as z:
            _ARRAYS.clear()
            _ARRAYS[key] = {s: np.asarray(z[f"{s}_images"]) for s in SPLIT_KEYS}
    return _ARRAYS[key]


@dataclass(frozen=True)
class NpzReader:
    """Picklable reader: record i -> (split, index) in the .npz -> 2-D uint8."""

    path: str
    mtime: int
    sizes: tuple[int, int, int]

    def __call__(self, i: int, size: int) -> np.ndarray:
        arrays = _images(self.path, self.mtime)
        for split, n in zip(SPLIT_KEYS, self.sizes):
            if i < n:
                return array_to_gray8(arrays[split][i])
            i -= n
        raise IndexError(i)


@register
class MedMNISTAdapter(SiteAdapter):
    kind = "medmnist"

    def __init__(self, name: str, root: str | None, options: dict):
        super().__init__(name, root, options)
        self.opts = parse_options(name, self.kind, MedMNISTOptions, self.options)
        self._records: SiteRecords | None = None
        self._reader: NpzReader | None = None

    @property
    def where(self) -> str:
        return f"site '{self.name}' ({self.kind})"

    def npz_path(self) -> Path:
        root = require_root(self, files_ok=True)
        if root.is_file():
            return root
        name = self.opts.file or (f"{self.opts.dataset}.npz" if self.opts.dataset else None)
        if name is None:
            found = sorted(p for p in root.glob("*.npz") if _dataset_of(p.name))
            if len(found) != 1:
                names = ", ".join(p.name for p in found) or "no MedMNIST .npz"
                raise SiteDataError(f"{self.where}: root '{root}' is a folder; name the file with "
                                    f"option 'file' (found: {names})")
            return found[0]
        path = root / name
        if not path.is_file():
            raise SiteDataError(f"{self.where}: '{path}' not found")
        return path

    def records(self) -> SiteRecords:
        if self._records is not None:
            return self._records
        path = self.npz_path()
        dataset = self.opts.dataset or _dataset_of(path.name)
        if dataset is None:
            raise SiteDataError(f"{self.where}: cannot tell the dataset from the file name "
                                f"'{path.name}'; set option 'dataset' to one of "
                                f"{', '.join(DATASETS)}")
        try:
            with np.load(path) as z:
                missing = [k for s in SPLIT_KEYS for k in (f"{s}_images", f"{s}_labels")
                           if k not in z.files]
                if missing:
                    raise SiteDataError(f"{self.where}: '{path}' lacks the keys {missing} "
                                        f"(has {z.files}); is it a MedMNIST file?")
                ys = {s: np.asarray(z[f"{s}_labels"]) for s in SPLIT_KEYS}
                shapes = {s: z[f"{s}_images"].shape for s in SPLIT_KEYS}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise SiteDataError(f"{self.where}: cannot read '{path}': {exc}") from None
        for s in SPLIT_KEYS:
            if len(ys[s]) != shapes[s][0]:
                raise SiteDataError(f"{self.where}: '{path}' has {shapes[s][0]} {s} images but "
                                    f"{len(ys[s])} labels")

        parts, ids, official = [], [], []
        for s in SPLIT_KEYS:
            parts.append(self._labels(ys[s], dataset, path, s))
            ids += [f"{s}/{i}" for i in range(len(ys[s]))]
            official += [s] * len(ys[s])
        labels = np.concatenate(parts).astype(np.float32)
        if dataset == "pneumoniamnist":
            annotated = np.zeros(len(INDEX), dtype=bool)
            annotated[[INDEX["Pneumonia"], INDEX[NO_FINDING]]] = True
        else:
            _, annotated = to_common(list(CHESTMNIST_LABELS) + [NO_FINDING],
                                     np.zeros((0, len(CHESTMNIST_LABELS) + 1)))
        if not ids:
            raise SiteDataError(f"{self.where}: '{path}' holds no images")
        meta = make_meta(ids, ids, official_split=official)
        st = path.stat()
        self._reader = NpzReader(str(path.resolve()), st.st_mtime_ns,
                                 tuple(len(ys[s]) for s in SPLIT_KEYS))
        self._records = SiteRecords(meta, labels, annotated)
        log.info("%s: %s, %d images (%s)", self.where, dataset, len(meta),
                 ", ".join(f"{s} {len(ys[s])}" for s in SPLIT_KEYS))
        return self._records

    def _labels(self, y: np.ndarray, dataset: str, path: Path, split: str) -> np.ndarray:
        y = np.asarray(y)
        if y.ndim == 1:
            y = y[:, None]
        valid = np.isin(y, (0, 1))
        if not valid.all():
            raise SiteDataError(f"{self.where}: {split}_labels of '{path.name}' has the value "
                                f"{show_value(y[~valid].flat[0])}; {dataset} labels are 0 or 1")
        if dataset == "pneumoniamnist":
            if y.shape[1] != 1:
                raise SiteDataError(f"{self.where}: {split}_labels of '{path.name}' has "
                                    f"{y.shape[1]} columns; PneumoniaMNIST has 1 (is it "
                                    "ChestMNIST?)")
            pneu = y[:, 0].astype(np.float32)
            out, _ = to_common(["Pneumonia", NO_FINDING], np.stack([pneu, 1 - pneu], axis=1))
            return out
        if y.shape[1] != len(CHESTMNIST_LABELS):
            raise SiteDataError(f"{self.where}: {split}_labels of '{path.name}' has {y.shape[1]} "
                                f"columns; ChestMNIST has {len(CHESTMNIST_LABELS)}")
        f = y.astype(np.float32)
        nf = (f.sum(axis=1) == 0).astype(np.float32)[:, None]
        out, _ = to_common(list(CHESTMNIST_LABELS) + [NO_FINDING], np.concatenate([f, nf], axis=1))
        return out

    def worker_reader(self) -> NpzReader:
        self.records()
        assert self._reader is not None
        return self._reader

    def read_image(self, i: int, size: int) -> np.ndarray:
        return self.worker_reader()(i, size)

    def fingerprint(self) -> str:
        self.records()
        r = self._reader
        blob = json.dumps({"kind": self.kind, "options": self.options, "path": r.path,
                           "mtime": r.mtime, "size": os.path.getsize(r.path), "n": r.sizes},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _dataset_of(filename: str) -> str | None:
    low = filename.lower()
    for d in DATASETS:
        if low.startswith(d):
            return d
    return None
