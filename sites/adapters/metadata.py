"""A site table's metadata as the common columns (sites/adapters/base.py META_COLUMNS): sex
M/F, view PA/AP/LATERAL, age in years (DICOM ages like '057Y' too), one row per image."""
from __future__ import annotations

import logging
import re
from typing import Any, Iterable

import numpy as np
import pandas as pd

from chestfed.sites.adapters.base import META_COLUMNS

log = logging.getLogger(__name__)

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
