"""Patient-wise, seeded, stratified train/val/test splits (or the dataset's official split).

No patient ever appears in two splits. Stratification is on a per-patient class (abnormal if
any of the patient's images is), via scikit-learn, so rare positives reach every split.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from chestfed.common.config import SplitConfig
from chestfed.sites.adapters.base import SiteDataError

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


def _patient_strata(patients: np.ndarray, y: np.ndarray) -> pd.Series:
    """1 if any image of the patient is positive, else 0 (NaN counts as 0)."""
    pos = pd.Series(np.nan_to_num(y, nan=0.0) > 0.5).groupby(patients).any()
    return pos.astype(int)


def _split_patients(pids: np.ndarray, strata: np.ndarray, frac: float, seed: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Split patients into (rest, part) with `part` about `frac` of them, stratified if possible."""
    if frac <= 0 or len(pids) < 2:
        return pids, pids[:0]
    counts = np.bincount(strata, minlength=2)
    # scikit-learn stratifies only if each side gets at least one patient of each class
    n_part = int(np.ceil(frac * len(pids)))
    strat = strata if counts.min() >= 2 and min(n_part, len(pids) - n_part) >= 2 else None
    rest, part = train_test_split(pids, test_size=frac, random_state=seed, stratify=strat)
    return np.asarray(rest), np.asarray(part)


def make_splits(meta: pd.DataFrame, y: np.ndarray, cfg: SplitConfig, seed: int) -> np.ndarray:
    """Split label per image: 'train' | 'val' | 'test'.

    `y` is one stratification target per image (1/0/NaN), e.g. the 'Abnormal' target.
    """
    seed = cfg.seed if cfg.seed is not None else seed
    patients = meta["patient_id"].astype(str).to_numpy()
    official = meta["official_split"]
    if cfg.use_official and cfg.folds is None and official.notna().all():
        return _from_official(official.to_numpy(dtype=object), patients, y, cfg, seed)

    strata = _patient_strata(patients, y)
    pids, pstrata = strata.index.to_numpy(), strata.to_numpy()
    if cfg.folds is not None:
        # Baltruschat et al.'s re-sampling: fold k of a stratified patient-wise K-fold is the
        # test set.
        if len(pids) < cfg.folds:
            raise SiteDataError(f"split.folds={cfg.folds} needs at least {cfg.folds} patients; "
                                f"this site has {len(pids)}")
        sgkf = StratifiedGroupKFold(n_splits=cfg.folds, shuffle=True, random_state=seed)
        folds = list(sgkf.split(pids, pstrata, groups=pids))
        test_p = set(pids[folds[cfg.fold][1]])
        rest = np.array([p for p in pids if p not in test_p])
        rest_strata = strata.loc[rest].to_numpy() if len(rest) else np.array([], dtype=int)
        val_frac = cfg.val / (cfg.train + cfg.val)
        train_p, val_p = _split_patients(rest, rest_strata, val_frac, seed)
    else:
        rest, test_p = _split_patients(pids, pstrata, cfg.test, seed)
        rest_strata = strata.loc[rest].to_numpy()
        train_p, val_p = _split_patients(rest, rest_strata, cfg.val / (cfg.train + cfg.val), seed)
    where = {p: "train" for p in train_p} | {p: "val" for p in val_p} | {p: "test" for p in test_p}
    return np.array([where[p] for p in patients], dtype=object)


def _from_official(official: np.ndarray, patients: np.ndarray, y: np.ndarray, cfg: SplitConfig,
                   seed: int) -> np.ndarray:
    """Use the dataset's split; carve a patient-wise validation set if it has none."""
    out = official.copy()
    if "val" not in set(out) and cfg.val > 0:
        in_train = out == "train"
        strata = _patient_strata(patients[in_train], y[in_train])
        frac = cfg.val / (cfg.train + cfg.val)
        _, val_p = _split_patients(strata.index.to_numpy(), strata.to_numpy(), frac, seed)
        out[in_train & np.isin(patients, val_p)] = "val"
    leaked = set(patients[out == "test"]) & set(patients[out != "test"])
    if leaked:
        log.warning("official split puts %d patients in both test and train/val", len(leaked))
    return out


def split_table(meta: pd.DataFrame, split: np.ndarray) -> pd.DataFrame:
    """What is written next to a run: one row per image, for audit and reuse."""
    return pd.DataFrame({"image_id": meta["image_id"].to_numpy(),
                         "patient_id": meta["patient_id"].to_numpy(), "split": split})
