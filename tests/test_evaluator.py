"""The shared evaluator: site-side scoring of several models, server-side orchestration, the matrix.

The metrics themselves are checked in test_metrics.py / test_stats.py; here: that the site
applies them as documented (thresholds from validation applied on test, CIs resampling patients,
pair statistics equal to common.stats on the same arrays), that the server combines and files
them correctly (internal / external, NaN with a reason), and the aggregation over runs.
The in-process runs use a stand-in Grid that hands Flower messages straight to the ClientApp's
handlers (no Ray), so the real message format is exercised in a few seconds; test_report.py's
e2e test covers the Simulation Engine.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from sklearn.metrics import roc_auc_score, roc_curve

from chestfed.common import protocol as P
from chestfed.common.config import config_from_tree
from chestfed.common.privacy.disclosure import ROC_FPR_GRID
from chestfed.common.metrics import threshold_metrics, youden_threshold
from chestfed.common.stats import bootstrap_auroc_ci, delong_test, kappa, paired_tests, spearman
from chestfed.server.evaluation import evaluator as E
from chestfed.server.evaluation import matrix as M
from chestfed.server.evaluation import results as R
from chestfed.sites import scoring as S
from e2e import TINY_TRAIN

LABELS = ["Cardiomegaly", "Effusion", "Nodule"]


class _M:  # a Trained stand-in
    def __init__(self, name, local_bn=False, trained_on=()):
        self.name, self.local_bn, self.trained_on = name, local_bn, list(trained_on)


def test_plan_round_trip_keeps_nan_thresholds_and_pairs():
    models = [_M("a"), _M("b", local_bn=True)]
    text = E.eval_plan(P.EVAL_MODE_SCORE, "test", models, {"a": {"X": 0.3, "Y": math.nan}}, [("a", "b")],
                   {"bootstrap": 50, "seed": 7, "ci": 0.9, "roc_points": 20})
    json.loads(text)  # strict JSON: NaN travelled as null
    assert "NaN" not in text
    plan = S.read_plan(text)
    assert [m.name for m in plan.models] == ["a", "b"] and plan.models[1].local_bn
    assert plan.models[0].thresholds["X"] == 0.3 and math.isnan(plan.models[0].thresholds["Y"])
    assert plan.pairs == [("a", "b")] and plan.bootstrap == 50 and plan.seed == 7
    with pytest.raises(S.PlanError):
        S.read_plan(E.eval_plan(P.EVAL_MODE_SCORE, "test", models, {}, [("a", "zzz")],
                            {"bootstrap": 0, "seed": 0, "ci": 0.95, "roc_points": 20}))


def _youden_j(y, s, t):
    y, s = np.asarray(y), np.asarray(s)
    return float((s[y == 1] >= t).mean() - (s[y == 0] >= t).mean())


GRID_LOSS = 0.02  # J given up to the grid's resolution (logit step 0.05) on dense scores


def _source(y, s):
    from chestfed.common.metrics import counts_above

    pos, neg = counts_above(y, s)
    return {"n_pos": float((np.asarray(y) == 1).sum()), "n_neg": float((np.asarray(y) == 0).sum()),
            "pos_above": pos.tolist(), "neg_above": neg.tolist()}


def test_combine_thresholds_is_youden_of_the_pooled_validation_data():
    rng = np.random.default_rng(1)
    # site s: scores around 0.3-0.6; site t: everything squeezed near 1 (an ICU-like site)
    ys, ss = (rng.random(80) < 0.5).astype(float), None
    ss = 1 / (1 + np.exp(-(rng.normal(0, 1, 80) + 1.5 * ys - 0.5)))
    yt = (rng.random(100) < 0.8).astype(float)
    st = 1 / (1 + np.exp(-(rng.normal(5, 0.7, 100) + 1.0 * yt)))
    one = {"s": _source(ys, ss)}
    t1, why = E.combine_thresholds(one)
    # one site: its own Youden point, to the grid's resolution (same J as the exact threshold)
    assert why is None and _youden_j(ys, ss, t1) >= _youden_j(ys, ss, youden_threshold(ys, ss)) - GRID_LOSS
    t, why = E.combine_thresholds({"s": _source(ys, ss), "t": _source(yt, st)})
    y, s = np.concatenate([ys, yt]), np.concatenate([ss, st])
    # two sites: the Youden point of the union, which no exact score ever left a site to find
    assert why is None and _youden_j(y, s, t) >= _youden_j(y, s, youden_threshold(y, s)) - GRID_LOSS
    # a site with one class still counts in the pool; none with both classes -> NaN with reason
    # a site with negatives only, scored just above site s's own point: counted in the pool, it
    # moves the threshold (J of the union 0.57 against 0.26 at s's own threshold)
    yu, su = np.zeros(30), np.clip(t1 + np.linspace(0.001, 0.08, 30), 0, 1)
    neg_only = _source(yu, su)
    t, why = E.combine_thresholds({"s": _source(ys, ss), "u": neg_only})
    y, s = np.concatenate([ys, yu]), np.concatenate([ss, su])
    assert why is None and _youden_j(y, s, t) >= _youden_j(y, s, youden_threshold(y, s)) - GRID_LOSS
    t, why = E.combine_thresholds({"u": neg_only})
    assert math.isnan(t) and "no labelled positives" in why
    t, why = E.combine_thresholds({"v": {"youden": math.nan, "n_pos": 0, "n_neg": 0, "reason": "site failed"}})
    assert math.isnan(t) and "site failed" in why


# --- site-side scoring on arrays -----------------------------------------------------------------


def _site_arrays(seed=0, n_pat=60):
    rng = np.random.default_rng(seed)
    pid = np.repeat(np.arange(n_pat), 2)  # two images per patient
    n = pid.size
    y = (rng.random((n, 3)) < 0.35).astype(float)
    y[rng.random(n) < 0.1, 1] = np.nan  # some uncertain labels
    y[:, 2] = np.nan  # this site does not annotate Nodule
    sa = np.clip(0.5 * y + rng.normal(0.3, 0.2, (n, 3)), 0, 1)
    sb = np.clip(0.3 * y + rng.normal(0.35, 0.2, (n, 3)), 0, 1)
    sa, sb = np.nan_to_num(sa, nan=0.4), np.nan_to_num(sb, nan=0.4)
    return y, sa, sb, pid.astype(str)


def test_val_thresholds_are_youden_per_label():
    y, sa, _, _ = _site_arrays()
    metrics, reasons = S.val_thresholds(y, {"a": sa}, LABELS)
    for j, label in enumerate(LABELS[:2]):
        keep = ~np.isnan(y[:, j])
        t = metrics[f"m/a/labels/{label}/youden"]  # on the grid: same J as the exact point
        yk, sk = y[keep, j], sa[keep, j]
        assert _youden_j(yk, sk, t) >= _youden_j(yk, sk, youden_threshold(yk, sk)) - GRID_LOSS
        assert metrics[f"m/a/labels/{label}/pos_above"][0] == (yk == 1).sum()  # grid starts near 0
        assert metrics[f"m/a/labels/{label}/n_pos"] == (y[keep, j] == 1).sum()
    assert math.isnan(metrics["m/a/labels/Nodule/youden"])
    assert "no labelled samples" in reasons["m/a/labels/Nodule/youden"]
    empty, why = S.val_thresholds(np.zeros((0, 3)), {"a": np.zeros((0, 3))}, LABELS)
    assert all("empty validation split" in v for v in why.values())


def test_score_models_matches_common_stats_on_the_same_arrays():
    y, sa, sb, pid = _site_arrays()
    plan = S.Plan(mode=P.EVAL_MODE_SCORE, split="test",
                  models=[S.ModelSpec("a", thresholds={"Cardiomegaly": 0.55, "Effusion": 0.6}),
                          S.ModelSpec("b", thresholds={"Cardiomegaly": 0.45})],
                  pairs=[("a", "b")], bootstrap=60, seed=3, ci=0.9, roc_points=25)
    m, why = S.score_models(y, {"a": sa, "b": sb}, LABELS, pid, plan)
    MetricRecord(S.to_wire(m))  # everything fits a Flower MetricRecord (lists included)
    models, pairs = P.split_eval_reply(m)
    a, ab = models["a"], pairs["a|b"]
    for j, label in enumerate(LABELS[:2]):
        k = ~np.isnan(y[:, j])
        yj, xa, xb = y[k, j], sa[k, j], sb[k, j]
        assert a[f"labels/{label}/auroc"] == pytest.approx(roc_auc_score(yj, xa))
        ci = bootstrap_auroc_ci(y[:, j], sa[:, j], pid, n_boot=60, seed=3, alpha=0.1)
        assert (a[f"labels/{label}/auroc_lo"], a[f"labels/{label}/auroc_hi"]) == pytest.approx(tuple(ci))
        # the ROC curve leaves as TPR on the fixed FPR grid: max TPR with FPR <= each grid point
        tpr = a[f"labels/{label}/roc_tpr"]
        assert f"labels/{label}/roc_fpr" not in a and len(tpr) == len(ROC_FPR_GRID) == 51
        fpr_x, tpr_x, _ = roc_curve(yj, xa)
        assert tpr == pytest.approx([tpr_x[fpr_x <= f + 1e-12].max() for f in ROC_FPR_GRID])
        assert tpr[-1] == 1.0 and np.all(np.diff(tpr) >= 0)
        # DeLong: patient-clustered (this site has patient ids), the image-level one alongside
        d = delong_test(yj, xa, xb, pid[k])
        di = delong_test(yj, xa, xb)
        assert ab[f"labels/{label}/delong_p"] == pytest.approx(d["p"])
        assert ab[f"labels/{label}/delong_se"] == pytest.approx(d["se"])
        assert ab[f"labels/{label}/delong_diff"] == pytest.approx(d["diff"]) == pytest.approx(di["diff"])
        assert ab[f"labels/{label}/delong_level"] == S.DELONG_LEVEL["patient"] == 1.0
        assert ab[f"labels/{label}/delong_patients"] == np.unique(pid[k]).size
        assert ab[f"labels/{label}/delong_image_p"] == pytest.approx(di["p"])
        assert ab[f"labels/{label}/delong_image_z"] == pytest.approx(di["z"])
        assert ab[f"labels/{label}/delong_p"] != pytest.approx(di["p"])  # two images per patient
        assert ab[f"labels/{label}/spearman"] == pytest.approx(spearman(xa, xb)[0])
        ora, orb = a[f"labels/{label}/oracle/threshold"], models["b"][f"labels/{label}/oracle/threshold"]
        assert ab[f"labels/{label}/kappa_oracle"] == pytest.approx(kappa(xa, xb, (ora, orb))[0])
    # the deployable threshold given by the server is the one applied on this test split
    k = ~np.isnan(y[:, 0])
    assert a["labels/Cardiomegaly/op/threshold"] == 0.55
    tm = threshold_metrics(y[k, 0], sa[k, 0], 0.55)
    for metric in ("accuracy", "precision", "recall", "specificity", "f1", "tp", "fn"):
        assert a[f"labels/Cardiomegaly/op/{metric}"] == pytest.approx(tm[metric])
    assert ab["labels/Cardiomegaly/kappa_op"] == pytest.approx(kappa(sa[k, 0], sb[k, 0], (0.55, 0.45))[0])
    # b has no deployable threshold for Effusion: NaN with a reason, never a guess
    assert math.isnan(ab["labels/Effusion/kappa_op"])
    assert "deployable threshold undefined for b" in why["p/a|b/Effusion/kappa_op"]
    assert math.isnan(models["b"]["labels/Effusion/op/f1"])
    # Nodule is not annotated here: NaN AUROC with reason, no ROC points, no pair stats
    assert math.isnan(a["labels/Nodule/auroc"]) and "labels/Nodule/roc_tpr" not in a
    assert why["m/a/Nodule/auroc"] == "no labelled samples"
    # over labels: paired t-test / Wilcoxon on the per-label AUROCs (2 defined < 3 needed)
    pt = paired_tests([a[f"labels/{x}/auroc"] for x in LABELS],
                      [models["b"][f"labels/{x}/auroc"] for x in LABELS])
    assert ab["over_labels/n_pairs"] == pt["n_pairs"] == 2
    assert "too few pairs" in why["p/a|b/over_labels/t"]
    # macro CI brackets the macro AUROC
    assert a["macro_auroc_lo"] <= a["macro_auroc"] <= a["macro_auroc_hi"]
    # without patient ids the site's DeLong is the image-level one, and says so
    m2, _ = S.score_models(y, {"a": sa, "b": sb}, LABELS, None, plan)
    ab2 = P.split_eval_reply(m2)[1]["a|b"]
    k = ~np.isnan(y[:, 0])
    assert ab2["labels/Cardiomegaly/delong_level"] == S.DELONG_LEVEL["image"] == 0.0
    assert ab2["labels/Cardiomegaly/delong_p"] == ab2["labels/Cardiomegaly/delong_image_p"] == \
        pytest.approx(delong_test(y[k, 0], sa[k, 0], sb[k, 0])["p"])
    assert "labels/Cardiomegaly/delong_patients" not in ab2
    # the server files every statistic under the pair and label
    info = {f"reason:{key}": v for key, v in why.items()}
    _, site_pairs = E.parse_site_reply("s", [_M("a"), _M("b")], LABELS, S.to_wire(m), info, {}, [("a", "b")])
    st = site_pairs["a|b"]["labels"]["Cardiomegaly"]
    assert st["delong_level"] == 1.0 and st["delong_image_p"] == ab["labels/Cardiomegaly/delong_image_p"]


def test_single_class_site_gives_nan_with_reasons_not_a_crash():
    n = 40
    y = np.zeros((n, 1))
    rng = np.random.default_rng(1)
    s1, s2 = rng.random((n, 1)), rng.random((n, 1))
    plan = S.Plan(P.EVAL_MODE_SCORE, "test", [S.ModelSpec("a", thresholds={"Abnormal": 0.5}),
                                         S.ModelSpec("b", thresholds={"Abnormal": 0.4})],
                  pairs=[("a", "b")], bootstrap=30)
    m, why = S.score_models(y, {"a": s1, "b": s2}, ["Abnormal"], np.arange(n), plan)
    models, pairs = P.split_eval_reply(m)
    assert math.isnan(models["a"]["macro_auroc"]) and math.isnan(models["a"]["labels/Abnormal/auroc"])
    assert math.isnan(models["a"]["macro_auroc_lo"])
    assert why["m/a/Abnormal/auroc"].startswith("only negatives")
    assert why["m/a/macro"] == "no label has both classes present"
    assert math.isnan(pairs["a|b"]["labels/Abnormal/delong_p"])
    assert "only negatives" in why["p/a|b/Abnormal/delong"]
    # specificity is still defined with negatives only; kappa too (agreement needs no labels)
    assert models["a"]["labels/Abnormal/op/specificity"] == pytest.approx((s1 < 0.5).mean())
    assert not math.isnan(pairs["a|b"]["labels/Abnormal/kappa_op"])


# --- the matrix and aggregation ----------------------------------------------------------------


def _cell(v, internal, labels=None):
    met = {"macro_auroc": v}
    for label, x in (labels or {}).items():
        met[f"labels/{label}/auroc"] = x
    return {"internal": internal, "metrics": met, "reasons": {} if v == v else {"macro": "no label has both classes present"}}


def _results(seed, strategy, matrix, sites=("s0", "s1", "s2"), task=("X", "Y")):
    return {"experiment": "e", "strategy": strategy, "seed": seed, "split": {"fold": 0, "folds": None},
            "task": list(task), "sites": {s: {} for s in sites}, "matrix": matrix,
            "models": {m: {"trained_on": [s for s, c in row.items() if c["internal"]]} for m, row in matrix.items()}}


def test_summaries_label_table_and_cell_tests():
    row = {"s0": _cell(0.9, True, {"X": 0.9, "Y": 0.88}), "s1": _cell(0.7, False, {"X": 0.7, "Y": 0.72}),
           "s2": _cell(float("nan"), False)}
    sm = M.summarize_row(row)
    assert sm["internal_mean"] == 0.9 and sm["external_mean"] == 0.7
    assert sm["gap"] == pytest.approx(0.2) and sm["n_external"] == 1
    other = {"s0": _cell(0.8, False, {"X": 0.8, "Y": 0.81}), "s1": _cell(0.8, True, {"X": 0.79, "Y": 0.83}),
             "s2": _cell(0.75, False, {"X": 0.75, "Y": 0.70})}
    table = M.label_table({"a": row, "b": other}, ["s0", "s1", "s2"], ["X", "Y"])
    assert table["X"]["a"]["n"] == 2 and table["X"]["a"]["mean"] == pytest.approx(0.8)
    assert table["X"]["b"]["sd"] == pytest.approx(np.std([0.8, 0.79, 0.75], ddof=1))
    comp = M.paired_cell_tests(table, ["a", "b"])["a|b"]
    xa = [0.9, 0.7, 0.88, 0.72]
    xb = [0.8, 0.79, 0.81, 0.83]
    ref = paired_tests(xa, xb)
    assert comp["n_pairs"] == 4 and comp["t_p"] == pytest.approx(ref["t_p"]) and comp["w_p"] == pytest.approx(ref["w_p"])
    assert comp["paired_over"] == "(label, test site) cells"
    # Holm over the table's family: both tests of every pair (here one pair: m = 2)
    lo, hi = sorted([ref["t_p"], ref["w_p"]])
    holm = {lo: min(1, 2 * lo), hi: min(1, max(2 * lo, hi))}
    assert comp["t_p_holm"] == pytest.approx(holm[ref["t_p"]]) and comp["w_p_holm"] == pytest.approx(holm[ref["w_p"]])
    # a binary task: the pairs are the test sites
    third = {s: _cell(v, False, {"X": v}) for s, v in (("s0", 0.7), ("s1", 0.71), ("s2", 0.6))}
    tx = M.label_table({"a": row, "b": other, "c": third}, ["s0", "s1", "s2"], ["X"])
    comps = M.paired_cell_tests(tx, ["a", "b", "c"])
    assert comps["b|c"]["paired_over"] == "test sites" and comps["b|c"]["n_pairs"] == 3
    assert comps["b|c"]["t_p"] == pytest.approx(paired_tests([0.8, 0.79, 0.75], [0.7, 0.71, 0.6])["t_p"])
    assert comps["a|b"]["n_pairs"] == 2 and math.isnan(comps["a|b"]["t_p_holm"])
    assert M.cell_reason(row["s2"]) == "no label has both classes present"


def test_aggregate_runs_over_seeds_and_strategies():
    runs = []
    for seed, v in ((0, 0.8), (1, 0.84)):
        runs.append(_results(seed, "fedavg", {"fedavg": {
            "s0": _cell(v, True, {"X": v, "Y": v}), "s1": _cell(v - 0.1, True, {"X": v - 0.1, "Y": v - 0.1}),
            "s2": _cell(float("nan"), True)}}))
    runs.append(_results(0, "local", {
        "local-s0": {"s0": _cell(0.9, True, {"X": 0.9, "Y": 0.9}), "s1": _cell(0.6, False, {"X": 0.6, "Y": 0.6}),
                     "s2": _cell(0.5, False, {"X": 0.5, "Y": 0.5})}}))
    agg = M.aggregate_runs(runs)
    json.dumps(agg)
    c = agg["cells"]["fedavg"]["s0"]
    assert c["values"] == [0.8, 0.84] and c["mean"] == pytest.approx(0.82) and c["n"] == 2
    assert c["sd"] == pytest.approx(np.std([0.8, 0.84], ddof=1)) and c["internal"] is True
    assert agg["cells"]["fedavg"]["s2"]["n"] == 0
    assert agg["cells"]["fedavg"]["s2"]["reasons"] == ["no label has both classes present"]
    assert agg["cells"]["local-s0"]["s1"]["internal"] is False
    assert agg["summary"]["fedavg"]["n_runs"] == 2 and agg["summary"]["local-s0"]["n_runs"] == 1
    assert agg["summary"]["local-s0"]["gap"]["mean"] == pytest.approx(0.9 - 0.55)
    assert agg["label_table"]["X"]["fedavg"]["sites"]["s1"]["mean"] == pytest.approx(0.72)
    assert agg["comparisons"]["fedavg|local-s0"]["n_pairs"] == 4  # (X, Y) x (s0, s1)
    assert agg["sites"] == ["s0", "s1", "s2"] and len(agg["runs"]) == 3
    # a model name reused with different training sets is flagged, not averaged silently
    runs[1]["matrix"]["fedavg"]["s2"]["internal"] = False
    assert M.aggregate_runs(runs)["cells"]["fedavg"]["s2"]["internal"] is None


# --- in process, through the real message handlers ----------------------------------------------


class HandlerGrid:
    """A Grid that delivers each message straight to the ClientApp's handler (no Ray).

    `local`: what server/simulation/engine.py gives every simulated node besides its partition id
    (sites/node.py `node_settings`: `cache-dir`, `splits-dir`, `egress-dir`), here as node config.
    `sent` and `replies` record every message in both directions."""

    def __init__(self, n_nodes: int, **local):
        from chestfed.sites import app as site_app

        self.handlers = {"query": site_app.query, "train": site_app.train,
                         "evaluate": site_app.evaluate}
        self.contexts = {i + 1: Context(run_id=1, node_id=i + 1,
                                        node_config={"partition-id": i, "num-partitions": n_nodes,
                                                     **{k.replace("_", "-"): str(v) for k, v in local.items()}},
                                        state=RecordDict(), run_config={})
                         for i in range(n_nodes)}
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    def set_local(self, **local):
        for c in self.contexts.values():
            c.node_config.update({k.replace("_", "-"): str(v) for k, v in local.items()})

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            self.sent.append(m)
            handler = self.handlers[m.metadata.message_type.split(".")[0]]
            try:
                out.append(handler(m, self.contexts[m.metadata.dst_node_id]))
            except Exception as exc:  # what Flower does with a failing ClientApp
                out.append(Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=m))
        self.replies += out
        return out


@pytest.fixture
def flower_identity():
    """Flower stamps messages with the running task's identity; give it one."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


def tiny_cfg(tmp_path, **extra):
    tree = {
        "experiment": "ev", "seed": 0, "output_dir": str(tmp_path / "runs"),
        "data": {"image_size": 32, "cache_dir": str(tmp_path / "cache"), "workers": 1},
        "sites": [
            {"name": "s0", "kind": "phantom", "options": {"preset": "a", "population": {"size": 120}}},
            {"name": "s1", "kind": "phantom", "options": {"preset": "b", "population": {"size": 120}}},
            # every image normal, no label noise: a single-class test split
            {"name": "healthy", "kind": "phantom", "options": {
                "preset": "a", "population": {"size": 60, "prevalence": {
                    f: 0.0 for f in ("Cardiomegaly", "Effusion", "Consolidation", "Pneumonia", "Nodule",
                                     "Mass", "Atelectasis", "Pneumothorax", "Edema")}},
                "labeller": {"noise": 0.0}}},
        ],
        "model": {"width": 4}, "train": dict(TINY_TRAIN),
        "strategy": {"rounds": 1, "min_sites": 1}, "eval": {"bootstrap": 40, "roc_points": 30},
        "wandb": {"enabled": False},
    }
    tree.update(extra)
    return config_from_tree(tree, "test")


def _federation(tmp_path, cfg, grid, echo=lambda s: None):
    """A run's parts (server/federation/federation.py) on `grid`, its sites discovered."""
    from chestfed.server.federation.federation import Federation
    from chestfed.server.run.folder import RunFolder
    from chestfed.server.tracking import Tracker

    run = RunFolder.create(cfg.output_dir, cfg.experiment, cfg.strategy.name)
    if hasattr(grid, "set_local"):  # as server/simulation/engine.py does for Ray's nodes
        grid.set_local(cache_dir=cfg.data.cache_dir, splits_dir=run.path / "splits")
    fed = Federation.open(grid, cfg, run, Tracker(cfg, run.path, "t"), echo=echo)
    fed.discover(timeout=30)
    fed.run, fed.cfg = run, cfg  # (for the tests' helpers below)
    return fed


def evaluate_all(fed, models, split="test"):
    """server/app.py's evaluation step: the shared evaluator with the run's settings."""
    return E.evaluate(fed.sites, models, fed.models.labels, E.settings_of(fed.cfg.eval, fed.cfg.seed),
                      split)


def test_final_evaluation_in_process(tmp_path, flower_identity):
    from chestfed.server.federation.trained import Trained
    from chestfed.sites.data import load_site

    cfg = tiny_cfg(tmp_path)
    grid = HandlerGrid(3)
    fed = _federation(tmp_path, cfg, grid)
    init = fed.models.initial_arrays()
    # local-s0 (plain) and a FedBN-style model trained at s0 and s1 with their own BatchNorm
    w0 = fed.train_at(1, "local-s0", {"s0": (init, 1)})["s0"]
    from chestfed.common.models import build_model, is_batchnorm_key

    net0 = build_model(cfg.model, 1)
    bn_keys = {k for k in init.keys() if is_batchnorm_key(k, net0)}
    fedbn_init = ArrayRecord({k: v for k, v in init.items() if k not in bn_keys})
    got = fed.train_at(1, "fedbn", {"s0": (fedbn_init, 1), "s1": (fedbn_init, 1)},
                         **{P.KEEP_LOCAL_BN: True})
    fedbn_w = got["s1"]
    models = [Trained("local-s0", w0, ["s0"]), Trained("fedbn", fedbn_w, ["s0", "s1"], local_bn=True)]
    n_before = len(grid.sent)
    ev = evaluate_all(fed, models, "test")
    sent = grid.sent[n_before:]
    # step 1: one message per training site (s0 gets both models); step 2: one per site, all models
    step1 = [m for m in sent if P.EVAL_PLAN in m.content[P.CONFIG] and
             json.loads(m.content[P.CONFIG][P.EVAL_PLAN])["mode"] == P.EVAL_MODE_THRESHOLDS]
    step2 = [m for m in sent if m not in step1]
    assert sorted(len(json.loads(m.content[P.CONFIG][P.EVAL_PLAN])["models"]) for m in step1) == [1, 2]
    assert len(step2) == 3
    for m in step2:
        # model names travel as aliases (a name such as local-s0 would name another site)
        assert {k for k in m.content.keys() if k.startswith(P.EVAL_MODEL_PREFIX)} == {
            P.EVAL_MODEL_PREFIX + fed.sites.alias("local-s0"), P.EVAL_MODEL_PREFIX + fed.sites.alias("fedbn")}

    # thresholds: local-s0's deployable threshold is the Youden threshold of its val split
    data = load_site(cfg, cfg.site("s0"), progress=False)
    import torch

    from chestfed.common.training import predict

    net = build_model(cfg.model, 1)
    net.load_state_dict(w0.to_torch_state_dict())
    val = data.splits["val"]
    yv, sv = val.y.numpy()[:, 0], predict(net, val.images, torch.device("cpu"))[:, 0]
    th = ev.thresholds["local-s0"]["Abnormal"]
    t_val = th["threshold"]
    from chestfed.common.metrics import counts_above, youden_on_grid

    assert t_val == youden_on_grid(*counts_above(yv, sv), (yv == 1).sum(), (yv == 0).sum())
    assert list(th["sources"]) == ["s0"] and "pos_above" not in th["sources"]["s0"]
    assert set(ev.thresholds["fedbn"]["Abnormal"]["sources"]) == {"s0", "s1"}
    # ... and it is the threshold applied on every test site
    for site in ("s0", "s1"):
        cell = ev.matrix["local-s0"][site]
        assert cell["metrics"]["labels/Abnormal/op/threshold"] == pytest.approx(t_val)
    # the test AUROC at s1 is what the model scores on s1's test split
    test = load_site(cfg, cfg.site("s1"), progress=False).splits["test"]
    auc = roc_auc_score(test.y.numpy()[:, 0], predict(net, test.images, torch.device("cpu"))[:, 0])
    assert ev.matrix["local-s0"]["s1"]["metrics"]["macro_auroc"] == pytest.approx(auc)

    # internal / external flags
    assert ev.matrix["local-s0"]["s0"]["internal"] and not ev.matrix["local-s0"]["s1"]["internal"]
    assert ev.matrix["fedbn"]["s1"]["internal"] and not ev.matrix["fedbn"]["healthy"]["internal"]
    # FedBN: own BatchNorm where trained, re-estimated elsewhere
    assert ev.matrix["fedbn"]["s0"]["batchnorm"] == "the site's own BatchNorm"
    assert "re-estimated" in ev.matrix["fedbn"]["healthy"]["batchnorm"]
    assert "batchnorm" not in ev.matrix["local-s0"]["s0"]
    # the single-class site: NaN with a reason, never 0.5
    h = ev.matrix["local-s0"]["healthy"]
    assert math.isnan(h["metrics"]["macro_auroc"])
    assert M.cell_reason(h).startswith("only negatives")
    # pairs at each site
    p = ev.pairs["s1"]["local-s0|fedbn"]
    assert set(p["labels"]["Abnormal"]) >= {"delong_p", "kappa_op", "spearman", "n"}
    assert math.isnan(ev.pairs["healthy"]["local-s0|fedbn"]["labels"]["Abnormal"]["delong_p"])
    # CIs and ROC points came back
    c = ev.matrix["fedbn"]["s0"]
    assert c["metrics"]["macro_auroc_lo"] <= c["metrics"]["macro_auroc"] <= c["metrics"]["macro_auroc_hi"]
    roc = c["roc"]["Abnormal"]  # on the fixed FPR grid, whatever eval.roc_points says
    assert roc["fpr"] == pytest.approx(ROC_FPR_GRID.tolist()) and len(roc["tpr"]) == 51


def test_a_failing_site_leaves_an_error_in_its_cells(tmp_path, flower_identity):
    import torch

    from chestfed.server.federation.trained import Trained

    cfg = tiny_cfg(tmp_path)
    grid = HandlerGrid(3)
    fed = _federation(tmp_path, cfg, grid)
    bad = ArrayRecord({"nope": torch.zeros(3)})  # does not fit the model
    ev = evaluate_all(fed, [Trained("broken", bad, ["s0"])], "test")
    for site in ("s0", "s1", "healthy"):
        assert "error" in ev.matrix["broken"][site]
    assert math.isnan(ev.thresholds["broken"]["Abnormal"]["threshold"])
    assert "site failed" in ev.thresholds["broken"]["Abnormal"]["reason"]


def test_local_own_site_row_for_comparisons():
    local = _results(0, "local", {
        f"local-{s}": {t: _cell(0.9 if s == t else 0.6, s == t, {"X": 0.9 if s == t else 0.6}) for t in ("s0", "s1")}
        for s in ("s0", "s1")}, sites=("s0", "s1"), task=("X",))
    fed = _results(0, "fedavg", {"fedavg": {t: _cell(0.8, True, {"X": 0.8}) for t in ("s0", "s1")}},
                   sites=("s0", "s1"), task=("X",))
    agg = M.aggregate_runs([local, fed])
    own = agg["cells"][M.LOCAL_OWN]
    assert own["s0"]["mean"] == 0.9 and own["s1"]["internal"] is True
    assert agg["comparisons"][f"{M.LOCAL_OWN}|fedavg"]["n_pairs"] == 2
    assert agg["comparisons"][f"{M.LOCAL_OWN}|fedavg"]["paired_over"] == "(test site, seed) cells"
    assert M.LOCAL_OWN not in local["matrix"]  # the input is not modified


def test_binary_comparisons_pair_test_sites_and_seeds():
    """One label: a pair per (test site, seed) where both models were scored with that seed;
    models with no seed in common fall back to the test sites' means over runs."""
    sites = ("s0", "s1", "s2")
    rng = np.random.default_rng(3)
    va = {(s, seed): 0.8 + 0.05 * rng.random() for s in sites for seed in (0, 1, 2)}
    vb = {(s, seed): 0.75 + 0.05 * rng.random() for s in sites for seed in (0, 1)}
    runs = [_results(seed, "fedavg", {"fedavg": {s: _cell(va[s, seed], True, {"X": va[s, seed]}) for s in sites}},
                     task=("X",)) for seed in (0, 1, 2)]
    runs += [_results(seed, "pooled", {"pooled": {s: _cell(vb[s, seed], True, {"X": vb[s, seed]}) for s in sites}},
                      task=("X",)) for seed in (0, 1)]
    runs.append(_results(7, "other", {"other": {s: _cell(0.7, False, {"X": 0.7 + 0.01 * i})
                                                for i, s in enumerate(sites)}}, task=("X",)))
    agg = M.aggregate_runs(runs)
    c = agg["comparisons"]["fedavg|pooled"]
    keys = [(s, seed) for seed in (0, 1) for s in sites]  # seed 2 has no pooled run
    ref = paired_tests([va[k] for k in sorted(keys)], [vb[k] for k in sorted(keys)])
    assert c["paired_over"] == "(test site, seed) cells" and c["n_pairs"] == 6
    assert c["t_p"] == pytest.approx(ref["t_p"]) and c["w_p"] == pytest.approx(ref["w_p"])
    f = agg["comparisons"]["fedavg|other"]
    assert f["paired_over"].startswith("test sites (means over runs") and f["n_pairs"] == 3
    mean_a = [np.mean([va[s, seed] for seed in (0, 1, 2)]) for s in sites]
    assert f["t_p"] == pytest.approx(paired_tests(mean_a, [0.7, 0.71, 0.72])["t_p"])
    ps = [agg["comparisons"][k][t] for k in agg["comparisons"] for t in ("t_p", "w_p")]
    from chestfed.common.stats import holm

    assert [agg["comparisons"][k][t + "_holm"] for k in agg["comparisons"] for t in ("t_p", "w_p")] == \
        pytest.approx(list(holm(ps)), nan_ok=True)
    json.dumps(agg)


# --- caveats: class counts and flags (common/caveats.py) -------------------------------------------


def _scored_cells(y, scores, train_counts=None, min_per_class=10, labels=("Abnormal",)):
    """Site-side scoring on arrays, then the server's reply parser: the real wire in between."""
    labels = list(labels)
    models = [_M(name, trained_on=["s0"]) for name in scores]
    plan = S.Plan(P.EVAL_MODE_SCORE, "test", [S.ModelSpec(m.name) for m in models], bootstrap=0)
    metrics, reasons = S.score_models(y, scores, labels, None, plan)
    metrics[P.NUM_EXAMPLES] = len(y)
    info = {"name": "t"} | {f"reason:{k}": v for k, v in reasons.items()}
    cells, _ = E.parse_site_reply("t", models, labels, S.to_wire(metrics), info, {}, [],
                                  min_per_class=min_per_class, train_counts=train_counts)
    return cells


def test_cells_carry_counts_and_flags():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(40), np.zeros(30)][:, None]
    good = np.clip(0.5 * y + rng.normal(0.25, 0.2, y.shape), 0, 1)
    const = np.full(y.shape, 0.3)
    cells = _scored_cells(y, {"good": good, "const": const})
    assert (cells["good"]["n_pos"], cells["good"]["n_neg"]) == (40, 30)
    assert cells["good"]["flags"] == [] and cells["good"]["labels"]["Abnormal"]["flags"] == []
    # all scores equal (within 1e-6): constant predictor, whatever its AUROC (0.5 by ties)
    assert cells["const"]["flags"] == ["constant_predictor"]
    assert cells["const"]["metrics"]["labels/Abnormal/score_range"] == 0.0
    assert cells["const"]["metrics"]["macro_auroc"] == 0.5
    near = const + rng.uniform(0, 5e-7, const.shape)
    assert _scored_cells(y, {"m": near})["m"]["flags"] == ["constant_predictor"]
    assert _scored_cells(y, {"m": const + np.linspace(0, 1e-3, len(y))[:, None]})["m"]["flags"] == []
    # one negative image: AUROC is computed (1.000 here) but flagged small_n
    y1 = np.r_[np.ones(30), np.zeros(1)][:, None]
    c = _scored_cells(y1, {"m": np.r_[np.full(30, 0.9), [0.1]][:, None]})["m"]
    assert c["metrics"]["macro_auroc"] == 1.0 and c["flags"] == ["small_n"]
    assert (c["n_pos"], c["n_neg"]) == (30, 1)
    assert _scored_cells(y1, {"m": good[:31]}, min_per_class=1)["m"]["flags"] == []
    # one class in the test split: n/a with its reason, flagged one_class_test (not small_n)
    c = _scored_cells(np.ones((12, 1)), {"m": good[:12]})["m"]
    assert c["flags"] == ["one_class_test"] and (c["n_pos"], c["n_neg"]) == (12, 0)
    assert M.cell_reason(c).startswith("only positives")
    # a model whose training data held one class: one_class_train (here also small n)
    c = _scored_cells(y1, {"m": good[:31]}, train_counts={"m": {"Abnormal": (0, 50)}})["m"]
    assert c["flags"] == ["small_n", "one_class_train"]
    ok = _scored_cells(y, {"m": good}, train_counts={"m": {"Abnormal": (3, 50)}})["m"]
    assert ok["flags"] == []


def test_multilabel_cells_flag_per_label_and_count_the_scarcest():
    rng = np.random.default_rng(1)
    n = 80
    y = np.zeros((n, 3))
    y[:40, 0] = 1  # A: 40/40
    y[:4, 1] = 1  # B: 4/76, small
    y[:, 2] = np.nan  # C: not annotated here: no flag
    s = np.clip(0.4 * np.nan_to_num(y) + rng.normal(0.3, 0.2, y.shape), 0, 1)
    c = _scored_cells(y, {"m": s}, labels=("A", "B", "C"))["m"]
    assert c["labels"]["A"] == {"n_pos": 40, "n_neg": 40, "flags": []}
    assert c["labels"]["B"] == {"n_pos": 4, "n_neg": 76, "flags": ["small_n"]}
    assert c["labels"]["C"] == {"n_pos": 0, "n_neg": 0, "flags": []}
    assert (c["n_pos"], c["n_neg"]) == (4, 40) and c["flags"] == ["small_n"]


def test_training_counts_are_the_union_of_the_training_sites():
    from chestfed.common import caveats as C

    info = {"a": {"n_train": 10, **C.counts_to_info({"train": {"X": (0, 10), "Y": (3, 7)}})},
            "b": {"n_train": 5, **C.counts_to_info({"train": {"X": (2, 3)}})},  # b masks Y
            "old": {"n_train": 5}}  # a site that sent no counts
    assert C.training_counts(info, ["a"], ["X", "Y"]) == {"X": (0, 10), "Y": (3, 7)}
    assert C.training_counts(info, ["a", "b"], ["X", "Y"]) == {"X": (2, 13), "Y": (3, 7)}
    assert C.training_counts(info, ["b"], ["X", "Y"])["Y"] == (0, 0)  # never saw Y: one_class_train
    assert C.training_counts(info, ["old"], ["X"]) is None  # unknown: no flag
    assert C.counts_from_info(info["a"]) == {"train": {"X": (0, 10), "Y": (3, 7)}}
    entry = C.site_entry(info["a"])
    assert entry == {"n_train": 10, "class_counts": {"train": {"X": {"n_pos": 0, "n_neg": 10},
                                                               "Y": {"n_pos": 3, "n_neg": 7}}}}
    w = C.split_warnings("a", {"train": {"X": (0, 10), "Y": (3, 7)}, "test": {"X": (0, 0)}}, 5)
    assert w == ["site a, train split: one class only for X (0+/10-): a model trained here cannot "
                 "learn to rank it",
                 "site a, train split: fewer than 5 (eval.min_per_class) positives or negatives for "
                 "Y (3+/7-)",
                 "site a, test split: no labelled image for X"]
    assert C.split_warnings("a", {"train": {"Y": (3, 7)}}, 3) == []


def _flag_results():
    def cell(v, internal, n_pos, n_neg, flags=(), reasons=None):
        return {"internal": internal, "metrics": {"macro_auroc": v}, "n_pos": n_pos, "n_neg": n_neg,
                "flags": list(flags), "reasons": reasons or {}}

    matrix = {
        "local-s0": {"s0": cell(0.81234, True, 40, 30), "s1": cell(1.0, False, 25, 1, ["small_n"]),
                     "healthy": cell(float("nan"), False, 0, 20, ["one_class_test"],
                                     {"Abnormal/auroc": "only negatives (n=20)"})},
        "local-healthy": {"s0": cell(0.5, False, 40, 30, ["one_class_train", "constant_predictor"]),
                          "s1": cell(0.5, False, 25, 1, ["small_n", "one_class_train", "constant_predictor"]),
                          "healthy": cell(float("nan"), True, 0, 20, ["one_class_test", "one_class_train",
                                                                       "constant_predictor"],
                                          {"Abnormal/auroc": "only negatives (n=20)"})},
    }
    res = {"task": ["Abnormal"], "sites": {"s0": {}, "s1": {}, "healthy": {}}, "matrix": matrix,
           "evaluation": {"min_per_class": 10}}
    res["summary"] = {m: M.summarize_row(row) for m, row in matrix.items()}
    return res


def test_format_table_shows_counts_marks_legend_and_every_na_reason():
    lines = R.format_table(_flag_results())
    text = "\n".join(lines)
    counts = next(x for x in lines if x.startswith("test n+/n-"))
    assert counts.split()[2:] == ["40/30", "25/1", "0/20"]
    row = next(x for x in lines if x.startswith("local-s0 "))
    assert "0.812*" in row and "1.000  s" in row and "n/a  o" in row
    row = next(x for x in lines if x.startswith("local-healthy "))
    assert "0.500  tc" in row and "0.500  stc" in row and "n/a* otc" in row
    # columns line up: every row as long as the header
    assert len({len(x) for x in lines if x.startswith(("model ", "local-"))}) == 1
    legend = next(x for x in lines if x.startswith("flags:"))
    for part in ("s = fewer than 10 positives or negatives in the test split",
                 "o = one class only in the test split", "t = the model's training split(s) held "
                 "one class only", "c = constant predictor"):
        assert part in legend
    assert "n/a: local-s0 at healthy: only negatives (n=20)" in lines
    assert "n/a: local-healthy at healthy: only negatives (n=20)" in lines
    assert "n/a: local-healthy int, gap: no internal test site with an AUROC" in lines
    assert "test n+/n-: labelled positives / negatives in each site's test split" in text
    # nothing flagged: a 'flags: none' line, and old results without counts still print
    clean = _flag_results()
    for row in clean["matrix"].values():
        for c in row.values():
            c["flags"] = []
    assert any(x.startswith("flags: none") for x in R.format_table(clean))
    for row in clean["matrix"].values():
        for c in row.values():
            del c["flags"], c["n_pos"], c["n_neg"]
    old = R.format_table(clean)
    assert not any(x.startswith(("test n+", "flags")) for x in old) and len(old) == 7


def test_run_warns_and_flags_in_process(tmp_path, flower_identity):
    """The healthy site's train split has one class: discovery warns; its local model is flagged
    one_class_train everywhere; a model with a zeroed head is a constant predictor."""
    import torch

    from chestfed.server.federation.trained import Trained
    from chestfed.sites.data import load_site

    cfg = tiny_cfg(tmp_path)
    grid = HandlerGrid(3)
    echoed: list[str] = []
    fed = _federation(tmp_path, cfg, grid, echo=echoed.append)
    coord = fed.sites
    # the query reply's counts are the site's own splits' counts
    for name in ("s0", "healthy"):
        data = load_site(cfg, cfg.site(name), progress=False)
        for split in ("train", "test"):
            y = data.splits[split].y.numpy()[:, 0]
            assert coord.site_info[name][f"n_pos/{split}/Abnormal"] == (y == 1).sum()
            assert coord.site_info[name][f"n_neg/{split}/Abnormal"] == (y == 0).sum()
    assert any(x.startswith("warning: site healthy, train split: one class only for Abnormal (0+/")
               for x in echoed), echoed
    assert any(x.startswith("warning: site healthy, test split: one class only") for x in echoed)
    assert coord.data_warnings and all(f"warning: {w}" in echoed for w in coord.data_warnings)

    init = fed.models.initial_arrays()
    w_h = fed.train_at(1, "local-healthy", {"healthy": (init, 1)})["healthy"]
    state = init.to_torch_state_dict()
    state["head.4.weight"] = torch.zeros_like(state["head.4.weight"])
    models = [Trained("local-healthy", w_h, ["healthy"]), Trained("const", ArrayRecord(state), ["s0"])]
    ev = evaluate_all(fed, models, "test")
    for site in ("s0", "s1", "healthy"):
        assert "one_class_train" in ev.matrix["local-healthy"][site]["flags"]
        assert "constant_predictor" in ev.matrix["const"][site]["flags"]
        assert "one_class_train" not in ev.matrix["const"][site]["flags"]
    h = ev.matrix["const"]["healthy"]
    assert "one_class_test" in h["flags"] and h["n_pos"] == 0 and h["n_neg"] > 0
    test = load_site(cfg, cfg.site("s1"), progress=False).splits["test"].y.numpy()[:, 0]
    c = ev.matrix["const"]["s1"]
    assert (c["n_pos"], c["n_neg"]) == ((test == 1).sum(), (test == 0).sum())
    assert ("small_n" in c["flags"]) == (min(c["n_pos"], c["n_neg"]) < 10)
    res = R.build_results(cfg, models, ev.matrix, {}, record=fed.record, sites=fed.sites,
                          eval_seconds=0.0, evaluation=ev)
    assert res["evaluation"]["min_per_class"] == 10
    assert res["data_warnings"] == coord.data_warnings
    assert res["sites"]["healthy"]["class_counts"]["train"]["Abnormal"]["n_pos"] == 0
    json.dumps(res)
    lines = R.format_table(res)
    assert any(x.startswith("flags:") and "t = " in x and "c = constant" in x for x in lines)
    assert any(x.startswith("n/a: const at healthy: only negatives") for x in lines)


def test_operating_points_own_site_where_trained_pooled_elsewhere():
    models = [_M("fed", trained_on=["a", "b"]), _M("local-a", trained_on=["a"])]
    th = {"fed": {"X": {"threshold": 0.4, "sources": {"a": {"youden": 0.2}, "b": {"youden": math.nan}}}},
          "local-a": {"X": {"threshold": 0.2, "sources": {"a": {"youden": 0.2}}}}}
    assert E.operating_points(models, th, "a") == (
        {"fed": {"X": 0.2}, "local-a": {"X": 0.2}}, {"fed": {"X": "own site"}, "local-a": {"X": "own site"}})
    assert E.operating_points(models, th, "b")[0]["fed"]["X"] == 0.4  # own point undefined: pooled
    assert E.operating_points(models, th, "b")[1]["fed"]["X"] == "pooled"
    assert E.operating_points(models, th, "c") == (
        {"fed": {"X": 0.4}, "local-a": {"X": 0.2}}, {"fed": {"X": "pooled"}, "local-a": {"X": "pooled"}})
    assert E.operating_points(models, th, "a", rule="pooled")[0]["fed"]["X"] == 0.4


def test_a_personalised_method_gets_its_own_site_row_next_to_local_and_fedavg():
    cells = {f"ditto-{s}": {t: _cell(0.85 if s == t else 0.6, s == t, {"X": 0.85 if s == t else 0.6})
                            for t in ("s0", "s1")} for s in ("s0", "s1")}
    cells["ditto-global"] = {t: _cell(0.8, True, {"X": 0.8}) for t in ("s0", "s1")}
    ditto = _results(0, "ditto", cells, sites=("s0", "s1"), task=("X",))
    ditto["personalisation"] = {"ditto": {"sites": {}}}
    fed = _results(0, "fedavg", {"fedavg": {t: _cell(0.8, True, {"X": 0.8}) for t in ("s0", "s1")}},
                   sites=("s0", "s1"), task=("X",))
    agg = M.aggregate_runs([ditto, fed])
    row = M.own_site_row("ditto")
    assert {s: c["mean"] for s, c in agg["cells"][row].items()} == {"s0": 0.85, "s1": 0.85}
    assert agg["cells"][row]["s0"]["internal"] is True
    assert agg["comparisons"][f"{row}|fedavg"]["n_pairs"] == 2
    assert row not in ditto["matrix"]  # the input is not modified
