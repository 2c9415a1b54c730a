"""kind: csv (a hospital's own folder + CSV): labels, metadata, and every bad input."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import chestfed.sites.data
from chestfed.common.config import config_from_tree
from chestfed.common.errors import ChestFedError
from chestfed.common.labels import FINDINGS, INDEX, NO_FINDING
from chestfed.sites.adapters.base import SiteDataError
from chestfed.sites.adapters.csvfolder import CSVAdapter


def hospital(root: Path, n: int = 24, rows: list[dict] | None = None) -> Path:
    """n images in root/img/, a labels.csv with two label columns and metadata."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    if rows is None:
        rows = []
        for i in range(n):
            rows.append({"file": f"img/{i:03d}.png", "patient": f"P{i // 2}",
                         "pneumonia": int(i % 3 == 0),
                         "effusion": "" if i % 5 == 0 else i % 2,
                         "age": 30 + i, "sex": "M" if i % 2 else "female",
                         "view": "PA" if i % 4 else "ap supine", "split": ""})
    for r in rows:
        path = root / r["file"]
        if not path.exists() and ".." not in r["file"]:
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((20, 24), 40 + len(r["file"]), np.uint8)).save(path)
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root


OPTS = {"csv": "labels.csv", "path_column": "file",
        "labels": {"pneumonia": "Pneumonia", "effusion": "Pleural Effusion"},
        "patient_column": "patient", "age_column": "age", "sex_column": "sex",
        "view_column": "view"}


def test_label_columns_and_metadata(tmp_path):
    root = hospital(tmp_path / "h")
    table = pd.read_csv(root / "labels.csv")
    rec = CSVAdapter("h", str(root), OPTS).records()
    assert len(rec) == 24 and rec.meta["patient_id"].nunique() == 12
    np.testing.assert_array_equal(rec.labels[:, INDEX["Pneumonia"]], table["pneumonia"])
    np.testing.assert_array_equal(rec.labels[:, INDEX["Effusion"]], table["effusion"])
    assert int(np.isnan(rec.labels[:, INDEX["Effusion"]]).sum()) == 5  # blanks are unknown
    assert [n for n in FINDINGS if rec.annotated[INDEX[n]]] == ["Effusion", "Pneumonia"]
    assert rec.meta["age"].tolist() == list(range(30, 54))
    assert rec.meta["sex"].tolist() == ["F", "M"] * 12
    assert rec.meta["view"].tolist() == ["AP", "PA", "PA", "PA"] * 6
    assert rec.meta["official_split"].isna().all()


def test_findings_column_and_split_column(tmp_path):
    rows = [{"file": "a.png", "f": "Pneumonia|effusion", "split": "train"},
            {"file": "b.png", "f": "No Finding", "split": "Validation"},
            {"file": "c.png", "f": "pleural thickening", "split": "TEST"},
            {"file": "d.png", "f": "", "split": "train"}]
    root = hospital(tmp_path / "h", rows=rows)
    rec = CSVAdapter("h", str(root), {"csv": "labels.csv", "path_column": "file",
                                      "findings_column": "f", "split_column": "split"}).records()
    names = [n for n in FINDINGS if rec.annotated[INDEX[n]]]
    assert names == ["Effusion", "Pneumonia", "Pleural_Thickening", NO_FINDING]
    L = {n: rec.labels[:, INDEX[n]] for n in names}
    np.testing.assert_array_equal(L["Pneumonia"][:3], [1, 0, 0])
    np.testing.assert_array_equal(L["Effusion"][:3], [1, 0, 0])
    np.testing.assert_array_equal(L["Pleural_Thickening"][:3], [0, 0, 1])
    np.testing.assert_array_equal(L[NO_FINDING][:3], [0, 1, 0])
    assert np.isnan(rec.labels[3]).all()  # blank cell: unknown
    assert rec.meta["official_split"].tolist() == ["train", "val", "test", "train"]
    # without patient_column every image is its own patient
    assert rec.meta["patient_id"].tolist() == rec.meta["image_id"].tolist()

    rec = CSVAdapter("h", str(root), {"csv": "labels.csv", "path_column": "file",
                                      "findings_column": "f",
                                      "annotates": ["Pneumonia", "Effusion",
                                                    "Pleural_Thickening", "No Finding",
                                                    "Cardiomegaly"]}).records()
    np.testing.assert_array_equal(rec.labels[:3, INDEX["Cardiomegaly"]], [0, 0, 0])


def err(root: Path, **changes) -> str:
    opts = {**OPTS, **changes}
    opts = {k: v for k, v in opts.items() if v is not None}
    with pytest.raises(SiteDataError) as info:
        CSVAdapter("h", str(root), opts).records()
    return str(info.value)


def test_missing_things(tmp_path):
    root = hospital(tmp_path / "h")
    assert "root '/no/such/dir' does not exist" in err(Path("/no/such/dir"))
    assert "option 'csv'" in err(root, csv="labels2.csv")
    assert "labels2.csv' not found" in err(root, csv="labels2.csv")
    msg = err(root, path_column="filename")
    assert "has no column 'filename'" in msg and "option 'path_column'" in msg
    msg = err(root, labels={"pneumonai": "Pneumonia"})
    assert "has no column 'pneumonai' (did you mean 'pneumonia'?)" in msg
    assert "option 'labels'" in msg
    assert "has no column 'patients'" in err(root, patient_column="patients")


def test_unknown_label_names(tmp_path):
    root = hospital(tmp_path / "h")
    msg = err(root, labels={"pneumonia": "Pneumonai"})
    assert "column 'pneumonia'" in msg and "unknown finding 'Pneumonai'" in msg
    assert "did you mean 'Pneumonia'" in msg
    rows = [{"file": "a.png", "f": "Pneumonia|Cardiomegally"}]
    root2 = hospital(tmp_path / "h2", rows=rows)
    with pytest.raises(SiteDataError) as info:
        CSVAdapter("h", str(root2), {"csv": "labels.csv", "path_column": "file",
                                     "findings_column": "f"}).records()
    assert "line 2" in str(info.value) and "did you mean 'Cardiomegaly'" in str(info.value)
    with pytest.raises(SiteDataError, match="no labels: set one of"):
        CSVAdapter("h", str(root2), {"csv": "labels.csv", "path_column": "file"})
    with pytest.raises(SiteDataError, match="several columns"):
        CSVAdapter("h", str(root2), {"csv": "x", "path_column": "file",
                                     "labels": {"a": "Effusion", "b": "pleural effusion"}})


@pytest.mark.parametrize("value", ["2", "yes", "-1", "0.5"])
def test_label_values_outside_the_domain(tmp_path, value):
    rows = [{"file": f"{i}.png", "patient": i, "pneumonia": 0, "effusion": 1}
            for i in range(4)]
    rows[2]["pneumonia"] = value
    root = hospital(tmp_path / "h", rows=rows)
    msg = err(root, age_column=None, sex_column=None, view_column=None)
    assert f"column 'pneumonia' of labels.csv has the value '{value}' on line 4" in msg
    assert "1, 0 or blank" in msg


@pytest.mark.parametrize("bad", ["../outside.png", "/etc/hostname", "img/../../outside.png"])
def test_paths_escaping_the_root(tmp_path, bad):
    rows = [{"file": "ok.png", "patient": 1, "pneumonia": 0, "effusion": 0},
            {"file": bad, "patient": 2, "pneumonia": 1, "effusion": 0}]
    root = hospital(tmp_path / "h", rows=rows)
    msg = err(root, age_column=None, sex_column=None, view_column=None)
    assert "line 3" in msg and bad in msg
    assert "absolute" in msg or "outside the site root" in msg


def test_symlink_out_of_the_root_is_refused_when_read(tmp_path, tmp_cache):
    root = hospital(tmp_path / "h")
    secret = tmp_path / "secret.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(secret)
    (root / "img" / "005.png").unlink()
    os.symlink(secret, root / "img" / "005.png")
    c = cfg(root, tmp_cache)
    chestfed.sites.data._LOADED.clear()
    data = chestfed.sites.data.load_site(c, c.sites[0], progress=False)
    assert data.n_bad == 1  # refused, listed in bad_images.csv with the reason
    [folder] = [p for p in tmp_cache.iterdir() if p.name.startswith("h-")]
    reason = pd.read_csv(folder / "bad_images.csv").set_index("image_id").loc["img/005.png",
                                                                             "reason"]
    assert "leads outside the site root" in reason and "symlink" in reason
    c2 = cfg(root, tmp_path / "cache2", on_bad_image="error")
    chestfed.sites.data._LOADED.clear()
    with pytest.raises(ChestFedError, match=r"image 'img/005.png' cannot be read.*symlink"):
        chestfed.sites.data.load_site(c2, c2.sites[0], progress=False)
    with pytest.raises(SiteDataError, match="symlink"):
        CSVAdapter("h", str(root), OPTS).read_image(5, 16)
    # a symlink that stays inside the root is fine
    (root / "img" / "005.png").unlink()
    os.symlink(root / "img" / "004.png", root / "img" / "005.png")
    assert CSVAdapter("h", str(root), OPTS).read_image(5, 16).shape == (20, 24)


def test_duplicates_and_bad_split(tmp_path):
    rows = [{"file": "a.png", "patient": 1, "pneumonia": 0, "effusion": 0, "split": "train"},
            {"file": "a.png", "patient": 1, "pneumonia": 1, "effusion": 0, "split": "test"}]
    root = hospital(tmp_path / "h", rows=rows)
    assert "listed twice in labels.csv, on lines 2 and 3" in err(root, age_column=None, sex_column=None,
                                                               view_column=None)
    rows[1]["file"] = "b.png"
    rows[1]["split"] = "holdout"
    root = hospital(tmp_path / "h2", rows=rows)
    msg = err(root, age_column=None, sex_column=None, view_column=None, split_column="split")
    assert "'holdout'" in msg and "train, val or test" in msg


def cfg(root: Path, cache: Path, **data):
    tree = {"experiment": "t", "seed": 1,
            "data": {"image_size": 16, "cache_dir": str(cache), "workers": 1, **data},
            "sites": [{"name": "h", "kind": "csv", "root": str(root), "options": OPTS}]}
    return config_from_tree(tree, "test")


def test_truncated_image_is_skipped_and_counted_or_fatal(tmp_path, tmp_cache):
    root = hospital(tmp_path / "h", n=40)
    bad = root / "img" / "007.png"
    bad.write_bytes(bad.read_bytes()[:40])
    c = cfg(root, tmp_cache)
    chestfed.sites.data._LOADED.clear()
    data = chestfed.sites.data.load_site(c, c.sites[0], progress=False)
    assert data.n_bad == 1
    assert sum(len(s) for s in data.splits.values()) == 39
    assert (data.table.set_index("image_id").loc["img/007.png", "split"]) == "unreadable"
    [folder] = [p for p in tmp_cache.iterdir() if p.name.startswith("h-")]
    bad_csv = pd.read_csv(folder / "bad_images.csv")
    assert bad_csv["image_id"].tolist() == ["img/007.png"]
    assert "007.png" in bad_csv["reason"][0] and "cannot be decoded" in bad_csv["reason"][0]

    c2 = cfg(root, tmp_path / "cache2", on_bad_image="error")
    chestfed.sites.data._LOADED.clear()
    with pytest.raises(ChestFedError, match=r"image 'img/007.png' cannot be read .*007.png"):
        chestfed.sites.data.load_site(c2, c2.sites[0], progress=False)
    # the same cache, reused with on_bad_image=error, also refuses
    c3 = cfg(root, tmp_cache, on_bad_image="error")
    chestfed.sites.data._LOADED.clear()
    with pytest.raises(ChestFedError, match="1 images cannot be read"):
        chestfed.sites.data.load_site(c3, c3.sites[0], progress=False)


def test_missing_image_file_is_a_counted_skip(tmp_path, tmp_cache):
    root = hospital(tmp_path / "h", n=30)
    (root / "img" / "003.png").unlink()
    c = cfg(root, tmp_cache)
    chestfed.sites.data._LOADED.clear()
    data = chestfed.sites.data.load_site(c, c.sites[0], progress=False)
    assert data.n_bad == 1


def test_one_class_site_still_loads(tmp_path, tmp_cache):
    rows = [{"file": f"img/{i}.png", "patient": f"P{i}", "pneumonia": 0, "effusion": 0}
            for i in range(30)]
    root = hospital(tmp_path / "h", rows=rows)
    opts = {k: v for k, v in OPTS.items() if k in ("csv", "path_column", "labels",
                                                   "patient_column")}
    tree = {"experiment": "t", "data": {"image_size": 16, "cache_dir": str(tmp_cache),
                                        "workers": 1},
            "sites": [{"name": "h", "kind": "csv", "root": str(root), "options": opts}]}
    c = config_from_tree(tree, "test")
    chestfed.sites.data._LOADED.clear()
    data = chestfed.sites.data.load_site(c, c.sites[0], progress=False)
    assert len(data.splits["train"]) > 0 and len(data.splits["test"]) > 0
    for s in data.splits.values():
        assert (s.y[:, 0] == 0).all()  # only normals: metrics there are the lead's NaN case


# --- what real exports need: values, abnormal_column, constant_labels, where, views ----------

def table(root: Path, rows: list[dict]) -> Path:
    """rows -> root/labels.csv, with a tiny PNG for every 'file'."""
    return hospital(root, rows=rows)


def abnormal_of(rec) -> np.ndarray:
    from chestfed.common.labels import Task, targets
    return targets(rec.labels, Task("binary"), rec.annotated)[:, 0]


def test_values_map_free_text_findings(tmp_path):
    cells = ["NORMAL", "PNEUMONIA", " covid-19 ", "No finding", "Inconclusive",
             "Pneumonia|Inconclusive", "effusion|COVID-19", ""]
    root = table(tmp_path / "h", [{"file": f"{i}.png", "finding": c} for i, c in enumerate(cells)])
    opts = {"csv": "labels.csv", "path_column": "file", "findings_column": "finding",
            "values": {"NORMAL": "No Finding", "PNEUMONIA": "Pneumonia", "COVID-19": "Pneumonia",
                       "Inconclusive": "unknown"}}
    rec = CSVAdapter("h", str(root), opts).records()
    assert [n for n in FINDINGS if rec.annotated[INDEX[n]]] == ["Effusion", "Pneumonia", NO_FINDING]
    pn, ef, nf = (rec.labels[:, INDEX[n]] for n in ("Pneumonia", "Effusion", NO_FINDING))
    np.testing.assert_array_equal(pn[:4], [0, 1, 1, 0])
    np.testing.assert_array_equal(nf[:4], [1, 0, 0, 1])
    assert np.isnan(rec.labels[4]).all() and np.isnan(rec.labels[7]).all()  # unknown, blank
    assert pn[5] == 1 and np.isnan(ef[5]) and np.isnan(nf[5])  # named 1, the rest unknown
    assert pn[6] == 1 and ef[6] == 1 and nf[6] == 0
    np.testing.assert_array_equal(abnormal_of(rec)[:7], [0, 1, 1, 0, np.nan, 1, 1])

    # a value neither mapped nor a finding: the value, the column, its first line, the count
    rows = [{"file": "a.png", "finding": "NORMAL"}, {"file": "b.png", "finding": "Opacidad"},
            {"file": "c.png", "finding": "Opacidad"}, {"file": "d.png", "finding": "cardiomegally"}]
    root2 = table(tmp_path / "h2", rows)
    with pytest.raises(SiteDataError) as info:
        CSVAdapter("h", str(root2), opts).records()
    msg = str(info.value)
    assert "column 'finding' of labels.csv has the value 'Opacidad' on line 3" in msg
    assert "option 'values'" in msg and "3 rows unmapped" in msg and "'cardiomegally'" in msg
    # a mapping to a name outside the label space fails at once, with a did-you-mean
    with pytest.raises(SiteDataError, match="option 'values'.*did you mean 'Pneumonia'"):
        CSVAdapter("h", str(root2), {**opts, "values": {"x": "Pneumonai"}})


def test_values_in_per_label_columns(tmp_path):
    rows = [{"file": f"{i}.png", "pneumonia": v} for i, v in
            enumerate(["positive", "Negative", "1", "0", "?", ""])]
    root = table(tmp_path / "h", rows)
    opts = {"csv": "labels.csv", "path_column": "file", "labels": {"pneumonia": "Pneumonia"},
            "values": {"positive": "Pneumonia", "negative": "No Finding", "?": "unknown"}}
    rec = CSVAdapter("h", str(root), opts).records()
    np.testing.assert_array_equal(rec.labels[:, INDEX["Pneumonia"]], [1, 0, 1, 0, np.nan, np.nan])
    with pytest.raises(SiteDataError, match=r"'positive' on line 2, which option 'values' maps "
                                            r"to 'Effusion'; this column holds Pneumonia"):
        CSVAdapter("h", str(root), {**opts, "values": {"positive": "Effusion"}}).records()
    with pytest.raises(SiteDataError, match=r"'\?' on line 6 \(1 such values\)"):
        CSVAdapter("h", str(root), {**opts, "values": {"positive": "Pneumonia",
                                                       "negative": "No Finding"}}).records()


def test_abnormal_column(tmp_path):
    rows = [{"file": f"{i}.png", "abn": v, "finding": f} for i, (v, f) in
            enumerate([("1", "Pneumonia"), ("0", "No Finding"), ("", ""), ("1", "")])]
    root = table(tmp_path / "h", rows)
    base = {"csv": "labels.csv", "path_column": "file"}
    rec = CSVAdapter("h", str(root), {**base, "abnormal_column": "abn"}).records()
    assert [n for n in FINDINGS if rec.annotated[INDEX[n]]] == [NO_FINDING]
    np.testing.assert_array_equal(abnormal_of(rec), [1, 0, np.nan, 1])
    # with a findings column: both are used, and must agree
    rec = CSVAdapter("h", str(root), {**base, "abnormal_column": "abn",
                                      "findings_column": "finding"}).records()
    np.testing.assert_array_equal(abnormal_of(rec), [1, 0, np.nan, 1])
    assert rec.labels[0, INDEX["Pneumonia"]] == 1
    rows[1]["abn"] = "1"
    root2 = table(tmp_path / "h2", rows)
    with pytest.raises(SiteDataError, match=r"labels.csv line 3: abnormal_column 'abn' says "
                                            r"Abnormal = 1 but findings_column 'finding' says "
                                            r"Abnormal = 0 \(1 such rows\)"):
        CSVAdapter("h", str(root2), {**base, "abnormal_column": "abn",
                                     "findings_column": "finding"}).records()
    rows[1]["abn"] = "maybe"
    root3 = table(tmp_path / "h3", rows)
    with pytest.raises(SiteDataError, match=r"column 'abn' of labels.csv has the value 'maybe' "
                                            r"on line 3"):
        CSVAdapter("h", str(root3), {**base, "abnormal_column": "abn"}).records()


def test_constant_labels_for_an_export_of_positives(tmp_path):
    root = table(tmp_path / "h", [{"file": f"{i}.png"} for i in range(5)])
    base = {"csv": "labels.csv", "path_column": "file"}
    rec = CSVAdapter("h", str(root), {**base, "constant_labels": {"Pneumonia": 1}}).records()
    assert [n for n in FINDINGS if rec.annotated[INDEX[n]]] == ["Pneumonia"]
    assert (rec.labels[:, INDEX["Pneumonia"]] == 1).all() and (abnormal_of(rec) == 1).all()
    rec = CSVAdapter("h", str(root), {**base, "constant_labels": {"abnormal": 1}}).records()
    assert (rec.labels[:, INDEX[NO_FINDING]] == 0).all() and (abnormal_of(rec) == 1).all()
    with pytest.raises(SiteDataError, match="constant_labels.*did you mean 'Pneumonia'"):
        CSVAdapter("h", str(root), {**base, "constant_labels": {"Pneumonai": 1}})
    with pytest.raises(SiteDataError, match="option 'constant_labels.Pneumonia'"):
        CSVAdapter("h", str(root), {**base, "constant_labels": {"Pneumonia": 2}})


def test_where_and_views_drop_rows_and_say_how_many(tmp_path):
    views = ["PA", "AP", "L", "LATERAL", "pa", ""]
    rows = [{"file": f"{i}.png", "view": v, "src": "a" if i < 4 else "B", "label": "NORMAL"}
            for i, v in enumerate(views)]
    root = table(tmp_path / "h", rows)
    base = {"csv": "labels.csv", "path_column": "file", "findings_column": "label",
            "values": {"normal": "No Finding"}}
    a = CSVAdapter("h", str(root), {**base, "where": {"view": ["PA", "AP"]}})
    assert a.records().meta["image_id"].tolist() == ["0.png", "1.png", "4.png"]
    assert a.row_filters == [("where view in [PA, AP]", 3)]
    assert a.lines.tolist() == [2, 3, 6]
    a = CSVAdapter("h", str(root), {**base, "view_column": "view", "views": ["PA"],
                                    "where": {"src": ["b"]}})
    assert a.records().meta["image_id"].tolist() == ["4.png"]
    assert a.row_filters == [("where src in [b]", 4), ("views [PA] (column 'view')", 1)]
    assert "line 6" in a.locate(0)
    with pytest.raises(SiteDataError, match=r"no images left after the filters .*views"):
        CSVAdapter("h", str(root), {**base, "view_column": "view", "views": ["AP"],
                                    "where": {"src": ["b"]}}).records()
    with pytest.raises(SiteDataError, match="'views' needs 'view_column'"):
        CSVAdapter("h", str(root), {**base, "views": ["PA"]})
    with pytest.raises(SiteDataError, match=r"has no column 'veiw' \(did you mean 'view'\?\).*"
                                            r"option 'where'"):
        CSVAdapter("h", str(root), {**base, "where": {"veiw": ["PA"]}}).records()
    # rows a rule drops need no valid labels
    rows[2]["label"] = "Lateral-only garbage"
    root2 = table(tmp_path / "h2", rows)
    assert len(CSVAdapter("h", str(root2), {**base, "where": {"view": ["PA", "AP"]}}).records()) == 3


def test_yaml_yes_no_keys_and_a_single_where_value(tmp_path):
    import yaml

    rows = [{"file": f"{i}.png", "pneumonia": v, "ok": o} for i, (v, o) in
            enumerate([("Yes", "Y"), ("no", "n"), ("YES", "no")])]
    root = table(tmp_path / "h", rows)
    # unquoted, YAML reads these keys as booleans; they still match the cells' yes / no / y / n
    opts = yaml.safe_load("{values: {Yes: Pneumonia, No: No Finding}, where: {ok: yes}}")
    assert opts["values"] == {True: "Pneumonia", False: "No Finding"} and opts["where"]["ok"] is True
    a = CSVAdapter("h", str(root), {"csv": "labels.csv", "path_column": "file",
                                    "labels": {"pneumonia": "Pneumonia"}, **opts})
    np.testing.assert_array_equal(a.records().labels[:, INDEX["Pneumonia"]], [1])
    assert a.row_filters == [("where ok in [true]", 2)]


@pytest.mark.parametrize("how", ["utf-16", "utf-16-le", "utf-16-be", "bom+latin-1"])
def test_csv_encodings_are_named_not_mistaken_for_column_names(tmp_path, how, caplog):
    """Excel's "Unicode text" (UTF-16 with or without a byte-order mark) reads as it is; a
    UTF-8 byte-order mark on a file that is Latin-1 further on loses the mark (not a column
    named 'ï»¿file') and the warning names what was read."""
    root = hospital(tmp_path / "h")
    table = pd.read_csv(root / "labels.csv")
    table.loc[3, "patient"] = "Pé3"  # one non-ASCII name, which each encoding spells its own way
    text = table.to_csv(index=False)
    if how == "bom+latin-1":
        data = b"\xef\xbb\xbf" + text.encode("latin-1")
    else:
        data = text.encode(how)  # 'utf-16' writes a byte-order mark, -le / -be do not
    (root / "labels.csv").write_bytes(data)
    with caplog.at_level("WARNING"):
        rec = CSVAdapter("h", str(root), OPTS).records()
    assert len(rec) == 24 and "Pé3" in set(rec.meta["patient_id"])
    warned = " ".join(r.getMessage() for r in caplog.records)
    if how == "bom+latin-1":
        assert "byte-order mark but is not UTF-8 throughout" in warned and "Windows-1252" in warned
    else:
        assert "not UTF-8" not in warned
