"""Robust aggregation (server/strategies/fedmedian.py, fedtrimmedavg.py, krum.py): one of five
sites sends an update scaled by 100; FedAvg follows it, the robust aggregators stay near the
honest sites' mean.

Each strategy is the real tapped Flower class, driven through configure_train / aggregate_train
as the round loop drives it. The honest sites' updates are a shared direction plus site noise
(heterogeneous hospitals); the faulty site sends 100 x its own update (a corrupt export, a
software fault). Distances are relative to the size of the honest mean update.
"""
from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from chestfed.common import protocol as P
from chestfed.common.config import config_from_tree
from chestfed.common.errors import ConfigError
from chestfed.server.federation.flower_loop import FLOWER_STRATEGIES
from tap_fakes import FakeFed
from test_resume import _task_identity  # noqa: F401 (Flower's task identity, autouse)

SITES = {n: f"site{n}" for n in range(1, 6)}
FAULTY = 5
SCALE = 100.0
DIM = 2000


class _Grid:
    def get_node_ids(self):
        return list(SITES)


def _round(kind: str, **options) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(aggregate - x0, honest sites' mean update, x0) for one round of strategy `kind`."""
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=DIM).astype(np.float32)
    direction = rng.normal(scale=0.01, size=DIM)
    updates = {n: direction + rng.normal(scale=0.005, size=DIM) for n in SITES}
    updates[FAULTY] = SCALE * updates[FAULTY]
    strat = FLOWER_STRATEGIES[kind](min_train_nodes=5, min_available_nodes=5,
                                     arrayrecord_key=P.ARRAYS, configrecord_key=P.CONFIG, **options)
    strat.fed, strat.model_name = FakeFed(SITES), kind
    global_ = ArrayRecord({"w": Array(x0), "bn.num_batches_tracked": Array(np.array(7, dtype=np.int64))})
    msgs = list(strat.configure_train(1, global_, ConfigRecord(), _Grid()))
    replies = []
    for msg in msgs:
        n = msg.metadata.dst_node_id
        local = ArrayRecord({"w": Array((x0 + updates[n]).astype(np.float32)),
                             "bn.num_batches_tracked": Array(np.array(9, dtype=np.int64))})
        content = RecordDict({P.ARRAYS: local, P.METRICS: MetricRecord(
            {P.NUM_EXAMPLES: 100, "train-loss": 0.5, "images": 100, "steps": 1})})
        replies.append(Message(content=content, reply_to=msg))
    arrays, _ = strat.aggregate_train(1, replies)
    assert arrays["bn.num_batches_tracked"].numpy().dtype == np.int64  # the sites' dtype back
    assert strat.fed.record.recorded == [(1, list(SITES.values()))]  # every site recorded
    honest = np.mean([updates[n] for n in SITES if n != FAULTY], axis=0)
    return arrays["w"].numpy().astype(np.float64) - x0, honest, x0


def _distance(kind: str, **options) -> float:
    got, honest, _ = _round(kind, **options)
    return float(np.linalg.norm(got - honest) / np.linalg.norm(honest))


def test_fedavg_is_pulled_away_by_one_wild_site():
    # the mean moves by (100 - 1) / 5 of the faulty site's update: about 20 honest updates away
    assert _distance("fedavg") > 10


@pytest.mark.parametrize("kind, options, bound", [
    ("fedmedian", {}, 0.5),
    ("fedtrimmedavg", {"beta": 0.2}, 0.5),  # cuts one site from each end of every coordinate
    ("krum", {"num_malicious_nodes": 1}, 1.0),  # one honest site's own update
])
def test_robust_aggregators_stay_near_the_honest_mean(kind, options, bound):
    """Stated distances: the median and the trimmed mean are within half the honest mean
    update's length of it (site noise is half the shared direction per coordinate); Krum,
    which takes one honest site's update whole, within one length."""
    d = _distance(kind, **options)
    assert d < bound, (kind, d)
    assert d < _distance("fedavg") / 10


def test_robust_strategies_take_their_parameters_from_the_config():
    sites = [{"name": f"s{i}", "kind": "phantom"} for i in range(5)]
    cfg = config_from_tree({"sites": sites, "strategy": {"name": "krum", "krum_byzantine": 1,
                                                          "trim_beta": 0.3}}, "test")
    assert FLOWER_STRATEGIES["krum"].options(cfg.strategy) == {"num_malicious_nodes": 1}
    assert FLOWER_STRATEGIES["fedtrimmedavg"].options(cfg.strategy) == {"beta": 0.3}
    with pytest.raises(ConfigError, match="krum_byzantine: 2 needs more than 6 sites"):
        config_from_tree({"sites": sites, "strategy": {"name": "krum", "krum_byzantine": 2}}, "test")
    with pytest.raises(ConfigError, match="secagg"):  # each update in the clear: no SecAgg+
        config_from_tree({"sites": sites, "strategy": {"name": "fedmedian"},
                          "privacy": {"secagg": True}}, "test")
