"""sites/dicom.py: DICOM files as hospitals export them, generated here with pydicom."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import (JPEGBaseline8Bit, RLELossless, ExplicitVRLittleEndian,  # noqa: E402
                         generate_uid)

from chestfed.sites.adapters.base import BadImageError  # noqa: E402
from chestfed.sites.adapters.csvfolder import CSVAdapter  # noqa: E402
from chestfed.sites.cache import build_or_load  # noqa: E402
from chestfed.sites.dicom import read_dicom  # noqa: E402
from chestfed.sites.imageio import read_grayscale  # noqa: E402

# 12-bit data stored in 16 bits: a ramp 0..4095 over 64 x 64 pixels.
RAMP = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)


def make_ds(arr: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 12,
            **tags) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray, presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("gen", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.set_pixel_data(arr, photometric_interpretation=photometric, bits_stored=bits)
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


def write(path: Path, ds: FileDataset) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def expected_minmax(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float64)
    return np.rint((v - v.min()) * 255.0 / (v.max() - v.min())).astype(np.uint8)


def test_12bit_monochrome2_without_window_is_minmax_scaled(tmp_path):
    arr = (RAMP // 2 + 1000).astype(np.uint16)  # 1000..3047: stretched, not scaled by 4095
    g = read_grayscale(write(tmp_path / "a.dcm", make_ds(arr)))
    assert g.dtype == np.uint8 and g.shape == (64, 64)
    np.testing.assert_array_equal(g, expected_minmax(arr))
    assert g[0, 0] == 0 and g[-1, -1] == 255


def test_monochrome1_is_inverted(tmp_path):
    m2 = read_dicom(write(tmp_path / "m2.dcm", make_ds(RAMP)))
    m1 = read_dicom(write(tmp_path / "m1.dcm", make_ds(RAMP, "MONOCHROME1")))
    np.testing.assert_array_equal(m1, 255 - m2)
    assert m1[0, 0] == 255 and m1[-1, -1] == 0  # low stored value = bright in MONOCHROME1


def test_rescale_slope_intercept_then_window_in_rescaled_units(tmp_path):
    # value = 2 * stored - 1000; a window of [-1000, 1000] is stored 0..1000.
    ds = make_ds(RAMP, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=0, WindowWidth=2000)
    g = read_dicom(write(tmp_path / "r.dcm", ds))
    flat = g.ravel()
    assert flat[0] == 0  # stored 0 -> -1000, the window's lower edge
    assert flat[1000] == 255 and (flat[1000:] == 255).all()  # at and above the upper edge
    assert abs(int(flat[500]) - 128) <= 1  # stored 500 -> 0, the window's center
    assert (np.diff(flat[:1001].astype(int)) >= 0).all()
    # Without a window, rescaling changes nothing: min-max is invariant to a linear map.
    plain = read_dicom(write(tmp_path / "p.dcm", make_ds(RAMP)))
    rescaled = read_dicom(write(tmp_path / "q.dcm", make_ds(RAMP, RescaleSlope=2,
                                                            RescaleIntercept=-1000)))
    np.testing.assert_array_equal(plain, rescaled)


def test_window_maps_its_edges_to_0_and_255(tmp_path):
    ds = make_ds(RAMP, WindowCenter=2048, WindowWidth=1024)  # 1536 .. 2560
    g = read_dicom(write(tmp_path / "w.dcm", ds)).ravel()
    assert (g[:1536] == 0).all() and (g[2561:] == 255).all()
    assert abs(int(g[2048]) - 128) <= 1
    assert (np.diff(g.astype(int)) >= 0).all()


def test_voi_lut_sequence_is_applied_and_preferred_over_the_window(tmp_path):
    lut = (4095 - np.arange(4096)).astype(np.uint16)  # an inverting LUT, 16-bit entries
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new("LUTData", "OW", lut.astype("<u2").tobytes())  # as files carry it
    ds = make_ds(RAMP, WindowCenter=100, WindowWidth=10)
    ds.VOILUTSequence = [item]
    g = read_dicom(write(tmp_path / "lut.dcm", ds))
    np.testing.assert_array_equal(g, 255 - expected_minmax(RAMP))


def test_pixel_padding_is_left_out_of_the_range_and_black(tmp_path):
    arr = RAMP.copy() // 4  # 0..1023
    arr[:4] = 4095  # a padded border, brightest stored value
    g = read_dicom(write(tmp_path / "pad.dcm", make_ds(arr, PixelPaddingValue=4095)))
    assert (g[:4] == 0).all()
    inner = arr[4:]
    np.testing.assert_array_equal(g[4:], expected_minmax(inner))


def test_multiframe_gives_the_first_frame(tmp_path):
    frames = np.stack([RAMP, 4095 - RAMP, RAMP // 2]).astype(np.uint16)
    ds = make_ds(frames)
    assert int(ds.NumberOfFrames) == 3
    np.testing.assert_array_equal(read_dicom(write(tmp_path / "mf.dcm", ds)),
                                  expected_minmax(RAMP))


def test_rle_compressed_equals_uncompressed(tmp_path):
    ds = make_ds(RAMP)
    ds.compress(RLELossless)
    np.testing.assert_array_equal(read_dicom(write(tmp_path / "rle.dcm", ds)),
                                  expected_minmax(RAMP))


def _jpeg_dicom(path: Path, arr8: np.ndarray, syntax: str = JPEGBaseline8Bit) -> Path:
    buf = io.BytesIO()
    Image.fromarray(arr8).save(buf, "JPEG", quality=95)
    ds = make_ds(arr8, bits=8)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax
    return write(path, ds)


def test_jpeg_baseline_compressed_dicom_decodes(tmp_path):
    arr8 = (np.add.outer(np.arange(48), np.arange(64)) * 2).astype(np.uint8)
    g = read_dicom(_jpeg_dicom(tmp_path / "jpg.dcm", arr8))
    # 8-bit data without a window: min-max over the (lossy) decoded values.
    assert np.abs(g.astype(int) - expected_minmax(arr8).astype(int)).max() <= 4


def test_undecodable_syntax_truncated_and_non_dicom_are_bad_images_with_reasons(tmp_path):
    arr8 = np.zeros((8, 8), dtype=np.uint8)
    mpeg2 = _jpeg_dicom(tmp_path / "mpeg2.dcm", arr8, "1.2.840.10008.1.2.4.100")  # MPEG2
    with pytest.raises(BadImageError, match=r"mpeg2.dcm: compressed as .*MPEG2.*no installed "
                       r"decoder can read"):
        read_grayscale(mpeg2)
    full = write(tmp_path / "full.dcm", make_ds(RAMP)).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(full[: len(full) // 2])
    with pytest.raises(BadImageError, match=r"cut.dcm: .*cannot be decoded: the file is "
                       r"truncated \(\d+ of 8192 bytes of pixel data\)"):
        read_grayscale(tmp_path / "cut.dcm")
    (tmp_path / "head.dcm").write_bytes(full[:100])
    with pytest.raises(BadImageError, match=r"head.dcm: "):
        read_grayscale(tmp_path / "head.dcm")
    (tmp_path / "notes.dcm").write_text("patient notes, not an image\n")
    with pytest.raises(BadImageError, match=r"notes.dcm: not a DICOM image \(no pixel data\)"):
        read_grayscale(tmp_path / "notes.dcm")
    with pytest.raises(BadImageError, match="file not found"):
        read_grayscale(tmp_path / "absent.dcm")


def test_dicom_without_extension_is_recognised_by_its_marker(tmp_path):
    path = write(tmp_path / "IM000001", make_ds(RAMP))
    np.testing.assert_array_equal(read_grayscale(path), expected_minmax(RAMP))


def test_csv_site_of_dicom_files_builds_its_cache_and_lists_the_bad_ones(tmp_path, tmp_cache):
    root = tmp_path / "hospital"
    (root / "dcm").mkdir(parents=True)
    rows = []
    for i in range(6):
        arr = ((RAMP + i * 7) % 4096).astype(np.uint16)
        write(root / "dcm" / f"{i}.dcm", make_ds(arr, "MONOCHROME1" if i % 2 else "MONOCHROME2",
                                                   WindowCenter=2048, WindowWidth=4096))
        rows.append({"file": f"dcm/{i}.dcm", "pneumonia": i % 2})
    _jpeg_dicom(root / "dcm" / "odd.dcm", np.zeros((8, 8), np.uint8), "1.2.840.10008.1.2.4.100")
    rows.append({"file": "dcm/odd.dcm", "pneumonia": 0})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    site = CSVAdapter("dicom_site", str(root), {"csv": "labels.csv", "path_column": "file",
                                                "labels": {"pneumonia": "Pneumonia"}})
    ids = site.records().meta["image_id"].tolist()
    cached = build_or_load(site, ids, 32, "squash", tmp_cache, progress=False)
    assert cached.ok.tolist() == [True] * 6 + [False]
    assert cached.images[0].mean() > 0 and cached.images[1].mean() > 0
    bad = pd.read_csv(cached.path / "bad_images.csv")
    assert bad["image_id"].tolist() == ["dcm/odd.dcm"]
    assert "no installed decoder" in bad["reason"].iloc[0]
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("tags", [{}, {"WindowCenter": 0, "WindowWidth": 1500},
                                  {"RescaleSlope": 0.5, "RescaleIntercept": 20,
                                   "WindowCenter": 100, "WindowWidth": 400}])
def test_value_table_equals_the_per_pixel_pipeline_also_for_signed_data(tmp_path, tags):
    from chestfed.sites.dicom import _to_gray

    signed = np.random.default_rng(3).integers(-2048, 2048, (40, 50)).astype(np.int16)
    ds = make_ds(signed, **tags)
    assert int(ds.PixelRepresentation) == 1
    back = pydicom.dcmread(write(tmp_path / "s.dcm", ds))
    fast = read_dicom(tmp_path / "s.dcm")
    slow = _to_gray(back.pixel_array, back, None)
    np.testing.assert_array_equal(fast, slow)
    assert fast.min() == 0 and fast.max() == 255


def test_real_radiographs_stored_as_monochrome1_dicom_cache_like_their_pngs(test_data, tmp_path):
    """NIH PNGs re-encoded the way a CR exports them (12-bit, MONOCHROME1, a full-range window)
    give the same cached images as the PNGs themselves."""
    nih = test_data / "nih-chestxray14-sample64"
    names = sorted(p.name for p in (nih / "images").glob("*.png"))[:24]
    root = tmp_path / "cr"
    (root / "dcm").mkdir(parents=True)
    rows = []
    for name in names:
        gray = np.asarray(Image.open(nih / "images" / name).convert("L"), dtype=np.uint16)
        stored = (4095 - np.rint(gray * (4095 / 255))).astype(np.uint16)  # bright bone = low
        write(root / "dcm" / f"{name[:-4]}.dcm",
              make_ds(stored, "MONOCHROME1", WindowCenter=2047.5, WindowWidth=4096,
                      RescaleSlope=1, RescaleIntercept=0))
        rows.append({"file": f"dcm/{name[:-4]}.dcm", "png": f"images/{name}", "pneumonia": 0})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    pd.DataFrame(rows).to_csv(tmp_path / "png.csv", index=False)
    opts = {"path_column": "file", "labels": {"pneumonia": "Pneumonia"}}
    dcm = CSVAdapter("cr", str(root), {**opts, "csv": "labels.csv"})
    png = CSVAdapter("nih", str(nih), {**opts, "csv": str(tmp_path / "png.csv"),
                                      "path_column": "png"})
    a = build_or_load(dcm, dcm.records().meta["image_id"].tolist(), 32, "center_crop",
                      tmp_path / "cache", progress=False)
    b = build_or_load(png, png.records().meta["image_id"].tolist(), 32, "center_crop",
                      tmp_path / "cache", progress=False)
    assert a.ok.all() and b.ok.all()
    diff = np.abs(np.asarray(a.images, dtype=int) - np.asarray(b.images, dtype=int))
    assert diff.max() <= 1, diff.max()
