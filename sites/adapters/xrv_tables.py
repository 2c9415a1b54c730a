"""torchxrayvision 1.5.7 as the parser of the public datasets' label tables.

torchxrayvision's dataset classes build their label matrix from the CSV alone: their constructors
read no image (checked in its datasets.py: images are read only in __getitem__). We pass the
views we mean and `unique_patients=False` explicitly (its defaults keep one PA image per patient),
and map its pathology names into the common label space by name (ChestFed's names are
torchxrayvision's). Importing torchxrayvision costs a few seconds, so it is imported here, on
first use, and only by the adapters of the public datasets.

Nothing here downloads anything: only the tables passed in (or shipped in the wheel) are read.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from chestfed.sites.adapters.base import SiteDataError

log = logging.getLogger(__name__)


def xrv_datasets() -> Any:
    """The `torchxrayvision.datasets` module (imported on first use, quietly)."""
    with contextlib.redirect_stdout(io.StringIO()):
        import torchxrayvision.datasets as xd  # noqa: PLC0415
    return xd


def shipped_table(name: str) -> Path:
    """A label table shipped inside the torchxrayvision wheel (e.g. 'chexpert_train.csv.gz')."""

    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise SiteDataError("torchxrayvision is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / name


def _build(where: str, cls_name: str, **kw: Any) -> Any:
    xd = xrv_datasets()
    cls = getattr(xd, cls_name)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return cls(**kw)
    except (KeyError, ValueError, TypeError) as exc:
        raise SiteDataError(f"{where}: torchxrayvision's {cls_name} cannot parse "
                            f"'{kw.get('csvpath')}': {type(exc).__name__}: {exc}") from None


def nih(where: str, csvpath: Path, imgpath: Path, views: list[str]) -> Any:
    """NIH ChestX-ray14 via `NIH_Dataset`: `.csv` (the kept rows), `.labels` (0/1, 14 columns)."""
    return _build(where, "NIH_Dataset", imgpath=str(imgpath), csvpath=str(csvpath),
                  views=list(views), unique_patients=False)


def chexpert(where: str, csvpath: Path, imgpath: Path) -> Any:
    """CheXpert through `CheX_Dataset` (all views; the adapter filters).

    `.labels` has the uncertain -1 as NaN, and every pathology but Support Devices set to 0 where
    'No Finding' is 1; `.csv` keeps the raw values (with the same No-Finding zeroing) and the
    derived 'view' (AP/PA/LL/RL for frontal images, 'L' for lateral ones).
    """
    name = os.path.basename(str(csvpath))
    if "train" not in str(csvpath) and "valid" not in str(csvpath):
        raise SiteDataError(f"{where}: the CheXpert table '{name}' must have 'train' or 'valid' in "
                            "its path (torchxrayvision's CheXpert reader derives ids from it)")
    return _build(where, "CheX_Dataset", imgpath=str(imgpath), csvpath=str(csvpath),
                  views=["*"], unique_patients=False)


# CheX_Dataset renames this one column after reading; the raw values keep the original name.
CHEXPERT_RAW_COLUMN = {"Effusion": "Pleural Effusion"}


def padchest(where: str, csvpath: Path, imgpath: Path, views: list[str]) -> Any:
    """PadChest through `PC_Dataset`: its finding-to-pathology mapping (e.g. 'infiltrates',
    'alveolar pattern', ... -> Infiltration; 'pleural effusion' -> Effusion).

    `PC_Dataset` also drops rows without labels, 21 files known to be missing or broken, and
    patients born 10 or fewer years before 2019 (unknown birth years too), and renames the
    projection 'AP_horizontal' to 'AP Supine'.
    """
    return _build(where, "PC_Dataset", imgpath=str(imgpath), csvpath=str(csvpath),
                  views=list(views), unique_patients=False)


def names(ds: Any) -> list[str]:
    return [str(p) for p in ds.pathologies]


def labels(ds: Any) -> np.ndarray:
    return np.asarray(ds.labels, dtype=np.float32)
