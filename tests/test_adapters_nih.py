"""kind: nih, on the real NIH sample and on small fake roots built from the real NIH table."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import chestfed.sites.cache
import chestfed.sites.data
import chestfed.sites.decode
from chestfed.common.config import config_from_tree
from chestfed.common.labels import FINDINGS, INDEX, NO_FINDING
from chestfed.sites.adapters.base import SiteDataError
from chestfed.sites.adapters.nih import NIH_FINDINGS, NIHAdapter
from chestfed.sites.adapters.xrv_tables import shipped_table
from chestfed.sites.data import load_site

SAMPLE = "nih-chestxray14-sample64"


def nih_root(test_data: Path) -> Path:
    return test_data / SAMPLE


def expected_labels(table: pd.DataFrame) -> dict[str, int]:
    """Positives per finding, straight from 'Finding Labels' with pandas."""
    tokens = table["Finding Labels"].str.split("|").explode()
    return {name: int((tokens == name).groupby(level=0).any().sum()) for name in
            (*NIH_FINDINGS, NO_FINDING)}


def test_records_match_the_table(test_data):
    root = nih_root(test_data)
    table = pd.read_csv(root / "Data_Entry_2017_v2020.csv")
    rec = NIHAdapter("nih", str(root), {}).records()
    assert len(rec) == len(table) == 1000
    assert rec.meta["patient_id"].nunique() == table["Patient ID"].nunique() == 264
    by_id = table.set_index("Image Index").loc[rec.meta["image_id"]]
    pos = expected_labels(table)
    for name, n in pos.items():
        col = rec.labels[:, INDEX[name]]
        assert int((col == 1).sum()) == n, name
        assert int((col == 0).sum()) == len(table) - n, name
        # row by row, not only the totals
        want = by_id["Finding Labels"].str.split("|").map(lambda t, name=name: name in t)
        np.testing.assert_array_equal(col == 1, want.to_numpy())
    for name in FINDINGS:
        assert rec.annotated[INDEX[name]] == (name in pos)
        if name not in pos:
            assert np.isnan(rec.labels[:, INDEX[name]]).all()
    # The README's note: one image filed as normal by the collector is 'Pneumonia' in the table.
    assert int((rec.labels[:, INDEX["Pneumonia"]] == 1).sum()) == pos["Pneumonia"]
    assert pos[NO_FINDING] == 499
    np.testing.assert_array_equal(rec.meta["age"].to_numpy(), by_id["Patient Age"].to_numpy())
    np.testing.assert_array_equal(rec.meta["sex"].to_numpy(), by_id["Patient Gender"].to_numpy())
    np.testing.assert_array_equal(rec.meta["view"].to_numpy(), by_id["View Position"].to_numpy())
    np.testing.assert_array_equal(rec.meta["patient_id"].to_numpy(),
                                  by_id["Patient ID"].astype(str).to_numpy())
    assert rec.meta["official_split"].isna().all()  # no train_val_list.txt in the sample


def test_views_filter(test_data):
    root = nih_root(test_data)
    table = pd.read_csv(root / "Data_Entry_2017_v2020.csv")
    rec = NIHAdapter("nih", str(root), {"views": ["AP"]}).records()
    assert len(rec) == int((table["View Position"] == "AP").sum()) == 363
    assert set(rec.meta["view"]) == {"AP"}


def cfg_for(sites_: list[dict], cache: Path, **data) -> object:
    tree = {"experiment": "t", "seed": 0, "sites": sites_,
            "data": {"image_size": 32, "cache_dir": str(cache), "workers": 2, **data}}
    return config_from_tree(tree, "test")


def test_load_site_end_to_end_cache_built_once(test_data, tmp_cache, monkeypatch):
    site = {"name": "nih", "kind": "nih", "root": str(nih_root(test_data))}
    cfg = cfg_for([site], tmp_cache)
    chestfed.sites.data._LOADED.clear()
    data = load_site(cfg, cfg.sites[0], progress=False)
    assert sum(len(s) for s in data.splits.values()) == 1000 and data.n_bad == 0
    folders = [p for p in tmp_cache.iterdir() if p.name.startswith("nih-")]
    assert len(folders) == 1 and (folders[0] / "done.json").is_file()
    mtime = (folders[0] / "images.u8").stat().st_mtime_ns
    img = data.splits["train"].images
    assert img.dtype.is_floating_point is False and tuple(img.shape[1:]) == (32, 32)
    assert float(img.float().std()) > 10  # real radiographs, not blank

    # A second load (new process: memo cleared) decodes nothing and rewrites nothing.
    chestfed.sites.data._LOADED.clear()

    def no_decoding(*a, **k):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(chestfed.sites.decode, "decode_one", no_decoding)
    again = load_site(cfg, cfg.sites[0], progress=False)
    assert (folders[0] / "images.u8").stat().st_mtime_ns == mtime
    for name in ("train", "val", "test"):
        assert np.array_equal(again.splits[name].images.numpy(), data.splits[name].images.numpy())


def test_cache_reader_works_in_worker_processes(test_data, tmp_cache):
    adapter = NIHAdapter("nih", str(nih_root(test_data)), {})
    ids = adapter.records().meta["image_id"].tolist()
    cached = chestfed.sites.cache.build_or_load(adapter, ids, 32, "center_crop", tmp_cache, workers=2,
                                       progress=False)
    assert cached.built and cached.ok.all()
    direct = chestfed.sites.cache.fit_to_square(adapter.read_image(500, 32), 32, "center_crop")
    np.testing.assert_array_equal(cached.images[500], direct)


# --- fake roots from the real NIH table ------------------------------------------------------

@pytest.fixture(scope="module")
def nih_table() -> pd.DataFrame:
    table = pd.read_csv(shipped_table("Data_Entry_2017_v2020.csv.gz"))
    patients = table["Patient ID"].drop_duplicates().iloc[:40]
    return table[table["Patient ID"].isin(patients)].reset_index(drop=True)


def fake_nih(root: Path, table: pd.DataFrame, layout: str = "images",
             skip: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    table.to_csv(root / "Data_Entry_2017_v2020.csv", index=False)
    for i, name in enumerate(table["Image Index"]):
        if i < skip:
            continue
        folder = root / ("images" if layout == "images" else f"images_{1 + i % 2:03d}/images")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), i % 256, np.uint8)).save(folder / name)
    return root


def test_split_folders_and_official_lists(tmp_path, nih_table):
    root = fake_nih(tmp_path / "nih", nih_table, layout="images_0NN")
    patients = nih_table["Patient ID"].unique()
    test_patients = set(patients[::4])
    is_test = nih_table["Patient ID"].isin(test_patients)
    (root / "test_list.txt").write_text("\n".join(nih_table["Image Index"][is_test]) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(nih_table["Image Index"][~is_test]) + "\n")
    adapter = NIHAdapter("fake", str(root), {})
    rec = adapter.records()
    assert len(rec) == len(nih_table)
    off = rec.meta.set_index("image_id")["official_split"]
    assert (off[nih_table["Image Index"][is_test]] == "test").all()
    assert (off[nih_table["Image Index"][~is_test]] == "train").all()
    assert adapter.image_path(1).endswith(f"images_002/images/{rec.meta['image_id'][1]}")

    from chestfed.common.config import SplitConfig
    from chestfed.sites.splits import make_splits
    y = np.nan_to_num(1 - rec.labels[:, INDEX[NO_FINDING]])
    split = make_splits(rec.meta, y, SplitConfig(), seed=0)
    test_rows = rec.meta["image_id"].isin(nih_table["Image Index"][is_test]).to_numpy()
    assert (split[test_rows] == "test").all()
    assert set(split[~test_rows]) == {"train", "val"}  # val carved from the official train
    val_p = set(rec.meta["patient_id"][split == "val"])
    assert val_p and not val_p & set(rec.meta["patient_id"][split == "train"])


def test_partial_download_leaves_missing_images_out(tmp_path, nih_table, caplog):
    root = fake_nih(tmp_path / "nih", nih_table, skip=10)
    rec = NIHAdapter("fake", str(root), {}).records()
    assert len(rec) == len(nih_table) - 10
    assert "10 of" in caplog.text and "left out" in caplog.text


def test_missing_root():
    with pytest.raises(SiteDataError, match=r"site 'x' \(nih\): root '/nonexistent/nih' does "
                                            "not exist"):
        NIHAdapter("x", "/nonexistent/nih", {}).records()
    with pytest.raises(SiteDataError, match="no root given"):
        NIHAdapter("x", None, {}).records()


def test_table_without_required_column(tmp_path, nih_table):
    root = fake_nih(tmp_path / "nih", nih_table.head(5))
    pd.read_csv(root / "Data_Entry_2017_v2020.csv").drop(columns=["Patient ID"]).to_csv(
        root / "Data_Entry_2017_v2020.csv", index=False)
    with pytest.raises(SiteDataError, match="has no column 'Patient ID'"):
        NIHAdapter("x", str(root), {}).records()


def test_no_table(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(SiteDataError, match="no NIH label table"):
        NIHAdapter("x", str(tmp_path), {}).records()


def test_zero_images_after_filters_names_the_filters(tmp_path, nih_table):
    pa_only = nih_table[nih_table["View Position"] == "PA"].head(6)
    root = fake_nih(tmp_path / "nih", pa_only)
    with pytest.raises(SiteDataError, match=r"no images left after the filters views=\['AP'\]"):
        NIHAdapter("x", str(root), {"views": ["AP"]}).records()
    empty = tmp_path / "noimages"
    empty.mkdir()
    pa_only.to_csv(empty / "Data_Entry_2017.csv", index=False)
    with pytest.raises(SiteDataError, match="none of the 6 images"):
        NIHAdapter("x", str(empty), {}).records()


def test_bad_options_name_the_site_and_key():
    with pytest.raises(SiteDataError, match=r"site 'x' \(nih\): unknown option 'veiws' "
                                            r"\(did you mean 'views'\?\)"):
        NIHAdapter("x", "/tmp", {"veiws": ["PA"]})
    with pytest.raises(SiteDataError, match=r"option 'views.0'"):
        NIHAdapter("x", "/tmp", {"views": ["LATERAL"]})
