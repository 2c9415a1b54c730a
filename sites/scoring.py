"""Site-side scoring of several models at once: the final evaluation's work at a hospital.

The coordinator's final evaluation (server/evaluation/evaluator.py) sends each site ONE message that
carries every model under comparison (an ArrayRecord per model under `model:<name>`) and a
JSON *plan* in the ConfigRecord: which split, each model's deployable thresholds, which pairs
of models to compare, and the bootstrap settings. Scoring all models in one place is what lets
the site compute *paired* statistics (DeLong, kappa, Spearman) on the same images, and it keeps
the per-image predictions at the site: only the aggregates below leave it.

Two modes:
- `thresholds` (on the validation split of a model's training site): per label the Youden
  threshold and the numbers of labelled positives and negatives, which the server combines
  across training sites into the model's deployable operating point;
- `score` (on the test split): per model `score_site` (AUROC, ECE, accuracy / precision /
  recall / specificity / F1 at 0.5, at the deployable threshold and at the oracle threshold),
  a patient-bootstrap CI of every AUROC and of the macro AUROC, the ROC curve as TPR on the
  fixed 51-point FPR grid (`common.disclosure.ROC_FPR_GRID`); per pair of models DeLong's test (patient-clustered, Obuchowski
  1997, where the site has patient ids; the plain image-level test alongside), Cohen's kappa (at
  each model's deployable, oracle and 0.5 thresholds), Spearman's rank correlation of the
  scores, and the paired t-test / Wilcoxon over the per-label AUROCs.

Everything here is numpy in, flat `{key: number or list of numbers}` out (a Flower
MetricRecord's value types), plus `{key: reason}` for every NaN; `release` applies the
disclosure rules (common/privacy/disclosure.py) before a reply leaves. sites/app.py does the Flower
and torch part (loading each model's weights, FedBN's own BatchNorm, predicting).
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

from chestfed.common import protocol as P
from chestfed.common.privacy import disclosure as D
from chestfed.common.calibration import bland_altman, calibrate, suppress_cells
from chestfed.common.metrics import (NAN, counts_above, flatten, prepare, score_site, undefined_reason,
                            youden_on_grid)
from chestfed.common.stats import (
    weighted_auc,
    weighted_auc_setup,
    bootstrap_auroc_ci,
    bootstrap_group_counts,
    delong_test,
    kappa,
    paired_tests,
    spearman,
)

log = logging.getLogger(__name__)

# Names on the wire live in common/protocol.py (EVAL_*).

# The operating points' keys in metric names (common/metrics.py): "op" is the deployable
# threshold (from the training sites' validation splits), kept short on the wire and in
# results.json (the reports read it there).
POINT_NAMES = {"op": "deployable", "oracle": "oracle", "at05": "0.5"}


class PlanError(ValueError):
    """A malformed evaluation plan (a bug on the server side, not a user error)."""


@dataclass
class ModelSpec:
    name: str
    local_bn: bool = False
    thresholds: dict[str, float] = field(default_factory=dict)  # deployable, per label


@dataclass
class Plan:
    mode: str
    split: str
    models: list[ModelSpec]
    pairs: list[tuple[str, str]] = field(default_factory=list)
    bootstrap: int = 200
    seed: int = 0
    ci: float = 0.95
    roc_points: int = 200  # ignored: ROC curves leave on the fixed D.ROC_FPR_GRID


def _num(v: Any) -> float:
    return NAN if v is None else float(v)


def read_plan(text: str) -> Plan:
    """Parse the server's JSON plan (NaN thresholds travel as null)."""
    try:
        d = json.loads(text)
        models = [ModelSpec(str(m["name"]), bool(m.get("local_bn", False)),
                            {str(k): _num(v) for k, v in (m.get("thresholds") or {}).items()})
                  for m in d["models"]]
        plan = Plan(mode=str(d["mode"]), split=str(d["split"]), models=models,
                    pairs=[(str(a), str(b)) for a, b in d.get("pairs", [])],
                    bootstrap=int(d.get("bootstrap", 200)), seed=int(d.get("seed", 0)),
                    ci=float(d.get("ci", 0.95)), roc_points=int(d.get("roc_points", 200)))
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanError(f"malformed evaluation plan: {exc}") from None
    if plan.mode not in (P.EVAL_MODE_THRESHOLDS, P.EVAL_MODE_SCORE, P.EVAL_MODE_BATCHNORM):
        raise PlanError(f"unknown evaluation mode '{plan.mode}'")
    names = [m.name for m in plan.models]
    for a, b in plan.pairs:
        if a not in names or b not in names:
            raise PlanError(f"pair ({a}, {b}) names a model that is not in the message")
    if not 2 <= plan.roc_points <= 200:
        raise PlanError(f"roc_points must be in [2, 200], got {plan.roc_points}")
    return plan


def to_wire(metrics: Mapping[str, Any]) -> dict[str, float | list[float]]:
    """Numbers as float, lists as lists of float (MetricRecord wants homogeneous lists)."""
    out: dict[str, float | list[float]] = {}
    for k, v in metrics.items():
        if isinstance(v, (list, tuple, np.ndarray)):
            out[k] = [float(x) for x in v]
        elif isinstance(v, (bool, np.bool_)):
            out[k] = float(v)
        elif isinstance(v, (int, float, np.integer, np.floating)):
            out[k] = float(v)
        elif v is None:
            out[k] = NAN
    return out


def release(metrics: dict[str, Any], min_cell: int) -> dict[str, str]:
    """What leaves the site (common/privacy/disclosure.py), in place: thresholds chosen on the site's own
    images (`.../oracle/threshold`) rounded to 0.01, score ranges as 0 or rounded up to 0.01,
    confusion counts below `min_cell` suppressed. Returns the reasons of the suppressed counts."""
    for k, v in metrics.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if k.endswith("oracle/threshold"):
            metrics[k] = D.round_threshold(float(v))
        elif k.endswith("/score_range"):
            metrics[k] = D.released_range(float(v))
    reasons = D.suppress_counts(metrics, min_cell)
    for k, v in metrics.items():  # Bland-Altman histograms: the same rule, per cell
        if k.endswith("/ba_hist") and isinstance(v, list):
            metrics[k] = suppress_cells(v, min_cell)
            if any(x != x for x in metrics[k]):
                reasons[k] = D.suppressed_reason(min_cell) + " (cells)"
    return reasons


# --- thresholds (validation split of a training site) ---------------------------------------------


def val_thresholds(y: np.ndarray, scores: Mapping[str, np.ndarray], names: Sequence[str],
                   min_cell: int = 0) -> tuple[dict[str, Any], dict[str, str]]:
    """Per model and label on this (validation) split: the numbers of labelled positives and
    negatives, how many of each score at or above every threshold of the fixed grid
    (`common.metrics.THRESHOLD_GRID`), from which the server finds the Youden point of the
    training sites' pooled validation data, and this site's own Youden point on that grid.
    Keys `m/<model>/labels/<L>/...`. No image's score leaves: only counts at fixed thresholds,
    coarsened to steps of at least `min_cell` images (`common.disclosure.coarsen_cumulative`;
    the site's own Youden point is chosen on the coarsened counts it sends)."""
    metrics: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    y = np.asarray(y, dtype=np.float64)
    for model, s in scores.items():
        s = np.asarray(s, dtype=np.float64).reshape(y.shape)
        for j, label in enumerate(names):
            keep = ~np.isnan(y[:, j])
            yj, sj = y[keep, j], s[keep, j]
            base = f"{P.EVAL_MODEL_KEY}{model}/labels/{label}"
            n_pos, n_neg = float((yj == 1).sum()), float((yj == 0).sum())
            pos_above, neg_above = counts_above(yj, sj)
            pos_above = D.coarsen_cumulative(pos_above, n_pos, min_cell)
            neg_above = D.coarsen_cumulative(neg_above, n_neg, min_cell)
            metrics[f"{base}/n_pos"], metrics[f"{base}/n_neg"] = n_pos, n_neg
            metrics[f"{base}/pos_above"] = pos_above.astype(float).tolist()
            metrics[f"{base}/neg_above"] = neg_above.astype(float).tolist()
            why = "empty validation split" if y.shape[0] == 0 else undefined_reason(yj, sj)
            metrics[f"{base}/youden"] = NAN if why else youden_on_grid(pos_above, neg_above, n_pos, n_neg)
            if why:
                reasons[f"{base}/youden"] = f"Youden threshold undefined on this site's validation split: {why}"
    return metrics, reasons


# --- test split ------------------------------------------------------------------------------------


def _group_codes(groups: Any | None, n: int) -> tuple[np.ndarray, str | None]:
    if groups is None:
        return np.arange(n), "no patient ids at this site: the bootstrap resampled images"
    g = np.asarray(groups).reshape(-1)
    if g.shape[0] != n:
        raise ValueError(f"groups has {g.shape[0]} entries for {n} images")
    _, codes = np.unique(g.astype(str), return_inverse=True)
    return codes, None


def macro_auroc_ci(y: np.ndarray, s: np.ndarray, groups: Any | None, labels: Sequence[int],
                   n_boot: int, seed: int, alpha: float = 0.05, min_valid: float = 0.5,
                   ) -> tuple[float, float, str | None]:
    """Patient-bootstrap percentile CI of the macro AUROC over the label columns `labels`.

    One resample draws patients with replacement once for all labels (labels of one image are
    correlated too). A resample in which any of those labels lacks a class is skipped; NaN with
    a reason if fewer than `min_valid` of the resamples are usable.
    """
    if not labels:
        return NAN, NAN, "no label has both classes present"
    codes, _ = _group_codes(groups, y.shape[0])
    n_groups = int(codes.max()) + 1 if codes.size else 0
    setups = []
    for j in labels:
        keep = ~np.isnan(y[:, j])
        code, n_codes = weighted_auc_setup(s[keep, j])
        setups.append((keep, y[keep, j] == 1, code, n_codes))
    rng = np.random.default_rng(seed)
    vals = np.empty(n_boot)
    for b in range(n_boot):
        w = bootstrap_group_counts(rng, n_groups)[codes].astype(np.float64)
        aucs = [weighted_auc(pos, code, n_codes, w[keep]) for keep, pos, code, n_codes in setups]
        vals[b] = NAN if any(math.isnan(a) for a in aucs) else float(np.mean(aucs))
    valid = vals[~np.isnan(vals)]
    if valid.size == 0 or valid.size < min_valid * n_boot:
        return NAN, NAN, (f"only {valid.size} of {n_boot} resamples had both classes for every "
                          f"label ({n_groups} patients)")
    lo, hi = np.quantile(valid, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi), None


def _score_one(y: np.ndarray, s: np.ndarray, names: Sequence[str], groups: Any | None,
               spec: ModelSpec, plan: Plan) -> tuple[dict[str, Any], dict[str, float], dict[str, str]]:
    """One model at this site: score_site + bootstrap CIs + the ROC curve as TPR on the fixed FPR
    grid (`labels/<L>/roc_tpr`, `common.disclosure.ROC_FPR_GRID`), and per label the range
    of its scores over the labelled images (`score_range`: the server flags a constant predictor
    from it, common/caveats.py; the scores themselves stay here)."""
    res = score_site(y, s, names, thresholds=spec.thresholds)
    base = f"{P.EVAL_MODEL_KEY}{spec.name}/"
    metrics: dict[str, Any] = {base + k: v for k, v in flatten(res).items()}
    reasons = {base + k: v for k, v in res["reasons"].items()}
    for j, label in enumerate(names):  # the constant-predictor check (common/caveats.py)
        sj = s[~np.isnan(y[:, j]), j]
        sj = sj[np.isfinite(sj)]
        metrics[f"{base}labels/{label}/score_range"] = float(sj.max() - sj.min()) if sj.size else NAN
    alpha = 1.0 - plan.ci
    macro_idx = [j for j, n in enumerate(names) if not math.isnan(res["labels"][n]["auroc"])]
    codes_note = None
    if plan.bootstrap > 0:
        _, codes_note = _group_codes(groups, y.shape[0])
        for j in macro_idx:
            ci = bootstrap_auroc_ci(y[:, j], s[:, j], groups, n_boot=plan.bootstrap,
                                    seed=plan.seed, alpha=alpha)
            metrics[f"{base}labels/{names[j]}/auroc_lo"] = ci.lo
            metrics[f"{base}labels/{names[j]}/auroc_hi"] = ci.hi
            if ci.reason:
                reasons[f"{base}{names[j]}/auroc_ci"] = ci.reason
        if len(macro_idx) == 1:  # the macro AUROC is that label's AUROC: same interval
            j = macro_idx[0]
            lo, hi = metrics[f"{base}labels/{names[j]}/auroc_lo"], metrics[f"{base}labels/{names[j]}/auroc_hi"]
            why = reasons.get(f"{base}{names[j]}/auroc_ci")
        else:
            lo, hi, why = macro_auroc_ci(y, s, groups, macro_idx, plan.bootstrap, plan.seed, alpha)
        metrics[f"{base}macro_auroc_lo"], metrics[f"{base}macro_auroc_hi"] = lo, hi
        if why:
            reasons[f"{base}macro_auroc_ci"] = why
        if codes_note:
            reasons[f"{base}bootstrap"] = codes_note
    for j in macro_idx:
        yj, sj, _ = prepare(y[:, j], s[:, j])
        fpr, tpr, _ = roc_curve(yj, sj, drop_intermediate=False)
        metrics[f"{base}labels/{names[j]}/roc_tpr"] = D.roc_on_grid(fpr, tpr)
    return res, metrics, reasons


DELONG_LEVEL = {"image": 0.0, "patient": 1.0}  # `delong_level` on the wire (metrics are numbers)


def _pair(y: np.ndarray, sa: np.ndarray, sb: np.ndarray, names: Sequence[str],
          ra: dict[str, Any], rb: dict[str, Any], a: ModelSpec, b: ModelSpec,
          groups: Any | None = None) -> tuple[dict[str, float], dict[str, str]]:
    """Paired statistics of models a and b on this site's images, per label and over labels.

    DeLong per label: `delong_diff/_se/_z/_p` is the test the report uses, patient-clustered
    (Obuchowski 1997) when `groups` (patient ids) are given, else image-level; `delong_level`
    says which (1 = patient, 0 = image; see DELONG_LEVEL) and `delong_patients` how many
    patients it used. `delong_image_se/_z/_p` is always the plain image-level DeLong test
    (images treated as independent: too small p-values when patients have several images).
    """
    base = f"{P.EVAL_PAIR_KEY}{a.name}{P.EVAL_PAIR_SEP}{b.name}/"
    metrics: dict[str, float] = {}
    reasons: dict[str, str] = {}
    g = None
    if groups is not None:
        g = np.asarray(groups).reshape(-1)
        if g.shape[0] != y.shape[0]:
            raise ValueError(f"groups has {g.shape[0]} entries for {y.shape[0]} images")
    for j, label in enumerate(names):
        keep = ~np.isnan(y[:, j])
        yj, xa, xb = y[keep, j], sa[keep, j], sb[keep, j]
        k = f"{base}labels/{label}/"
        metrics[k + "n"] = float(yj.size)
        if yj.size == 0:
            reasons[f"{base}{label}"] = "not annotated at this site"
            continue
        di = delong_test(yj, xa, xb)
        d = di if g is None else delong_test(yj, xa, xb, g[keep])
        metrics.update({k + "delong_diff": d["diff"], k + "delong_se": d["se"],
                        k + "delong_z": d["z"], k + "delong_p": d["p"],
                        k + "delong_level": DELONG_LEVEL[d["level"]],
                        k + "delong_image_se": di["se"], k + "delong_image_z": di["z"],
                        k + "delong_image_p": di["p"]})
        if g is not None:
            metrics[k + "delong_patients"] = float(d["n_clusters"])
        if d["reason"]:
            reasons[f"{base}{label}/delong"] = d["reason"]
        if di["reason"] and g is not None:
            reasons[f"{base}{label}/delong_image"] = di["reason"]
        for point, ta, tb in (
            ("op", a.thresholds.get(label, NAN), b.thresholds.get(label, NAN)),
            ("oracle", ra["labels"][label]["oracle"]["threshold"], rb["labels"][label]["oracle"]["threshold"]),
            ("at05", 0.5, 0.5),
        ):
            if math.isnan(ta) or math.isnan(tb):
                metrics[k + f"kappa_{point}"] = NAN
                which = " and ".join(m for m, t in ((a.name, ta), (b.name, tb)) if math.isnan(t))
                reasons[f"{base}{label}/kappa_{point}"] = f"{POINT_NAMES[point]} threshold undefined for {which}"
                continue
            kv, why = kappa(xa, xb, (ta, tb))
            metrics[k + f"kappa_{point}"] = kv
            if why:
                reasons[f"{base}{label}/kappa_{point}"] = why
        # Cohen et al.: both models calibrated to their own oracle point (Eq. 1), then kappa at 0.5
        # and Bland-Altman aggregates (common/calibration.py; `release` suppresses small cells).
        oa, ob = ra["labels"][label]["oracle"]["threshold"], rb["labels"][label]["oracle"]["threshold"]
        if math.isnan(oa) or math.isnan(ob):
            metrics[k + "kappa_calibrated"] = NAN
            reasons[f"{base}{label}/kappa_calibrated"] = "oracle threshold undefined (one class?)"
        else:
            ca, cb = calibrate(xa, oa), calibrate(xb, ob)
            kv, why = kappa(ca, cb, 0.5)
            metrics[k + "kappa_calibrated"] = kv
            if why:
                reasons[f"{base}{label}/kappa_calibrated"] = why
            ba = bland_altman(ca, cb)
            metrics.update({k + "ba_n": ba["n"], k + "ba_bias": ba["bias"], k + "ba_sd": ba["sd"],
                            k + "ba_hist": ba["hist"]})
        rho, why = spearman(xa, xb)
        metrics[k + "spearman"] = rho
        if why:
            reasons[f"{base}{label}/spearman"] = why
    auc_a = [ra["labels"][n]["auroc"] for n in names]
    auc_b = [rb["labels"][n]["auroc"] for n in names]
    pt = paired_tests(auc_a, auc_b)
    for key in ("n_pairs", "mean_diff", "median_diff", "t", "t_p", "w", "w_p"):
        metrics[f"{base}over_labels/{key}"] = pt[key]
    for key, why in pt["reasons"].items():
        reasons[f"{base}over_labels/{key}"] = why
    return metrics, reasons


def score_models(y: np.ndarray, scores: Mapping[str, np.ndarray], names: Sequence[str],
                 groups: Any | None, plan: Plan) -> tuple[dict[str, Any], dict[str, str]]:
    """Every model of the plan on this site's test split, then every requested pair.

    y: [N, T] targets (NaN = masked, incl. labels this site does not annotate); scores: model
    name -> [N, T] probabilities; groups: [N] patient ids (None: resample images).
    """
    y = np.asarray(y, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    names = list(names)
    metrics: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    results: dict[str, dict[str, Any]] = {}
    arrays: dict[str, np.ndarray] = {}
    specs = {m.name: m for m in plan.models}
    for spec in plan.models:
        s = np.asarray(scores[spec.name], dtype=np.float64).reshape(y.shape)
        arrays[spec.name] = s
        res, m, r = _score_one(y, s, names, groups, spec, plan)
        results[spec.name] = res
        metrics.update(m)
        reasons.update(r)
    for a, b in plan.pairs:
        m, r = _pair(y, arrays[a], arrays[b], names, results[a], results[b], specs[a], specs[b],
                     groups)
        metrics.update(m)
        reasons.update(r)
    return metrics, reasons
