"""The phantom's pixels are pinned: the renderer may be reorganised, but the same row, acquisition
and seed must give the same bytes (a change in pixels needs RENDER_VERSION bumped, since cached
images are keyed on it, and new digests here).

The digests were computed once from sites/phantom/render.py as it stood before its 258-line
`_phantom` was split into named anatomical steps (issue 18), so they also prove that split
changed no pixel. The rows are written out here rather than drawn from a preset population,
so a change to population drawing or to the preset files does not move these digests.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from sites.phantom import MODELLED, AcquisitionSpec, MarkerSpec, render
from sites.phantom.render import RENDER_VERSION

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


def digest(anatomy_seed: int) -> str:
    h = hashlib.sha256()
    for k, row in enumerate(rows(anatomy_seed)):
        for acq, size in ((AcquisitionSpec.plain(), 64), (BUSY, 97), (ROUND_MARK, 48)):
            img = render(row, acq, size, np.random.default_rng([anatomy_seed, k]))
            assert img.dtype == np.uint8 and img.shape == (size, size)
            h.update(img.tobytes())
    return h.hexdigest()


# Computed from the renderer before the split; RENDER_VERSION 1.
PINNED = {
    1: "33d5cbea43fd61c917085699e8b190640d76c34d0947c5fb32fd15ec8e6d2ae1",
    7: "26fcae1e44b79e8f6f29e48e109d58f7250d037f2d9be342149934ea77b7ba38",
    42: "e78dc970be063147a673ac9b672038f4c48aaac5ea2550bde28abd1302796b7f",
}


@pytest.mark.parametrize("anatomy_seed", sorted(PINNED))
def test_rendered_pixels_are_byte_identical_to_the_pinned_renderer(anatomy_seed: int) -> None:
    assert RENDER_VERSION == 1, "pixels changed on purpose: recompute PINNED with digest()"
    assert digest(anatomy_seed) == PINNED[anatomy_seed]
