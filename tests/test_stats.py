"""common/stats.py: DeLong against direct computations, bootstrap coverage, scipy/sklearn parity."""
from __future__ import annotations

import json
import math
import pickle
import time
import warnings

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from chestfed.common import stats as S

NAN = float("nan")


@pytest.fixture(autouse=True)
def _no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _binormal(rng: np.random.Generator, n_pos: int, n_neg: int, d: float):
    """Scores N(d,1) for positives, N(0,1) for negatives: AUROC = Phi(d / sqrt 2)."""
    y = np.r_[np.ones(n_pos), np.zeros(n_neg)]
    s = np.r_[rng.normal(d, 1, n_pos), rng.normal(0, 1, n_neg)]
    return y, s


# ----------------------------------------------------------------------------- DeLong


def _slow_delong(y: np.ndarray, scores: list[np.ndarray]):
    """Direct O(m*n) placement values: psi(x, z) = 1 if x > z, 1/2 if tied, 0 otherwise."""
    pos, neg = y == 1, y == 0
    m, n = pos.sum(), neg.sum()
    v10, v01, aucs = [], [], []
    for s in scores:
        psi = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
        aucs.append(psi.mean())
        v10.append(psi.mean(axis=1))  # one per positive
        v01.append(psi.mean(axis=0))  # one per negative
    cov = np.cov(np.array(v10)) / m + np.cov(np.array(v01)) / n
    return np.array(aucs), np.atleast_2d(cov)


def test_delong_auc_is_mann_whitney_worked_example():
    # positives and negatives with ties inside and across classes
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 1.0])
    s = np.array([0.9, 0.8, 0.4, 0.4, 0.4, 0.3, 0.8, 0.1, 0.2, 0.6])
    u = sps.mannwhitneyu(s[y == 1], s[y == 0]).statistic
    # by hand: pairs (pos > neg) + 1/2 ties over 5*5 pairs
    hand = sum((p > q) + 0.5 * (p == q) for p in s[y == 1] for q in s[y == 0]) / 25
    aucs, cov, reason = S.delong_cov(y, s)
    assert reason is None
    assert aucs[0] == pytest.approx(u / 25) == pytest.approx(hand) == pytest.approx(roc_auc_score(y, s))
    _, slow_cov = _slow_delong(y, [s])
    assert cov[0, 0] == pytest.approx(slow_cov[0, 0], rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delong_covariance_matches_direct_placements(seed):
    rng = np.random.default_rng(seed)
    y, s1 = _binormal(rng, 70, 130, 1.0)
    s2 = 0.6 * s1 + rng.normal(0, 1, y.size)
    s1, s2 = np.round(s1, 1), np.round(s2, 1)  # ties
    aucs, cov, _ = S.delong_cov(y, s1, s2)
    slow_aucs, slow_cov = _slow_delong(y, [s1, s2])
    np.testing.assert_allclose(aucs, slow_aucs, rtol=1e-12)
    np.testing.assert_allclose(cov, slow_cov, rtol=1e-10)
    r = S.delong_test(y, s1, s2)
    var = slow_cov[0, 0] + slow_cov[1, 1] - 2 * slow_cov[0, 1]
    assert r["se"] == pytest.approx(math.sqrt(var))
    assert r["diff"] == pytest.approx(slow_aucs[0] - slow_aucs[1])
    assert r["p"] == pytest.approx(2 * sps.norm.sf(abs(r["diff"]) / math.sqrt(var)))
    assert r["reason"] is None


def test_delong_pvalues_uniform_under_null():
    rng = np.random.default_rng(123)
    ps = []
    for _ in range(300):
        n = 200
        y = (rng.random(n) < 0.4).astype(float)
        shared = rng.normal(size=n)  # the two scorers are correlated, equally informative
        s1 = y + shared + rng.normal(size=n)
        s2 = y + shared + rng.normal(size=n)
        ps.append(S.delong_test(y, s1, s2)["p"])
    ps = np.array(ps)
    assert sps.kstest(ps, "uniform").pvalue > 0.01
    assert 0.02 <= np.mean(ps < 0.05) <= 0.09


def test_delong_detects_a_real_difference():
    rng = np.random.default_rng(4)
    y, s = _binormal(rng, 300, 300, 1.5)
    r = S.delong_test(y, s, s + rng.normal(0, 2, y.size))
    assert r["diff"] > 0 and r["p"] < 1e-3


def test_delong_degenerate_cases():
    r = S.delong_test([0, 0, 0, NAN], [0.1, 0.2, 0.3, 0.4], [0.3, 0.2, 0.1, 0.0])
    assert math.isnan(r["p"]) and r["reason"] == "only negatives (n=3)"
    y = np.array([0, 1, 0, 1, 1, 0.0])
    s = np.array([0.1, 0.7, 0.3, 0.2, 0.9, 0.5])
    r = S.delong_test(y, s, s)
    assert r["diff"] == 0 and r["p"] == 1.0
    # NaN targets are dropped from both scorers
    y2 = np.r_[y, NAN, NAN]
    r2 = S.delong_test(y2, np.r_[s, 0.0, 1.0], np.r_[s[::-1], 1.0, 0.0])
    r3 = S.delong_test(y, s, s[::-1])
    assert r2 == pytest.approx(r3, nan_ok=True)


def test_delong_ci():
    rng = np.random.default_rng(5)
    y, s = _binormal(rng, 100, 200, 1.0)
    ci = S.delong_ci(y, s)
    _, slow_cov = _slow_delong(y, [s])
    auc = roc_auc_score(y, s)
    h = sps.norm.ppf(0.975) * math.sqrt(slow_cov[0, 0])
    assert ci == pytest.approx((auc - h, auc + h))
    assert ci.auc == pytest.approx(auc) and ci.reason is None
    lo, hi = ci
    assert json.loads(json.dumps(ci)) == [lo, hi]
    back = pickle.loads(pickle.dumps(ci))
    assert back == ci and back.auc == ci.auc and back.reason is None
    bad = S.delong_ci([1, 1], [0.2, 0.3])
    assert math.isnan(bad.lo) and bad.reason == "only positives (n=2)"


def test_delong_speed():
    rng = np.random.default_rng(6)
    y, s1 = _binormal(rng, 3_000, 7_000, 1.0)
    s2 = s1 + rng.normal(size=y.size)
    t0 = time.perf_counter()
    S.delong_test(y, s1, s2)
    assert time.perf_counter() - t0 < 1.0


# ----------------------------------------------------------------------------- clustered DeLong


def _slow_obuchowski(y: np.ndarray, g: np.ndarray, scores: list[np.ndarray]):
    """Obuchowski (1997) written out with loops over patients and the O(M*N) psi matrix."""
    pos, neg = y == 1, y == 0
    big_m, big_n = pos.sum(), neg.sum()
    patients = sorted(set(g[pos | neg].tolist()))
    k = len(scores)
    aucs, v10_i, v01_i, m_i, n_i = [], [], [], [], []
    for s in scores:
        psi = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
        aucs.append(psi.mean())
        v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
        v10_i.append([v10[g[pos] == p].sum() for p in patients])
        v01_i.append([v01[g[neg] == p].sum() for p in patients])
    m_i = np.array([(g[pos] == p).sum() for p in patients])
    n_i = np.array([(g[neg] == p).sum() for p in patients])
    i10, i01, i_all = (m_i > 0).sum(), (n_i > 0).sum(), len(patients)
    cov = np.zeros((k, k))
    for r in range(k):
        for t in range(k):
            a_r = np.array(v10_i[r]) - m_i * aucs[r]
            a_t = np.array(v10_i[t]) - m_i * aucs[t]
            b_r = np.array(v01_i[r]) - n_i * aucs[r]
            b_t = np.array(v01_i[t]) - n_i * aucs[t]
            s10 = i10 / ((i10 - 1) * big_m) * np.sum(a_r * a_t)
            s01 = i01 / ((i01 - 1) * big_n) * np.sum(b_r * b_t)
            s11_rt = i_all / (i_all - 1) * np.sum(a_r * b_t)
            s11_tr = i_all / (i_all - 1) * np.sum(a_t * b_r)
            cov[r, t] = s10 / big_m + s01 / big_n + (s11_rt + s11_tr) / (big_m * big_n)
    return np.array(aucs), cov


def _clustered(rng: np.random.Generator, n_pat: int, kappa: float = 0.0, rho: float = 0.6,
               d: float = 1.0):
    """1-6 images per patient (mean 3.5; NIH averages 3.6); a patient-level propensity makes
    some patients all-negative, some mixed; each model's score has its own patient effect
    (correlation rho within a patient), so a patient's images move together under either model
    and in their difference. The two models are exchangeable: equal AUROC (the null)."""
    k = rng.integers(1, 7, n_pat)
    g = np.repeat(np.arange(n_pat), k)
    p_pat = np.where(rng.random(n_pat) < 0.4, 0.7, 0.1)
    y = (rng.random(g.size) < p_pat[g]).astype(float)
    z = rng.normal(size=n_pat)
    s = [d * y + math.sqrt(rho) * (math.sqrt(kappa) * z + math.sqrt(1 - kappa) * rng.normal(size=n_pat))[g]
         + math.sqrt(1 - rho) * rng.normal(size=g.size) for _ in range(2)]
    return y, s[0], s[1], g


def test_clustered_delong_is_delong_with_one_image_per_patient():
    rng = np.random.default_rng(21)
    y, s1 = _binormal(rng, 60, 90, 1.0)
    s2 = np.round(0.5 * s1 + rng.normal(size=y.size), 1)
    ids = np.array([f"p{i}" for i in rng.permutation(y.size)])  # any id type, any order
    aucs, cov, reason = S.delong_cov(y, s1, s2)
    c_aucs, c_cov, c_reason, n_cl = S.clustered_delong_cov(y, ids, s1, s2)
    assert reason is None and c_reason is None and n_cl == y.size
    np.testing.assert_allclose(c_aucs, aucs, rtol=1e-13)
    np.testing.assert_allclose(c_cov, cov, rtol=1e-10)
    r, ri = S.delong_test(y, s1, s2, ids), S.delong_test(y, s1, s2)
    assert r["level"] == "patient" and ri["level"] == "image"
    assert r["p"] == pytest.approx(ri["p"], rel=1e-9) and r["se"] == pytest.approx(ri["se"], rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_clustered_delong_matches_the_formula_written_out(seed):
    rng = np.random.default_rng(seed)
    y, s1, s2, g = _clustered(rng, 40, kappa=0.3)
    s1, s2 = np.round(s1, 1), np.round(s2, 1)  # ties within and across classes
    # patients with only positive images, with only negative ones, and mixed ones
    per = {p: set(y[g == p]) for p in np.unique(g)}
    assert {frozenset(v) for v in per.values()} >= {frozenset({0.0}), frozenset({0.0, 1.0})}
    y[g == g[-1]] = 1.0  # make sure one patient is all-positive
    y[3] = NAN  # a masked image is dropped from both scorers
    aucs, cov, reason, n_cl = S.clustered_delong_cov(y, g, s1, s2)
    keep = ~np.isnan(y)
    slow_aucs, slow_cov = _slow_obuchowski(y[keep], g[keep], [s1[keep], s2[keep]])
    assert reason is None and n_cl == np.unique(g[keep]).size
    np.testing.assert_allclose(aucs, slow_aucs, rtol=1e-12)
    np.testing.assert_allclose(cov, slow_cov, rtol=1e-10)
    assert aucs[0] == pytest.approx(roc_auc_score(y[keep], s1[keep]))  # the AUROC is unchanged
    r = S.delong_test(y, s1, s2, g)
    var = slow_cov[0, 0] + slow_cov[1, 1] - 2 * slow_cov[0, 1]
    assert r["se"] == pytest.approx(math.sqrt(var))
    assert r["p"] == pytest.approx(2 * sps.norm.sf(abs(r["diff"]) / math.sqrt(var)))
    # a patient all of whose images are masked is not a patient of this label
    g2 = g.copy()
    g2[3] = 10_000
    assert S.clustered_delong_cov(y, g2, s1, s2)[3] == n_cl


def test_clustered_delong_null_uniform_image_level_anticonservative():
    """Under the null, with 1-6 correlated images per patient, the patient-clustered p-values
    are uniform; the image-level DeLong's are not (it rejects far more often than 5 %)."""
    rng = np.random.default_rng(0)
    reps = 600
    p_pat, p_img = np.empty(reps), np.empty(reps)
    for i in range(reps):
        y, s1, s2, g = _clustered(rng, 150)
        p_pat[i] = S.delong_test(y, s1, s2, g)["p"]
        p_img[i] = S.delong_test(y, s1, s2)["p"]
    assert sps.kstest(p_pat, "uniform").pvalue > 0.01
    assert 0.03 <= np.mean(p_pat < 0.05) <= 0.08
    assert sps.kstest(p_img, "uniform").pvalue < 0.01
    assert np.mean(p_img < 0.05) > 0.10


def test_clustered_delong_degenerate_cases():
    y = np.array([1, 1, 0, 0, 0, 0, 1.0])
    s = np.array([0.9, 0.8, 0.1, 0.2, 0.4, 0.3, 0.7])
    g = np.array([0, 0, 1, 1, 2, 2, 0])  # every positive image is patient 0's
    r = S.delong_test(y, s, s[::-1], g)
    assert math.isnan(r["p"]) and "positive images come from 1 patient" in r["reason"]
    assert r["level"] == "patient" and not math.isnan(r["diff"])
    r = S.delong_test([0, 0, 0], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1], [1, 2, 3])
    assert math.isnan(r["p"]) and r["reason"] == "only negatives (n=3)"
    g = np.array([0, 1, 1, 2, 2, 3, 0])
    r = S.delong_test(y, s, s, g)
    assert r["diff"] == 0 and r["p"] == 1.0 and r["reason"] is None
    with pytest.raises(ValueError, match="groups has 3 entries"):
        S.delong_test(y, s, s, [0, 1, 2])


def test_clustered_delong_speed():
    rng = np.random.default_rng(6)
    n_pat = 5_500
    g = np.repeat(np.arange(n_pat), rng.integers(1, 7, n_pat))[:20_000]
    y = (rng.random(g.size) < 0.3).astype(float)
    s1 = y + rng.normal(size=g.size)
    s2 = s1 + rng.normal(size=g.size)
    S.delong_test(y, s1, s2, g)
    t0 = time.perf_counter()
    r = S.delong_test(y, s1, s2, g)
    assert time.perf_counter() - t0 < 0.5 and r["reason"] is None


def test_holm_against_a_hand_computation():
    # sorted finite p: 0.005, 0.01, 0.03, 0.04 (m = 4) -> 4*0.005, 3*0.01, 2*0.03, 1*0.04
    # = 0.02, 0.03, 0.06, 0.04 -> running maximum 0.02, 0.03, 0.06, 0.06
    got = S.holm([0.01, 0.04, 0.03, 0.005, NAN])
    np.testing.assert_allclose(got[:4], [0.03, 0.06, 0.06, 0.02])
    assert math.isnan(got[4])  # NaN stays NaN and is not counted in m
    np.testing.assert_allclose(S.holm([0.3, 0.5, 0.01]), [0.6, 0.6, 0.03])
    np.testing.assert_allclose(S.holm([0.6, 0.9]), [1.0, 1.0])  # capped at 1
    np.testing.assert_allclose(S.holm([0.02, 0.02]), [0.04, 0.04])  # ties
    assert S.holm([]).size == 0 and math.isnan(S.holm([NAN])[0])


# ----------------------------------------------------------------------------- bootstrap


def test_weighted_resample_equals_materialised_resample():
    """A resample is a count per patient; its AUROC equals sklearn's on the repeated images."""
    rng = np.random.default_rng(7)
    n = 120
    groups = rng.integers(0, 40, n)
    y = (rng.random(n) < 0.4).astype(float)
    s = np.round(rng.normal(size=n) + y, 1)
    _, g = np.unique(groups, return_inverse=True)
    code, n_codes = S.weighted_auc_setup(s)
    brng = np.random.default_rng(0)
    for _ in range(20):
        counts = S.bootstrap_group_counts(brng, g.max() + 1)
        assert counts.sum() == g.max() + 1  # as many patients drawn as there are
        w = counts[g]
        idx = np.repeat(np.arange(n), w)  # every image of a drawn patient, once per draw
        if len(np.unique(y[idx])) < 2:
            continue
        got = S.weighted_auc(y == 1, code, n_codes, w.astype(float))
        assert got == pytest.approx(roc_auc_score(y[idx], s[idx]), abs=1e-12)


def test_bootstrap_ci_coverage_patient_level():
    """Patients with 4 correlated images each; label per patient; AUROC = Phi(d/sqrt 2).

    Patient resampling covers near the nominal 95 %; image resampling, which treats the 4
    correlated images as independent, covers visibly less.
    """
    d, rho, k = 1.0, 0.7, 4
    true_auc = sps.norm.cdf(d / math.sqrt(2))
    rng = np.random.default_rng(2024)
    hit_patient = hit_image = 0
    reps = 100
    for r in range(reps):
        n_pat = 80
        y_pat = (rng.random(n_pat) < 0.4).astype(float)
        u = rng.normal(size=n_pat)
        groups = np.repeat(np.arange(n_pat), k)
        y = y_pat[groups]
        s = d * y + math.sqrt(rho) * u[groups] + math.sqrt(1 - rho) * rng.normal(size=y.size)
        lo, hi = S.bootstrap_auroc_ci(y, s, groups, n_boot=300, seed=r)
        hit_patient += lo <= true_auc <= hi
        lo, hi = S.bootstrap_auroc_ci(y, s, None, n_boot=300, seed=r)
        hit_image += lo <= true_auc <= hi
    assert 0.88 <= hit_patient / reps <= 0.99
    assert hit_image < hit_patient - 5


def test_bootstrap_ci_coverage_independent_images():
    d = 1.2
    true_auc = sps.norm.cdf(d / math.sqrt(2))
    rng = np.random.default_rng(99)
    hits = 0
    for r in range(100):
        y, s = _binormal(rng, 60, 90, d)
        lo, hi = S.bootstrap_auroc_ci(y, s, np.arange(y.size), n_boot=300, seed=r)
        hits += lo <= true_auc <= hi
    assert 0.88 <= hits / 100 <= 0.99


def test_patient_bootstrap_wider_than_image_bootstrap():
    """Every patient has 5 identical images: resampling images pretends to have 5x the data."""
    rng = np.random.default_rng(8)
    y1, s1 = _binormal(rng, 40, 60, 1.0)
    groups = np.repeat(np.arange(y1.size), 5)
    y, s = y1[groups], s1[groups]
    p_lo, p_hi = S.bootstrap_auroc_ci(y, s, groups, n_boot=1000, seed=1)
    i_lo, i_hi = S.bootstrap_auroc_ci(y, s, None, n_boot=1000, seed=1)
    o_lo, o_hi = S.bootstrap_auroc_ci(y1, s1, None, n_boot=1000, seed=1)
    assert (p_hi - p_lo) > 1.6 * (i_hi - i_lo)  # ~sqrt(5) in expectation
    # patient resampling of the 5x data is the same as image resampling of one copy
    assert (p_hi - p_lo) == pytest.approx(o_hi - o_lo, rel=0.2)


def test_bootstrap_seeded_and_masks_nan():
    rng = np.random.default_rng(9)
    y, s = _binormal(rng, 50, 50, 1.0)
    g = np.arange(100) // 2
    a = S.bootstrap_auroc_ci(y, s, g, n_boot=200, seed=3)
    assert a == S.bootstrap_auroc_ci(y, s, g, n_boot=200, seed=3)
    assert a != S.bootstrap_auroc_ci(y, s, g, n_boot=200, seed=4)
    assert a.lo < roc_auc_score(y, s) < a.hi and a.reason is None and a.n_valid == 200
    y2, s2, g2 = np.r_[y, NAN, NAN], np.r_[s, 9.0, -9.0], np.r_[g, 500, 501]
    assert S.bootstrap_auroc_ci(y2, s2, g2, n_boot=200, seed=3) == a


def test_bootstrap_undefined():
    ci = S.bootstrap_auroc_ci([0, 0, 0], [0.1, 0.2, 0.3], [1, 2, 3], n_boot=50)
    assert math.isnan(ci.lo) and math.isnan(ci.hi) and ci.reason == "only negatives (n=3)"
    # all positives from one patient: a CI would only reflect the negatives' variability
    y = np.r_[np.ones(3), np.zeros(27)]
    s = np.linspace(0, 1, 30)[::-1]
    g = np.repeat(np.arange(10), 3)
    ci = S.bootstrap_auroc_ci(y, s, g, n_boot=100, seed=0)
    assert math.isnan(ci.lo) and "positive images come from 1 patient" in ci.reason
    # positives in 2 of 10 patients: P(a resample has both classes) = 1 - 0.8**10 ~ 0.89
    y = np.r_[np.ones(6), np.zeros(24)]
    ci = S.bootstrap_auroc_ci(y, s, g, n_boot=400, seed=0)
    assert not math.isnan(ci.lo) and 0.8 * 400 < ci.n_valid < 0.95 * 400
    ci = S.bootstrap_auroc_ci(y, s, g, n_boot=400, seed=0, min_valid=0.95)
    assert math.isnan(ci.lo) and "resamples had both classes" in ci.reason


# ----------------------------------------------------------------------------- paired etc.


def test_paired_tests_match_scipy_and_drop_nan_pairs():
    a = np.array([0.81, 0.75, NAN, 0.90, 0.66, 0.72, 0.88, 0.79, 0.70, 0.85])
    b = np.array([0.78, 0.76, 0.80, 0.85, 0.60, NAN, 0.84, 0.74, 0.71, 0.80])
    r = S.paired_tests(a, b)
    ok = ~np.isnan(a) & ~np.isnan(b)
    t = sps.ttest_rel(a[ok], b[ok])
    w = sps.wilcoxon(a[ok], b[ok])
    assert r["n_pairs"] == 8
    assert r["t"] == pytest.approx(t.statistic) and r["t_p"] == pytest.approx(t.pvalue)
    assert r["w"] == pytest.approx(w.statistic) and r["w_p"] == pytest.approx(w.pvalue)
    assert r["mean_diff"] == pytest.approx(np.mean(a[ok] - b[ok]))
    assert r["reasons"] == {}
    json.dumps(r)


def test_paired_tests_too_few_and_degenerate():
    r = S.paired_tests([0.8, NAN, 0.7], [0.7, 0.6, NAN])
    assert r["n_pairs"] == 1 and math.isnan(r["t_p"]) and math.isnan(r["w_p"])
    assert "too few pairs" in r["reasons"]["t"]
    r = S.paired_tests([0.8, 0.7, 0.6], [0.8, 0.7, 0.6])
    assert math.isnan(r["t_p"]) and "zero" in r["reasons"]["w"]
    r = S.paired_tests([0.9, 0.8, 0.7, 0.6], [0.8, 0.7, 0.6, 0.5])  # constant shift
    assert math.isnan(r["t_p"]) and "t" in r["reasons"] and not math.isnan(r["w_p"])


def test_kappa_matches_sklearn():
    rng = np.random.default_rng(10)
    p1 = rng.random(500)
    p2 = np.clip(p1 + rng.normal(0, 0.2, 500), 0, 1)
    k, reason = S.kappa(p1, p2)
    assert reason is None
    assert k == pytest.approx(cohen_kappa_score(p1 >= 0.5, p2 >= 0.5))
    k2, _ = S.kappa(p1, p2, threshold=(0.3, 0.6))
    assert k2 == pytest.approx(cohen_kappa_score(p1 >= 0.3, p2 >= 0.6))
    k3, _ = S.kappa((p1 >= 0.5).astype(float), (p2 >= 0.5).astype(float))  # 0/1 pass through
    assert k3 == pytest.approx(k)
    k, reason = S.kappa([0.1, 0.2, NAN], [0.3, 0.1, 0.9])
    assert math.isnan(k) and "only negatives" in reason


def test_spearman_matches_scipy():
    rng = np.random.default_rng(11)
    a = rng.random(300)
    b = a + rng.normal(0, 0.3, 300)
    b[5] = NAN
    rho, reason = S.spearman(a, b)
    ok = ~np.isnan(b)
    assert reason is None and rho == pytest.approx(sps.spearmanr(a[ok], b[ok]).statistic)
    rho, reason = S.spearman([0.5, 0.5, 0.5, 0.5], [0.1, 0.2, 0.3, 0.4])
    assert math.isnan(rho) and "constant" in reason
    assert math.isnan(S.spearman([0.1, 0.2], [0.2, 0.1])[0])
