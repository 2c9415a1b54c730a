"""Seed methods, items 3 and 4 of issue 16: loss weights (common/weights.py), the plateau
schedule and the best-validation checkpoint (common/schedules.py, server/evaluation/selection.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from chestfed.common.config import TrainConfig, config_from_tree
from chestfed.common.errors import ConfigError
from chestfed.common.schedules import BestCheckpoint, Plateau
from chestfed.common.training import masked_bce
from chestfed.common.weights import cohen2020_task_weights, inverse_prevalence, loss_weights, reciprocal_prevalence

NAN = float("nan")
# 8 images, 3 labels; label 2 is unlabelled on two images.
Y = np.array([[1, 0, 1], [1, 0, 0], [1, 1, NAN], [0, 0, 0],
              [1, 0, NAN], [0, 0, 1], [1, 0, 0], [0, 0, 0]], dtype=np.float32)


def test_reciprocal_prevalence_is_labelled_over_positives():
    # label 0: 5 of 8 positive -> 8/5; label 1: 1 of 8 -> 8; label 2: 2 of 6 labelled -> 3
    assert torch.allclose(reciprocal_prevalence(Y), torch.tensor([8 / 5, 8.0, 3.0]))
    # no positive: 1 (1/0 undefined), and no clipping of large ratios
    y = np.zeros((300, 2), dtype=np.float32)
    y[0, 1] = 1
    assert reciprocal_prevalence(y).tolist() == [1.0, 300.0]


def test_inverse_prevalence_is_negatives_over_positives_clipped():
    assert torch.allclose(inverse_prevalence(Y), torch.tensor([3 / 5, 7.0, 2.0]))
    y = np.zeros((300, 1), dtype=np.float32)
    y[0] = 1
    assert inverse_prevalence(y).tolist() == [100.0]  # 299 clipped


def test_cohen2020_task_weights_by_hand():
    # positive counts c = [5, 1, 2]: max 5, mean 8/3; alpha = 5 - c + 8/3
    alpha = np.array([5 - 5 + 8 / 3, 5 - 1 + 8 / 3, 5 - 2 + 8 / 3])
    assert torch.allclose(cohen2020_task_weights(Y), torch.tensor(alpha / alpha.max(), dtype=torch.float32))
    assert cohen2020_task_weights(Y[:, :1]).tolist() == [1.0]  # one task: weight 1
    assert cohen2020_task_weights(np.zeros((4, 2))).tolist() == [1.0, 1.0]


def test_task_weights_scale_each_labels_loss():
    logits = torch.tensor([[0.3, -1.0], [2.0, 0.5]])
    target = torch.tensor([[1.0, 0.0], [0.0, NAN]])
    w = torch.tensor([0.5, 2.0])
    per = torch.nn.functional.binary_cross_entropy_with_logits(logits, target.nan_to_num(0), reduction="none")
    want = (per[0, 0] * 0.5 + per[0, 1] * 2.0 + per[1, 0] * 0.5) / 3  # 3 known entries
    assert torch.allclose(masked_bce(logits, target, task_weights=w), want)


def test_loss_weights_follow_the_config():
    assert loss_weights(TrainConfig(pos_weight="none"), Y) == {}
    assert set(loss_weights(TrainConfig(), Y)) == {"pos_weight"}  # the default: inverse prevalence
    out = loss_weights(TrainConfig(pos_weight="reciprocal_prevalence", task_weights="cohen2020"), Y)
    assert set(out) == {"pos_weight", "task_weights"}
    assert torch.equal(out["pos_weight"], reciprocal_prevalence(Y))


def test_plateau_reduces_after_patience_evaluations():
    p = Plateau(TrainConfig(lr=0.01, lr_schedule="plateau", plateau_factor=0.5, plateau_patience=1))
    lrs = [p.step(v) for v in (1.0, 0.9, 0.95, 0.96, NAN, 0.97)]
    # 0.95: one bad evaluation (= patience, no cut); 0.96: two -> cut; NaN: no step; 0.97: one
    assert lrs == pytest.approx([0.01, 0.01, 0.01, 0.005, 0.005, 0.005])


def test_best_checkpoint_keeps_lowest_loss_and_earliest_tie():
    b = BestCheckpoint()
    for rnd, loss in enumerate([0.7, 0.5, 0.5, NAN, 0.6], start=1):
        b.offer(rnd, loss, f"w{rnd}")
    assert (b.round, b.loss, b.arrays) == (2, 0.5, "w2")


def test_select_checkpoints_labels_best_val():
    from chestfed.server.evaluation.selection import select_checkpoints
    from chestfed.server.federation.trained import Trained

    best = BestCheckpoint()
    best.offer(2, 0.4, "best-arrays")
    stages = [Trained("sequential", "final", ["a", "b"], meta={"stage": 4}),
              Trained("sequential-stage-2", "s2", ["a", "b"], meta={"stage": 2}),
              Trained("sequential-stage-1", "s1", ["a"], meta={"stage": 1})]
    for which, names in ((["final", "best_val"], ["sequential", "sequential@best_val"]),
                         (["best_val"], ["sequential@best_val"])):
        out = select_checkpoints(stages, which, {"sequential": best})
        assert [m.name for m in out if not m.name.startswith("sequential-stage")] == names
        bv = next(m for m in out if m.name.endswith("@best_val"))
        assert bv.arrays == "best-arrays" and bv.meta["best_round"] == 2 and bv.trained_on == ["a", "b"]


def _tree(**over):
    tree = {"sites": [{"name": "a", "kind": "phantom"}]}
    for k, v in over.items():
        tree.setdefault(k.split(".")[0], {})[k.split(".")[1]] = v
    return tree


@pytest.mark.parametrize("over, needle", [
    ({"train.lr_schedule": "plateau", "eval.every": 2}, "eval.every: train.lr_schedule: plateau needs"),
    ({"eval.checkpoints": ["best_val"], "eval.every": 0}, "eval.checkpoints: best_val needs"),
    ({"eval.checkpoints": []}, "'eval.checkpoints': must name"),
    ({"eval.checkpoints": ["last"]}, "eval.checkpoints.0"),
    ({"train.task_weights": "cohen"}, "train.task_weights"),
    ({"train.plateau_factor": 1.5}, "train.plateau_factor"),
])
def test_bad_values_are_one_line(over, needle):
    with pytest.raises(ConfigError) as err:
        config_from_tree(_tree(**over), "x.yaml")
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_round_lr_under_plateau_is_the_base_rate():
    from chestfed.common.training import round_lr
    assert round_lr(TrainConfig(lr=0.01, lr_schedule="plateau"), 3, 6) == 0.01
    assert not math.isclose(round_lr(TrainConfig(lr=0.01, lr_schedule="cosine"), 3, 6), 0.01)
