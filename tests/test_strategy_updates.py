"""The server step of FedAdam / FedYogi, against a hand-written form of the published update.

Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR), Algorithm 2, per round t:
    Delta_t = mean of the client deltas x_i - x_t
    m_t     = beta1 m_{t-1} + (1 - beta1) Delta_t
    v_t     = beta2 v_{t-1} + (1 - beta2) Delta_t^2                       (FedAdam)
    v_t     = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2)   (FedYogi)
    x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)
with m_{-1} = 0 and v_{-1} >= tau^2.

Flower 1.41 (flwr/serverapp/strategy/fedadam.py, fedyogi.py, fedopt.py), which ChestFed uses as
it is, departs from that in three documented ways, and the reference below follows Flower there:
  - Delta_t is the mean weighted by each site's `num-examples` (FedAvg's weighting), not the
    plain mean over clients;
  - v starts at 0, not at tau^2;
  - FedAdam scales eta by Adam's bias correction sqrt(1 - beta2^(t+1)) / (1 - beta1^(t+1)), with
    t = the server round (Kingma & Ba's alpha_t, one step later); FedYogi does not.
The test drives the real strategy classes of server/strategies/fedadam.py and fedyogi.py (Flower's
class with ChestFed's tap, tap.py) through configure_train / aggregate_train for three rounds of
two sites. ChestFed's own change is checked with it: a BatchNorm statistic gets the plain weighted
average (FedAvg) instead of the server step.
"""
from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from chestfed.common import protocol as P
from tap_fakes import FakeFed
from chestfed.server.federation.flower_loop import FLOWER_STRATEGIES

SITES = {1: "site_a", 2: "site_b"}
N_EXAMPLES = {1: 30, 2: 10}  # unequal: the weighted and the plain mean differ
ROUNDS = 3
# A BatchNorm statistic: ChestFed's tap gives it the plain weighted average, not the server step
BUFFER = "bn.running_var"


class _Grid:
    def get_node_ids(self):
        return list(SITES)


@pytest.fixture(autouse=True)
def _task_identity():
    # Flower stamps messages with the running task's identity; outside a run, lend one.
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = None


def _site_deltas(seed: int = 0) -> dict[int, list[dict[str, np.ndarray]]]:
    """Each site's local update per round. Magnitudes from 1e-4 to 1e-1, so tau (1e-3) matters
    for some coordinates and not for others, and the round-3 updates are mostly much smaller than
    round 2's: Yogi's sign(v - Delta^2) then takes both values (checked in the test)."""
    rng = np.random.default_rng(seed)
    out: dict[int, list[dict[str, np.ndarray]]] = {n: [] for n in SITES}
    for t in range(ROUNDS):
        shrink = 0.02 if t == 2 else 1.0
        for n in SITES:
            out[n].append({
                k: (rng.choice([-1.0, 1.0], shape) * 10 ** rng.uniform(-4, -1, shape) * shrink
                    ).astype(np.float32)
                for k, shape in (("conv.weight", (4, 3)), ("head.bias", (5,)), (BUFFER, (3,)))})
    return out


def _reference(kind: str, x0: dict[str, np.ndarray], deltas, eta, beta1, beta2, tau,
               weighted=True, v0=0.0, bias_correction=None):
    """Algorithm 2 of Reddi et al. 2021 by hand, in float64; x is kept in the sites' float32
    between rounds, as ChestFed's tap casts the server's result back (server/federation/tap.py
    `cast_like`). Defaults: Flower's variant (see the module docstring)."""
    if bias_correction is None:
        bias_correction = kind == "fedadam"
    x = {k: v.copy() for k, v in x0.items()}
    m = {k: np.zeros(v.shape) for k, v in x0.items()}
    v = {k: np.full(x0[k].shape, v0) for k in x0}
    signs = []
    w = np.array([N_EXAMPLES[n] if weighted else 1.0 for n in SITES], dtype=np.float64)
    w /= w.sum()
    for t in range(1, ROUNDS + 1):
        lr = eta * np.sqrt(1 - beta2 ** (t + 1)) / (1 - beta1 ** (t + 1)) if bias_correction else eta
        new = {}
        for k in x:
            d = sum(wi * deltas[n][t - 1][k].astype(np.float64) for wi, n in zip(w, SITES))
            if k == BUFFER:
                new[k] = (x[k] + d).astype(np.float32)
                continue
            m[k] = beta1 * m[k] + (1 - beta1) * d
            if kind == "fedadam":
                v[k] = beta2 * v[k] + (1 - beta2) * d**2
            else:
                s = np.sign(v[k] - d**2)
                signs.append(s)
                v[k] = v[k] - (1 - beta2) * d**2 * s
            new[k] = (x[k] + lr * m[k] / (np.sqrt(v[k]) + tau)).astype(np.float32)
        x = new
    return x, np.concatenate([s.ravel() for s in signs]) if signs else None


def _run_strategy(kind: str, x0: dict[str, np.ndarray], deltas, eta: float, **hyper):
    """Three rounds of the real (tapped) strategy, each site answering x_t + its delta."""
    strat = FLOWER_STRATEGIES[kind](min_train_nodes=2, min_available_nodes=2, eta=eta,
                                     arrayrecord_key=P.ARRAYS, configrecord_key=P.CONFIG, **hyper)
    strat.fed, strat.model_name, strat.buffer_keys = FakeFed(SITES), kind, frozenset({BUFFER})
    arrays = ArrayRecord({k: Array(v) for k, v in x0.items()})
    for rnd in range(1, ROUNDS + 1):
        msgs = list(strat.configure_train(rnd, arrays, ConfigRecord(), _Grid()))
        assert sorted(m.metadata.dst_node_id for m in msgs) == list(SITES)
        sent = {k: a.numpy() for k, a in arrays.items()}
        replies = []
        for msg in reversed(msgs):  # out of site order: the tap sorts them (recorded below)
            n = msg.metadata.dst_node_id
            local = ArrayRecord({k: Array((sent[k] + deltas[n][rnd - 1][k]).astype(np.float32)) for k in sent})
            content = RecordDict({P.ARRAYS: local, P.METRICS: MetricRecord(
                {P.NUM_EXAMPLES: N_EXAMPLES[n], "train-loss": 0.5, "images": N_EXAMPLES[n], "steps": 1})})
            replies.append(Message(content=content, reply_to=msg))
        arrays, _ = strat.aggregate_train(rnd, replies)
    assert strat.fed.record.recorded == [(r, ["site_a", "site_b"]) for r in range(1, ROUNDS + 1)]
    assert strat.fed.record.dropouts == []
    return strat, {k: a.numpy() for k, a in arrays.items()}


def _close(a: dict[str, np.ndarray], b: dict[str, np.ndarray], rtol=1e-5, atol=1e-6) -> bool:
    return a.keys() == b.keys() and all(np.allclose(a[k], b[k], rtol=rtol, atol=atol) for k in a)


SHORT_MEMORY = {"beta_1": 0.5, "beta_2": 0.5, "tau": 1e-2}


@pytest.mark.parametrize("hyper", [{}, SHORT_MEMORY], ids=["flower-defaults", "short-memory"])
@pytest.mark.parametrize("kind", ["fedadam", "fedyogi"])
def test_server_step_follows_the_published_update(kind, hyper):
    rng = np.random.default_rng(1)
    x0 = {"conv.weight": rng.normal(size=(4, 3)).astype(np.float32),
          "head.bias": rng.normal(size=5).astype(np.float32),
          BUFFER: (1 + rng.random(3)).astype(np.float32)}
    deltas = _site_deltas()
    eta = 0.05
    strat, got = _run_strategy(kind, x0, deltas, eta, **hyper)
    b1, b2, tau = strat.beta_1, strat.beta_2, strat.tau
    if not hyper:
        assert (b1, b2, tau) == (0.9, 0.99, 1e-3)  # Flower's defaults, which ChestFed keeps
    want, signs = _reference(kind, x0, deltas, eta, b1, b2, tau)
    assert all(v.dtype == np.float32 for v in got.values())  # cast back to the sites' dtype
    assert _close(got, want), {k: np.abs(got[k] - want[k]).max() for k in got}
    moved = max(np.abs(got[k] - x0[k]).max() for k in got)
    assert moved > eta  # a real step, not a no-op that the tolerance would hide

    # The toy tells the variants apart: each one misses Flower's result by over 10x the tolerance
    # above, so that comparison would catch a change to any of them.
    def far(other):
        return not _close(got, other, rtol=1e-4, atol=1e-5)

    fedavg = {k: x0[k] + sum(N_EXAMPLES[n] * sum(d[k] for d in deltas[n]) for n in SITES) / 40
              for k in x0}
    assert far(fedavg)
    assert np.allclose(got[BUFFER], fedavg[BUFFER], rtol=1e-5, atol=1e-6)  # the tap's plain average
    for variant in (dict(weighted=False), dict(v0=tau**2), dict(bias_correction=kind != "fedadam")):
        assert far(_reference(kind, x0, deltas, eta, b1, b2, tau, **variant)[0]), variant
    assert far(_reference(kind, x0, deltas, 1.1 * eta, b1, b2, tau)[0])
    if hyper:  # with beta2 = 0.99, three rounds are too few for Adam's and Yogi's v to part much
        other_kind = "fedyogi" if kind == "fedadam" else "fedadam"
        assert far(_reference(other_kind, x0, deltas, eta, b1, b2, tau, bias_correction=kind == "fedadam")[0])
    if kind == "fedyogi":
        # both branches of Yogi's sign were taken (v grows on a large update, shrinks on a small one)
        assert (signs > 0).any() and (signs < 0).any()


def test_run_flower_hands_server_lr_and_proximal_mu_to_flower(monkeypatch):
    """strategy.server_lr becomes Flower's eta; strategy.proximal_mu becomes FedProx's mu."""
    from types import SimpleNamespace

    from flwr.serverapp.strategy import Strategy

    from chestfed.common.config import config_from_tree
    from chestfed.common.models import build_model
    from chestfed.server.federation import flower_loop as flower
    from chestfed.server.federation.validation import ValidationSchedule

    started = []

    def fake_start(self, grid, initial_arrays, num_rounds, **kw):
        started.append(self)
        return SimpleNamespace(arrays=initial_arrays)

    monkeypatch.setattr(Strategy, "start", fake_start)
    for name in ("fedadam", "fedyogi", "fedprox"):
        cfg = config_from_tree({
            "experiment": "t", "sites": [{"name": s, "kind": "phantom"} for s in SITES.values()],
            "model": {"width": 4}, "wandb": {"enabled": False},
            "strategy": {"name": name, "rounds": 2, "server_lr": 0.0375, "proximal_mu": 0.25}}, "test")
        net = build_model(cfg.model, 1)
        fed = SimpleNamespace(
            strategy=cfg.strategy, train=cfg.train, privacy=cfg.privacy,
            validation=ValidationSchedule(cfg.train, cfg.eval),
            sites=SimpleNamespace(grid=_Grid(), node_of={s: n for n, s in SITES.items()},
                                  training_sites=lambda: list(SITES.values()),
                                  config_record=lambda **kw: ConfigRecord(kw)),
            resume=SimpleNamespace(finished_model=lambda name: None, resume=lambda unit: None),  # not a resume
            models=SimpleNamespace(initial_arrays=lambda local_bn=False: ArrayRecord(net.state_dict()),
                                   batchnorm_keys=lambda: frozenset()))
        flower.run_flower(fed)
        strat = started[-1]
        assert isinstance(strat, FLOWER_STRATEGIES[name])
        if name == "fedprox":
            assert strat.proximal_mu == 0.25
        else:
            assert strat.eta == 0.0375
