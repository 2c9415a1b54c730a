"""common/metrics.py, cross-checked against scikit-learn and hand computations."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from chestfed.common import metrics as M

NAN = float("nan")


@pytest.fixture(autouse=True)
def _no_warnings():
    """Undefined metrics must be handled, not warned about by sklearn/numpy."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _data(n: int = 400, seed: int = 0, prev: float = 0.3, d: float = 1.0, ties: bool = True):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prev).astype(float)
    s = 1 / (1 + np.exp(-(d * y + rng.normal(size=n) - 1)))
    if ties:
        s = np.round(s, 2)  # many tied scores
    return y, s


# ----------------------------------------------------------------------------- auroc


def test_auroc_matches_sklearn_with_ties():
    y, s = _data()
    value, reason = M.auroc(y, s)
    assert reason is None
    assert value == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auroc_removes_nan_targets():
    y, s = _data()
    y_masked = y.copy()
    y_masked[::3] = NAN
    # the masked samples get scores that would wreck the AUROC if they were used
    s_masked = s.copy()
    s_masked[::3] = np.where(y[::3] == 1, 0.0, 1.0)
    keep = ~np.isnan(y_masked)
    value, reason = M.auroc(y_masked, s_masked)
    assert reason is None
    assert value == pytest.approx(roc_auc_score(y[keep], s[keep]), abs=1e-12)


@pytest.mark.parametrize("y, expect", [
    ([0, 0, 0, NAN], "only negatives (n=3)"),
    ([1, 1, NAN, NAN], "only positives (n=2)"),
    ([NAN, NAN, NAN, NAN], "no labelled samples"),
    ([], "no labelled samples"),
])
def test_auroc_undefined_is_nan_with_reason(y, expect):
    s = np.linspace(0.1, 0.9, len(y))
    value, reason = M.auroc(np.array(y, dtype=float), s)
    assert math.isnan(value)
    assert reason == expect


def test_auroc_nonfinite_scores_reported():
    value, reason = M.auroc([0, 1, 0, 1], [0.1, NAN, 0.3, 0.9])
    assert math.isnan(value) and "non-finite" in reason


def test_bad_targets_raise():
    with pytest.raises(ValueError, match="0, 1 or NaN"):
        M.auroc([0, 1, -1], [0.1, 0.2, 0.3])


# ----------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize("t", [0.05, 0.3, 0.5, 0.37, 0.8])
def test_threshold_metrics_match_sklearn(t):
    y, s = _data(seed=1)
    r = M.threshold_metrics(y, s, t)
    pred = (s >= t).astype(int)
    assert r["threshold"] == t
    assert r["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert r["precision"] == pytest.approx(precision_score(y, pred, zero_division=np.nan), nan_ok=True)
    assert r["recall"] == pytest.approx(recall_score(y, pred))
    assert r["f1"] == pytest.approx(f1_score(y, pred, zero_division=np.nan), nan_ok=True)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (tp, fp, tn, fn)
    # specificity by hand
    neg = y == 0
    assert r["specificity"] == pytest.approx(np.mean(s[neg] < t))


def test_threshold_metrics_zero_division():
    y = np.array([1, 1, 0, 0, 0.0])
    s = np.array([0.1, 0.2, 0.3, 0.2, 0.1])
    r = M.threshold_metrics(y, s, 0.9)  # nothing predicted positive
    assert math.isnan(r["precision"]) and "no predicted positives" in r["reasons"]["precision"]
    assert r["recall"] == 0.0 and r["specificity"] == 1.0
    assert r["f1"] == f1_score(y, s >= 0.9, zero_division=np.nan) == 0.0
    assert r["accuracy"] == 0.6

    r = M.threshold_metrics(np.zeros(4), np.array([0.1, 0.6, 0.2, 0.9]), 0.5)  # only negatives
    assert math.isnan(r["recall"]) and r["reasons"]["recall"] == "only negatives (n=4)"
    assert r["specificity"] == 0.5 and r["precision"] == 0.0 and r["f1"] == 0.0

    r = M.threshold_metrics(np.zeros(3), np.array([0.1, 0.2, 0.3]), 0.5)
    assert math.isnan(r["f1"]) and "f1" in r["reasons"]

    r = M.threshold_metrics(np.ones(3), np.array([0.1, 0.2, 0.9]), 0.5)  # only positives
    assert math.isnan(r["specificity"]) and r["recall"] == pytest.approx(1 / 3)


def test_threshold_metrics_nan_threshold_and_masked():
    y, s = _data(seed=2)
    r = M.threshold_metrics(y, s, NAN)
    assert all(math.isnan(r[m]) for m in M.THRESHOLD_METRICS)
    assert set(r["reasons"]) == set(M.THRESHOLD_METRICS)
    y2 = y.copy()
    y2[:50] = NAN
    r = M.threshold_metrics(y2, s, 0.5)
    assert r["tp"] + r["fp"] + r["tn"] + r["fn"] == len(y) - 50
    assert r["accuracy"] == pytest.approx(accuracy_score(y[50:], s[50:] >= 0.5))


def test_youden_threshold_is_brute_force_optimum():
    y, s = _data(seed=3, n=300)
    t = M.youden_threshold(y, s)
    pos, neg = y == 1, y == 0

    def j(th):
        return np.mean(s[pos] >= th) - np.mean(s[neg] >= th)

    best = max(j(th) for th in np.unique(s))
    assert j(t) == pytest.approx(best, abs=1e-12)
    assert t in set(np.unique(s))


def test_youden_threshold_separable_and_undefined():
    y = np.array([0, 0, 0, 1, 1.0])
    s = np.array([0.1, 0.2, 0.3, 0.7, 0.8])
    t = M.youden_threshold(y, s)
    assert 0.3 < t <= 0.7
    r = M.threshold_metrics(y, s, t)
    assert r["recall"] == 1.0 and r["specificity"] == 1.0
    assert math.isnan(M.youden_threshold([0, 0, NAN], [0.1, 0.2, 0.3]))
    # a useless scorer: the best J is 0 at "predict nothing", kept finite
    t = M.youden_threshold([1, 0, 1, 0], [0.1, 0.9, 0.2, 0.8])
    assert math.isfinite(t) and t > 0.9


# ----------------------------------------------------------------------------- ece


def test_ece_hand_example():
    # 15 bins of width 1/15: 0.05 and 0.06 -> bin 0, 0.95 and 1.0 -> bin 14, 0.5 -> bin 7
    y = np.array([0, 1, 1, 1, 0.0])
    s = np.array([0.05, 0.06, 0.95, 1.0, 0.5])
    expect = (2 / 5) * abs(0.5 - 0.055) + (2 / 5) * abs(1.0 - 0.975) + (1 / 5) * abs(0 - 0.5)
    assert M.ece(y, s) == pytest.approx(expect)


def test_ece_matches_loop_implementation_and_masks():
    y, s = _data(seed=4, n=1000, ties=False)
    y[::7] = NAN
    keep = ~np.isnan(y)
    yk, sk = y[keep], s[keep]
    edges = np.linspace(0, 1, 11)
    total = 0.0
    for b in range(10):
        inb = (sk >= edges[b]) & ((sk < edges[b + 1]) if b < 9 else (sk <= 1))
        if inb.any():
            total += inb.sum() / len(yk) * abs(yk[inb].mean() - sk[inb].mean())
    assert M.ece(y, s, n_bins=10) == pytest.approx(total)


def test_ece_calibrated_is_small_and_empty_is_nan():
    rng = np.random.default_rng(5)
    s = rng.random(200_000)
    y = (rng.random(s.size) < s).astype(float)
    assert M.ece(y, s) < 0.01
    assert M.ece(y, np.clip(s + 0.2, 0, 1)) > 0.1
    assert math.isnan(M.ece([NAN, NAN], [0.2, 0.4]))


# ----------------------------------------------------------------------------- roc points


def test_roc_points_downsampled_keeps_ends():
    y, s = _data(seed=6, n=5000, ties=False)
    fpr, tpr = M.roc_points(y, s, max_points=50)
    full_f, full_t, _ = roc_curve(y, s)
    assert 2 < len(fpr) <= 50 and len(fpr) == len(tpr)
    assert (fpr[0], tpr[0]) == (full_f[0], full_t[0]) == (0.0, 0.0)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    pts = set(zip(full_f.tolist(), full_t.tolist()))
    assert all(p in pts for p in zip(fpr, tpr))
    assert all(isinstance(v, float) for v in fpr + tpr)
    # the downsampled area stays close to the true AUROC
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(y, s), abs=0.01)


def test_roc_points_small_and_undefined():
    y = np.array([0, 1, 0, 1.0])
    s = np.array([0.1, 0.4, 0.35, 0.8])
    f, t, _ = roc_curve(y, s)
    assert M.roc_points(y, s) == (f.tolist(), t.tolist())
    assert M.roc_points([0, 0], [0.1, 0.2]) == ([], [])


# ----------------------------------------------------------------------------- score_site


def _site(n: int = 600, seed: int = 7):
    rng = np.random.default_rng(seed)
    names = ["Atelectasis", "Effusion", "Hernia", "Fracture"]
    y = (rng.random((n, 4)) < [0.3, 0.2, 0.0, 0.1]).astype(float)  # Hernia: no positives
    s = np.clip(0.3 * y + 0.7 * rng.random((n, 4)), 0, 1)
    y[rng.random((n, 4)) < 0.2] = NAN  # scattered masking
    y[:, 3] = NAN                      # Fracture: not annotated at this site
    return y, s, names


def test_score_site_single_class_label_excluded_from_macro():
    y, s, names = _site()
    r = M.score_site(y, s, names)
    labels = r["labels"]
    assert list(labels) == names
    for j in (0, 1):
        keep = ~np.isnan(y[:, j])
        lab = labels[names[j]]
        assert lab["n"] == keep.sum() and lab["n_pos"] == int(y[keep, j].sum())
        assert lab["auroc"] == pytest.approx(roc_auc_score(y[keep, j], s[keep, j]), abs=1e-12)
        assert lab["ece"] == pytest.approx(M.ece(y[:, j], s[:, j]))
        tm = M.threshold_metrics(y[:, j], s[:, j], 0.5)
        tm.pop("reasons")
        assert lab["at05"] == pytest.approx(tm, nan_ok=True)
        t_or = M.youden_threshold(y[:, j], s[:, j])
        assert lab["oracle"]["threshold"] == pytest.approx(t_or)
        assert lab["oracle"]["f1"] == pytest.approx(M.threshold_metrics(y[:, j], s[:, j], t_or)["f1"])
        assert "op" not in lab

    hernia = labels["Hernia"]
    n_h = int((~np.isnan(y[:, 2])).sum())
    assert math.isnan(hernia["auroc"])
    assert r["reasons"]["Hernia/auroc"] == f"only negatives (n={n_h})"
    assert hernia["n_pos"] == 0 and not math.isnan(hernia["at05"]["specificity"])
    assert "Hernia/oracle" in r["reasons"]
    assert math.isnan(labels["Fracture"]["auroc"])
    assert r["reasons"]["Fracture/auroc"] == "no labelled samples"

    assert r["n_labels_macro"] == 2
    assert r["macro_auroc"] == pytest.approx(
        (labels["Atelectasis"]["auroc"] + labels["Effusion"]["auroc"]) / 2)
    assert r["macro_ece"] == pytest.approx((labels["Atelectasis"]["ece"] + labels["Effusion"]["ece"]) / 2)
    # Hernia's specificity exists but must not leak into the macro
    assert r["macro_at05"]["specificity"] == pytest.approx(
        (labels["Atelectasis"]["at05"]["specificity"] + labels["Effusion"]["at05"]["specificity"]) / 2)
    json.loads(json.dumps(r))  # plain, serialisable (NaN allowed)


def test_score_site_operating_point():
    y, s, names = _site(seed=8)
    thr = {"Atelectasis": 0.42, "Effusion": NAN}
    r = M.score_site(y, s, names, thresholds=thr)
    op = r["labels"]["Atelectasis"]["op"]
    assert op["threshold"] == 0.42
    assert op["recall"] == pytest.approx(M.threshold_metrics(y[:, 0], s[:, 0], 0.42)["recall"])
    assert math.isnan(r["labels"]["Effusion"]["op"]["f1"])
    assert "NaN" in r["reasons"]["Effusion/op"]
    assert r["reasons"]["Hernia/op"] == "no deployable threshold given for this label"
    assert r["macro_op"]["recall"] == pytest.approx(op["recall"])  # Effusion's is NaN


def test_score_site_nothing_scorable_and_bad_shapes():
    y = np.zeros((5, 2))
    y[:, 1] = NAN
    r = M.score_site(y, np.full((5, 2), 0.3), ["A", "B"])
    assert r["n_labels_macro"] == 0 and math.isnan(r["macro_auroc"])
    assert "macro" in r["reasons"]
    with pytest.raises(ValueError):
        M.score_site(np.zeros((5, 2)), np.zeros((5, 3)), ["A", "B"])
    with pytest.raises(ValueError):
        M.score_site(np.zeros((5, 2)), np.zeros((5, 2)), ["A"])


def test_flatten():
    y, s, names = _site()
    r = M.score_site(y, s, names, thresholds={"Atelectasis": 0.5})
    f = M.flatten(r)
    assert all(isinstance(k, str) and isinstance(v, float) for k, v in f.items())
    assert f["labels/Atelectasis/auroc"] == r["labels"]["Atelectasis"]["auroc"]
    assert f["labels/Effusion/oracle/tp"] == float(r["labels"]["Effusion"]["oracle"]["tp"])
    assert f["macro_at05/f1"] == r["macro_at05"]["f1"]
    assert not any(k.startswith("reasons") for k in f)
    assert math.isnan(f["labels/Hernia/auroc"])
    assert M.flatten({"a": {"b": 1, "c": "x", "d": [1.0]}, "e": True, "f": np.float32(2)},
                     prefix="p") == {"p/a/b": 1.0, "p/e": 1.0, "p/f": 2.0}


def test_score_site_fast():
    import time

    rng = np.random.default_rng(9)
    n, t = 20_000, 14
    y = (rng.random((n, t)) < 0.2).astype(float)
    s = np.clip(0.3 * y + 0.7 * rng.random((n, t)), 0, 1)
    t0 = time.perf_counter()
    M.score_site(y, s, [f"L{i}" for i in range(t)], {f"L{i}": 0.4 for i in range(t)})
    assert time.perf_counter() - t0 < 2.0
