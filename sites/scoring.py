"""Site-side scoring of several models at once: the final evaluation's work at a hospital.

The coordinator's final evaluation (server/evaluator.py) sends each site ONE message that
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
  a patient-bootstrap CI of every AUROC and of the macro AUROC, ROC points (at most
  `eval.roc_points` per curve); per pair of models DeLong's test, Cohen's kappa (at each model's
  deployable, oracle and 0.5 thresholds), Spearman's rank correlation of the scores, and the
  paired t-test / Wilcoxon over the per-label AUROCs.

Everything here is numpy in, flat `{key: number or list of numbers}` out (a Flower
MetricRecord's value types), plus `{key: reason}` for every NaN. sites/app.py does the Flower
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

from common import protocol as P
from common.metrics import NAN, flatten, roc_points, score_site, undefined_reason, youden_threshold
from common.stats import (
    _weighted_auc,
    _weighted_auc_setup,
    bootstrap_auroc_ci,
    bootstrap_group_counts,
    delong_test,
    kappa,
    paired_tests,
    spearman,
)

log = logging.getLogger(__name__)

# Names on the wire live in common/protocol.py (EVAL_*).

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
    roc_points: int = 200


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


# --- thresholds (validation split of a training site) ---------------------------------------------


def val_thresholds(y: np.ndarray, scores: Mapping[str, np.ndarray], names: Sequence[str],
                   ) -> tuple[dict[str, float], dict[str, str]]:
    """Per model and label: the Youden threshold on this (validation) split and the numbers of
    labelled positives / negatives the server weighs it by. Keys `m/<model>/labels/<L>/...`."""
    metrics: dict[str, float] = {}
    reasons: dict[str, str] = {}
    y = np.asarray(y, dtype=np.float64)
    for model, s in scores.items():
        s = np.asarray(s, dtype=np.float64).reshape(y.shape)
        for j, label in enumerate(names):
            keep = ~np.isnan(y[:, j])
            yj, sj = y[keep, j], s[keep, j]
            base = f"{P.EVAL_MODEL_KEY}{model}/labels/{label}"
            metrics[f"{base}/n_pos"] = float((yj == 1).sum())
            metrics[f"{base}/n_neg"] = float((yj == 0).sum())
            why = "empty validation split" if y.shape[0] == 0 else undefined_reason(yj, sj)
            metrics[f"{base}/youden"] = NAN if why else youden_threshold(yj, sj)
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
        code, n_codes = _weighted_auc_setup(s[keep, j])
        setups.append((keep, y[keep, j] == 1, code, n_codes))
    rng = np.random.default_rng(seed)
    vals = np.empty(n_boot)
    for b in range(n_boot):
        w = bootstrap_group_counts(rng, n_groups)[codes].astype(np.float64)
        aucs = [_weighted_auc(pos, code, n_codes, w[keep]) for keep, pos, code, n_codes in setups]
        vals[b] = NAN if any(math.isnan(a) for a in aucs) else float(np.mean(aucs))
    valid = vals[~np.isnan(vals)]
    if valid.size == 0 or valid.size < min_valid * n_boot:
        return NAN, NAN, (f"only {valid.size} of {n_boot} resamples had both classes for every "
                          f"label ({n_groups} patients)")
    lo, hi = np.quantile(valid, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi), None


def _score_one(y: np.ndarray, s: np.ndarray, names: Sequence[str], groups: Any | None,
               spec: ModelSpec, plan: Plan) -> tuple[dict[str, Any], dict[str, float], dict[str, str]]:
    """One model at this site: score_site + bootstrap CIs + ROC points."""
    res = score_site(y, s, names, thresholds=spec.thresholds)
    base = f"{P.EVAL_MODEL_KEY}{spec.name}/"
    metrics: dict[str, Any] = {base + k: v for k, v in flatten(res).items()}
    reasons = {base + k: v for k, v in res["reasons"].items()}
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
        fpr, tpr = roc_points(y[:, j], s[:, j], max_points=plan.roc_points)
        metrics[f"{base}labels/{names[j]}/roc_fpr"] = fpr
        metrics[f"{base}labels/{names[j]}/roc_tpr"] = tpr
    return res, metrics, reasons


def _pair(y: np.ndarray, sa: np.ndarray, sb: np.ndarray, names: Sequence[str],
          ra: dict[str, Any], rb: dict[str, Any], a: ModelSpec, b: ModelSpec,
          ) -> tuple[dict[str, float], dict[str, str]]:
    """Paired statistics of models a and b on this site's images, per label and over labels."""
    base = f"{P.EVAL_PAIR_KEY}{a.name}{P.EVAL_PAIR_SEP}{b.name}/"
    metrics: dict[str, float] = {}
    reasons: dict[str, str] = {}
    for j, label in enumerate(names):
        keep = ~np.isnan(y[:, j])
        yj, xa, xb = y[keep, j], sa[keep, j], sb[keep, j]
        k = f"{base}labels/{label}/"
        metrics[k + "n"] = float(yj.size)
        if yj.size == 0:
            reasons[f"{base}{label}"] = "not annotated at this site"
            continue
        d = delong_test(yj, xa, xb)
        metrics.update({k + "delong_diff": d["diff"], k + "delong_se": d["se"],
                        k + "delong_z": d["z"], k + "delong_p": d["p"]})
        if d["reason"]:
            reasons[f"{base}{label}/delong"] = d["reason"]
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
        m, r = _pair(y, arrays[a], arrays[b], names, results[a], results[b], specs[a], specs[b])
        metrics.update(m)
        reasons.update(r)
    return metrics, reasons
