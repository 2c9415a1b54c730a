"""The phantom's pixels are pinned: the renderer may be reorganised, but the same row, acquisition
and seed must give the same pixels (a change in pixels needs RENDER_VERSION bumped, since cached
images are keyed on it, and new fingerprints here).

The fingerprints were computed once from sites/phantom/render.py as it stood before its 258-line
`_phantom` was split into named anatomical steps (issue 18), so they also prove that split
changed no pixel (it was also checked byte for byte, on one machine). They are block means
compared with a tolerance, not a hash of the bytes: the same code gives bytes that differ by one
grey level on a few pixels between CPUs (numpy picks SIMD kernels per CPU). The rows are written
out here rather than drawn from a preset population, so a change to population drawing or to the preset files does not move these fingerprints.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from chestfed.sites.phantom import MODELLED, AcquisitionSpec, MarkerSpec, render
from chestfed.sites.phantom.render import RENDER_VERSION

BUSY = AcquisitionSpec(gamma=1.3, contrast=1.2, brightness=0.05, noise=0.03, blur=1.0,
                       collimation=0.1, rotation=10.0,
                       marker=MarkerSpec(kind="text", text="PORTABLE", position="top_left", size=0.1))
ROUND_MARK = AcquisitionSpec(blur=0.0, noise=0.0, marker=MarkerSpec(kind="circle", position="bottom_right"))


def rows(anatomy_seed: int) -> list[dict]:
    """A normal chest, each modelled finding alone, all of them together, and each device."""
    none = {f"sev_{f}": 0.0 for f in MODELLED}
    base = {"anatomy_seed": anatomy_seed, "view": "PA", "sex": "M", "device": "", "shortcut_device": False, **none}
    out = [base]
    for i, f in enumerate(MODELLED):
        out.append({**base, f"sev_{f}": 0.9, "view": "AP" if i % 2 else "PA", "sex": "F" if i % 3 == 0 else "M"})
    out.append({**base, **{f"sev_{f}": 0.6 for f in MODELLED}, "view": "AP", "sex": "F",
                "device": "chest_drain", "shortcut_device": True})
    for device in ("pacemaker", "marker"):
        out.append({**base, "sev_Effusion": 0.3, "device": device, "shortcut_device": True})
    return out


def fingerprint(anatomy_seed: int) -> np.ndarray:
    """4 x 4 block means of every image (float), in row x acquisition order."""
    out = []
    for k, row in enumerate(rows(anatomy_seed)):
        for acq, size in ((AcquisitionSpec.plain(), 64), (BUSY, 97), (ROUND_MARK, 48)):
            img = render(row, acq, size, np.random.default_rng([anatomy_seed, k]))
            assert img.dtype == np.uint8 and img.shape == (size, size)
            out.append(_blocks(img))
    return np.asarray(out)


def _blocks(img: np.ndarray) -> np.ndarray:
    return np.asarray([[c.mean() for c in np.array_split(band, 4, axis=1)]
                       for band in np.array_split(img.astype(np.float64), 4, axis=0)])


SEEDS = (1, 7, 42)
# Text, not a binary file, written by `write_pinned()` (RENDER_VERSION 1) on a machine where the
# split renderer's bytes were checked equal to the pre-split one's.
PINNED = Path(__file__).with_name("data") / "phantom_pixels_v1.json"


def write_pinned() -> None:  # run by hand after a deliberate change (and RENDER_VERSION bumped)
    PINNED.write_text(json.dumps({str(s): np.round(fingerprint(s), 2).tolist() for s in SEEDS}))


@pytest.mark.parametrize("anatomy_seed", SEEDS)
def test_rendered_pixels_match_the_pinned_renderer(anatomy_seed: int) -> None:
    assert RENDER_VERSION == 1, "pixels changed on purpose: bump the file name and write_pinned()"
    want = np.asarray(json.loads(PINNED.read_text())[str(anatomy_seed)])
    got = fingerprint(anatomy_seed)
    assert got.shape == want.shape
    # A drawing step that moves, grows or drops a structure shifts some 4 x 4 block by whole grey
    # levels; a different CPU's float rounding (numpy picks SIMD kernels per CPU) flips a few
    # pixels by one level, which moves a block mean by well under one.
    diff = np.abs(got - want)
    assert diff.max() < 1.0, f"a block moved by {diff.max():.2f} grey levels"
    assert diff.mean() < 0.05


def test_the_fingerprint_sees_a_one_finding_change() -> None:
    """The tolerance is not so loose that it misses a structure: a mild finding is visible."""
    base = rows(3)[0]
    acq = AcquisitionSpec.plain()
    a = render(base, acq, 64, np.random.default_rng([3, 0]))
    b = render({**base, f"sev_{MODELLED[0]}": 0.3}, acq, 64, np.random.default_rng([3, 0]))
    assert np.abs(_blocks(a) - _blocks(b)).max() >= 1.0
