"""A phantom site's readers: true severity -> labels in the common label space.

label = 1 iff true severity > the site's threshold for that finding, then each annotated label
is flipped with probability `noise`. Findings the site does not annotate, and findings the
phantom never draws, are NaN. 'No Finding' is 1 iff no annotated finding is 1.

The labeller has its own random stream (seed, LABEL_STREAM), and its flip draws have a fixed
shape, so changing the labeller changes labels only, never pixels, and changing one threshold
never re-rolls the noise of another finding.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from chestfed.common.labels import FINDINGS, INDEX, NO_FINDING
from chestfed.sites.phantom.population import LABEL_STREAM, sev_column
from chestfed.sites.phantom.spec import MODELLED, LabellerSpec


def annotated_mask(opts: LabellerSpec) -> np.ndarray:
    """bool [len(FINDINGS)]: the findings this site labels ('No Finding' always)."""
    mask = np.zeros(len(FINDINGS), dtype=bool)
    for f in MODELLED:
        if f not in opts.not_annotated:
            mask[INDEX[f]] = True
    mask[INDEX[NO_FINDING]] = True
    return mask


def label(population: pd.DataFrame, opts: LabellerSpec, seed: int) -> np.ndarray:
    """float32 [N, len(FINDINGS)] with 1/0/NaN, in common.labels.FINDINGS order."""
    n = len(population)
    rng = np.random.default_rng([int(seed), LABEL_STREAM])
    flips = rng.random((n, len(MODELLED))) < opts.noise
    out = np.full((n, len(FINDINGS)), np.nan, dtype=np.float32)
    annotated_cols = []
    for j, f in enumerate(MODELLED):
        if f in opts.not_annotated:
            continue
        sev = population[sev_column(f)].to_numpy(dtype=float)
        y = (sev > opts.threshold(f)) ^ flips[:, j]
        out[:, INDEX[f]] = y
        annotated_cols.append(INDEX[f])
    any_pos = (out[:, annotated_cols] == 1).any(axis=1) if annotated_cols else np.zeros(n, bool)
    out[:, INDEX[NO_FINDING]] = (~any_pos).astype(np.float32)
    return out
