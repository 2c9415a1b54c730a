"""The phantom site adapter: a generated hospital behind the ordinary SiteAdapter interface.

    PhantomAdapter("hospital_a", None, {"preset": "a"})
    PhantomAdapter("hospital_x", None, {"preset": "b", "seed": 7, "acquisition": {"noise": 0.1}})

Options: an optional `preset` (a, b, c, or a YAML path) and/or any PhantomOptions fields, deep-
merged over the preset. `root` is ignored. Images are rendered on demand at the requested size
from (seed, index) only, so any worker process renders byte-identical images in any order.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from chestfed.common.atomic import write_with
from chestfed.sites.adapters.base import BadImageError, SiteAdapter, SiteDataError, SiteRecords, register
from chestfed.sites.phantom.labeller import annotated_mask, label
from chestfed.sites.phantom.population import RENDER_STREAM, draw_population, sev_column, truth_columns
from chestfed.sites.phantom.markers import text_mask
from chestfed.sites.phantom.render import RENDER_VERSION, render
from chestfed.sites.phantom.spec import MODELLED, PhantomOptionError, PhantomOptions, resolve_options

log = logging.getLogger(__name__)


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The acquisition RNG of image `index`: depends on (seed, index) only."""
    return np.random.default_rng([int(seed), RENDER_STREAM, int(index)])


# What render() reads of a population row (sites/phantom/render.py, anatomy.py, markers.py),
# besides the sev_<Finding> severities.
_RENDER_COLUMNS = frozenset({"view", "sex", "device", "shortcut_device", "anatomy_seed"})


@register
class PhantomAdapter(SiteAdapter):
    kind = "phantom"

    def __init__(self, name: str, root: str | None, options: dict[str, Any] | None):
        super().__init__(name, root, dict(options or {}))
        self.requested = dict(options or {})  # as written in the config, for messages
        try:
            self.spec: PhantomOptions = resolve_options(self.requested)
        except PhantomOptionError as e:
            raise SiteDataError(f"site '{name}': {e}") from None
        # The base fingerprint hashes self.options: store the resolved contents, not the preset
        # name, so editing a preset file invalidates cached images.
        self.options = self.spec.model_dump(mode="json")
        self._population: pd.DataFrame | None = None
        self._rows: dict[str, np.ndarray] | None = None  # population columns (read_image)

    @property
    def population(self) -> pd.DataFrame:
        """The drawn population (one row per image), cached on the instance."""
        if self._population is None:
            self._population = draw_population(self.spec, self.spec.seed)
        return self._population

    def records(self) -> SiteRecords:
        pop = self.population
        meta = pd.DataFrame({
            "image_id": [f"{self.name}/{x}" for x in pop["image_id"]],
            "patient_id": [f"{self.name}/{x}" for x in pop["patient_id"]],
            "age": pop["age"].astype(float),
            "sex": pop["sex"].astype(object),
            "view": pop["view"].astype(object),
            "official_split": pd.Series([None] * len(pop), dtype=object),
        })
        truth = pop[truth_columns()].reset_index(drop=True).copy()
        return SiteRecords(
            meta=meta,
            labels=label(pop, self.spec.labeller, self.spec.seed),
            annotated=annotated_mask(self.spec.labeller),
            extras={"truth": truth},
        )

    def _render_rows(self) -> dict[str, np.ndarray]:
        """The population columns render() reads, as column arrays (one row's dict is built per
        image: a dict per row would cost ~1 KB each, 100 MB at 100,000 images)."""
        if self._rows is None:
            pop = self.population
            self._rows = {c: pop[c].to_numpy() for c in pop.columns
                          if c in _RENDER_COLUMNS or c.startswith("sev_")}
        return self._rows

    def read_image(self, i: int, size: int) -> np.ndarray:
        rows = self._render_rows()
        n = len(next(iter(rows.values()))) if rows else 0
        if not 0 <= int(i) < n:
            raise BadImageError(f"site '{self.name}': phantom image {i} does not exist "
                                f"(the site has {n} images)")
        row = {c: (v[int(i)].item() if hasattr(v[int(i)], "item") else v[int(i)])
               for c, v in rows.items()}
        return render(row, self.spec.acquisition, int(size), image_rng(self.spec.seed, i))

    def fingerprint(self) -> str:
        # root is ignored by the phantom; the renderer version is not (new pixels, new key).
        blob = json.dumps({"kind": self.kind, "options": self.options, "render_version": RENDER_VERSION},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def __getstate__(self) -> dict[str, Any]:
        # A cache-building worker gets only the columns render() reads (~10 MB at 100,000
        # images), not the population: drawing it again in every worker cost each ~73 MB there
        # (bench/large_site.py: +243 MB of peak memory from 1k to 100k images with 2 workers).
        state = dict(self.__dict__)
        state["_rows"] = self._render_rows()
        state["_population"] = None
        return state


# --- a contact sheet for eyeballing -----------------------------------------------------------

_SHEET_PICKS: dict[str, Sequence[str]] = {
    "a": ("", "Cardiomegaly", "Nodule", "Mass", "Consolidation", "Pneumothorax"),
    "b": ("", "Effusion", "Edema", "Atelectasis", "Pneumonia"),
    "c": ("", "Pneumothorax", "Effusion", "Consolidation", "Mass"),
}


def contact_sheet(path: str | Path = "/tmp/phantom_sheet.png", size: int = 256, cols: int = 4) -> Path:
    """Write a PNG grid of images from presets a, b, c (normal + one per finding), captioned.

    Each tile shows the clearest example of its finding (severe, few other findings; normal:
    the first image with no finding). Written atomically. Returns the path.
    """
    from PIL import Image  # only needed here

    tiles: list[np.ndarray] = []
    for preset, picks in _SHEET_PICKS.items():
        site = PhantomAdapter(f"phantom_{preset}", None, {"preset": preset})
        pop = site.population
        sev = pop[[sev_column(f) for f in MODELLED]].to_numpy()
        for finding in picks:
            if finding:
                # The clearest example: severe, with as little else going on as possible.
                j = MODELLED.index(finding)
                score = 2 * sev[:, j] - sev.sum(axis=1)
                sc = site.spec.shortcut
                if sc is None or sc.finding != finding:  # show the shortcut device with its finding only
                    score = score - pop["shortcut_device"].to_numpy()
                i = int(np.argmax(score))
                caption = f"{preset} {finding[:12]} {pop[sev_column(finding)].iloc[i]:.1f}"
            else:
                normal = np.flatnonzero((sev == 0).all(axis=1))
                i = int(normal[0]) if len(normal) else 0
                caption = f"{preset} normal"
            if pop["device"].iloc[i]:
                caption += " DEV"
            caption += f" {pop['view'].iloc[i]}"
            img = site.read_image(i, size).copy()
            m = text_mask(caption.upper(), max(7, size // 22))
            h, w = min(m.shape[0], size - 4), min(m.shape[1], size - 4)
            band = img[size - h - 2:size - 2, 2:2 + w]
            band[...] = np.where(m[:h, :w] > 0.5, 255, band // 3)
            tiles.append(img)
    rows = -(-len(tiles) // cols)
    sheet = np.zeros((rows * size, cols * size), np.uint8)
    for k, t in enumerate(tiles):
        r, c = divmod(k, cols)
        sheet[r * size:(r + 1) * size, c * size:(c + 1) * size] = t
    path = Path(path)
    write_with(path, lambda tmp: Image.fromarray(sheet).save(tmp, format="PNG"), suffix=".png")
    log.info("phantom contact sheet: %d images -> %s", len(tiles), path)
    return path
