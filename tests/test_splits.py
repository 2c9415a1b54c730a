"""sites/splits.py: patient-wise, seeded, stratified splits; k-fold; official splits; edge cases."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from chestfed.common.config import SplitConfig
from chestfed.common.labels import INDEX, NO_FINDING
from chestfed.sites.adapters.base import SiteDataError
from chestfed.sites.splits import SPLITS, make_splits, split_table


@pytest.fixture(scope="module")
def nih(test_data):
    from chestfed.sites.adapters.nih import NIHAdapter

    rec = NIHAdapter("nih", str(test_data / "nih-chestxray14-sample64"), {}).records()
    y = 1 - rec.labels[:, INDEX[NO_FINDING]]  # Abnormal
    return rec.meta, y


def patients_of(meta: pd.DataFrame, split: np.ndarray) -> dict[str, set]:
    return {s: set(meta["patient_id"][split == s]) for s in SPLITS}


def assert_patient_wise(meta: pd.DataFrame, split: np.ndarray) -> None:
    p = patients_of(meta, split)
    assert not p["train"] & p["val"] and not p["train"] & p["test"] and not p["val"] & p["test"]
    assert p["train"] | p["val"] | p["test"] == set(meta["patient_id"])
    # and per patient: one split only
    assert (pd.Series(split).groupby(meta["patient_id"].to_numpy()).nunique() == 1).all()


def test_real_nih_split_is_patient_wise_stratified_and_70_15_15(nih):
    meta, y = nih
    split = make_splits(meta, y, SplitConfig(), seed=0)
    assert_patient_wise(meta, split)
    n_pat = meta["patient_id"].nunique()
    p = patients_of(meta, split)
    for name, want in (("train", 0.70), ("val", 0.15), ("test", 0.15)):
        assert abs(len(p[name]) / n_pat - want) < 0.02, name
        assert abs(float((split == name).mean()) - want) < 0.08, name  # images follow patients
        assert (y[split == name] == 1).sum() > 0 and (y[split == name] == 0).sum() > 0
    # stratified by patient class: each split's share of patients with any abnormal image
    pos = pd.Series(y > 0.5).groupby(meta["patient_id"].to_numpy()).any()
    overall = pos.mean()
    for name in SPLITS:
        assert abs(pos[list(p[name])].mean() - overall) < 0.05, name


def test_seeded(nih):
    meta, y = nih
    a = make_splits(meta, y, SplitConfig(), seed=0)
    b = make_splits(meta, y, SplitConfig(), seed=0)
    c = make_splits(meta, y, SplitConfig(), seed=1)
    d = make_splits(meta, y, SplitConfig(seed=1), seed=0)  # split.seed wins over the run seed
    assert (a == b).all() and not (a == c).all() and (c == d).all()


def test_kfold_folds_are_disjoint_and_cover_all_patients(nih):
    meta, y = nih
    tests = []
    for k in range(5):
        split = make_splits(meta, y, SplitConfig(folds=5, fold=k), seed=0)
        assert_patient_wise(meta, split)
        assert set(split) == set(SPLITS)
        tests.append(patients_of(meta, split)["test"])
        assert (y[split == "test"] == 1).sum() > 0
    for i in range(5):
        for j in range(i + 1, 5):
            assert not tests[i] & tests[j]
    assert set().union(*tests) == set(meta["patient_id"])
    sizes = [len(t) for t in tests]
    assert max(sizes) - min(sizes) <= 2


def toy(n_patients: int, images: int = 2, pos_every: int = 3, official=None) -> tuple:
    pid = np.repeat([f"p{i}" for i in range(n_patients)], images)
    y = np.repeat([1.0 if i % pos_every == 0 else 0.0 for i in range(n_patients)], images)
    meta = pd.DataFrame({"image_id": [f"i{k}" for k in range(len(pid))], "patient_id": pid,
                         "age": np.nan, "sex": None, "view": None,
                         "official_split": official if official is not None else None})
    return meta, y


def test_official_split_is_used_and_val_carved_patient_wise():
    meta, y = toy(40)
    official = np.where(np.arange(80) < 60, "train", "test").astype(object)
    meta["official_split"] = official
    split = make_splits(meta, y, SplitConfig(), seed=0)
    assert (split[60:] == "test").all() and set(split[:60]) == {"train", "val"}
    assert_patient_wise(meta, split)
    # with use_official false, or a k-fold, the dataset's split is ignored
    own = make_splits(meta, y, SplitConfig(use_official=False), seed=0)
    assert not (own[60:] == "test").all()
    # an official val split is kept as it is
    official[50:60] = "val"
    meta["official_split"] = official
    split = make_splits(meta, y, SplitConfig(), seed=0)
    assert (split == official).all()


def test_partial_official_split_is_ignored():
    meta, y = toy(30)
    meta["official_split"] = [None] * 10 + ["train"] * 50
    split = make_splits(meta, y, SplitConfig(), seed=0)
    assert_patient_wise(meta, split)


def test_one_class_site_still_splits():
    meta, y = toy(30, pos_every=10 ** 6)
    y[:] = 0
    split = make_splits(meta, y, SplitConfig(), seed=0)
    assert_patient_wise(meta, split)
    assert all((split == s).sum() > 0 for s in SPLITS)


def test_unknown_targets_count_as_negative_for_strata():
    meta, y = toy(30)
    y[::4] = np.nan
    split = make_splits(meta, y, SplitConfig(), seed=0)
    assert_patient_wise(meta, split)


@pytest.mark.parametrize("n", [2, 3, 5, 7])
def test_tiny_sites_split_without_crashing(n):
    meta, y = toy(n, pos_every=2)
    split = make_splits(meta, y, SplitConfig(), seed=0)
    assert_patient_wise(meta, split)
    assert (split == "train").sum() > 0


def test_kfold_with_too_few_patients_is_a_clear_error():
    meta, y = toy(3)
    with pytest.raises(SiteDataError, match="split.folds=5 needs at least 5 patients"):
        make_splits(meta, y, SplitConfig(folds=5, fold=0), seed=0)


def test_split_table():
    meta, y = toy(10)
    split = make_splits(meta, y, SplitConfig(), seed=0)
    t = split_table(meta, split)
    assert list(t.columns) == ["image_id", "patient_id", "split"] and len(t) == 20
