"""kind: medmnist, on the real PneumoniaMNIST file and a small fake ChestMNIST."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import chestfed.sites.cache
import chestfed.sites.data
import chestfed.sites.decode
from chestfed.common.config import config_from_tree
from chestfed.common.labels import FINDINGS, INDEX, NO_FINDING
from chestfed.sites.adapters.base import SiteDataError
from chestfed.sites.adapters.medmnist import CHESTMNIST_LABELS, MedMNISTAdapter
from chestfed.sites.data import load_site


def npz(test_data: Path) -> Path:
    return test_data / "pneumoniamnist" / "pneumoniamnist.npz"


def test_pneumoniamnist_records(test_data):
    z = np.load(npz(test_data))
    rec = MedMNISTAdapter("pm", str(npz(test_data)), {}).records()
    sizes = {s: len(z[f"{s}_labels"]) for s in ("train", "val", "test")}
    assert sizes == {"train": 3882, "val": 524, "test": 624}
    assert len(rec) == sum(sizes.values())
    assert rec.meta["official_split"].value_counts().to_dict() == sizes
    y = np.concatenate([z[f"{s}_labels"][:, 0] for s in ("train", "val", "test")])
    np.testing.assert_array_equal(rec.labels[:, INDEX["Pneumonia"]], y)
    np.testing.assert_array_equal(rec.labels[:, INDEX[NO_FINDING]], 1 - y)
    others = [INDEX[n] for n in FINDINGS if n not in ("Pneumonia", NO_FINDING)]
    assert np.isnan(rec.labels[:, others]).all()
    assert rec.annotated.sum() == 2
    # train: 388 normal, 3494 pneumonia (README)
    train = rec.meta["official_split"] == "train"
    assert int((rec.labels[train.to_numpy(), INDEX["Pneumonia"]] == 0).sum()) == 388
    # each image is its own patient
    assert (rec.meta["patient_id"] == rec.meta["image_id"]).all()
    assert rec.meta["patient_id"].is_unique


def test_root_may_be_the_folder(test_data):
    folder = npz(test_data).parent
    a = MedMNISTAdapter("pm", str(folder), {"file": "pneumoniamnist.npz"})
    b = MedMNISTAdapter("pm", str(folder), {})  # the one MedMNIST file in the folder
    assert len(a.records()) == len(b.records()) == 5030
    img = a.read_image(3882, 28)  # the first val image
    np.testing.assert_array_equal(img, np.load(npz(test_data))["val_images"][0])


def test_load_site_end_to_end_uses_official_split_and_cache(test_data, tmp_cache, monkeypatch):
    tree = {"experiment": "t", "seed": 0,
            "data": {"image_size": 32, "cache_dir": str(tmp_cache), "workers": 2},
            "sites": [{"name": "pm", "kind": "medmnist", "root": str(npz(test_data))}]}
    cfg = config_from_tree(tree, "test")
    chestfed.sites.data._LOADED.clear()
    data = load_site(cfg, cfg.sites[0], progress=False)
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 3882, "val": 524, "test": 624}
    z = np.load(npz(test_data))
    np.testing.assert_array_equal(data.splits["train"].y[:, 0].numpy(), z["train_labels"][:, 0])
    # 28 px upscaled to 32 px; the cache holds every image
    assert tuple(data.splits["test"].images.shape) == (624, 32, 32)
    chestfed.sites.data._LOADED.clear()
    monkeypatch.setattr(chestfed.sites.decode, "decode_one", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("rebuilt")))
    again = load_site(cfg, cfg.sites[0], progress=False)
    assert np.array_equal(again.splits["val"].images.numpy(), data.splits["val"].images.numpy())


def fake_chestmnist(path: Path, n: int = 30) -> np.ndarray:
    rng = np.random.default_rng(0)
    arrays = {}
    all_y = []
    for s in ("train", "val", "test"):
        y = (rng.random((n, 14)) < 0.2).astype(np.uint8)
        y[:5] = 0  # some normals
        arrays[f"{s}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{s}_labels"] = y
        all_y.append(y)
    np.savez(path, **arrays)
    return np.concatenate(all_y)


def test_chestmnist_label_order_and_no_finding(tmp_path):
    y = fake_chestmnist(tmp_path / "chestmnist.npz")
    rec = MedMNISTAdapter("cm", str(tmp_path / "chestmnist.npz"), {}).records()
    for j, name in enumerate(CHESTMNIST_LABELS):
        np.testing.assert_array_equal(rec.labels[:, INDEX[name]], y[:, j])
    assert CHESTMNIST_LABELS[2] == "Effusion" and CHESTMNIST_LABELS[12] == "Pleural_Thickening"
    np.testing.assert_array_equal(rec.labels[:, INDEX[NO_FINDING]], (y.sum(1) == 0))
    assert rec.annotated.sum() == 15
    for name in ("Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum"):
        assert not rec.annotated[INDEX[name]]


def test_bad_files(tmp_path):
    with pytest.raises(SiteDataError, match="does not exist"):
        MedMNISTAdapter("m", str(tmp_path / "none.npz"), {}).records()
    np.savez(tmp_path / "pneumoniamnist.npz", train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(SiteDataError, match=r"lacks the keys \['train_labels'"):
        MedMNISTAdapter("m", str(tmp_path / "pneumoniamnist.npz"), {}).records()
    (tmp_path / "weird.npz").write_bytes(b"not a zip")
    with pytest.raises(SiteDataError, match="cannot tell the dataset"):
        MedMNISTAdapter("m", str(tmp_path / "weird.npz"), {}).records()
    with pytest.raises(SiteDataError, match="cannot read"):
        MedMNISTAdapter("m", str(tmp_path / "weird.npz"), {"dataset": "chestmnist"}).records()
    arrays = {f"{s}_{k}": (np.zeros((2, 28, 28), np.uint8) if k == "images"
                           else np.array([[0], [2]], np.uint8))
              for s in ("train", "val", "test") for k in ("images", "labels")}
    np.savez(tmp_path / "pneumoniamnist.npz", **arrays)
    with pytest.raises(SiteDataError, match="has the value 2"):
        MedMNISTAdapter("m", str(tmp_path / "pneumoniamnist.npz"), {}).records()
    with pytest.raises(SiteDataError, match="option 'dataset'"):
        MedMNISTAdapter("m", str(tmp_path), {"dataset": "pathmnist"})
