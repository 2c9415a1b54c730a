"""kind: chexpert, on a fake CheXpert-v1.0-small root made from rows of the REAL CheXpert table
shipped in torchxrayvision (placeholder JPEGs at the real relative paths)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import chestfed.sites.data
from chestfed.common.config import config_from_tree
from chestfed.common.labels import FINDINGS, INDEX, NO_FINDING
from chestfed.sites.adapters.base import SiteDataError
from chestfed.sites.adapters.chexpert import CheXpertAdapter
from chestfed.sites.adapters.xrv_tables import shipped_table

# CheXpert column -> common finding (Pleural Other and Support Devices have no place in it)
COLUMNS = {"Enlarged Cardiomediastinum": "Enlarged Cardiomediastinum",
           "Cardiomegaly": "Cardiomegaly", "Lung Opacity": "Lung Opacity",
           "Lung Lesion": "Lung Lesion", "Edema": "Edema", "Consolidation": "Consolidation",
           "Pneumonia": "Pneumonia", "Atelectasis": "Atelectasis", "Pneumothorax": "Pneumothorax",
           "Pleural Effusion": "Effusion", "Fracture": "Fracture"}


@pytest.fixture(scope="module")
def tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    full = pd.read_csv(shipped_table("chexpert_train.csv.gz"))
    full["pid"] = full["Path"].str.extract(r"(patient\d+)", expand=False)
    rng = np.random.default_rng(4)
    patients = rng.choice(full["pid"].unique(), 30, replace=False)
    part = full[full["pid"].isin(patients)]
    train = part[part["pid"].isin(patients[:22])].drop(columns="pid").reset_index(drop=True)
    # valid.csv: the radiologists' labels are 0/1 only, patients 64541..., path under valid/
    valid = part[part["pid"].isin(patients[22:])].drop(columns="pid").reset_index(drop=True)
    for i, pid in enumerate(valid["Path"].str.extract(r"(patient\d+)", expand=False).unique()):
        valid["Path"] = valid["Path"].str.replace(pid, f"patient{64541 + i:05d}", regex=False)
    valid["Path"] = valid["Path"].str.replace("/train/", "/valid/", regex=False)
    cols = list(COLUMNS) + ["Pleural Other", "Support Devices", "No Finding"]
    valid[cols] = valid[cols].replace(-1, 1).fillna(0)
    assert len(train) >= 40 and (train == -1).any().any() and (train["Frontal/Lateral"] ==
                                                                "Lateral").any()
    return train, valid


def fake_root(base: Path, train: pd.DataFrame, valid: pd.DataFrame | None) -> Path:
    root = base / "CheXpert-v1.0-small"
    root.mkdir(parents=True)
    train.to_csv(root / "train.csv", index=False)
    frames = [train]
    if valid is not None:
        valid.to_csv(root / "valid.csv", index=False)
        frames.append(valid)
    for i, rel in enumerate(pd.concat(frames)["Path"]):
        path = base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((20, 16), 10 + i % 200, np.uint8)).save(path, quality=95)
    return root


def expected(table: pd.DataFrame, uncertain: str = "ignore", blank: str = "nan") -> np.ndarray:
    """The common-space labels straight from the table (torchxrayvision's rules, stated here)."""
    out = np.full((len(table), len(FINDINGS)), np.nan, dtype=np.float32)
    healthy = (table["No Finding"] == 1).to_numpy()
    for col, name in COLUMNS.items():
        v = table[col].to_numpy(dtype=np.float32).copy()
        nan = np.isnan(v)
        v[v == -1] = {"ignore": np.nan, "ones": 1, "zeros": 0}[uncertain]
        if blank == "zeros":
            v[nan] = 0
        v[healthy] = 0  # 'No Finding' = 1 sets every pathology to 0
        out[:, INDEX[name]] = v
    out[:, INDEX[NO_FINDING]] = healthy
    return out


def frontal(t: pd.DataFrame) -> pd.DataFrame:
    return t[t["Frontal/Lateral"] == "Frontal"].reset_index(drop=True)


@pytest.mark.parametrize("uncertain", ["ignore", "ones", "zeros"])
def test_labels_views_and_patients_match_the_table(tmp_path, tables, uncertain):
    train, valid = tables
    root = fake_root(tmp_path, train, valid)
    rec = CheXpertAdapter("cx", str(root), {"uncertain": uncertain}).records()
    want = pd.concat([frontal(train), frontal(valid)], ignore_index=True)
    assert rec.meta["image_id"].tolist() == want["Path"].tolist()
    np.testing.assert_array_equal(rec.labels, expected(want, uncertain))
    assert rec.meta["patient_id"].nunique() == want["Path"].str.extract(
        r"(patient\d+)", expand=False).nunique()
    assert rec.meta["patient_id"].str.fullmatch(r"patient\d+").all()
    assert set(rec.meta["view"]) <= {"AP", "PA"}
    np.testing.assert_array_equal(rec.meta["view"].to_numpy(), want["AP/PA"].to_numpy())
    assert rec.meta["sex"].tolist() == want["Sex"].map({"Male": "M", "Female": "F"}).tolist()
    ages = want["Age"].where(want["Age"] > 0).to_numpy(dtype=float)
    np.testing.assert_array_equal(rec.meta["age"].to_numpy(), ages)
    masked = [n for n in FINDINGS if not rec.annotated[INDEX[n]]]
    assert set(masked) == set(FINDINGS) - set(COLUMNS.values()) - {NO_FINDING}
    # valid.csv is the official test split (Bajwa et al.), train.csv the official train split
    n_valid = len(frontal(valid))
    assert (rec.meta["official_split"][-n_valid:] == "test").all()
    assert (rec.meta["official_split"][:-n_valid] == "train").all()


def test_blank_as_zeros_and_all_views(tmp_path, tables):
    train, _ = tables
    root = fake_root(tmp_path, train, None)
    rec = CheXpertAdapter("cx", str(root), {"blank": "zeros", "views": ["*"]}).records()
    np.testing.assert_array_equal(rec.labels, expected(train, "ignore", "zeros"))
    assert int((rec.meta["view"] == "LATERAL").sum()) == int(
        (train["Frontal/Lateral"] == "Lateral").sum())
    assert rec.meta["official_split"].isna().all()  # no valid.csv: split by ChestFed


def test_view_tokens(tmp_path, tables):
    train, valid = tables
    root = fake_root(tmp_path, train, valid)
    both = pd.concat([train, valid])
    lat = CheXpertAdapter("cx", str(root), {"views": ["lateral"]}).records()
    assert len(lat) == int((both["Frontal/Lateral"] == "Lateral").sum())
    ap = CheXpertAdapter("cx", str(root), {"views": ["AP"]}).records()
    assert len(ap) == int((both["AP/PA"] == "AP").sum())
    pooled = CheXpertAdapter("cx", str(root), {"valid_as_test": False}).records()
    assert pooled.meta["official_split"].isna().all()


def test_root_may_be_the_parent_and_images_resolve(tmp_path, tables):
    train, valid = tables
    fake_root(tmp_path, train, valid)
    adapter = CheXpertAdapter("cx", str(tmp_path), {})
    rec = adapter.records()
    first = Path(adapter.image_path(0))
    assert first.is_file() and str(first).endswith(rec.meta["image_id"][0].split("/", 1)[1])
    assert adapter.read_image(0, 16).shape == (20, 16)


def test_load_site_uses_valid_as_test(tmp_path, tables, tmp_cache):
    train, valid = tables
    root = fake_root(tmp_path, train, valid)
    tree = {"experiment": "t", "data": {"image_size": 16, "cache_dir": str(tmp_cache),
                                        "workers": 1},
            "sites": [{"name": "cx", "kind": "chexpert", "root": str(root),
                       "options": {"uncertain": "ones"}}]}
    cfg = config_from_tree(tree, "test")
    chestfed.sites.data._LOADED.clear()
    data = chestfed.sites.data.load_site(cfg, cfg.sites[0], progress=False)
    assert len(data.splits["test"]) == len(frontal(valid))
    assert data.splits["test"].meta["image_id"].str.contains("/valid/").all()
    assert len(data.splits["train"]) + len(data.splits["val"]) == len(frontal(train))


def test_bad_tables(tmp_path, tables):
    train, _ = tables
    bad = train.head(6).copy()
    bad.loc[2, "Edema"] = 2
    root = fake_root(tmp_path / "a", bad, None)
    with pytest.raises(SiteDataError, match=r"column 'Edema' of train.csv has the value 2"):
        CheXpertAdapter("cx", str(root), {}).records()

    escape = train.head(6).copy()
    escape.loc[0, "Path"] = "CheXpert-v1.0-small/../../outside/patient00001/view1_frontal.jpg"
    escape.loc[0, "Frontal/Lateral"] = "Frontal"
    root = tmp_path / "b" / "CheXpert-v1.0-small"
    root.mkdir(parents=True)
    escape.to_csv(root / "train.csv", index=False)
    with pytest.raises(SiteDataError, match="leads outside the site root"):
        CheXpertAdapter("cx", str(root), {}).records()

    root = tmp_path / "c" / "CheXpert-v1.0-small"
    root.mkdir(parents=True)
    train.head(3).drop(columns=["Frontal/Lateral"]).to_csv(root / "train.csv", index=False)
    with pytest.raises(SiteDataError, match="has no column 'Frontal/Lateral'"):
        CheXpertAdapter("cx", str(root), {}).records()

    empty = tmp_path / "d"
    empty.mkdir()
    with pytest.raises(SiteDataError, match="no train.csv or valid.csv"):
        CheXpertAdapter("cx", str(empty), {}).records()

    root = fake_root(tmp_path / "e", frontal(train).head(4), None)
    with pytest.raises(SiteDataError, match=r"no images left after the filters "
                                            r"views=\['lateral'\]"):
        CheXpertAdapter("cx", str(root), {"views": ["lateral"]}).records()


def test_bad_options():
    with pytest.raises(SiteDataError, match=r"option 'uncertain'.*'ones'"):
        CheXpertAdapter("cx", "/tmp", {"uncertain": "U-Ones"})
    with pytest.raises(SiteDataError, match=r"unknown view 'front'"):
        CheXpertAdapter("cx", "/tmp", {"views": ["front"]})
