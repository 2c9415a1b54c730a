"""A researcher's own folder as it really arrives: CSV dialects, and every kind of bad input.

Each bad input gives one clear line (a SiteDataError, exit 2 from the launchers) or a counted
skip listed in the cache's bad_images.csv; none changes a byte of the source folder, and the
cache is never left half-written.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import chestfed.sites.data
from chestfed.common.config import config_from_tree
from chestfed.sites.adapters.base import SiteDataError
from chestfed.sites.adapters.csvfolder import CSVAdapter
from chestfed.sites.cache import build_or_load

REPO = Path(__file__).resolve().parents[1]
OPTS = {"csv": "labels.csv", "path_column": "file", "labels": {"pneumonia": "Pneumonia"},
        "patient_column": "patient"}


def folder(root: Path, n: int = 12, text: str | None = None, encoding: str = "utf-8",
           name: str = "labels.csv") -> Path:
    """n small PNGs under root/img/ and a CSV (`text`, else a plain comma-separated one)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((20, 24), 10 * i % 256, np.uint8)).save(root / "img" / f"{i}.png")
    if text is None:
        text = "file,patient,pneumonia\n" + "".join(f"img/{i}.png,P{i // 2},{i % 2}\n"
                                                    for i in range(n))
    (root / name).write_bytes(text.encode(encoding))
    return root


def records(root: Path, **opts):
    return CSVAdapter("h", str(root), {**OPTS, **opts}).records()


def error(root: Path, **opts) -> str:
    with pytest.raises(SiteDataError) as info:
        records(root, **opts)
    msg = str(info.value)
    assert "\n" not in msg, msg  # one line
    return msg


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and mtime, and every link's target, under root."""
    out: dict[str, tuple[bytes, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                out[str(p)] = (os.readlink(p).encode(), 0)
            elif p.is_file():
                out[str(p)] = (p.read_bytes(), p.stat().st_mtime_ns)
    return out


def cfg(root: Path, cache: Path, **data):
    tree = {"experiment": "t", "seed": 1,
            "data": {"image_size": 16, "cache_dir": str(cache), "workers": 1, **data},
            "sites": [{"name": "h", "kind": "csv", "root": str(root), "options": OPTS}]}
    return config_from_tree(tree, "test")


# --- CSV dialects ----------------------------------------------------------------------------

ROWS = [("img/0.png", "P0", "0", "Zoë"), ("img/1.png", "P0", "1", "Müller"),
        ("img/2.png", "P1", "1", "Ñuñez")]


def dialect(sep: str = ",", bom: bool = False) -> str:
    lines = [sep.join(["file", "patient", "pneumonia", "name"])]
    lines += [sep.join(r) for r in ROWS]
    return ("\ufeff" if bom else "") + "\n".join(lines) + "\n"


@pytest.mark.parametrize("sep", [",", ";", "\t"])
@pytest.mark.parametrize("bom", [False, True])
def test_separators_and_byte_order_mark_are_detected(tmp_path, sep, bom):
    root = folder(tmp_path / "h", n=3, text=dialect(sep, bom))
    rec = records(root)
    assert rec.meta["image_id"].tolist() == ["img/0.png", "img/1.png", "img/2.png"]
    assert rec.meta["patient_id"].tolist() == ["P0", "P0", "P1"]


@pytest.mark.parametrize("encoding", ["latin-1", "cp1252"])
def test_latin1_export_is_read_with_a_warning(tmp_path, caplog, encoding):
    root = folder(tmp_path / "h", n=3, text=dialect(";"), encoding=encoding)
    with pytest.raises(UnicodeDecodeError):
        (root / "labels.csv").read_bytes().decode("utf-8")
    rec = records(root, patient_column="name")
    assert rec.meta["patient_id"].tolist() == ["Zoë", "Müller", "Ñuñez"]
    assert "not UTF-8" in caplog.text and "csv_options" in caplog.text


def test_csv_options_are_passed_to_pandas_and_checked(tmp_path):
    text = "# exported 2024-01-01\n" + dialect("|")
    root = folder(tmp_path / "h", n=3, text=text, encoding="latin-1")
    rec = records(root, patient_column="name",
                  csv_options={"sep": "|", "encoding": "latin-1", "comment": "#"})
    assert rec.meta["patient_id"].tolist() == ["Zoë", "Müller", "Ñuñez"]
    msg = error(root, csv_options={"seperator": "|"})
    assert "option 'csv_options': unknown key 'seperator'" in msg and "'sep'" in msg
    assert "unknown encoding 'latin-9x'" in error(root, csv_options={"encoding": "latin-9x"})
    # An encoding the user forces is not second-guessed: a clear line, not a silent fallback.
    utf8 = folder(tmp_path / "u", n=3, text=dialect(","), encoding="utf-16")
    msg = error(utf8, csv_options={"encoding": "utf-8"})
    assert "cannot read" in msg and "csv_options" in msg


def test_a_separator_that_is_not_detected_names_the_option(tmp_path):
    root = folder(tmp_path / "h", n=3, text=dialect("|"))
    msg = error(root)
    assert "has no column 'file'" in msg and "csv_options: {sep: ...}" in msg


def test_empty_csv_and_header_only_csv(tmp_path):
    root = folder(tmp_path / "h", n=1, text="")
    assert "labels.csv' is empty (not even a header line)" in error(root)
    root = folder(tmp_path / "h2", n=1, text="file,patient,pneumonia\n")
    assert "has no rows" in error(root)


# --- bad inputs --------------------------------------------------------------------------------

def test_root_that_is_a_file_and_a_missing_root(tmp_path):
    f = tmp_path / "labels.csv"
    f.write_text("file,patient,pneumonia\n")
    assert "is a file; it must be the dataset folder" in error(f)
    assert "does not exist" in error(tmp_path / "nowhere")
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    assert "is a symlink that leads nowhere (a loop" in error(tmp_path / "loop")


@pytest.mark.parametrize("bad", ["/etc/hostname", "../outside.png", "C:\\\\scans\\\\1.png"])
def test_absolute_paths_and_paths_outside_the_root_name_the_line(tmp_path, bad):
    text = "file,patient,pneumonia\nimg/0.png,P0,0\n" + f"{bad},P1,1\n"
    msg = error(folder(tmp_path / "h", n=1, text=text))
    assert "labels.csv line 3" in msg and ("absolute" in msg or "outside the site root" in msg)


def test_bad_images_are_counted_skips_listed_with_reasons_and_the_source_is_untouched(
        tmp_path, tmp_cache):
    root = folder(tmp_path / "h", n=12)
    (root / "img" / "1.png").unlink()  # missing
    cut = root / "img" / "2.png"
    cut.write_bytes(cut.read_bytes()[:30])  # truncated
    (root / "img" / "3.png").write_text("a text file saved as .png\n")  # not an image
    (root / "img" / "4.png").unlink()
    os.symlink("4.png", root / "img" / "4.png")  # a symlink loop
    (root / "img" / "5.png").unlink()
    (root / "img" / "5.png").mkdir()  # a folder where an image should be
    before = snapshot(root)
    messages: list[str] = []
    info = chestfed.sites.data.build_caches(cfg(root, tmp_cache), progress=False, echo=messages.append)
    assert info["h"]["skipped"] == 5 and info["h"]["decoded"] == 7
    [line] = messages
    assert line.startswith("h: 12 images (7 decoded in ") and "0 from cache, 5 skipped: see " in line
    bad = pd.read_csv(Path(info["h"]["cache"]) / "bad_images.csv").set_index("image_id")["reason"]
    assert bad.index.tolist() == [f"img/{i}.png" for i in (1, 2, 3, 4, 5)]
    assert "file not found" in bad["img/1.png"]
    assert "cannot be decoded" in bad["img/2.png"] and "truncated or corrupt PNG" in bad["img/2.png"]
    assert "not an image file" in bad["img/3.png"]
    assert "a symlink loop" in bad["img/4.png"]
    assert "directory" in bad["img/5.png"]
    # Again: nothing decoded, the same skips, and the source folder is byte-for-byte the same.
    messages.clear()
    chestfed.sites.data.build_caches(cfg(root, tmp_cache), progress=False, echo=messages.append)
    assert messages == [f"h: 12 images (0 decoded, 7 from cache, 5 skipped: see "
                        f"{Path(info['h']['cache']) / 'bad_images.csv'})"]
    assert snapshot(root) == before
    # and a site loaded for training skips the same five
    chestfed.sites.data._LOADED.clear()
    assert chestfed.sites.data.load_site(cfg(root, tmp_cache), cfg(root, tmp_cache).sites[0],
                                progress=False).n_bad == 5


def test_symlinked_folder_loop_in_the_root_is_harmless(tmp_path, tmp_cache):
    root = folder(tmp_path / "h", n=12)
    os.symlink(root, root / "img" / "again")  # root/img/again -> root: a cycle for a tree walk
    text = ("file,patient,pneumonia\n" + "".join(f"img/{i}.png,P{i},{i % 2}\n" for i in range(11))
            + "img/again/img/again/img/11.png,P11,1\n")
    (root / "labels.csv").write_text(text)
    info = chestfed.sites.data.build_caches(cfg(root, tmp_cache), progress=False, echo=lambda _: None)
    assert info["h"]["skipped"] == 0 and info["h"]["decoded"] == 12


# --- the cache is written whole or not at all ---------------------------------------------------

def test_a_build_that_fails_leaves_no_cache_and_no_temporary_folder(tmp_path, tmp_cache):
    root = folder(tmp_path / "h", n=12)
    (root / "img" / "7.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    c = cfg(root, tmp_cache, on_bad_image="error")
    with pytest.raises(SiteDataError, match=r"image 'img/7.png' cannot be read"):
        chestfed.sites.data.build_caches(c, progress=False, echo=lambda _: None)
    assert list(tmp_cache.iterdir()) == []


def test_an_interrupted_build_leaves_no_cache_and_the_next_run_rebuilds(tmp_path, tmp_cache):
    root = folder(tmp_path / "h", n=120)
    script = textwrap.dedent(f"""
        import signal, sys, time
        # Ctrl-C as in a terminal, even when this test runs as a background job (which starts
        # children with SIGINT ignored)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.path.insert(0, {str(REPO)!r})
        import chestfed.sites.adapters.files as files
        from chestfed.sites.adapters.csvfolder import CSVAdapter
        from chestfed.sites.cache import build_or_load
        real = files.read_grayscale
        said = []
        def slow(*a, **k):
            if not said:  # the build is under way: tell the test when to press Ctrl-C
                said.append(print("decoding", flush=True))
            time.sleep(0.05)
            return real(*a, **k)
        files.read_grayscale = slow
        site = CSVAdapter("h", {str(root)!r}, {OPTS!r})
        ids = site.records().meta["image_id"].tolist()
        print("start", flush=True)
        build_or_load(site, ids, 16, "squash", {str(tmp_cache)!r}, progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "start"
    assert proc.stdout.readline().strip() == "decoding"  # 120 x 50 ms: ~6 s of decoding ahead
    time.sleep(0.5)
    assert any(p.name.startswith(".h-") for p in tmp_cache.iterdir())  # a temporary folder
    proc.send_signal(signal.SIGINT)  # Ctrl-C in the middle of decoding
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert list(tmp_cache.iterdir()) == []  # the temporary folder went with it
    # A folder without done.json (a build killed with SIGKILL) is not taken for a cache.
    site = CSVAdapter("h", str(root), OPTS)
    ids = site.records().meta["image_id"].tolist()
    first = build_or_load(site, ids, 16, "squash", tmp_cache, progress=False)
    (first.path / "done.json").unlink()
    again = build_or_load(site, ids, 16, "squash", tmp_cache, progress=False)
    assert again.built and again.path == first.path and (first.path / "done.json").is_file()
    assert [p.name for p in tmp_cache.iterdir()] == [first.path.name]


def test_build_or_load_reports_built_then_reused(tmp_path, tmp_cache):
    root = folder(tmp_path / "h", n=12)
    site = CSVAdapter("h", str(root), OPTS)
    ids = site.records().meta["image_id"].tolist()
    assert build_or_load(site, ids, 16, "squash", tmp_cache, progress=False).built
    assert not build_or_load(site, ids, 16, "squash", tmp_cache, progress=False).built


# --- on real files (../shared/data; skipped without it) -------------------------------------

@pytest.mark.parametrize("sep,encoding", [(";", "utf-8-sig"), ("\t", "cp1252")])
def test_real_nih_sample_reexported_as_a_spreadsheet_would(test_data, tmp_path, sep, encoding):
    nih = test_data / "nih-chestxray14-sample64"
    table = pd.read_csv(nih / "Data_Entry_2017_v2020.csv", usecols=[0, 1, 3, 4, 5]).head(60)
    out = pd.DataFrame({"Bild": "images/" + table["Image Index"], "Patient": table["Patient ID"],
                        "Befund": table["Finding Labels"], "Geschlecht": table["Patient Gender"],
                        "Bemerkung": "Röntgen Thorax – ärztlich geprüft"})
    before = snapshot(nih)
    opts = {"csv": str(tmp_path / "export.csv"), "path_column": "Bild", "patient_column": "Patient",
            "findings_column": "Befund", "sex_column": "Geschlecht"}
    out.to_csv(tmp_path / "plain.csv", index=False)
    out.to_csv(tmp_path / "export.csv", index=False, sep=sep, encoding=encoding)
    got = CSVAdapter("nih_export", str(nih), opts).records()
    want = CSVAdapter("nih_plain", str(nih), {**opts, "csv": str(tmp_path / "plain.csv")}).records()
    pd.testing.assert_frame_equal(got.meta, want.meta)
    np.testing.assert_array_equal(got.labels, want.labels)
    assert got.meta["sex"].notna().all() and len(got) == 60
    site = CSVAdapter("nih_export", str(nih), opts)
    cached = build_or_load(site, site.records().meta["image_id"].tolist(), 32, "squash",
                           tmp_path / "cache", progress=False)
    assert cached.ok.all()
    assert snapshot(nih) == before  # the shared folder is read, never written
