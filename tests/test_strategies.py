"""Strategies: unit checks of their mechanics, then every strategy end to end on 2 tiny sites."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from chestfed.common.config import ModelConfig
from chestfed.common.models import build_model, is_batchnorm_key
from e2e import REPO, one_epoch, only_run, results, simulate, tiny_config
from chestfed.server.federation.flower_loop import FLOWER_STRATEGIES
from chestfed.sites.pooled import balance_indices
from tap_fakes import FakeFed
from wandb_offline import history, run_config, run_info


@pytest.fixture(autouse=True)
def _task_identity():
    # Flower stamps messages with the running task's identity; outside a run, lend one.
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = None


def _reply(state, n):
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": n, "images": n, "steps": 1, "train-loss": 0.5, "seconds": 0.1})})
    msg = Message(content=content, dst_node_id=1, message_type="train")
    return Message(content=content, reply_to=msg)


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedbn"])
def test_aggregating_identical_updates_returns_that_update(name):
    torch.manual_seed(0)
    state = build_model(ModelConfig(width=4), 1).state_dict()
    strat = FLOWER_STRATEGIES[name](min_train_nodes=1, min_available_nodes=1)
    strat.fed, strat.model_name = FakeFed(), name
    arrays, _ = strat.aggregate_train(1, [_reply(state, 30), _reply(state, 70), _reply(state, 5)])
    out = arrays.to_torch_state_dict()
    for k, v in state.items():
        assert torch.allclose(out[k].to(v.dtype), v, atol=1e-6), k


def test_fedavg_weights_by_example_count():
    a = {"w": torch.zeros(3)}
    b = {"w": torch.ones(3)}
    strat = FLOWER_STRATEGIES["fedavg"](min_train_nodes=1, min_available_nodes=1)
    strat.fed, strat.model_name = FakeFed(), "fedavg"
    arrays, _ = strat.aggregate_train(1, [_reply(a, 30), _reply(b, 10)])
    assert torch.allclose(arrays.to_torch_state_dict()["w"], torch.full((3,), 0.25))


def test_server_optimisers_leave_batchnorm_statistics_averaged():
    net = build_model(ModelConfig(width=4), 1)
    state = net.state_dict()
    bn_buffers = frozenset(k for k in state if is_batchnorm_key(k, net) and not k.endswith((".weight", ".bias")))
    strat = FLOWER_STRATEGIES["fedadam"](min_train_nodes=1, min_available_nodes=1, eta=1.0)
    strat.fed, strat.model_name, strat.buffer_keys = FakeFed(), "fedadam", bn_buffers
    strat.configure_train(1, ArrayRecord(state), ConfigRecord(), _FakeGrid())
    moved = {k: v + 0.5 if v.is_floating_point() else v for k, v in state.items()}
    arrays, _ = strat.aggregate_train(1, [_reply(moved, 10)])
    out = arrays.to_torch_state_dict()
    var = next(k for k in bn_buffers if k.endswith("running_var"))
    assert torch.allclose(out[var], moved[var])  # plain average, not an Adam step
    w = "head.4.weight"
    assert not torch.allclose(out[w], moved[w])  # trainable weights did take the Adam step


class _FakeGrid:
    def get_node_ids(self):
        return [1]


def test_balancing_counts():
    ys = [np.array([1, 1, 1, 0, 0, 0, 0, 0, np.nan]), np.array([1, 0, 0, 0]), np.array([1, 1, 0, 0, 0, 0])]
    none = balance_indices(ys, "none", 0)
    assert [len(i) for i in none] == [9, 4, 6]
    site = balance_indices(ys, "site", 0)
    assert [len(i) for i in site] == [4, 4, 4]
    sc = balance_indices(ys, "site_and_class", 0)
    for y, idx in zip(ys, sc):
        assert (y[idx] == 1).sum() == 1 and (y[idx] == 0).sum() == 1
    assert [list(i) for i in balance_indices(ys, "site", 0)] == [list(i) for i in site]  # seeded


# --- end to end --------------------------------------------------------------------------

# Through the real launcher and Ray. FedProx, FedAdam and FedYogi are FedAvg's Flower path with
# other settings: they run in process, through the real coordinator and site handlers, in
# test_resume.py (which also checks every strategy's budget) and their server and site updates
# in test_strategy_updates.py. fedavg runs alone through simulate.py (the user's command, read
# as a user reads its folder), loso alone on 3 sites; the others share one compare.py process
# and its Ray session (launch/warm_runs.py: ~3 s of start-up per run instead of ~13 s).
ALL = ["local", "pooled", "sequential", "fedavg", "fedbn", "loso"]
WARM = ["local", "pooled", "sequential", "fedbn", "ditto", "fedper", "mrmtl", "apfl", "krum"]
EVERY = ALL + [n for n in WARM if n not in ALL]


@pytest.fixture(scope="session")
def strategy_run(tmp_path_factory):
    """A folder per strategy whose runs/<experiment>/ holds that strategy's one run, made on
    first use: `-k fedbn` runs the shared comparison, `-k fedavg` fedavg alone. (`make test`
    sends this whole file to one pytest worker.)"""
    made: dict[str, tuple] = {}

    def get(name: str):
        if name not in made:
            if name in WARM:
                tmp = tmp_path_factory.mktemp("warm")
                cfg = tiny_config(tmp, strategy={"rounds": 2, "min_sites": 1})
                proc = subprocess.run([sys.executable, str(REPO / "launch" / "compare.py"),
                                       "--config", str(cfg), "--strategies", ",".join(WARM)],
                                      capture_output=True, text=True, timeout=1200, cwd=tmp,
                                      env={**os.environ, "WANDB_MODE": "offline"})
                for w in WARM:  # runs/<experiment>/compare-*/runs/<w>-seed0 -> <w>/runs/tiny/
                    own = tmp / w / "runs" / "tiny"
                    own.mkdir(parents=True)
                    for run in tmp.glob(f"runs/*/compare-*/runs/{w}-seed0"):
                        (own / run.name).symlink_to(run, target_is_directory=True)
                    made[w] = (proc, tmp / w)
            else:
                tmp = tmp_path_factory.mktemp(name)
                cfg = tiny_config(tmp, n_sites=3 if name == "loso" else 2,
                                  strategy={"rounds": 2, "min_sites": 1})
                made[name] = (simulate(cfg, "--strategy", name), tmp)
        proc, tmp = made[name]
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return tmp

    get.proc = lambda name: (get(name), made[name][0])[1]  # the launcher's CompletedProcess
    return get


@pytest.mark.e2e
@pytest.mark.parametrize("name", EVERY)
def test_every_strategy_runs(strategy_run, name):
    res = results(only_run(strategy_run(name)))
    sites = list(res["sites"])
    assert res["status"] == "complete" and res["strategy"] == name
    for model, row in res["matrix"].items():
        assert set(row) == set(sites)
        for site, cell in row.items():
            assert cell["internal"] == (site in res["models"][model]["trained_on"])
            # scored on the site's whole test split: an AUROC, or NaN (null) with the reason
            assert cell["metrics"]["n_images"] == res["sites"][site]["n_test"], (model, site)
            auc = cell["metrics"]["macro_auroc"]
            assert 0 <= auc <= 1 if auc is not None else cell["reasons"], (model, site, cell)


@pytest.mark.e2e
def test_fedavg_run_writes_a_complete_run_folder(strategy_run):
    """The fedavg run of `strategy_run` (2 sites, 2 rounds) read as a user reads its folder
    (it was a run of its own in test_simulate.py)."""
    run = only_run(strategy_run("fedavg"))
    proc = strategy_run.proc("fedavg")
    assert run.parent.name == "tiny" and run.name.startswith("fedavg-")
    assert "round 2/2" in proc.stdout and str(run) in proc.stdout
    # the per-site table: both sites, internal marks
    assert "site0" in proc.stdout and "*" in proc.stdout

    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "complete"
    # Ray's session ends with the run: no process of it left, no /tmp/ray folder piling up
    from chestfed.server.simulation.ray_session import session_pids

    assert status["ray_session"] and not Path(status["ray_session"]).exists()
    assert not session_pids(status["ray_session"])
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["strategy"]["name"] == "fedavg" and len(resolved["sites"]) == 2
    for site in ("site0", "site1"):
        split = (run / "splits" / f"{site}.csv").read_text().splitlines()
        assert split[0] == "image_id,patient_id,split" and len(split) == 91
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {(r["round"], r["site"]) for r in rows} == {(k, s) for k in (1, 2) for s in ("site0", "site1")}

    res = results(run)
    assert res["status"] == "complete"
    # the effective budget, printed in the first lines and kept: what tiny_config leaves out
    # is named as the schema's default
    assert res["budget"]["values"]["strategy.rounds"] == 2
    assert res["budget"]["values"]["train.local_epochs"] == 1
    # the tiny config sets local_epochs (tests/e2e.py TINY_TRAIN) but not task_weights
    assert "train.task_weights" in res["budget"]["schema_defaults"]
    assert not {"strategy.rounds", "train.local_epochs"} & set(res["budget"]["schema_defaults"])
    head = proc.stdout.splitlines()[:8]
    assert any(line.startswith("chestfed: budget: 2 rounds x 1 local epochs") for line in head), head
    for r in rows:  # one pass over the site's train split per round
        assert (r["images"], r["steps"]) == one_epoch(res["sites"][r["site"]]["n_train"]), r
    cell = res["matrix"]["fedavg"]["site0"]
    assert cell["internal"] is True
    m = cell["metrics"]  # scored on the whole test split; binary task: macro = the one label
    assert m["n_images"] == res["sites"]["site0"]["n_test"]
    assert 0 <= m["macro_auroc_lo"] <= m["macro_auroc"] == m["labels/Abnormal/auroc"] <= m["macro_auroc_hi"] <= 1
    assert res["budget"]["images_processed"] == sum(r["images"] for r in rows)
    ckpt = torch.load(run / res["models"]["fedavg"]["checkpoint"], weights_only=True)
    build_model(ModelConfig(width=4), 1).load_state_dict(ckpt["model"])  # strict: the whole model

    wb = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(wb) == 1
    hist = history(wb[0])
    assert hist[0]["round"] == 1 and "train/site0/loss" in hist[0] and "eval/site1/auroc" in hist[0]
    assert hist[0]["train/site0/loss"] == pytest.approx(next(r for r in rows if r["site"] == "site0")["train_loss"])
    assert any(k.startswith("matrix") for h in hist for k in h)
    conf = run_config(wb[0])
    assert conf["strategy"] == "fedavg" and conf["sites"] == ["site0", "site1"] and conf["seed"] == 0
    assert run_info(wb[0])["project"] == "chestfed"


@pytest.mark.e2e
@pytest.mark.parametrize("name", [n for n in ALL if n != "loso"])
def test_every_strategy_spends_the_same_budget(strategy_run, name):
    # rounds x local_epochs passes over each site's train split (pooled: over their union),
    # whatever the strategy
    res = results(only_run(strategy_run(name)))
    n_train = [s["n_train"] for s in res["sites"].values()]
    passes = [one_epoch(n) for n in ([sum(n_train)] if name == "pooled" else n_train)]
    want = (2 * sum(i for i, _ in passes), 2 * sum(s for _, s in passes))
    assert (res["budget"]["images_processed"], res["budget"]["optimizer_steps"]) == want, (name, res["budget"])


@pytest.mark.e2e
def test_local_matrix_is_internal_on_the_diagonal(strategy_run):
    res = results(only_run(strategy_run("local")))
    assert set(res["matrix"]) == {"local-site0", "local-site1"}
    assert res["matrix"]["local-site0"]["site0"]["internal"] is True
    assert res["matrix"]["local-site0"]["site1"]["internal"] is False
    assert res["summary"]["local-site0"]["gap"] == pytest.approx(
        res["summary"]["local-site0"]["internal_mean"] - res["summary"]["local-site0"]["external_mean"])


@pytest.mark.e2e
def test_sequential_visits_sites_in_order_and_keeps_every_stage(strategy_run):
    run = only_run(strategy_run("sequential"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [r["site"] for r in rows if "train_loss" in r]
    assert trained == ["site0", "site1", "site0", "site1"]  # 2 cycles in config order
    res = results(run)
    assert {"sequential", "sequential-stage-1", "sequential-stage-2", "sequential-stage-3"} <= set(res["matrix"])
    assert res["models"]["sequential-stage-1"]["trained_on"] == ["site0"]


@pytest.mark.e2e
def test_fedbn_server_state_has_no_batchnorm(strategy_run):
    run = only_run(strategy_run("fedbn"))
    res = results(run)
    state = torch.load(run / res["models"]["fedbn"]["checkpoint"], weights_only=True)["model"]
    net = build_model(ModelConfig(width=4), 1)
    assert state and not [k for k in state if is_batchnorm_key(k, net)]
    # both sites trained it: each scores it with its own BatchNorm, none re-estimates
    assert {s: c["batchnorm"] for s, c in res["matrix"]["fedbn"].items()} == {
        s: "the site's own BatchNorm" for s in ("site0", "site1")}


@pytest.mark.e2e
def test_pooled_trains_on_the_union(strategy_run):
    res = results(only_run(strategy_run("pooled")))
    n_train = sum(s["n_train"] for s in res["sites"].values())
    assert abs(res["budget"]["images_processed"] - 2 * n_train) <= 2
    assert res["models"]["pooled"]["trained_on"] == ["site0", "site1"]


@pytest.mark.e2e
def test_loso_holds_each_site_out(strategy_run):
    res = results(only_run(strategy_run("loso")))
    for held in ("site0", "site1", "site2"):
        row = res["matrix"][f"loso-{held}"]
        assert row[held]["internal"] is False
        assert all(row[s]["internal"] for s in row if s != held)


@pytest.mark.e2e
def test_staged_sequential_remembers_the_sites_of_its_init(tmp_path):
    """Bajwa et al.'s staged regime as two runs: stage 1 trains at site0 only, stage 2 continues
    from its checkpoint at site1. Stage 2's models count site0 as internal (it trained there),
    and its own checkpoint carries both sites on to any later stage."""
    from chestfed.server.strategies.sequential import load_init

    first = tmp_path / "stage1"
    first.mkdir()
    cfg1 = tiny_config(first, n_sites=2, strategy={"rounds": 1, "min_sites": 1,
                                                   "sequential": {"order": ["site0"]}})
    proc = simulate(cfg1, "--strategy", "sequential")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run1 = only_run(first)
    res1 = results(run1)
    assert res1["models"]["sequential"]["trained_on"] == ["site0"]
    assert res1["matrix"]["sequential"]["site1"]["internal"] is False

    second = tmp_path / "stage2"
    second.mkdir()
    init = run1 / res1["models"]["sequential"]["checkpoint"]
    cfg2 = tiny_config(second, n_sites=2, strategy={"rounds": 1, "min_sites": 1,
                                                    "sequential": {"order": ["site1"], "init": str(init)}})
    proc = simulate(cfg2, "--strategy", "sequential")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run2 = only_run(second)
    res2 = results(run2)
    rows = [json.loads(line) for line in (run2 / "metrics.jsonl").read_text().splitlines()]
    assert [r["site"] for r in rows if "train_loss" in r] == ["site1"]  # this run trained at site1 only
    assert res2["models"]["sequential"]["trained_on"] == ["site0", "site1"]
    assert res2["models"]["sequential"]["init_trained_on"] == ["site0"]
    row = res2["matrix"]["sequential"]
    assert row["site0"]["internal"] is True and row["site1"]["internal"] is True
    assert res2["summary"]["sequential"]["n_external"] == 0
    # BatchNorm statistics came from both sites it trained at, not only this run's
    assert res2["models"]["sequential"]["batchnorm"]["sites"] == ["site0", "site1"]
    # a third stage would inherit both
    _, carried = load_init(str(run2 / res2["models"]["sequential"]["checkpoint"]))
    assert carried == ["site0", "site1"]


@pytest.mark.e2e
def test_personalised_and_robust_strategies_give_their_rows(strategy_run):
    """Each ends complete with its rows; a site's egress log shows the head only in its one
    release reply, never in training (tests/test_personalised.py checks the rest in process)."""
    rows = {name: set(results(only_run(strategy_run(name)))["matrix"])
            for name in ("ditto", "fedper", "mrmtl", "krum")}
    assert rows == {"ditto": {"ditto-global", "ditto-site0", "ditto-site1"},
                    "fedper": {"fedper-site0", "fedper-site1"},
                    "mrmtl": {"mrmtl-site0", "mrmtl-site1"}, "krum": {"krum"}}
    res = results(only_run(strategy_run("ditto")))
    assert set(res["personalisation"]["ditto"]["sites"]) == {"site0", "site1"}
    head = {"head.4.weight", "head.4.bias"}
    released = 0
    for line in (only_run(strategy_run("fedper")) / "egress" / "site0.jsonl").read_text().splitlines():
        row = json.loads(line)
        keys = set((row.get("records") or {}).get("arrays", {}).get("items", {}))
        if row["type"].startswith("train"):
            assert keys and not keys & head
        elif keys:  # the one release, after the last round
            assert row["type"].startswith("query") and head <= keys
            released += 1
    assert released == 1
