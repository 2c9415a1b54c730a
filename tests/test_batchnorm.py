"""PreciseBN: the models the project saves and scores carry BatchNorm statistics of their final
weights, estimated on their own training sites' train splits (common/batchnorm.py,
server/evaluation/batchnorm.py, the site's `batchnorm` evaluation mode in sites/app.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from chestfed.common import batchnorm
from chestfed.common.models import build_model
from chestfed.common.training import predict
from tests.test_evaluator import HandlerGrid, _federation, evaluate_all, flower_identity, tiny_cfg  # noqa: F401


def test_combine_is_the_statistics_of_the_union():
    rng = np.random.default_rng(0)
    a = rng.normal(1.0, 2.0, (300, 3))
    b = rng.normal(-2.0, 0.5, (100, 3))
    part = lambda x: (len(x), {"bn.running_mean": torch.tensor(x.mean(0)),  # noqa: E731
                               "bn.running_var": torch.tensor(x.var(0))})
    got = batchnorm.combine([part(a), part(b)])
    union = np.concatenate([a, b])
    assert got["bn.running_mean"].numpy() == pytest.approx(union.mean(0))
    # the between-site term matters here: the mean of the two variances is far off
    assert got["bn.running_var"].numpy() == pytest.approx(union.var(0))
    assert not np.allclose((a.var(0) * 3 + b.var(0)) / 4, union.var(0), rtol=0.1)
    with pytest.raises(ValueError):
        batchnorm.combine([(0, part(a)[1])])


def test_reestimate_gives_the_batch_statistics_of_the_data():
    net = nn.Sequential(nn.BatchNorm2d(1))
    images = torch.randint(0, 255, (64, 8, 8), dtype=torch.uint8)
    used = batchnorm.reestimate(net, images, torch.device("cpu"), batch_size=64)
    x = images.float().div(127.5).sub(1.0)
    assert used == 64
    assert float(net[0].running_mean) == pytest.approx(float(x.mean()), abs=1e-5)
    assert float(net[0].running_var) == pytest.approx(float(x.var()), rel=1e-4)  # unbiased, one batch
    assert not net.training
    # a lone last image is left out (no batch statistics from one image)
    assert batchnorm.reestimate(net, images[:33], torch.device("cpu"), batch_size=32) == 32


def _stats_of(cfg, arrays, site):
    """What re-estimation on `site`'s train split gives, computed here directly."""
    from chestfed.sites.data import load_site

    net = build_model(cfg.model, 1)
    net.load_state_dict(arrays.to_torch_state_dict())
    train = load_site(cfg, cfg.site(site), progress=False).splits["train"]
    used = batchnorm.reestimate(net, train.images, torch.device("cpu"), 1, cfg.train.batch_size)
    return used, batchnorm.running_stats(net)


def test_scored_and_saved_models_carry_reestimated_statistics(tmp_path, flower_identity):  # noqa: F811
    from chestfed.server.evaluation.batchnorm import reestimate_all
    from chestfed.server.federation.trained import Trained
    from chestfed.server.evaluation.evaluator import settings_of
    from chestfed.sites.data import load_site

    cfg = tiny_cfg(tmp_path)
    run = _federation(tmp_path, cfg, HandlerGrid(3))
    init = run.models.initial_arrays()
    w0, steps = init, 0
    for rnd in range(1, 6):  # about 25 optimiser steps, as in a first short run
        w0 = run.train_at(rnd, "local-s0", {"s0": (w0, 1)})["s0"]
    steps = run.record.optimizer_steps
    assert 20 <= steps <= 40
    both = run.train_at(6, "fedavg", {"s0": (init, 2), "s1": (init, 2)})
    fed = both["s0"]  # stands in for an aggregate: any weights trained at s0 and s1
    running = {k: v.clone() for k, v in batchnorm.running_stats(_net(cfg, w0)).items()}
    models = [Trained("local-s0", w0, ["s0"]), Trained("fed", fed, ["s0", "s1"])]
    reestimate_all(run.sites, models, "precise", run.models.probe(), settings_of(cfg.eval, cfg.seed))

    # local-s0: exactly its own site's statistics under its final weights ...
    n0, want = _stats_of(cfg, w0, "s0")
    got = batchnorm.running_stats(_net(cfg, models[0].arrays))
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6), k
    # ... which are not the running averages they replaced
    assert max(float((got[k] - running[k]).abs().max()) for k in got) > 1e-3
    assert models[0].meta["batchnorm"] == {"mode": "precise", "sites": ["s0"], "images": n0}
    # the non-BatchNorm weights are untouched
    before, after = w0.to_torch_state_dict(), models[0].arrays.to_torch_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.endswith(("running_mean", "running_var")))

    # a two-site model: both sites' statistics pooled by image count (never the healthy site's)
    parts = [_stats_of(cfg, fed, s) for s in ("s0", "s1")]
    want = batchnorm.combine(parts)
    got = batchnorm.running_stats(_net(cfg, models[1].arrays))
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-5), k
    assert models[1].meta["batchnorm"]["sites"] == ["s0", "s1"]

    # what the evaluator scores is the re-estimated model
    ev = evaluate_all(run, models[:1], "test")
    test = load_site(cfg, cfg.site("s1"), progress=False).splits["test"]
    from sklearn.metrics import roc_auc_score

    scores = predict(_net(cfg, models[0].arrays), test.images, torch.device("cpu"))[:, 0]
    assert ev.matrix["local-s0"]["s1"]["metrics"]["macro_auroc"] == pytest.approx(
        roc_auc_score(test.y.numpy()[:, 0], scores))
    # ... and what is saved
    paths = run.models.save_final(run.run, models, cfg.strategy.name)
    blob = torch.load(run.run.path / paths["local-s0"], weights_only=True)
    assert blob["meta"]["batchnorm"] == "precise"
    for k, v in batchnorm.running_stats(_net(cfg, models[0].arrays)).items():
        assert torch.equal(blob["model"][k], v)


def test_running_mode_keeps_training_statistics(tmp_path, flower_identity):  # noqa: F811
    from chestfed.server.evaluation.batchnorm import reestimate_all
    from chestfed.server.federation.trained import Trained

    from chestfed.server.evaluation.evaluator import settings_of

    cfg = tiny_cfg(tmp_path, eval={"batchnorm": "running", "bootstrap": 0})
    run = _federation(tmp_path, cfg, HandlerGrid(3))
    w = run.train_at(1, "local-s0", {"s0": (run.models.initial_arrays(), 1)})["s0"]
    m = Trained("local-s0", w, ["s0"])
    reestimate_all(run.sites, [m], cfg.eval.batchnorm, run.models.probe(), settings_of(cfg.eval, cfg.seed))
    assert m.arrays is w and "batchnorm" not in m.meta


def _net(cfg, arrays):
    net = build_model(cfg.model, 1)
    net.load_state_dict(arrays.to_torch_state_dict())
    return net


def test_report_says_which_batchnorm_statistics_scored_each_model():
    from chestfed.server.report.run import batchnorm_text as _batchnorm_text

    precise = {"batchnorm": {"mode": "precise", "sites": ["a", "b"], "images": 1243}}
    assert _batchnorm_text(precise) == "re-estimated on a, b (1243 train images)"
    assert "FedBN" in _batchnorm_text({"local_batchnorm": True, "batchnorm": {"mode": "site"}})
    assert _batchnorm_text({}).startswith("training-time running averages")


@pytest.mark.parametrize("mode", ["site", "running"])
def test_round_validation_scores_the_rounds_weights_with_matching_statistics(tmp_path, flower_identity, mode):  # noqa: F811
    """eval.round_batchnorm=site: a round's validation loss is the round's weights with BatchNorm
    statistics re-estimated on the scoring site's train split (the running averages lag, so
    per-round curves built on them keep 'improving' after the weights stopped); 'running'
    scores the running averages as they came."""
    from chestfed.common.training import masked_bce_np
    from chestfed.sites.data import load_site

    cfg = tiny_cfg(tmp_path, eval={"round_batchnorm": mode, "bootstrap": 0})
    run = _federation(tmp_path, cfg, HandlerGrid(3))
    w = run.train_at(1, "local-s0", {"s0": (run.models.initial_arrays(), 1)})["s0"]
    run.eval_at(1, "local-s0", {"s0": w})
    got = run.record.row(1, "s0", "local-s0")["val_loss"]
    net = _net(cfg, w)
    if mode == "site":
        _, stats = _stats_of(cfg, w, "s0")
        net.load_state_dict({**net.state_dict(), **stats})
    val = load_site(cfg, cfg.site("s0"), progress=False).splits["val"]
    want = masked_bce_np(val.y.numpy(), predict(net, val.images, torch.device("cpu")))
    assert got == pytest.approx(want, rel=1e-5)
    other = _net(cfg, w) if mode == "site" else None
    if other is not None:  # and it is not what the running averages give
        plain = masked_bce_np(val.y.numpy(), predict(other, val.images, torch.device("cpu")))
        assert abs(plain - got) > 1e-4
