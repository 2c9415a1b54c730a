"""The learning-rate schedule (train.lr_schedule) and the rounds it spans."""
from __future__ import annotations

import math

import pytest

from chestfed.common.config import config_from_tree
from chestfed.common.training import round_lr, schedule_length


def _cfg(**strategy):
    return config_from_tree({"sites": [{"name": n, "kind": "phantom"} for n in ("a", "b", "c")],
                             "train": {"lr": 0.01, "lr_schedule": "cosine"},
                             "strategy": {"rounds": 4, **strategy}}, "test")


def test_cosine_decays_from_lr_by_round_and_constant_does_not():
    cfg = _cfg()
    rates = [round_lr(cfg.train, r, 4) for r in range(1, 5)]
    assert rates == pytest.approx([0.01 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)])
    assert rates[0] == 0.01 and all(a > b > 0 for a, b in zip(rates, rates[1:]))
    flat = cfg.train.model_copy(update={"lr_schedule": "constant"})
    assert {round_lr(flat, r, 4) for r in range(1, 5)} == {0.01}


def test_schedule_spans_rounds_or_sequential_stages():
    assert schedule_length(_cfg(name="fedavg")) == 4
    assert schedule_length(_cfg(name="sequential")) == 4 * 3  # 4 cycles over 3 sites
    assert schedule_length(_cfg(name="sequential", sequential={"order": ["b"], "cycles": 2})) == 2
