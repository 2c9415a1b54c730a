"""sites/app.py's train handler: what it hands to common.training.train_epochs.

test_training.py shows that the proximal term and the class weights change what is trained;
here, that the site actually passes them: FedProx's mu from the message Flower's FedProx sends,
the global weights it received, and train.pos_weight's weights from its own train split. The
handler runs in process on a tiny phantom site (no Ray), with train_epochs wrapped to record its
arguments (and, where said, still run).
"""
from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from chestfed.common import protocol as P
from chestfed.common.config import config_from_tree
from chestfed.common.models import build_model
from chestfed.common.training import TrainStats, inverse_prevalence
from chestfed.server.strategies.fedavg import FedAvg
from e2e import TINY_TRAIN
from chestfed.server.strategies.fedprox import FedProx
from chestfed.sites import app as site_app
from chestfed.sites.data import load_site

LABELS = ["Cardiomegaly", "Effusion", "Nodule"]


@pytest.fixture(autouse=True)
def _task_identity():
    # Flower stamps messages with the running task's identity; outside a run, lend one.
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = None


def _cfg(tmp_path, pos_weight="none"):
    return config_from_tree({
        "experiment": "st", "seed": 0, "output_dir": str(tmp_path / "runs"),
        "data": {"image_size": 16, "cache_dir": str(tmp_path / "cache"), "workers": 1},
        "sites": [{"name": "s0", "kind": "phantom", "options": {"preset": "a", "population": {"size": 60}}}],
        "task": {"type": "multilabel", "labels": LABELS},
        "model": {"width": 4}, "train": {**TINY_TRAIN, "pos_weight": pos_weight},
        "strategy": {"rounds": 1, "min_sites": 1}, "wandb": {"enabled": False}}, "test")


class _Grid:
    def get_node_ids(self):
        return [1]


def _train_message(cfg, strategy, state):
    """The message a tapped Flower strategy sends the site for round 1."""
    strat = strategy[0](min_train_nodes=1, min_available_nodes=1, arrayrecord_key=P.ARRAYS,
                        configrecord_key=P.CONFIG, **strategy[1])
    conf = ConfigRecord({P.EXPERIMENT: cfg.to_yaml(), P.LOCAL_EPOCHS: 2})
    (msg,) = strat.configure_train(1, ArrayRecord(state), conf, _Grid())
    return msg


def _context():
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 1},
                   state=RecordDict(), run_config={})


class _Recorder:
    """Stands in for sites.app.train_epochs: records each call's arguments (the weights as the
    model held them when called) and, with `run` set, still trains."""

    def __init__(self, real):
        self.real, self.run, self.calls = real, False, []

    def __call__(self, model, images, y, cfg, epochs, seed, device, in_channels=1, proximal_mu=0.0,
                 global_params=None, pos_weight=None, lr=None):
        self.calls.append(dict(model_state={k: v.clone() for k, v in model.state_dict().items()},
                               names=[n for n, _ in model.named_parameters()], y=y, epochs=epochs,
                               proximal_mu=proximal_mu, global_params=global_params,
                               pos_weight=pos_weight, lr=lr))
        if self.run:
            return self.real(model, images, y, cfg, epochs, seed, device, in_channels, proximal_mu,
                             global_params, pos_weight, lr=lr)
        return TrainStats(loss=0.5, images=len(images), steps=1)


@pytest.fixture
def recorded(monkeypatch):
    rec = _Recorder(site_app.train_epochs)
    monkeypatch.setattr(site_app, "train_epochs", rec)
    return rec


def test_fedprox_mu_and_the_global_weights_reach_the_site_s_training(tmp_path, recorded):
    cfg = _cfg(tmp_path)
    torch.manual_seed(0)
    state = build_model(cfg.model, len(LABELS)).state_dict()
    msg = _train_message(cfg, (FedProx, {"proximal_mu": 0.3}), state)
    assert msg.content[P.CONFIG][P.PROX_MU] == 0.3  # Flower's FedProx writes the key sites read
    recorded.run = True  # train for real: the reply must carry moved weights
    reply = site_app.train(msg, _context())
    (call,) = recorded.calls
    assert call["proximal_mu"] == 0.3 and call["epochs"] == 2
    # the anchor of the proximal term is the model the server sent, parameter by parameter
    assert len(call["global_params"]) == len(call["names"])
    for name, g in zip(call["names"], call["global_params"]):
        assert torch.equal(g, state[name]), name
    assert all(torch.equal(call["model_state"][k], v) for k, v in state.items())  # trains from it
    back = reply.content[P.ARRAYS].to_torch_state_dict()
    assert not torch.equal(back["head.4.weight"], state["head.4.weight"])
    assert call["pos_weight"] is None  # train.pos_weight: none


def test_without_fedprox_the_site_adds_no_proximal_term(tmp_path, recorded):
    cfg = _cfg(tmp_path)
    state = build_model(cfg.model, len(LABELS)).state_dict()
    msg = _train_message(cfg, (FedAvg, {}), state)
    assert P.PROX_MU not in msg.content[P.CONFIG]
    site_app.train(msg, _context())
    (call,) = recorded.calls
    assert call["proximal_mu"] == 0.0 and call["global_params"] is None


def test_site_weights_classes_by_its_own_train_split(tmp_path, recorded):
    cfg = _cfg(tmp_path, pos_weight="inverse_prevalence")
    state = build_model(cfg.model, len(LABELS)).state_dict()
    site_app.train(_train_message(cfg, (FedAvg, {}), state), _context())
    (call,) = recorded.calls
    train_y = load_site(cfg, cfg.sites[0], progress=False).splits["train"].y
    assert torch.equal(call["y"], train_y)
    want = inverse_prevalence(train_y.numpy())
    assert call["pos_weight"] is not None and torch.equal(call["pos_weight"], want)
    # the phantom's findings are rare here: one weight per label, > 1, not all the same
    assert want.shape == (len(LABELS),) and bool((want > 1).all()) and len(set(want.tolist())) > 1, want


def test_the_round_s_scheduled_learning_rate_reaches_training(tmp_path, recorded):
    from chestfed.common.training import round_lr

    cfg = _cfg(tmp_path).model_copy(deep=True)
    cfg.train.lr_schedule, cfg.strategy.rounds = "cosine", 4
    state = build_model(cfg.model, len(LABELS)).state_dict()
    strat = FedAvg(min_train_nodes=1, min_available_nodes=1, arrayrecord_key=P.ARRAYS,
                   configrecord_key=P.CONFIG)
    for rnd in (1, 3):
        conf = ConfigRecord({P.EXPERIMENT: cfg.to_yaml(), P.LOCAL_EPOCHS: 1})
        (msg,) = strat.configure_train(rnd, ArrayRecord(state), conf, _Grid())
        site_app.train(msg, _context())
    assert [c["lr"] for c in recorded.calls] == [cfg.train.lr, round_lr(cfg.train, 3, 4)]
    assert recorded.calls[1]["lr"] == pytest.approx(cfg.train.lr / 2)  # (1 + cos(pi/2)) / 2
