"""Per-site evaluation metrics: pure numpy + scikit-learn, CPU, fast enough to run every round.

Conventions (see common/labels.py): targets are float arrays of 1, 0 and NaN, NaN being the mask
(not annotated at this site, or uncertain and ignored). Scores are probabilities in [0, 1].

A metric that cannot be computed (no labelled samples, one class only, no predicted positives
for precision, ...) is NaN together with a human-readable reason, never an exception and never
a made-up value such as an AUROC of 0.5. Bad *inputs* (mismatched shapes, labels other than
0/1/NaN) are bugs and raise ValueError.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

log = logging.getLogger(__name__)

NAN = float("nan")
THRESHOLD_METRICS: tuple[str, ...] = ("accuracy", "precision", "recall", "specificity", "f1")


# ----------------------------------------------------------------------------- input handling


def as_1d(a: Any, name: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim == 2 and 1 in arr.shape:  # a single [N, 1] or [1, N] column is fine
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {np.shape(a)}")
    return arr


def check_targets(y: np.ndarray) -> None:
    """Raise if targets hold anything but 0, 1 and NaN (e.g. an unmapped -1 'uncertain')."""
    bad = ~(np.isnan(y) | (y == 0) | (y == 1))
    if bad.any():
        vals = np.unique(y[bad])[:5]
        raise ValueError(f"targets must be 0, 1 or NaN (NaN = masked); found {vals.tolist()}")


def prepare(y: Any, s: Any) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Drop masked (NaN-target) samples; return (y, s, reason) where reason says why no
    two-class metric is possible (None if both classes are present and all scores finite)."""
    y = as_1d(y, "y")
    s = as_1d(s, "scores")
    if y.shape != s.shape:
        raise ValueError(f"y and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    check_targets(y)
    keep = ~np.isnan(y)
    y, s = y[keep], s[keep]
    return y, s, undefined_reason(y, s)


def undefined_reason(y: np.ndarray, s: np.ndarray | None = None) -> str | None:
    """Why a ranking metric is undefined for these (already unmasked) targets, or None."""
    n = int(y.size)
    if n == 0:
        return "no labelled samples"
    n_pos = int((y == 1).sum())
    if n_pos == 0:
        return f"only negatives (n={n})"
    if n_pos == n:
        return f"only positives (n={n})"
    if s is not None:
        n_bad = int((~np.isfinite(s)).sum())
        if n_bad:
            return f"{n_bad} non-finite scores of {n}"
    return None


# ----------------------------------------------------------------------------- single label


def auroc(y: Any, s: Any) -> tuple[float, str | None]:
    """Area under the ROC curve (sklearn), NaN + reason when one class is absent."""
    y, s, reason = prepare(y, s)
    if reason:
        return NAN, reason
    return float(roc_auc_score(y, s)), None


def _youden_from_curve(fpr: np.ndarray, tpr: np.ndarray, thr: np.ndarray, s: np.ndarray) -> float:
    # argmax takes the first maximum, i.e. the highest (most conservative) threshold on ties.
    i = int(np.argmax(tpr - fpr))
    t = float(thr[i])
    if not math.isfinite(t):
        # sklearn's first threshold is +inf ("predict nothing positive"); keep it finite and
        # JSON-friendly while preserving its meaning.
        t = float(np.nextafter(np.max(s), np.inf))
    return t


# The thresholds at which a site counts its validation positives and negatives for the
# deployable operating point: evenly spaced in logit space (step 0.05 from -8 to 8), so scores
# squeezed near 0 or 1 are still resolved, and no image's exact score leaves the site.
THRESHOLD_GRID = 1.0 / (1.0 + np.exp(-np.linspace(-8.0, 8.0, 321)))


def counts_above(y: Any, s: Any, grid: np.ndarray = THRESHOLD_GRID) -> tuple[np.ndarray, np.ndarray]:
    """Labelled positives and negatives with score >= each grid threshold (NaN labels skipped)."""
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    s = np.asarray(s, dtype=np.float64).reshape(-1)
    keep = ~np.isnan(y)
    pos, neg = np.sort(s[keep & (y == 1)]), np.sort(s[keep & (y == 0)])
    return (pos.size - np.searchsorted(pos, grid, side="left"),
            neg.size - np.searchsorted(neg, grid, side="left"))


def youden_on_grid(pos_above: np.ndarray, neg_above: np.ndarray, n_pos: float, n_neg: float,
                   grid: np.ndarray = THRESHOLD_GRID) -> float:
    """The grid threshold maximising J = TPR - FPR from counts at the grid (NaN without both
    classes). On a plateau of equal J, its middle grid point."""
    if n_pos <= 0 or n_neg <= 0:
        return NAN
    j = np.asarray(pos_above, dtype=np.float64) / n_pos - np.asarray(neg_above, dtype=np.float64) / n_neg
    best = np.flatnonzero(np.isclose(j, j.max(), rtol=0, atol=1e-12))
    # the longest run of consecutive best points that contains the first one
    run = best[: int(np.argmax(np.diff(np.append(best, best[-1] + 2)) != 1)) + 1]
    return float(grid[run[len(run) // 2]])


def youden_threshold(y: Any, s: Any) -> float:
    """Threshold maximising Youden's J = TPR - FPR (predict positive when score >= t).

    Used both as the deployable operating point (chosen on the training site's validation
    split) and as the oracle point (chosen on the test data itself). NaN if undefined.
    """
    y, s, reason = prepare(y, s)
    if reason:
        log.debug("youden threshold undefined: %s", reason)
        return NAN
    fpr, tpr, thr = roc_curve(y, s)
    return _youden_from_curve(fpr, tpr, thr, s)


def threshold_metrics(y: Any, s: Any, t: float) -> dict[str, Any]:
    """Accuracy, precision, recall (sensitivity), specificity and F1 at `score >= t`.

    Returns the metrics, the threshold, the confusion counts (so a server can pool sites) and a
    `reasons` dict for every NaN. Counted by hand rather than through sklearn's
    precision/recall functions, which report zero division as 0 or NaN but never *why*;
    tests/test_metrics.py cross-checks the values against sklearn.
    """
    y = as_1d(y, "y")
    s = as_1d(s, "scores")
    if y.shape != s.shape:
        raise ValueError(f"y and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    check_targets(y)
    keep = ~np.isnan(y)
    y, s = y[keep], s[keep]
    t = float(t) if t is not None else NAN
    out: dict[str, Any] = {"threshold": t}
    reasons: dict[str, str] = {}
    n = int(y.size)
    n_bad = int((~np.isfinite(s)).sum())
    if n == 0 or math.isnan(t) or n_bad:
        why = ("no labelled samples" if n == 0 else
               "threshold undefined" if math.isnan(t) else f"{n_bad} non-finite scores of {n}")
        out.update({m: NAN for m in THRESHOLD_METRICS})
        out.update(tp=0, fp=0, tn=0, fn=0)
        out["reasons"] = {m: why for m in THRESHOLD_METRICS}
        return out
    pos = y == 1
    pred = s >= t
    tp = int(np.count_nonzero(pred & pos))
    fp = int(np.count_nonzero(pred & ~pos))
    fn = int(np.count_nonzero(~pred & pos))
    tn = n - tp - fp - fn

    def ratio(num: int, den: int, metric: str, why: str) -> float:
        if den == 0:
            reasons[metric] = why
            return NAN
        return num / den

    out["accuracy"] = (tp + tn) / n
    out["precision"] = ratio(tp, tp + fp, "precision", f"no predicted positives at t={t:.4g}")
    out["recall"] = ratio(tp, tp + fn, "recall", f"only negatives (n={n})")
    out["specificity"] = ratio(tn, tn + fp, "specificity", f"only positives (n={n})")
    # 2TP / (2TP + FP + FN): equals 2PR/(P+R) where both exist, and is 0 (not NaN) when the
    # model predicts no positives although some exist; sklearn >= 1.3 defines it the same way.
    out["f1"] = ratio(2 * tp, 2 * tp + fp + fn, "f1",
                      f"no positives and no predicted positives (n={n})")
    out.update(tp=tp, fp=fp, tn=tn, fn=fn)
    out["reasons"] = reasons
    return out


def ece(y: Any, s: Any, n_bins: int = 15) -> float:
    """Expected calibration error with `n_bins` equal-width bins on [0, 1]:
    sum_b (n_b / N) * |mean(y in b) - mean(s in b)|.

    Hand-written: sklearn's calibration_curve returns per-bin means but not bin counts.
    Defined with a single class present (it then measures how far scores are from 0 or 1);
    NaN only with no labelled samples.
    """
    y = as_1d(y, "y")
    s = as_1d(s, "scores")
    if y.shape != s.shape:
        raise ValueError(f"y and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    keep = ~np.isnan(y) & np.isfinite(s)
    y, s = y[keep], s[keep]
    if y.size == 0:
        return NAN
    if s.min() < 0.0 or s.max() > 1.0:
        log.warning("ece: scores outside [0, 1] (min %.3g, max %.3g); are these logits?",
                    s.min(), s.max())
    # bin b holds [b/n, (b+1)/n); a score of exactly 1.0 goes in the last bin.
    b = np.clip((np.clip(s, 0.0, 1.0) * n_bins).astype(np.int64), 0, n_bins - 1)
    sum_y = np.bincount(b, weights=y, minlength=n_bins)
    sum_s = np.bincount(b, weights=s, minlength=n_bins)
    # sum_b (n_b/N) |sum_y/n_b - sum_s/n_b| = sum_b |sum_y - sum_s| / N
    return float(np.abs(sum_y - sum_s).sum() / y.size)


def _downsample_curve(fpr: np.ndarray, tpr: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    if fpr.size <= max_points:
        return fpr, tpr
    # pick points evenly spaced along the curve's length, so steep and flat parts both keep
    # their shape; the first and last points are always kept.
    seg = np.abs(np.diff(fpr)) + np.abs(np.diff(tpr))
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    targets = np.linspace(0.0, arc[-1], max_points)
    idx = np.searchsorted(arc, targets, side="left")
    idx = np.unique(np.clip(idx, 0, fpr.size - 1))
    idx[0], idx[-1] = 0, fpr.size - 1
    idx = np.unique(idx)
    return fpr[idx], tpr[idx]


def roc_points(y: Any, s: Any, max_points: int = 200) -> tuple[list[float], list[float]]:
    """ROC curve (fpr, tpr) as plain lists of at most `max_points` points, ends kept.
    Empty lists when the curve is undefined (one class)."""
    if max_points < 2:
        raise ValueError("max_points must be >= 2")
    y, s, reason = prepare(y, s)
    if reason:
        log.debug("roc curve undefined: %s", reason)
        return [], []
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=True)
    fpr, tpr = _downsample_curve(fpr, tpr, max_points)
    return fpr.tolist(), tpr.tolist()


# ----------------------------------------------------------------------------- whole site


def _mean_defined(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else NAN


def score_site(
    y_true: Any,
    y_score: Any,
    names: Sequence[str],
    thresholds: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Score every label of one site's test set.

    y_true, y_score: [N, T] (NaN in y_true = masked). `thresholds`: the deployable operating
    point per label (Youden on the training site's validation split); when given, each label
    is also scored there ("op"). Every label is scored at 0.5 ("at05") and at the oracle Youden
    threshold picked on this very data ("oracle", optimistic by construction).

    Returns a JSON-serialisable nested dict::

        {"labels": {name: {"n", "n_pos", "n_neg", "auroc", "ece", "at05": {...}, "op": {...}, "oracle": {...}}},
         # each threshold block: threshold, accuracy, precision, recall, specificity, f1,
         # tp, fp, tn, fn (counts let a server pool sites)
         "macro_auroc", "macro_ece", "macro_at05": {metric: mean}, "macro_op", "macro_oracle",
         "n_labels_macro", "reasons": {"<name>/<metric path>": why NaN}}

    Macro averages run over the labels whose AUROC is defined (both classes present); a
    threshold metric that is NaN for one of those labels (e.g. precision with no predicted
    positives) is left out of that metric's mean.
    """
    yt = np.asarray(y_true, dtype=np.float64)
    ys = np.asarray(y_score, dtype=np.float64)
    if yt.ndim == 1:
        yt = yt[:, None]
    if ys.ndim == 1:
        ys = ys[:, None]
    names = list(names)
    if yt.shape != ys.shape:
        raise ValueError(f"y_true {yt.shape} and y_score {ys.shape} differ in shape")
    if yt.ndim != 2 or yt.shape[1] != len(names):
        raise ValueError(f"expected [N, {len(names)}] arrays for labels {names}, got {yt.shape}")
    check_targets(yt)

    points = ["at05"] + (["op"] if thresholds is not None else []) + ["oracle"]
    labels: dict[str, dict[str, Any]] = {}
    reasons: dict[str, str] = {}
    macro_names: list[str] = []
    for j, name in enumerate(names):
        keep = ~np.isnan(yt[:, j])
        y, s = yt[keep, j], ys[keep, j]
        reason = undefined_reason(y, s)
        res: dict[str, Any] = {"n": int(y.size), "n_pos": int((y == 1).sum()),
                               "n_neg": int((y == 0).sum())}
        if reason is None:
            # one roc_curve serves both AUROC (its trapezoid area is what roc_auc_score
            # computes) and the oracle Youden threshold
            fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
            res["auroc"] = float(np.trapezoid(tpr, fpr))
            oracle_t = _youden_from_curve(fpr, tpr, thr, s)
            macro_names.append(name)
        else:
            res["auroc"] = NAN
            reasons[f"{name}/auroc"] = reason
            oracle_t = NAN
        res["ece"] = ece(y, s)  # NaN only when not annotated; the auroc reason covers it
        ts = {"at05": 0.5, "oracle": oracle_t}
        t_why = {"oracle": f"oracle threshold undefined: {reason}"}
        if thresholds is not None:
            ts["op"] = float(thresholds.get(name, NAN))
            t_why["op"] = ("no deployable threshold given for this label" if name not in thresholds
                           else "deployable threshold is NaN (undefined on the training site's "
                                "validation split)")
        for p in points:
            tm = threshold_metrics(y, s, ts[p])
            why_p = tm.pop("reasons")
            res[p] = tm
            if y.size == 0:
                continue  # not annotated here: the auroc reason says it once for the label
            if math.isnan(ts[p]):
                reasons[f"{name}/{p}"] = t_why[p]
            else:
                reasons.update({f"{name}/{p}/{m}": why for m, why in why_p.items()})
        labels[name] = res

    out: dict[str, Any] = {"labels": labels}
    out["macro_auroc"] = _mean_defined([labels[n]["auroc"] for n in macro_names])
    out["macro_ece"] = _mean_defined([labels[n]["ece"] for n in macro_names])
    for p in points:
        out[f"macro_{p}"] = {
            m: _mean_defined([labels[n][p][m] for n in macro_names]) for m in THRESHOLD_METRICS
        }
    out["n_labels_macro"] = len(macro_names)
    if not macro_names:
        reasons["macro"] = "no label has both classes present"
    out["reasons"] = reasons
    return out


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten the numeric leaves of a nested dict into {"a/b/c": float}.

    Strings, None and lists are dropped: Flower MetricRecord values must be int/float (or lists
    of them), and reasons are for logs, not records. NaN is kept.
    """
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        elif isinstance(v, (bool, np.bool_)):
            out[key] = float(v)
        elif isinstance(v, (int, float, np.integer, np.floating)):
            out[key] = float(v)
    return out
