"""What a site is told and what leaves it (issue 13 items 3 and 4; common/privacy/disclosure.py).

In-process runs (tests/test_evaluator.py's HandlerGrid: the real ClientApp handlers, no Ray)
read every message sent to a site and every reply: a site is told only its own part of the
experiment, and only aggregates leave it, in the released form (ROC on the fixed FPR grid,
thresholds rounded, small counts suppressed), each reply described in the site's egress log.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from chestfed.common.privacy import disclosure as D
from chestfed.common import protocol as P
from chestfed.common.metrics import THRESHOLD_GRID
from chestfed.common.models import build_model
from chestfed.common.training import predict
from tests.test_evaluator import HandlerGrid, _federation, evaluate_all, flower_identity, tiny_cfg  # noqa: F401

SITES = ("s0", "s1", "healthy")


# --- the rules ------------------------------------------------------------------------------------

def test_roc_on_grid_is_the_highest_tpr_at_or_below_each_fpr():
    fpr = np.array([0.0, 0.0, 0.1, 0.1, 0.5, 1.0])
    tpr = np.array([0.0, 0.3, 0.3, 0.8, 0.9, 1.0])
    got = D.roc_on_grid(fpr, tpr)
    want = [tpr[fpr <= f + 1e-12].max() for f in D.ROC_FPR_GRID]
    assert got == pytest.approx(want) and len(got) == 51
    assert got[0] == 0.3 and got[5] == 0.8 and got[-1] == 1.0  # FPR 0.1 reaches 0.8


def test_released_thresholds_ranges_and_counts():
    assert D.round_threshold(0.123456) == 0.12 and math.isnan(D.round_threshold(math.nan))
    assert D.released_range(0.0) == 0.0 and D.released_range(1e-7) == 0.0
    assert D.released_range(0.0031) == 0.01 and D.released_range(0.4234) == 0.43
    m = {"a/at05/tp": 3.0, "a/at05/fp": 0.0, "a/at05/tn": 5.0, "a/at05/fn": 4.0, "a/auroc": 0.7}
    why = D.suppress_counts(m, 5)
    assert math.isnan(m["a/at05/tp"]) and math.isnan(m["a/at05/fn"])
    assert m["a/at05/fp"] == 0.0 and m["a/at05/tn"] == 5.0 and m["a/auroc"] == 0.7
    assert set(why) == {"a/at05/tp", "a/at05/fn"} and why["a/at05/tp"].startswith(D.SUPPRESSED)
    assert "<5" in why["a/at05/tp"]
    assert D.suppress_counts({"x/tp": 1.0}, 0) == {}  # simulation default: nothing suppressed
    assert D.min_cell_for(None, deployed=True) == 5 and D.min_cell_for(None, deployed=False) == 0
    assert D.min_cell_for(3, deployed=True) == 3


def test_coarsened_grid_counts_step_by_at_least_min_cell():
    rng = np.random.default_rng(0)
    s = np.sort(rng.random(40))
    counts = (s.size - np.searchsorted(s, THRESHOLD_GRID, side="left")).astype(float)
    out = D.coarsen_cumulative(counts, s.size, 5)
    assert np.all(out <= counts) and np.all(np.diff(out) <= 0)  # rounded down, still cumulative
    levels = np.unique(out)
    below = s.size - levels[-1]  # images under the lowest released level: none, or >= 5
    assert levels[0] == 0 and np.all(np.diff(levels) >= 5) and (below == 0 or below >= 5)
    odd = D.coarsen_cumulative(np.array([43.0, 41.0, 12.0, 3.0, 0.0]), 44, 5)
    assert odd.tolist() == [12.0, 12.0, 12.0, 0.0, 0.0]  # 41 would leave 3 below it: merged
    assert np.array_equal(D.coarsen_cumulative(counts, s.size, 0), counts)


# --- a whole run in process ---------------------------------------------------------------------

def _strings(conf: dict) -> str:
    return json.dumps({k: v if isinstance(v, (str, int, float, bool)) else str(v) for k, v in conf.items()})


def _numbers(reply: Message) -> list[float]:
    out: list[float] = []
    for rec in reply.content.values():
        if type(rec).__name__ != "MetricRecord":
            continue
        for v in rec.values():
            out.extend(v if isinstance(v, list) else [v])
    return [float(x) for x in out]


def test_a_site_is_told_its_own_part_and_only_aggregates_leave(tmp_path, flower_identity):
    from chestfed.server.evaluation.batchnorm import reestimate_all
    from chestfed.server.federation.trained import Trained
    from chestfed.server.evaluation.evaluator import settings_of
    from chestfed.sites.data import load_site

    cfg = tiny_cfg(tmp_path, privacy={"min_cell": 5})
    grid = HandlerGrid(3)
    fed = _federation(tmp_path, cfg, grid)
    coord = fed.sites
    grid.set_local(egress_dir=tmp_path / "egress")
    init = fed.models.initial_arrays()
    w0 = fed.train_at(1, "local-s0", {"s0": (init, 1)})["s0"]
    fed.eval_at(1, "local-s0", {s: w0 for s in SITES})  # per-round validation replies too
    both = fed.train_at(1, "federated", {"s0": (init, 1), "s1": (init, 1)})
    models = [Trained("local-s0", w0, ["s0"]), Trained("federated", both["s1"], ["s0", "s1"])]
    reestimate_all(coord, models, "precise", fed.models.probe(), settings_of(cfg.eval, cfg.seed))
    ev = evaluate_all(fed, models, "test")

    # --- what each site was told
    assert len(grid.sent) >= 3 * 4
    for m in grid.sent:
        conf = dict(m.content[P.CONFIG].items())
        if P.HELLO in conf:
            assert set(conf) == {P.HELLO}  # "which site are you?" carries nothing else
            continue
        site = coord.site_of[m.metadata.dst_node_id]
        exp = yaml.safe_load(conf[P.EXPERIMENT])
        assert [s["name"] for s in exp["sites"]] == [site]
        assert conf[P.SITE] == site and conf[P.SITE_INDEX] == list(SITES).index(site)
        assert conf[P.RUN_NAME] == fed.run.path.name
        for gone in ("wandb", "output_dir", "strategy", "fallbacks"):
            assert gone not in exp, gone
        assert "cache_dir" not in exp["data"] and "weights" not in exp["model"]
        text = _strings(conf) + " ".join(m.content.keys())
        for other in SITES:
            if other != site:
                assert not re.search(rf"\b{other}\b", text), (site, other)
        assert str(tmp_path) not in text and "runs/" not in text  # no folder of the coordinator
        assert "local-s0" not in text and "federated" not in text  # model names travel as aliases
        assert all(isinstance(v, (str, int, float, bool)) for v in conf.values())

    # --- what left each site: per-image scores of every model it scored, recomputed here
    scores: dict[str, set[float]] = {s: set() for s in SITES}
    sizes: dict[str, set[int]] = {}
    for s in SITES:
        data = load_site(cfg, cfg.site(s), progress=False)
        sizes[s] = {len(data.splits[k]) for k in ("train", "val", "test")}
        for arrays, split in ((w0, "val"), (models[0].arrays, "test"), (models[1].arrays, "test")):
            net = build_model(cfg.model, 1)
            net.load_state_dict(arrays.to_torch_state_dict())
            p = predict(net, data.splits[split].images, torch.device("cpu"), cfg.model.in_channels)
            scores[s] |= {float(x) for x in p.reshape(-1)}
    shapes = {tuple(v.shape) for v in build_model(cfg.model, 1).state_dict().values()}
    from chestfed.common.calibration import DIFF_BINS, MEAN_BINS

    # the two fixed grids, and the Bland-Altman histogram's fixed bins (common/calibration.py)
    allowed_lists = {len(D.ROC_FPR_GRID), len(THRESHOLD_GRID), MEAN_BINS * DIFF_BINS}
    assert not allowed_lists & set().union(*sizes.values()), "pick a config whose splits differ"
    suppressed = 0
    for r in grid.replies:
        assert not r.has_error(), r.error.reason
        site = coord.site_of[r.metadata.src_node_id]
        for name, rec in r.content.items():
            kind = type(rec).__name__
            if kind == "ArrayRecord":
                for k, a in rec.items():
                    assert tuple(a.shape) in shapes, (site, name, k, a.shape)
                    assert tuple(a.shape[-2:]) != (cfg.data.image_size, cfg.data.image_size)
            elif kind == "MetricRecord":
                for k, v in rec.items():
                    if isinstance(v, list):  # only the fixed grids, never a split's length
                        assert len(v) in allowed_lists and len(v) not in sizes[site], (site, k, len(v))
                        if k.endswith("/ba_hist"):  # a histogram's small cells are suppressed too
                            assert all(x != x or x == 0 or x >= 5 for x in v), (site, k)
                    elif k.rsplit("/", 1)[-1] in D.COUNT_KEYS and not math.isnan(v):
                        assert v == 0 or v >= 5, (site, k, v)  # min_cell
                    if k.endswith("/threshold") and not math.isnan(v):
                        assert v == round(v, 2) or v in THRESHOLD_GRID, (k, v)
            else:
                suppressed += sum(str(v).startswith(D.SUPPRESSED) for v in rec.values())
        leaked = {x for x in _numbers(r) if x in scores[site]} - {0.0, 0.5, 1.0}
        assert not leaked, (site, sorted(leaked)[:5])
    assert suppressed > 0  # 18 test images: some confusion count is below 5 somewhere

    # --- the results keep their meaning: suppressed counts are NaN with the reason, shown as <5
    cell = ev.matrix["local-s0"]["s1"]
    sup = {k: v for k, v in cell["reasons"].items() if v.startswith(D.SUPPRESSED)}
    for k in sup:
        assert math.isnan(cell["metrics"][k])
    assert cell["roc"]["Abnormal"]["fpr"] == pytest.approx(D.ROC_FPR_GRID.tolist())

    # --- the sites' egress logs: one row per reply, keys and shapes only
    for s in SITES:
        rows = [json.loads(x) for x in (tmp_path / "egress" / f"{s}.jsonl").read_text().splitlines()]
        mine = [r for r in grid.replies if coord.site_of[r.metadata.src_node_id] == s]
        # the HELLO and the data query came before the egress folder was set
        assert len(rows) == len(mine) - 2 and all(r["dir"] == "out" and r["site"] == s for r in rows)
        for row in rows:
            for rec in row["records"].values():
                for item in rec["items"].values():
                    assert isinstance(item, str) or set(item) <= {"shape", "dtype", "list", "type", "len"}


def test_a_deployed_site_logs_every_reply_in_its_workdir(tmp_path, flower_identity):
    from chestfed.server.federation.site_grid import site_experiment
    from chestfed.sites import app as site_app
    from chestfed.sites import node as site_node

    cfg = tiny_cfg(tmp_path)
    work = tmp_path / "hospital"
    ctx = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                  node_config={"site": "s1", "workdir": str(work), "cache-dir": str(tmp_path / "c"),
                               "splits-dir": str(work / "splits")})

    def ask(kind, conf, **records):
        return site_app.query(Message(RecordDict({P.CONFIG: ConfigRecord(conf), **records}),
                                      dst_node_id=1, message_type=kind), ctx) if kind == MessageType.QUERY \
            else site_app.train(Message(RecordDict({P.CONFIG: ConfigRecord(conf), **records}),
                                        dst_node_id=1, message_type=kind), ctx)

    part = {P.EXPERIMENT: site_experiment(cfg, ["s1"]), P.SITE: "s1", P.SITE_INDEX: 1,
            P.RUN_NAME: "run-x", P.LR_ROUNDS: 1}
    hello = ask(MessageType.QUERY, {P.HELLO: True})
    assert dict(hello.content[P.SITE_INFO]) == {"name": "s1"}
    info = ask(MessageType.QUERY, part)
    state = build_model(cfg.model, 1).state_dict()
    trained = ask(MessageType.TRAIN, {**part, P.LOCAL_EPOCHS: 1, P.ROUND: 1},
                  **{P.ARRAYS: ArrayRecord(state)})
    assert (work / "splits" / "run-x" / "s1.csv").is_file()  # under the run's name, at home
    assert (tmp_path / "c").is_dir()  # the site's own cache, not the config's
    rows = [json.loads(x) for x in (work / "egress.jsonl").read_text().splitlines()]
    assert [r["type"] for r in rows] == ["query", "query", "train"]
    assert rows[1]["records"][P.METRICS]["items"]["n_train"] == "float" or \
        rows[1]["records"][P.METRICS]["items"]["n_train"] == "int"
    arrays = rows[2]["records"][P.ARRAYS]["items"]
    assert {k: tuple(v["shape"]) for k, v in arrays.items()} == {k: tuple(v.shape) for k, v in state.items()}
    # values never: not the site's split sizes, not the training loss
    text = (work / "egress.jsonl").read_text()
    n_train = int(info.content[P.METRICS]["n_train"])
    assert f": {n_train}," not in text and str(float(trained.content[P.METRICS]["train-loss"])) not in text
    assert site_node.min_cell(cfg, ctx) == 5  # privacy.min_cell unset: 5 at a deployed site
    ctx.node_config["min-cell"] = 8  # launch/site.py --min-cell: a hospital can only raise it
    assert site_node.min_cell(cfg, ctx) == 8
    ctx.node_config["min-cell"] = 2
    assert site_node.min_cell(cfg, ctx) == 5
    sim = Context(run_id=1, node_id=2, state=RecordDict(), run_config={}, node_config={"partition-id": 0})
    assert site_node.min_cell(cfg, sim) == 0  # simulation default
    assert Path(work / "egress.jsonl").stat().st_size > 0
