"""A site's data, ready to train on: adapter -> records -> cache -> splits -> tensors.

Loaded once per process and kept (keyed by everything that shapes it), so rounds after the
first touch no disk and decode nothing.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from chestfed.common.caveats import class_counts, counts_to_info
from chestfed.common.config import ExperimentConfig, SiteConfig
from chestfed.common.labels import annotated_targets, targets
# make_adapter lives with the registry (no torch there: launchers check sites before importing
# this module); re-exported here for callers that import it from sites.data.
from chestfed.sites.adapters.base import ADAPTER_MODULES, SiteDataError, make_adapter  # noqa: F401
from chestfed.sites.cache import CacheView, build_or_load
from chestfed.sites.splits import SPLITS, make_splits, split_table

log = logging.getLogger(__name__)

@dataclass
class Split:
    images: torch.Tensor | CacheView  # uint8 [n, S, S]; a site's: a view of its memory-mapped cache
    y: torch.Tensor  # float32 [n, T], NaN = masked
    meta: pd.DataFrame

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class SiteData:
    name: str
    target_names: list[str]
    annotated: np.ndarray  # bool [T]: which task targets this site annotates
    splits: dict[str, Split]
    table: pd.DataFrame  # image_id, patient_id, split (for the run folder)
    n_bad: int = 0
    extras: dict[str, pd.DataFrame] = field(default_factory=dict)

    def summary(self) -> dict[str, int]:
        """Images per split, and per split and task label the labelled positives / negatives
        (`n_pos/<split>/<label>`, common/caveats.py; only labels this site annotates)."""
        out = {f"n_{k}": len(v) for k, v in self.splits.items()}
        out |= counts_to_info({k: class_counts(v.y.numpy(), self.target_names, self.annotated)
                               for k, v in self.splits.items()})
        return out


# The sites this worker process has loaded, newest last. Bounded: in a federation of hundreds
# of sites with client sampling, each simulation worker serves a different few every round, and
# keeping all of them would make its memory grow with the federation, not the sampled sites.
_LOADED: OrderedDict[str, SiteData] = OrderedDict()
MAX_LOADED_SITES = 16


def _memo_key(cfg: ExperimentConfig, site: SiteConfig) -> str:
    blob = json.dumps([site.model_dump(mode="json"), cfg.data.model_dump(mode="json"),
                       cfg.task.model_dump(mode="json"), cfg.seed])
    return hashlib.sha256(blob.encode()).hexdigest()


def load_site(cfg: ExperimentConfig, site: SiteConfig, progress: bool = True) -> SiteData:
    key = _memo_key(cfg, site)
    if key in _LOADED:
        _LOADED.move_to_end(key)
    else:
        _LOADED[key] = _load(cfg, site, progress)
        while len(_LOADED) > MAX_LOADED_SITES:
            _LOADED.popitem(last=False)
    return _LOADED[key]


def _load(cfg: ExperimentConfig, site: SiteConfig, progress: bool) -> SiteData:
    adapter = make_adapter(site)
    rec = adapter.records()
    if len(rec) == 0:
        raise SiteDataError(f"site '{site.name}': no images (check root and filters)")
    task = cfg.task.task()
    y_all = targets(rec.labels, task, rec.annotated)
    annotated = annotated_targets(rec.annotated, task)
    if not annotated.any():
        raise SiteDataError(f"site '{site.name}' annotates none of the task's labels "
                            f"({', '.join(task.names)})")
    cached = build_or_load(adapter, rec.meta["image_id"].astype(str).tolist(),
                           cfg.data.image_size, cfg.data.resize, cfg.data.cache_dir,
                           cfg.data.workers, cfg.data.on_bad_image, progress)
    split = make_splits(rec.meta, y_all[:, 0], cfg.data.split, cfg.seed)
    keep = cached.ok
    splits: dict[str, Split] = {}
    for name in SPLITS:
        idx = np.flatnonzero((split == name) & keep)
        # A view of the memory-mapped cache, read a batch at a time: never a copy per worker.
        imgs = CacheView(cached.images, idx)
        splits[name] = Split(imgs, torch.from_numpy(y_all[idx].astype(np.float32)),
                             rec.meta.iloc[idx].reset_index(drop=True))
    if len(splits["train"]) == 0:
        raise SiteDataError(f"site '{site.name}': the train split is empty "
                            f"({len(rec)} images, {int(keep.sum())} readable)")
    table = split_table(rec.meta, split)
    table.loc[~keep, "split"] = "unreadable"
    log.info("site %s: %s", site.name, {k: len(v) for k, v in splits.items()})
    return SiteData(site.name, task.names, annotated, splits, table, int((~keep).sum()),
                    rec.extras)


def write_split(data: SiteData, folder: Path) -> Path:
    """Write the site's split table atomically to `<folder>/<site>.csv`."""
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / f"{data.name}.csv"
    tmp = dest.with_suffix(".csv.tmp")
    data.table.to_csv(tmp, index=False)
    tmp.replace(dest)
    return dest


def build_caches(cfg: ExperimentConfig, progress: bool = True,
                 echo: Callable[[str], None] = print,
                 quiet_tables: bool = True, tables: dict[str, tuple[Any, Any]] | None = None,
                 ) -> dict[str, dict[str, Any]]:
    """Decode every site's images into the cache, a progress bar per site (images/s, time left),
    and echo one line per site: `clinic_a: 600 images (597 decoded in 4.1 s, 0 from cache,
    3 skipped: see <cache>/bad_images.csv)`.

    The launchers call it before Ray starts, so the sites' workers (which load with
    progress=False) find their cache built and decode nothing. Raises SiteDataError for a site
    whose data cannot be read (or, with data.on_bad_image: error, an unreadable image).
    `tables`: site name -> (adapter, records) already read by the launcher's check; those
    tables are not read again.
    """

    out: dict[str, dict[str, Any]] = {}
    read = []
    # The tables' warnings (no patient column, encoding guessed, ...) were printed by the
    # launcher's check before this; reading the tables again here need not repeat them.
    table_log = logging.getLogger("chestfed.sites.adapters")
    level = table_log.level
    if quiet_tables:
        table_log.setLevel(logging.ERROR)
    try:
        for site in cfg.sites:  # every table first: a mistake there stops before any decoding
            if tables and site.name in tables:
                adapter, rec = tables[site.name]
            else:
                adapter = make_adapter(site)
                rec = adapter.records()
            if len(rec) == 0:
                raise SiteDataError(f"site '{site.name}': no images (check root and filters)")
            read.append((site, adapter, rec))
    finally:
        table_log.setLevel(level)
    for site, adapter, rec in read:
        t0 = time.perf_counter()
        cached = build_or_load(adapter, rec.meta["image_id"].astype(str).tolist(),
                               cfg.data.image_size, cfg.data.resize, cfg.data.cache_dir,
                               cfg.data.workers, cfg.data.on_bad_image, progress, warn_bad=False)
        seconds = time.perf_counter() - t0
        n, n_bad = len(rec), int((~cached.ok).sum())
        decoded = n - n_bad if cached.built else 0
        info = {"images": n, "decoded": decoded, "from_cache": n - n_bad - decoded,
                "skipped": n_bad, "seconds": round(seconds, 2), "cache": str(cached.path)}
        parts = [f"{decoded} decoded" + (f" in {seconds:.1f} s" if decoded else ""),
                 f"{info['from_cache']} from cache"]
        if n_bad:
            parts.append(f"{n_bad} skipped: see {cached.path / 'bad_images.csv'}")
        echo(f"{site.name}: {n} images ({', '.join(parts)})")
        out[site.name] = info
    return out
