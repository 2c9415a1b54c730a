"""What every site adapter gives the rest of ChestFed.

An adapter turns one dataset layout into `SiteRecords` (a table of images in the common label
space) plus a way to read one image as 8-bit grayscale. Everything downstream (cache, splits,
training, scoring) only sees this.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import pandas as pd

from chestfed.common.errors import ChestFedError
from chestfed.common.labels import FINDINGS

META_COLUMNS = ("image_id", "patient_id", "age", "sex", "view", "official_split")


class SiteDataError(ChestFedError):
    """A problem with a site's data the user can fix (missing root, bad CSV, no images left)."""


class BadImageError(SiteDataError):
    """One image that cannot be decoded (missing, truncated, unreadable)."""


@dataclass
class SiteRecords:
    """One row per image.

    meta: columns META_COLUMNS. `age` float (NaN unknown), `sex` 'M'/'F'/None, `view` 'PA'/'AP'/
          'LATERAL'/None, `official_split` 'train'/'val'/'test'/None (None: no official split).
    labels: float32 [N, len(FINDINGS)], 1/0/NaN (NaN: not annotated or uncertain-ignored).
    annotated: bool [len(FINDINGS)], the findings this site annotates at all.
    extras: adapter-specific tables aligned with meta (the phantom keeps its true severities here).
    """

    meta: pd.DataFrame
    labels: np.ndarray
    annotated: np.ndarray
    extras: dict[str, pd.DataFrame] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [c for c in META_COLUMNS if c not in self.meta.columns]
        if missing:
            raise ValueError(f"adapter bug: meta lacks columns {missing}")
        if self.labels.shape != (len(self.meta), len(FINDINGS)):
            raise ValueError(f"adapter bug: labels {self.labels.shape} vs {len(self.meta)} rows")
        self.meta = self.meta.reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.meta)


class SiteAdapter:
    """Base class. Subclasses set `kind`, parse `options` in __init__, and implement the rest."""

    kind: ClassVar[str] = ""

    def __init__(self, name: str, root: str | None, options: dict[str, Any]):
        self.name = name
        self.root = Path(root).expanduser() if root else None
        self.options = dict(options)

    def records(self) -> SiteRecords:
        raise NotImplementedError

    def read_image(self, i: int, size: int) -> np.ndarray:
        """Image i of `records()` as a 2-D uint8 array.

        File-based adapters return the native resolution and ignore `size` (the cache resizes);
        generators may render at `size` directly. Raise BadImageError for an unreadable image.
        """
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Identifies the source for the cache key: changes whenever the images could change."""
        blob = json.dumps({"kind": self.kind, "root": str(self.root), "options": self.options},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def worker_reader(self) -> Callable[[int, int], np.ndarray]:
        """A picklable callable for cache-building worker processes (default: the bound method)."""
        return self.read_image


ADAPTERS: dict[str, type[SiteAdapter]] = {}


def register(cls: type[SiteAdapter]) -> type[SiteAdapter]:
    ADAPTERS[cls.kind] = cls
    return cls


# kind -> module that registers it; imported on demand so a phantom site never pays for pandas
# parsers of the public datasets, nor a NIH site for the phantom renderer.
ADAPTER_MODULES = {
    "phantom": "chestfed.sites.phantom.adapter",
    "nih": "chestfed.sites.adapters.nih",
    "chexpert": "chestfed.sites.adapters.chexpert",
    "padchest": "chestfed.sites.adapters.padchest",
    "medmnist": "chestfed.sites.adapters.medmnist",
    "csv": "chestfed.sites.adapters.csvfolder",
    "reports": "chestfed.sites.adapters.radiology_reports",
}


def make_adapter(site: Any) -> SiteAdapter:
    """The adapter of a site config (`name`, `kind`, `root`, `options`); its options are checked
    here, its data when `records()` is called."""
    if site.kind not in ADAPTER_MODULES:
        close = difflib.get_close_matches(site.kind, ADAPTER_MODULES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ChestFedError(f"site '{site.name}': unknown kind '{site.kind}'{hint}; known: "
                            f"{', '.join(ADAPTER_MODULES)}")

    try:
        importlib.import_module(ADAPTER_MODULES[site.kind])
    except ModuleNotFoundError as exc:
        if exc.name == ADAPTER_MODULES[site.kind]:
            raise ChestFedError(f"site '{site.name}': kind '{site.kind}' is not available in "
                                "this version of ChestFed") from None
        raise
    return ADAPTERS[site.kind](site.name, site.root, site.options)
