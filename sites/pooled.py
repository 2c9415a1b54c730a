"""The simulation-only pooled node: the union of several sites' train and val splits.

Balancing (`strategy.balance`), by seeded undersampling of each site's train split:
- none: every image of every site;
- site: the same number of images from each site (the smallest site's count);
- site_and_class: Siwek's experiment 3: from each site the same number of normal and of
  abnormal images (50/50), the count set by the scarcest (site, class) pair. Uses the first
  task target (the binary 'Abnormal' task, or the first listed finding).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from chestfed.common.config import ExperimentConfig
from chestfed.common.errors import ChestFedError
from chestfed.sites.data import SiteData, Split, load_site


def _sample(idx: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(idx, size=n, replace=False)) if n < len(idx) else idx


def balance_indices(ys: list[np.ndarray], policy: str, seed: int) -> list[np.ndarray]:
    """Per site, the train-split indices to keep. `ys` holds each site's first target."""
    rng = np.random.default_rng(seed)
    alls = [np.arange(len(y)) for y in ys]
    if policy == "none":
        return alls
    if policy == "site":
        n = min(len(a) for a in alls)
        return [_sample(a, n, rng) for a in alls]
    pos = [np.flatnonzero(y == 1) for y in ys]
    neg = [np.flatnonzero(y == 0) for y in ys]
    n = min(min(len(p), len(q)) for p, q in zip(pos, neg))
    if n == 0:
        raise ChestFedError("strategy.balance site_and_class: some site has no normal or no "
                            "abnormal training image; use balance: site or none")
    return [np.sort(np.concatenate([_sample(p, n, rng), _sample(q, n, rng)])) for p, q in zip(pos, neg)]


_POOLS: dict[tuple[str, tuple[str, ...]], SiteData] = {}


def load_pooled(cfg: ExperimentConfig, sites: list[str], name: str = "pooled") -> SiteData:
    key = (cfg.model_dump_json(), tuple(sites))
    if key not in _POOLS:
        _POOLS[key] = _pool(cfg, sites, name)
    return _POOLS[key]


def _pool(cfg: ExperimentConfig, sites: list[str], name: str) -> SiteData:
    parts = [load_site(cfg, cfg.site(s), progress=False) for s in sites]
    keep = balance_indices([p.splits["train"].y[:, 0].numpy() for p in parts],
                           cfg.strategy.balance, cfg.seed)
    splits = {}
    for split in ("train", "val", "test"):
        chosen = [(p, k if split == "train" else np.arange(len(p.splits[split])))
                  for p, k in zip(parts, keep)]
        idx = [torch.as_tensor(k, dtype=torch.long) for _, k in chosen]
        images = torch.cat([p.splits[split].images[i] for (p, _), i in zip(chosen, idx)])
        y = torch.cat([p.splits[split].y[i] for (p, _), i in zip(chosen, idx)])
        meta = pd.concat([p.splits[split].meta.iloc[k].assign(site=p.name)
                          for p, k in chosen], ignore_index=True)
        splits[split] = Split(images, y, meta)
    annotated = np.any([p.annotated for p in parts], axis=0)
    table = pd.concat([p.table.assign(site=p.name) for p in parts], ignore_index=True)
    return SiteData(name, parts[0].target_names, annotated, splits, table)
