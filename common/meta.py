"""Patient metadata as model input (model.meta, Neuhaus's and Baltruschat et al.'s "-meta" models).

Each requested field becomes fixed columns, the same at every site, so a federated model reads
them the same way everywhere:
- age: (age - 50) / 20, plus a missing indicator. Fixed constants rather than each site's own
  mean and sd: per-site standardisation would make one age mean different things at different
  sites, and sharing the statistics would send them off the site. (Baltruschat et al. min-max
  scale their one dataset's ages; that is not defined across sites.)
- sex: one-hot M, F, plus a missing indicator.
- view: one-hot PA, AP, LATERAL, plus a missing indicator (another value also counts as missing).
A missing value is all-zero one-hot / zero age *with its indicator set*, never a silent zero.
The encoding happens at the site, from the site's own table, for the site's own model; no
metadata is sent anywhere. Nothing here imports torch (launchers check sites before torch loads).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd
from chestfed.common.errors import DataError

FIELDS = ("age", "sex", "view")
SEXES = ("M", "F")
VIEWS = ("PA", "AP", "LATERAL")
AGE_CENTER, AGE_SCALE = 50.0, 20.0


def columns(fields: Iterable[str]) -> list[str]:
    """Names of the encoded columns, in order (age, age_missing, sex_M, ...)."""
    out: list[str] = []
    for f in fields:
        if f == "age":
            out += ["age", "age_missing"]
        elif f == "sex":
            out += [f"sex_{s}" for s in SEXES] + ["sex_missing"]
        elif f == "view":
            out += [f"view_{v}" for v in VIEWS] + ["view_missing"]
        else:
            raise ValueError(f"unknown metadata field '{f}' (choose from {', '.join(FIELDS)})")
    return out


def width(fields: Iterable[str]) -> int:
    return len(columns(fields))


def absent_fields(meta: pd.DataFrame, fields: Iterable[str]) -> list[str]:
    """Requested fields this site's table does not have at all (no column, or no known value)."""
    out = []
    for f in fields:
        if f not in meta.columns:
            out.append(f)
            continue
        col = meta[f]
        known = pd.to_numeric(col, errors="coerce").notna() if f == "age" else \
            col.astype(str).str.upper().isin(SEXES if f == "sex" else VIEWS)
        if not known.any():
            out.append(f)
    return out


def encode(meta: pd.DataFrame, fields: Iterable[str]) -> np.ndarray:
    """float32 [N, width(fields)] for the rows of a site's metadata table (columns of
    sites.adapters.base.META_COLUMNS). A field without a column is missing on every row."""
    n = len(meta)
    parts = []
    for f in fields:
        col = meta[f] if f in meta.columns else pd.Series([None] * n, index=meta.index)
        if f == "age":
            age = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
            miss = np.isnan(age)
            parts += [np.where(miss, 0.0, (age - AGE_CENTER) / AGE_SCALE), miss.astype(float)]
            continue
        values = SEXES if f == "sex" else VIEWS
        if f not in FIELDS:
            raise ValueError(f"unknown metadata field '{f}'")
        text = col.map(lambda v: str(v).strip().upper() if isinstance(v, str) else "").to_numpy()
        onehot = [(text == v).astype(float) for v in values]
        parts += onehot + [1.0 - np.sum(onehot, axis=0)]
    if not parts:
        return np.zeros((n, 0), dtype=np.float32)
    return np.stack(parts, axis=1).astype(np.float32)


def all_missing(fields: Iterable[str]) -> np.ndarray:
    """The encoding of a row with every field missing [width] (used when a caller has images
    but no table, e.g. BatchNorm re-estimation or saliency maps)."""
    return encode(pd.DataFrame(index=[0]), fields)[0]


def missing_line(site: str, absent: list[str]) -> str:
    """The one line for a site whose table lacks requested fields (model.meta_missing: error)."""
    return (f"site '{site}': model.meta asks for {', '.join(absent)}, which its data does not "
            f"have; drop {'them' if len(absent) > 1 else 'it'} from model.meta, or set "
            f"model.meta_missing: allow to encode {'them' if len(absent) > 1 else 'it'} as missing")


def site_inputs(site: str, meta: pd.DataFrame, fields: list[str], allow_missing: bool
                ) -> np.ndarray | None:
    """A split's encoded metadata for model.meta (None when it is empty), checked as the
    launcher's preflight does, for a site whose data the launcher never saw (a deployment)."""
    if not fields:
        return None
    absent = absent_fields(meta, fields) if len(meta) else []
    if absent and not allow_missing:
        raise DataError(missing_line(site, absent))
    return encode(meta, fields)
