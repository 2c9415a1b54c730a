"""Disclosure control: what a site's numbers look like when they leave it. Sites and the
coordinator share these rules (sites apply them, the coordinator and tests read them back).

Only aggregates leave a site, and in a form that cannot be turned back into per-image data:

- **ROC curves** travel as TPR at the fixed FPR grid `ROC_FPR_GRID` (51 points, 0 to 1), the
  "vertical averaging" grid: TPR at f is the largest TPR the curve reaches with FPR <= f. The
  corner points of an exact curve would encode the labels in score order on a small split.
- **Thresholds** chosen on a site's own images (the oracle Youden point on the test split) leave
  rounded to `THRESHOLD_DECIMALS` (0.01); the metrics at that point are computed at the site at
  the exact threshold. Thresholds of the fixed logit grid (`common.metrics.THRESHOLD_GRID`) are
  public constants, the same for every site, and travel as they are.
- **Small counts**: a confusion count (tp, fp, tn, fn) from 1 to `min_cell - 1` travels as NaN
  with the reason `SUPPRESSED` (the report shows `<min_cell`); 0 is kept (a zero cell is already
  said by the metrics' own reasons, e.g. "no predicted positives"). The validation grid counts
  (cumulative positives / negatives above each grid threshold) are coarsened so that every step
  between two released levels holds at least `min_cell` images (`coarsen_cumulative`): the
  difference between adjacent grid points would otherwise say how many images scored in a
  narrow band. `min_cell` is `privacy.min_cell`; unset, 5 at a deployed site, 0 in simulation.
- **score ranges** (the constant-predictor check) travel as 0 (constant) or rounded up to 0.01.

`describe` writes what a message holds (keys, dtypes, shapes, never values): the coordinator's
`wire.jsonl` and each site's `egress.jsonl` use it.
"""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

ROC_FPR_GRID = np.linspace(0.0, 1.0, 51)
THRESHOLD_DECIMALS = 2
DEPLOYED_MIN_CELL = 5  # privacy.min_cell when the config leaves it unset, at a deployed site
COUNT_KEYS = ("tp", "fp", "tn", "fn")
CONSTANT_TOL = 1e-6  # common.caveats.CONSTANT_TOL (kept equal; caveats imports nothing here)


def suppressed_reason(min_cell: int) -> str:
    return f"suppressed: fewer than {min_cell} (privacy.min_cell); shown as <{min_cell}"


SUPPRESSED = "suppressed:"  # how a suppressed count's reason starts


def min_cell_for(configured: int | None, deployed: bool) -> int:
    """The min_cell a site applies: the config's, or 5 deployed / 0 simulated when unset."""
    if configured is None:
        return DEPLOYED_MIN_CELL if deployed else 0
    return int(configured)


def roc_on_grid(fpr: Any, tpr: Any, grid: np.ndarray = ROC_FPR_GRID) -> list[float]:
    """TPR at each FPR of `grid` of the curve (fpr, tpr): the largest TPR with FPR <= f."""
    fpr = np.asarray(fpr, dtype=np.float64)
    tpr = np.maximum.accumulate(np.asarray(tpr, dtype=np.float64))
    idx = np.searchsorted(fpr, grid + 1e-12, side="right") - 1
    return [float(tpr[i]) if i >= 0 else 0.0 for i in idx]


def round_threshold(t: float) -> float:
    return t if not math.isfinite(t) else round(float(t), THRESHOLD_DECIMALS)


def released_range(r: float) -> float:
    """A score range as it leaves: 0 when constant (within CONSTANT_TOL), else rounded up to 0.01."""
    if not math.isfinite(r):
        return r
    if r <= CONSTANT_TOL:
        return 0.0
    return max(0.01, math.ceil(r * 100 - 1e-9) / 100)


def suppress_counts(metrics: dict[str, Any], min_cell: int) -> dict[str, str]:
    """Confusion counts (keys ending in /tp, /fp, /tn, /fn) from 1 to min_cell - 1 -> NaN, in place;
    returns {key: reason} for each one suppressed."""
    reasons: dict[str, str] = {}
    if min_cell <= 1:
        return reasons
    for k, v in metrics.items():
        if k.rsplit("/", 1)[-1] in COUNT_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool):
            if math.isfinite(v) and 0 < v < min_cell:
                metrics[k] = math.nan
                reasons[k] = suppressed_reason(min_cell)
    return reasons


def coarsen_cumulative(counts: Any, total: float, min_cell: int) -> np.ndarray:
    """Non-increasing cumulative counts (how many score >= each grid threshold) released so that
    each step between released levels, and the part below the lowest one, holds >= min_cell.

    Walking from the highest threshold down, a count becomes a new level once it exceeds the
    last level by min_cell; every grid point shows the highest level not above its count (the
    counts are rounded down to the levels). With min_cell <= 1 the counts are returned as they are.
    """
    c = np.asarray(counts, dtype=np.float64)
    if min_cell <= 1 or c.size == 0:
        return c
    levels = [0.0]
    for v in c[::-1]:
        if v - levels[-1] >= min_cell:
            levels.append(float(v))
    while len(levels) > 1 and total - levels[-1] < min_cell and total - levels[-1] > 0:
        levels.pop()  # the images below the lowest level must be >= min_cell too
    lv = np.asarray(levels)
    return lv[np.searchsorted(lv, c, side="right") - 1]


# --- describing a message: keys, dtypes, shapes; never values -------------------------------------


def describe_content(content: Any) -> dict[str, Any]:
    """{record name: {"kind", "items": {key: shape/dtype (arrays), type/length (metrics, config)}}}."""
    records: dict[str, Any] = {}
    for name, rec in content.items():
        kind = type(rec).__name__
        if kind == "ArrayRecord":
            items = {k: {"shape": list(a.shape), "dtype": str(a.dtype)} for k, a in rec.items()}
        elif kind == "MetricRecord":
            items = {k: ({"list": len(v)} if isinstance(v, list) else type(v).__name__)
                     for k, v in rec.items()}
        else:  # ConfigRecord
            items = {k: ({"type": type(v).__name__, "len": len(v)}
                         if isinstance(v, (str, bytes, list)) else type(v).__name__)
                     for k, v in rec.items()}
        records[name] = {"kind": kind, "items": items}
    return records


def describe(msg: Any, direction: str) -> dict[str, Any]:
    """One row of wire.jsonl / egress.jsonl for a Flower message ('out' or 'in' seen from the
    writer)."""
    meta = msg.metadata
    row: dict[str, Any] = {"t": time.time(), "dir": direction, "type": str(meta.message_type)}
    try:
        row["node"] = int(meta.dst_node_id if direction == "out" else meta.src_node_id)
    except (TypeError, ValueError):
        pass
    if msg.has_error():
        row["error"] = str(msg.error.reason)[:200]
        return row
    row["records"] = describe_content(msg.content)
    return row

