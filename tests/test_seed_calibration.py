"""Seed-paper methods, item 5 of issue 16: Cohen et al.'s calibration (Eq. 1), kappa at
the calibrated operating points and Bland-Altman aggregates (common/calibration.py,
sites/scoring.py)."""
from __future__ import annotations

import math

import numpy as np

from chestfed.common.calibration import DIFF_BINS, MEAN_BINS, bland_altman, calibrate, limits_of_agreement


def test_eq1_by_hand():
    # opt 0.2: below, x / 0.4; above, 1 - (1 - x) / 1.6
    got = calibrate([0.0, 0.1, 0.2, 0.6, 1.0], 0.2)
    np.testing.assert_allclose(got, [0.0, 0.25, 0.5, 1 - 0.4 / 1.6, 1.0])
    np.testing.assert_allclose(calibrate([0.3, 0.9], 0.9), [0.3 / 1.8, 0.5])
    # monotone, and thresholding at 0.5 is thresholding the raw score at opt
    x = np.linspace(0, 1, 101)
    c = calibrate(x, 0.37)
    assert np.all(np.diff(c) > 0) and np.array_equal(c >= 0.5, x >= 0.37)


def test_bland_altman_aggregates_by_hand():
    a = np.array([0.93, 0.85, 0.12, 0.55])
    b = np.array([0.7, 0.8, 0.3, np.nan])
    ba = bland_altman(a, b)
    d = np.array([0.23, 0.05, -0.18])
    assert ba["n"] == 3 and math.isclose(ba["bias"], 0.1 / 3)
    assert math.isclose(ba["sd"], float(d.std(ddof=1)))
    hist = np.array(ba["hist"]).reshape(MEAN_BINS, DIFF_BINS)
    assert hist.sum() == 3
    # means 0.815, 0.825, 0.21 -> mean bins 8, 8, 2; differences 0.23, 0.05, -0.18 -> bins 6, 5, 4
    assert hist[8, 6] == 1 and hist[8, 5] == 1 and hist[2, 4] == 1
    lo, hi = limits_of_agreement(0.1, 0.5)
    assert math.isclose(lo, 0.1 - 0.98) and math.isclose(hi, 0.1 + 0.98)


def test_site_pairs_carry_calibrated_kappa_and_suppressed_histograms():
    from chestfed.sites.scoring import ModelSpec, Plan, release, score_models

    rng = np.random.default_rng(0)
    y = (rng.random(60) < 0.4).astype(float)[:, None]
    sa = np.clip(y[:, 0] * 0.3 + rng.random(60) * 0.7, 0, 1)[:, None]
    sb = np.clip(y[:, 0] * 0.2 + rng.random(60) * 0.5, 0, 1)[:, None]
    plan = Plan(split="test", mode="score", models=[ModelSpec("a"), ModelSpec("b")],
                pairs=[("a", "b")], bootstrap=0)
    metrics, _ = score_models(y, {"a": sa, "b": sb}, ["Abnormal"], None, plan)
    k = "p/a|b/labels/Abnormal/"
    # kappa of the calibrated outputs at 0.5 = kappa at both models' oracle thresholds
    assert math.isclose(metrics[k + "kappa_calibrated"], metrics[k + "kappa_oracle"])
    assert metrics[k + "ba_n"] == 60 and len(metrics[k + "ba_hist"]) == MEAN_BINS * DIFF_BINS
    raw = list(metrics[k + "ba_hist"])
    reasons = release(metrics, 5)
    for before, after in zip(raw, metrics[k + "ba_hist"]):
        assert (after != after) == (0 < before < 5) and (after != after or after == before)
    assert (k + "ba_hist") in reasons or not any(0 < c < 5 for c in raw)
