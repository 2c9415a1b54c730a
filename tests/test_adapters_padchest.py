"""kind: padchest, on a fake root made from rows of the REAL PadChest table shipped in
torchxrayvision, with 16-bit placeholder PNGs in the release's <ImageDir>/ folders."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from chestfed.common.labels import FINDINGS, INDEX, NO_FINDING
from chestfed.sites.adapters.base import SiteDataError
from chestfed.sites.adapters.padchest import TABLE, PadChestAdapter
from chestfed.sites.adapters.xrv_tables import shipped_table

# torchxrayvision's PadChest mapping, restated: a finding is present if any of these substrings
# occurs in the row's Labels (its own lower-cased name, plus the listed synonyms).
MAPPING = {
    "Atelectasis": [], "Consolidation": ["air bronchogram"],
    "Infiltration": ["infiltrates", "interstitial pattern", "ground glass pattern",
                     "reticular interstitial pattern", "reticulonodular interstitial pattern",
                     "alveolar pattern", "consolidation", "air bronchogram"],
    "Pneumothorax": [], "Edema": [], "Emphysema": [], "Fibrosis": [], "Effusion": [],
    "Pneumonia": [], "Pleural_Thickening": ["pleural thickening"], "Cardiomegaly": [],
    "Nodule": [], "Mass": [], "Hernia": [], "Fracture": [],
}
# One of the 21 files torchxrayvision's PC_Dataset leaves out as broken ("image file is
# truncated"); the sample includes it to show the adapter leaves it out too.
KNOWN_BROKEN = "216840111366964013962490064942014134093945580_01-178-104.png"


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    full = pd.read_csv(shipped_table(TABLE + ".gz"), low_memory=False)
    rng = np.random.default_rng(7)
    picks = [rng.choice(np.flatnonzero(mask), k, replace=False) for mask, k in [
        (full["Projection"].isin(["PA", "AP"]).to_numpy(), 40),
        (full["Labels"].str.contains("'normal'", na=False).to_numpy(), 6),
        (full["Labels"].str.contains("'exclude'", na=False).to_numpy(), 2),
        ((full["Projection"] == "L").to_numpy(), 3),
        ((full["Projection"] == "AP_horizontal").to_numpy(), 4),
        ((full["PatientBirth"] >= 2012).to_numpy(), 2),
        (full["Labels"].isna().to_numpy(), 1),
        ((full["Labels"] == "['']").to_numpy() & (full["Projection"] == "PA").to_numpy(), 2),
        ((full["ImageID"] == KNOWN_BROKEN).to_numpy(), 1),
        (full["Labels"].str.contains("pleural thickening", na=False).to_numpy(), 2),
    ]]
    return full.iloc[np.unique(np.concatenate(picks))].reset_index(drop=True)


def pixels(bits: int, i: int) -> np.ndarray:
    top = 2 ** bits - 1
    arr = np.zeros((12, 10), dtype=np.uint16)
    arr[0, :4] = [0, top // 2 + 1, top, i]
    arr[1:] = (i * 37) % (top + 1)
    return arr


def fake_root(base: Path, table: pd.DataFrame, flat: bool = False) -> Path:
    base.mkdir(parents=True, exist_ok=True)
    table.to_csv(base / (TABLE + ".gz"), index=False)
    for i, row in table.iterrows():
        folder = base / ("images" if flat else str(row["ImageDir"]))
        folder.mkdir(exist_ok=True)
        bits = 16 if i % 3 == 0 else int(row["BitsStored_DICOM"])  # some rescaled to 16 bits
        Image.fromarray(pixels(bits, int(i))).save(folder / row["ImageID"])
    return base


def kept(table: pd.DataFrame, views=("PA", "AP", "AP_horizontal")) -> pd.DataFrame:
    """The rows the adapter keeps, by its documented rules, straight from the table."""
    t = table[table["Projection"].isin(views) & table["Labels"].notna()]
    t = t[2019 - t["PatientBirth"] > 10]
    t = t[~t["Labels"].str.contains("'exclude'") & (t["ImageID"] != KNOWN_BROKEN)]
    return t.sort_values("ImageID").reset_index(drop=True)


def expected(t: pd.DataFrame) -> np.ndarray:
    out = np.full((len(t), len(FINDINGS)), np.nan, dtype=np.float32)
    low = t["Labels"].str.lower()
    for name, syn in MAPPING.items():
        hit = np.zeros(len(t), dtype=bool)
        for s in [name.lower(), *syn]:
            hit |= low.str.contains(s, regex=False).to_numpy()
        out[:, INDEX[name]] = hit
    out[:, INDEX[NO_FINDING]] = t["Labels"].str.contains("'normal'", regex=False).to_numpy()
    out[(t["Labels"] == "['']").to_numpy()] = np.nan  # no label at all: unknown
    return out


def test_labels_masks_and_counts_match_the_table(tmp_path, table):
    root = fake_root(tmp_path / "pc", table)
    rec = PadChestAdapter("pc", str(root), {}).records()
    want = kept(table)
    assert len(want) >= 40
    assert rec.meta["image_id"].tolist() == want["ImageID"].tolist()
    np.testing.assert_array_equal(rec.labels, expected(want))
    assert np.nansum(rec.labels[:, INDEX[NO_FINDING]]) >= 1
    assert np.nansum(rec.labels[:, INDEX["Pleural_Thickening"]]) >= 1
    assert np.isnan(rec.labels[:, INDEX[NO_FINDING]]).sum() >= 1  # the "['']" rows
    annotated = {n for n in FINDINGS if rec.annotated[INDEX[n]]}
    assert annotated == set(MAPPING) | {NO_FINDING}
    assert rec.meta["patient_id"].nunique() == want["PatientID"].nunique()
    year = want["StudyDate_DICOM"].astype(str).str[:4].astype(int)
    np.testing.assert_array_equal(rec.meta["age"].to_numpy(), (year - want["PatientBirth"]))
    sex = want["PatientSex_DICOM"].where(want["PatientSex_DICOM"].isin(["M", "F"]))
    assert rec.meta["sex"].tolist() == [s if isinstance(s, str) else None for s in sex]
    views = want["Projection"].map({"PA": "PA", "AP": "AP", "AP_horizontal": "AP"})
    assert rec.meta["view"].tolist() == views.tolist()
    assert rec.meta["official_split"].isna().all()
    # the children, the 'exclude' rows and the known-broken file of the sample are gone
    assert not set(table["ImageID"][table["PatientBirth"] >= 2012]) & set(rec.meta["image_id"])
    assert KNOWN_BROKEN in set(table["ImageID"]) and KNOWN_BROKEN not in set(rec.meta["image_id"])


def test_views_option(tmp_path, table):
    root = fake_root(tmp_path / "pc", table)
    lat = PadChestAdapter("pc", str(root), {"views": ["L"]}).records()
    assert lat.meta["image_id"].tolist() == kept(table, ("L",))["ImageID"].tolist()
    assert set(lat.meta["view"]) == {"LATERAL"}
    sup = PadChestAdapter("pc", str(root), {"views": ["AP Supine"]}).records()
    assert len(sup) == len(kept(table, ("AP_horizontal",)))
    keep = PadChestAdapter("pc", str(root), {"drop_exclude": False}).records()
    assert len(keep) > len(kept(table))


def test_16bit_images_are_read_by_their_bit_depth(tmp_path, table):
    root = fake_root(tmp_path / "pc", table)
    adapter = PadChestAdapter("pc", str(root), {})
    rec = adapter.records()
    index = {name: i for i, name in enumerate(table["ImageID"])}
    seen = set()
    for k in range(len(rec)):
        i = index[rec.meta["image_id"][k]]
        assert Image.open(adapter.image_path(k)).mode.startswith("I")
        img = adapter.read_image(k, 12)
        bits = 16 if i % 3 == 0 else int(table["BitsStored_DICOM"][i])
        seen.add(bits)
        # [0, half, full scale]: 0, 128, 255 whatever the bit depth
        np.testing.assert_array_equal(img[0, :3], [0, 128, 255])
        want = np.rint(((i * 37) % 2 ** bits) * 255 / (2 ** bits - 1))
        assert int(img[5, 5]) == int(want)
    assert {12, 16} <= seen


def test_flat_layout_and_partial_download(tmp_path, table, caplog):
    root = fake_root(tmp_path / "pc", table, flat=True)
    want = kept(table)
    (root / "images" / want["ImageID"][0]).unlink()
    rec = PadChestAdapter("pc", str(root), {}).records()
    assert len(rec) == len(want) - 1
    assert "1 of" in caplog.text


def test_errors(tmp_path, table):
    with pytest.raises(SiteDataError, match="no PadChest label table"):
        PadChestAdapter("pc", str(tmp_path), {}).records()
    root = fake_root(tmp_path / "a", table.drop(columns=["Projection"]).head(3))
    with pytest.raises(SiteDataError, match="has no column 'Projection'"):
        PadChestAdapter("pc", str(root), {}).records()
    root = fake_root(tmp_path / "b", table[table["Projection"] == "PA"].head(5))
    with pytest.raises(SiteDataError, match=r"no images left after the filters views=\['L'\]"):
        PadChestAdapter("pc", str(root), {"views": ["L"]}).records()
    with pytest.raises(SiteDataError, match=r"unknown view 'LAT'"):
        PadChestAdapter("pc", str(root), {"views": ["LAT"]})
    assert re.search(r"bits", str(pytest.raises(SiteDataError, PadChestAdapter, "pc", str(root),
                                                {"bits": 20}).value))
