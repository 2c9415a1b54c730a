"""Uncertainty and paired comparisons for evaluation results.

- `bootstrap_auroc_ci`: percentile CI resampling *patients*, because images of one patient are
  correlated and resampling images understates the uncertainty.
- `delong_test` / `delong_ci`: DeLong's asymptotic variance of the AUROC, paired across two
  scorers on the same images (fast midrank algorithm of Sun & Xu 2014). Given patient ids,
  `delong_test` uses the clustered variance of Obuchowski (1997) (`clustered_delong_cov`):
  several images of one patient are correlated, and the image-level variance understates it.
- `paired_tests`: paired t-test and Wilcoxon signed-rank over per-label AUROCs.
- `holm`: Holm's step-down adjustment of a family of p-values.
- `kappa`, `spearman`: agreement between two models' predictions.

Undefined results are NaN with a reason (see common/metrics.py), never an exception.
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import numpy as np
from scipy import stats as sps
from sklearn.metrics import cohen_kappa_score

from chestfed.common.metrics import NAN, as_1d, check_targets, undefined_reason

log = logging.getLogger(__name__)


class Interval(tuple):
    """A confidence interval: unpacks as `lo, hi`; `.reason` says why it is NaN (else None).

    Serialises to JSON as [lo, hi]. Extra diagnostics (e.g. `n_valid`) are attributes.
    """

    def __new__(cls, lo: float, hi: float, reason: str | None = None, **extra: Any) -> "Interval":
        self = super().__new__(cls, (float(lo), float(hi)))
        self.reason = reason
        for k, v in extra.items():
            setattr(self, k, v)
        return self

    def __getnewargs__(self) -> tuple[float, float]:  # pickling (Ray / multiprocessing)
        return (self[0], self[1])

    @property
    def lo(self) -> float:
        return self[0]

    @property
    def hi(self) -> float:
        return self[1]

    def __repr__(self) -> str:
        extra = f", reason={self.reason!r}" if self.reason else ""
        return f"Interval({self[0]:.4g}, {self[1]:.4g}{extra})"


# ----------------------------------------------------------------------------- patient bootstrap


def weighted_auc_setup(s: np.ndarray) -> tuple[np.ndarray, int]:
    """Map scores to tie-group codes in ascending score order (done once per bootstrap)."""
    _, code = np.unique(s, return_inverse=True)
    return code, int(code.max()) + 1


def weighted_auc(pos: np.ndarray, code: np.ndarray, n_codes: int, w: np.ndarray) -> float:
    """Mann-Whitney AUROC with integer sample weights (ties count 1/2), O(N) given codes.

    Equal to roc_auc_score on the data with each sample repeated w times, without building it.
    """
    wp = np.bincount(code, weights=w * pos, minlength=n_codes)
    wn = np.bincount(code, weights=w * ~pos, minlength=n_codes)
    tot_p, tot_n = wp.sum(), wn.sum()
    if tot_p == 0 or tot_n == 0:
        return NAN
    neg_below = np.cumsum(wn) - wn
    return float((wp * (neg_below + 0.5 * wn)).sum() / (tot_p * tot_n))


def bootstrap_group_counts(rng: np.random.Generator, n_groups: int) -> np.ndarray:
    """One bootstrap resample of `n_groups` groups with replacement, as a count per group."""
    return np.bincount(rng.integers(0, n_groups, size=n_groups), minlength=n_groups)


def bootstrap_auroc_ci(
    y: Any,
    s: Any,
    groups: Any | None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    min_valid: float = 0.5,
    min_groups_per_class: int = 2,
) -> Interval:
    """Percentile bootstrap CI of the AUROC, resampling patients (`groups`) with replacement.

    Hand-written (sklearn/scipy have no grouped bootstrap): a resample is a count per patient,
    turned into image weights, so each resample costs one O(N) pass and never copies data.
    Resamples with one class are skipped; if fewer than `min_valid` of them are usable, or a
    class occurs in fewer than `min_groups_per_class` patients, the CI is NaN with a reason.
    `groups=None` resamples images (for comparison only).
    """
    y_all = as_1d(y, "y")
    s_all = as_1d(s, "scores")
    if y_all.shape != s_all.shape:
        raise ValueError(f"y and scores differ in length: {y_all.shape[0]} vs {s_all.shape[0]}")
    check_targets(y_all)
    keep = ~np.isnan(y_all)
    if groups is None:
        g = np.arange(int(keep.sum()))
    else:
        g_all = np.asarray(groups).reshape(-1)
        if g_all.shape[0] != y_all.shape[0]:
            raise ValueError(f"groups has {g_all.shape[0]} entries for {y_all.shape[0]} samples")
        _, g = np.unique(g_all[keep], return_inverse=True)
    yk, sk = y_all[keep], s_all[keep]
    reason = undefined_reason(yk, sk)
    if reason:
        return Interval(NAN, NAN, reason, n_valid=0)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    n_groups = int(g.max()) + 1
    pos = yk == 1
    for cls, mask in (("positive", pos), ("negative", ~pos)):
        n_cls = int(np.unique(g[mask]).size)
        if n_cls < min_groups_per_class:
            why = (f"{cls} images come from {n_cls} patient(s) (need >= {min_groups_per_class}); "
                   "a patient bootstrap cannot show their variability")
            return Interval(NAN, NAN, why, n_valid=0)
    code, n_codes = weighted_auc_setup(sk)
    rng = np.random.default_rng(seed)
    aucs = np.empty(n_boot)
    for b in range(n_boot):
        w = bootstrap_group_counts(rng, n_groups)[g].astype(np.float64)
        aucs[b] = weighted_auc(pos, code, n_codes, w)
    valid = aucs[~np.isnan(aucs)]
    if valid.size < min_valid * n_boot or valid.size == 0:
        why = (f"only {valid.size} of {n_boot} resamples had both classes "
               f"({n_groups} patients, {int(pos.sum())} positive images)")
        return Interval(NAN, NAN, why, n_valid=int(valid.size))
    lo, hi = np.quantile(valid, [alpha / 2, 1 - alpha / 2])
    return Interval(lo, hi, None, n_valid=int(valid.size))


# ----------------------------------------------------------------------------- DeLong


def _delong_placements(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fast DeLong (Sun & Xu 2014): AUCs [k] and placement values V10 [k, m], V01 [k, n]
    for k scorers (rows of `scores`), from midranks in O(k N log N).

    Hand-written: neither sklearn nor scipy implements DeLong's variance.
    """
    pos = y == 1
    x, z = scores[:, pos], scores[:, ~pos]
    m, n = x.shape[1], z.shape[1]
    tx = sps.rankdata(x, axis=1)          # midranks among positives
    tz = sps.rankdata(z, axis=1)          # midranks among negatives
    t = sps.rankdata(np.concatenate([x, z], axis=1), axis=1)  # midranks overall
    aucs = (t[:, :m].sum(axis=1) / m - (m + 1) / 2.0) / n
    v10 = (t[:, :m] - tx) / n             # P(neg < this positive), ties 1/2
    v01 = 1.0 - (t[:, m:] - tz) / m       # P(pos > this negative), ties 1/2
    return aucs, v10, v01


def _scorers(y: Any, scores: tuple[Any, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Targets [N] and scores [k, N] as float arrays, checked to agree in length."""
    y = as_1d(y, "y")
    sc = np.vstack([as_1d(s, "scores") for s in scores])
    if sc.shape[1] != y.shape[0]:
        raise ValueError(f"scores have {sc.shape[1]} samples, y has {y.shape[0]}")
    check_targets(y)
    return y, sc


def _why_undefined(y: np.ndarray, sc: np.ndarray) -> str | None:
    return undefined_reason(y) or next((r for r in (undefined_reason(y, row) for row in sc) if r), None)


def delong_cov(y: Any, *scores: Any) -> tuple[np.ndarray, np.ndarray, str | None]:
    """AUCs [k] and their DeLong covariance [k, k] for k scorers on the same samples.

    Samples whose target is NaN are dropped; NaN with reason when one class is absent.
    """
    y, sc = _scorers(y, scores)
    keep = ~np.isnan(y)
    y, sc = y[keep], sc[:, keep]
    k = sc.shape[0]
    reason = _why_undefined(y, sc)
    if reason:
        return np.full(k, NAN), np.full((k, k), NAN), reason
    aucs, v10, v01 = _delong_placements(y, sc)
    m, n = v10.shape[1], v01.shape[1]
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((k, k))
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((k, k))
    return aucs, s10 / m + s01 / n, None


def clustered_delong_cov(y: Any, groups: Any, *scores: Any,
                         ) -> tuple[np.ndarray, np.ndarray, str | None, int]:
    """AUCs [k], their covariance [k, k] with patient clustering, the reason if NaN, and the
    number of patients (clusters) with a labelled image.

    Obuchowski (1997), "Nonparametric analysis of clustered ROC curve data", Biometrics 53:
    the AUROC is DeLong's (every positive image against every negative image, of any patient);
    its structural components (the placement values V10 of positive images and V01 of negative
    images) are summed per patient, and the variance comes from the between-patient spread of
    those sums. With I patients, M positive and N negative images, m_i and n_i of them in
    patient i, I10 / I01 patients with a positive / negative image, V10_i / V01_i the sums and
    theta the AUROC (per scorer r, s):

        S10 = I10 / ((I10 - 1) M) * sum_i (V10_i^r - m_i theta^r)(V10_i^s - m_i theta^s)
        S01 = I01 / ((I01 - 1) N) * sum_i (V01_i^r - n_i theta^r)(V01_i^s - n_i theta^s)
        S11 = I / (I - 1)         * sum_i (V10_i^r - m_i theta^r)(V01_i^s - n_i theta^s)
        cov = S10 / M + S01 / N + (S11 + S11^T) / (M N)

    A patient with only positive (or only negative) images contributes 0 to the other class's
    terms. With one image per patient this is exactly `delong_cov`. Vectorised: one pass of
    midranks plus a bincount per scorer, O(k N log N). NaN targets are dropped.
    """
    y, sc = _scorers(y, scores)
    g_all = np.asarray(groups).reshape(-1)
    if g_all.shape[0] != y.shape[0]:
        raise ValueError(f"groups has {g_all.shape[0]} entries for {y.shape[0]} samples")
    keep = ~np.isnan(y)
    y, sc = y[keep], sc[:, keep]
    k = sc.shape[0]
    _, g = np.unique(g_all[keep], return_inverse=True)
    g = g.reshape(-1)
    n_cl = int(g.max()) + 1 if g.size else 0
    nan = np.full(k, NAN), np.full((k, k), NAN)
    reason = _why_undefined(y, sc)
    if reason:
        return *nan, reason, n_cl
    pos = y == 1
    m_i = np.bincount(g[pos], minlength=n_cl).astype(np.float64)
    n_i = np.bincount(g[~pos], minlength=n_cl).astype(np.float64)
    i10, i01 = int((m_i > 0).sum()), int((n_i > 0).sum())
    aucs, v10, v01 = _delong_placements(y, sc)
    for cls, n_cls in (("positive", i10), ("negative", i01)):
        if n_cls < 2:  # the AUROCs are defined, their between-patient variance is not
            return aucs, nan[1], (f"{cls} images come from {n_cls} patient(s) (need >= 2): "
                                  "the patient-clustered variance is undefined"), n_cl
    big_m, big_n = v10.shape[1], v01.shape[1]
    # per-patient sums of the structural components, centred at m_i * theta (n_i * theta)
    a = np.stack([np.bincount(g[pos], weights=row, minlength=n_cl) for row in v10]) - aucs[:, None] * m_i
    b = np.stack([np.bincount(g[~pos], weights=row, minlength=n_cl) for row in v01]) - aucs[:, None] * n_i
    s10 = i10 / ((i10 - 1) * big_m) * (a @ a.T)
    s01 = i01 / ((i01 - 1) * big_n) * (b @ b.T)
    s11 = n_cl / (n_cl - 1) * (a @ b.T)
    cov = s10 / big_m + s01 / big_n + (s11 + s11.T) / (big_m * big_n)
    return aucs, cov, None, n_cl


def delong_test(y: Any, s1: Any, s2: Any, groups: Any | None = None) -> dict[str, Any]:
    """DeLong's paired test of AUROC(s1) == AUROC(s2) on the same images (two-sided).

    `groups` (patient ids, one per image): the variance accounts for several correlated images
    per patient (`clustered_delong_cov`, Obuchowski 1997), `level` "patient"; None: images are
    treated as independent (plain DeLong), `level` "image".
    Returns auc1, auc2, diff (= auc1 - auc2), se, z, p, level, n_clusters (patients, or images
    at the image level) and `reason` (None unless NaN).
    """
    if groups is None:
        aucs, cov, reason = delong_cov(y, s1, s2)
        level, n_cl = "image", int(np.sum(~np.isnan(as_1d(y, "y"))))
    else:
        aucs, cov, reason, n_cl = clustered_delong_cov(y, groups, s1, s2)
        level = "patient"
    out: dict[str, Any] = {"auc1": float(aucs[0]), "auc2": float(aucs[1]),
                           "diff": float(aucs[0] - aucs[1]), "level": level, "n_clusters": n_cl}
    if reason:
        out.update(se=NAN, z=NAN, p=NAN, reason=reason)
        return out
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    se = math.sqrt(max(var, 0.0))
    out["se"] = se
    if se < 1e-12 * max(1.0, abs(out["diff"])):
        if abs(out["diff"]) < 1e-12:
            # identical rankings (e.g. the same model twice): nothing to test
            out.update(se=0.0, z=0.0, p=1.0, reason=None)
        else:
            out.update(z=NAN, p=NAN, reason="zero variance of the AUC difference")
        return out
    z = out["diff"] / se
    out.update(z=z, p=float(2 * sps.norm.sf(abs(z))), reason=None)
    return out


def delong_ci(y: Any, s: Any, alpha: float = 0.05) -> Interval:
    """Normal-approximation CI of one AUROC with DeLong's variance, clipped to [0, 1].

    Treats images as independent; prefer `bootstrap_auroc_ci` when patients have many images.
    """
    aucs, cov, reason = delong_cov(y, s)
    if reason:
        return Interval(NAN, NAN, reason, auc=NAN)
    auc, se = float(aucs[0]), math.sqrt(max(float(cov[0, 0]), 0.0))
    h = float(sps.norm.ppf(1 - alpha / 2)) * se
    return Interval(max(0.0, auc - h), min(1.0, auc + h), None, auc=auc, se=se)


# ----------------------------------------------------------------------------- across labels


def paired_tests(a: Any, b: Any, min_pairs: int = 3) -> dict[str, Any]:
    """Paired t-test and Wilcoxon signed-rank test of a vs b (e.g. per-label AUROCs of two
    models), ignoring pairs where either is NaN.

    Returns n_pairs, mean_diff and median_diff (a - b), t, t_p, w, w_p and `reasons` for NaNs.
    """
    a = as_1d(a, "a")
    b = as_1d(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b differ in length: {a.shape[0]} vs {b.shape[0]}")
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    d = a - b
    n = int(d.size)
    out: dict[str, Any] = {"n_pairs": n,
                           "mean_diff": float(d.mean()) if n else NAN,
                           "median_diff": float(np.median(d)) if n else NAN,
                           "t": NAN, "t_p": NAN, "w": NAN, "w_p": NAN}
    reasons: dict[str, str] = {}
    out["reasons"] = reasons
    if n < min_pairs:
        reasons["t"] = reasons["w"] = f"too few pairs (n={n}; need >= {min_pairs})"
        return out
    if np.all(d == 0):
        reasons["t"] = reasons["w"] = f"all {n} differences are zero"
        return out
    if np.ptp(d) <= 1e-9 * max(1.0, float(np.abs(d).max())):  # equal up to rounding
        reasons["t"] = f"all {n} differences equal ({d[0]:.4g}): zero variance"
    else:
        r = sps.ttest_rel(a, b)
        out["t"], out["t_p"] = float(r.statistic), float(r.pvalue)
    with warnings.catch_warnings():
        # scipy warns when zeros or ties force the normal approximation; that is expected here
        warnings.simplefilter("ignore", UserWarning)
        r = sps.wilcoxon(a, b)
    out["w"], out["w_p"] = float(r.statistic), float(r.pvalue)
    return out


def holm(pvalues: Any) -> np.ndarray:
    """Holm's (1979) step-down adjustment: the family is every finite p-value given; NaN stays
    NaN and does not count. adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)) for the sorted
    p_(1) <= ... <= p_(m). Controls the family-wise error rate under any dependence.

    Hand-written: scipy has no Holm (only false_discovery_control), and statsmodels is not a
    dependency of this project for the sake of six lines.
    """
    p = np.asarray(pvalues, dtype=np.float64).reshape(-1)
    out = np.full(p.shape, NAN)
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adj = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(adj)
    return out


def _binarise(p: np.ndarray, t: float) -> np.ndarray:
    return (p >= t).astype(np.int8)


def kappa(pred1: Any, pred2: Any, threshold: float | tuple[float, float] = 0.5) -> tuple[float, str | None]:
    """Cohen's kappa (sklearn) between two models' binarised predictions (`score >= threshold`;
    a pair gives each model its own operating point; 0/1 inputs pass through at 0.5).
    Pairs with a NaN are dropped. NaN + reason when kappa is 0/0 (both constant and equal)."""
    p1, p2 = as_1d(pred1, "pred1"), as_1d(pred2, "pred2")
    if p1.shape != p2.shape:
        raise ValueError(f"pred1 and pred2 differ in length: {p1.shape[0]} vs {p2.shape[0]}")
    t1, t2 = threshold if isinstance(threshold, tuple) else (threshold, threshold)
    ok = np.isfinite(p1) & np.isfinite(p2)
    if not ok.any():
        return NAN, "no paired predictions"
    b1, b2 = _binarise(p1[ok], t1), _binarise(p2[ok], t2)
    # chance agreement p_e = 1 exactly when both raters are constant with the same value
    if np.all(b1 == b1[0]) and np.all(b2 == b1[0]):
        return NAN, f"both predict only {'positives' if b1[0] else 'negatives'} (n={b1.size})"
    return float(cohen_kappa_score(b1, b2, labels=[0, 1])), None


def spearman(s1: Any, s2: Any) -> tuple[float, str | None]:
    """Spearman rank correlation (scipy) of two score vectors; NaN pairs dropped; NaN + reason
    when fewer than 3 pairs or either vector is constant."""
    a, b = as_1d(s1, "s1"), as_1d(s2, "s2")
    if a.shape != b.shape:
        raise ValueError(f"s1 and s2 differ in length: {a.shape[0]} vs {b.shape[0]}")
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if a.size < 3:
        return NAN, f"too few pairs (n={a.size}; need >= 3)"
    if np.all(a == a[0]) or np.all(b == b[0]):
        return NAN, f"constant input (n={a.size})"
    return float(sps.spearmanr(a, b).statistic), None
