"""Personalised FL (server/strategies/finetune.py, ditto.py, fedper.py, fedrep.py; the site's
half in sites/personal.py): what each method's limits must give, and that a site's personal
part never leaves it in a training reply.

In process, through the real ClientApp handlers (tests/test_resume.py's Grid): each case is a
few seconds on 2 tiny phantom sites. Resume after round k for each method is in
tests/test_resume.py (CASES); through the launcher and Ray in tests/test_strategies.py.
"""
from __future__ import annotations

import json

import pytest
import torch

from chestfed.common.models import build_model, head_keys
from test_resume import _cfg, _task_identity, _train  # noqa: F401 (the fixture is autouse)


def _by_name(models):
    return {m.name: m.arrays.to_torch_state_dict() for m in models}


def _distance(a: dict, b: dict) -> float:
    """Euclidean distance over the weights (not BatchNorm's running statistics, which follow
    each site's data whatever the penalty: they are buffers, not parameters)."""
    keys = [k for k in a if a[k].is_floating_point() and not k.endswith(("running_mean", "running_var"))]
    return float(torch.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in keys)))


def test_ditto_lambda_zero_is_local_training(tmp_path):
    ditto, _ = _train(_cfg(tmp_path / "d", "ditto", rounds=2, ditto_lambda=0.0))
    local, _ = _train(_cfg(tmp_path / "l", "local", rounds=2))
    d, l_ = _by_name(ditto), _by_name(local)
    for site in ("site0", "site1"):
        mine, theirs = d[f"ditto-{site}"], l_[f"local-{site}"]
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), site


def test_mrmtl_lambda_zero_is_local_training_and_its_models_carry_on(tmp_path):
    """MR-MTL never replaces a site's model with the mean: with lambda 0 nothing pulls it there,
    so each site's model is local-<site>'s, bit for bit. (With one site and lambda > 0 it is
    local training plus a proximal term to each round's start, so not local: the mean of one
    model is that model as the round began.)"""
    mr, _ = _train(_cfg(tmp_path / "m", "mrmtl", rounds=2, mrmtl_lambda=0.0))
    local, _ = _train(_cfg(tmp_path / "l", "local", rounds=2))
    m, l_ = _by_name(mr), _by_name(local)
    assert set(m) == {"mrmtl-site0", "mrmtl-site1"}
    for site in ("site0", "site1"):
        assert all(torch.equal(m[f"mrmtl-{site}"][k], l_[f"local-{site}"][k]) for k in l_[f"local-{site}"])
    pulled, _ = _train(_cfg(tmp_path / "p", "mrmtl", rounds=2, mrmtl_lambda=1e4))
    p = _by_name(pulled)  # a large lambda brings the sites' models together
    assert _distance(p["mrmtl-site0"], p["mrmtl-site1"]) < _distance(m["mrmtl-site0"], m["mrmtl-site1"]) / 2


def test_apfl_global_model_is_fedavg_and_alpha_zero_is_the_global_model(tmp_path):
    """Deng et al.'s v_bar = alpha v + (1 - alpha) w: the global model w is trained exactly as
    FedAvg's (same bits); with alpha fixed at 0 each site's personal model has the global
    model's weights (its BatchNorm statistics are the site's own: buffers, not weights)."""
    fixed, _ = _train(_cfg(tmp_path / "p", "apfl", rounds=2, apfl_alpha=0.0, apfl_learn_alpha=False))
    fedavg, _ = _train(_cfg(tmp_path / "a", "fedavg", rounds=2))
    p, a = _by_name(fixed), _by_name(fedavg)["fedavg"]
    assert all(torch.equal(p["apfl-global"][k], a[k]) for k in a)
    for site in ("site0", "site1"):
        assert _distance(p[f"apfl-{site}"], a) == 0.0, site


def test_apfl_learns_each_sites_alpha_and_mixes(tmp_path):
    from chestfed.sites.personal import ALPHA_KEY

    models, fed = _train(_cfg(tmp_path, "apfl", rounds=2, apfl_alpha=0.5))
    m = _by_name(models)
    assert _distance(m["apfl-site0"], m["apfl-global"]) > 0
    assert _distance(m["apfl-site0"], m["apfl-site1"]) > 0
    alphas = []
    for site in ("site0", "site1"):
        (f,) = [p for p in (fed.run.path / "site-state" / site).glob("personal-*-r2.pt")]
        alphas.append(float(torch.load(f, weights_only=True)[ALPHA_KEY]))
    assert all(0 <= x <= 1 for x in alphas) and alphas != [0.5, 0.5], alphas  # learned, projected


def test_ditto_with_a_very_large_lambda_keeps_the_personal_model_at_the_global_one(tmp_path):
    """lambda 1e4: each personal step is pulled back to the round's received global model, so
    after round 2 the personal model sits at the global model it received in round 2 (FedAvg's
    after one round: the same seeds give the same bits). The sites train with Adam, whose step
    is about lr per weight whatever the gradient's size, so "at" means within Adam's step:
    1.5 x lr x sqrt(number of weights); the local model of the same budget is several times
    farther."""
    cfg = _cfg(tmp_path / "d", "ditto", rounds=2, ditto_lambda=1e4)
    models, fed = _train(cfg)
    received, _ = _train(_cfg(tmp_path / "a", "fedavg", rounds=1))
    local, _ = _train(_cfg(tmp_path / "l", "local", rounds=2))
    d, l_, g = _by_name(models), _by_name(local), _by_name(received)["fedavg"]
    n_weights = sum(p.numel() for p in build_model(fed.models.cfg, fed.models.n_outputs).parameters())
    step = cfg.train.lr * n_weights ** 0.5
    for site in ("site0", "site1"):
        near, far = _distance(d[f"ditto-{site}"], g), _distance(l_[f"local-{site}"], g)
        assert near < 1.5 * step and near < far / 3, (site, near, step, far)


def test_finetune_with_zero_epochs_is_fedavg(tmp_path):
    tuned, _ = _train(_cfg(tmp_path / "f", "finetune", rounds=2, finetune_epochs=0))
    fedavg, _ = _train(_cfg(tmp_path / "a", "fedavg", rounds=2))
    t, a = _by_name(tuned), _by_name(fedavg)
    assert set(t) == {"finetune-global", "finetune-site0", "finetune-site1"}
    for name in t:
        assert all(torch.equal(t[name][k], a["fedavg"][k]) for k in a["fedavg"]), name


def test_finetune_trains_each_site_after_the_rounds(tmp_path):
    tuned, fed = _train(_cfg(tmp_path / "f", "finetune", rounds=2, finetune_epochs=1))
    t = _by_name(tuned)
    assert _distance(t["finetune-site0"], t["finetune-global"]) > 0
    assert _distance(t["finetune-site0"], t["finetune-site1"]) > 0
    assert {m.name: m.trained_on for m in tuned}["finetune-site1"] == ["site1"]
    rows = [json.loads(x) for x in (fed.run.path / "metrics.jsonl").read_text().splitlines()]
    assert {r["site"] for r in rows if r["round"] == 3 and "train_loss" in r} == {"site0", "site1"}


def _train_replies(run):
    """Every training reply's arrays as the coordinator received them (wire.jsonl) and as each
    site sent them (egress/<site>.jsonl): {source: [set of array keys, ...]}."""
    out = {}
    sources = {"wire": run / "wire.jsonl", **{p.stem: p for p in (run / "egress").glob("*.jsonl")
                                              if not p.stem.startswith("partition-")}}  # (HELLO)
    for name, path in sources.items():
        keys = []
        for line in path.read_text().splitlines():
            row = json.loads(line)
            mine = row["dir"] == ("in" if name == "wire" else "out")
            if mine and row["type"].startswith("train") and "records" in row:
                keys.append(set(row["records"].get("arrays", {}).get("items", {})))
        out[name] = keys
    return out


@pytest.mark.parametrize("name", ["fedper", "fedrep", "fenda"])
def test_heads_differ_between_sites_and_never_leave_in_a_training_reply(tmp_path, name):
    models, fed = _train(_cfg(tmp_path, name, rounds=2), audit=True)
    m = _by_name(models)
    assert set(m) == {f"{name}-site0", f"{name}-site1"}  # no global model: it has no head
    net = build_model(fed.models.cfg, fed.models.n_outputs)
    head = head_keys(net)
    a, b = m[f"{name}-site0"], m[f"{name}-site1"]
    assert all(not torch.equal(a[k], b[k]) for k in head if a[k].is_floating_point())  # own heads
    body = [k for k in a if k not in head and a[k].is_floating_point()]
    assert all(torch.equal(a[k], b[k]) for k in body)  # one shared body
    replies = _train_replies(fed.run.path)
    assert set(replies) == {"wire", "site0", "site1"}
    for source, keysets in replies.items():
        assert len(keysets) == (4 if source == "wire" else 2), source  # 2 rounds x sites
        for keys in keysets:
            assert keys and not keys & head, (source, sorted(keys & head))


def test_fenda_shares_only_its_global_extractor(tmp_path):
    """FENDA-FL: two extractors and a classifier over both; every training reply holds exactly
    the global extractor, and the model a site is scored with is the whole network."""
    from chestfed.common.models import Fenda

    models, fed = _train(_cfg(tmp_path, "fenda", rounds=2), audit=True)
    assert fed.models.cfg.structure == "fenda"
    net = build_model(fed.models.cfg, fed.models.n_outputs)
    assert isinstance(net, Fenda)
    shared = {k for k in net.state_dict() if k.startswith("shared.")}
    assert shared and head_keys(net) == set(net.state_dict()) - shared
    for source, keysets in _train_replies(fed.run.path).items():
        assert keysets and all(keys == shared for keys in keysets), source
    for m in models:
        assert set(m.arrays.keys()) == set(net.state_dict()), m.name


def test_fenda_refuses_what_its_network_cannot_take():
    from chestfed.common.config import config_from_tree

    base = {"experiment": "t", "sites": [{"name": "a", "kind": "phantom"}]}
    with pytest.raises(Exception, match="fenda does not support model.meta"):
        config_from_tree({**base, "strategy": {"name": "fenda"}, "model": {"meta": ["age"]}}, "t")
    # another strategy builds the single network, whatever a dumped config says
    cfg = config_from_tree({**base, "strategy": {"name": "fedavg"}, "model": {"structure": "fenda"}}, "t")
    assert cfg.model.structure == "single"


def test_ditto_sends_only_the_global_model(tmp_path):
    models, fed = _train(_cfg(tmp_path, "ditto", rounds=2), audit=True)
    full = set(build_model(fed.models.cfg, fed.models.n_outputs).state_dict())
    for source, keysets in _train_replies(fed.run.path).items():
        assert keysets and all(keys == full for keys in keysets), source  # one model's worth
    # the personal models differ from the global one and from each other
    m = _by_name(models)
    assert _distance(m["ditto-site0"], m["ditto-global"]) > 0
    assert _distance(m["ditto-site0"], m["ditto-site1"]) > 0
    # and the budget counts both trainings: twice FedAvg's
    fedavg, ref = _train(_cfg(tmp_path / "avg", "fedavg", rounds=2))
    assert fed.record.images_processed == 2 * ref.record.images_processed


def test_personalisation_gain_and_external_penalty_from_the_matrix():
    from chestfed.server.evaluation.personalisation import personalisation
    from chestfed.server.report.document import Doc
    from chestfed.server.report.personalisation import personalisation_section

    def cell(v):
        return {"metrics": {"macro_auroc": v}}

    matrix = {"ditto-global": {"a": cell(0.70), "b": cell(0.80)},
              "ditto-a": {"a": cell(0.78), "b": cell(0.60)},
              "ditto-b": {"a": cell(0.65), "b": cell(0.85)},
              "fedper-a": {"a": cell(0.75), "b": cell(0.55)}}
    models = {"ditto-global": {}, "ditto-a": {"personal": "ditto"}, "ditto-b": {"personal": "ditto"},
              "fedper-a": {"personal": "fedper"}}
    pairs = {"a": {"ditto-global|ditto-a": {"labels": {"Abnormal": {"delong_p": 0.01}}}}}
    got = personalisation(models, matrix, pairs, ["a", "b"])
    a, b = got["ditto"]["sites"]["a"], got["ditto"]["sites"]["b"]
    assert (a["gain"], a["penalty"]) == pytest.approx((0.08, 0.18))
    assert (b["gain"], b["penalty"]) == pytest.approx((0.05, 0.20))
    assert a["delong_p"] == {"Abnormal": 0.01} and b["delong_p"] == {}
    assert got["ditto"]["mean_gain"] == pytest.approx(0.065)
    fp = got["fedper"]
    assert fp["global_model"] is None and fp["sites"]["a"]["penalty"] == pytest.approx(0.20)
    assert set(fp["sites"]) == {"a"}  # fedper-b was not in the matrix (its site failed)
    doc = Doc("t")
    personalisation_section(doc, {"personalisation": got})
    text = doc.to_markdown()
    assert "+0.080" in text and "no global model" in text



def test_record_level_dp_trains_fedper_and_its_heads_stay(tmp_path):
    """fedper (and finetune, FedAvg's DP path plus one more round) train every step through
    DP-SGD (Opacus), so record-level DP applies: the run accounts epsilon per site, and FedPer's
    heads still never leave (the model is GroupNorm's under DP). ditto, fedrep, mrmtl and apfl
    refuse it at config time."""
    name = "fedper"
    from chestfed.common.config import config_from_tree
    from chestfed.common.errors import ConfigError

    cfg = _cfg(tmp_path, name, rounds=1)
    tree = cfg.model_dump(mode="json")
    tree["privacy"] = {"dp": {"level": "record", "noise_multiplier": 1.0}}
    tree["model"].pop("norm", None)  # DP sets GroupNorm itself
    cfg = config_from_tree(tree, "test")
    models, fed = _train(cfg, audit=True)
    assert fed.record.privacy.summary()["dp"]["sites"]["site0"]["epsilon"] > 0
    head = head_keys(build_model(fed.models.cfg, fed.models.n_outputs))
    replies = _train_replies(fed.run.path)
    assert replies["wire"] and all(keys and not keys & head for ks in replies.values() for keys in ks)
    for refused in ("ditto", "fedrep", "mrmtl", "apfl"):
        with pytest.raises(ConfigError, match=f"does not go with {refused}"):
            config_from_tree({**tree, "strategy": {**tree["strategy"], "name": refused}}, "test")
