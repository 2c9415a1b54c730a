"""eval.round_validation: a round's validation carried in the next round's training message.

In process, through the real ClientApp handlers (test_resume.py's harness): with_training and
separate must give the same models, the same metrics.jsonl rows (every round's validation
under its own round) and the same best_val checkpoint, with one exchange a round instead of
two (the coordinator's wire.jsonl counts them) and the carried numbers visible in each site's
egress log. Where carrying would change a round (plateau schedule), a separate exchange is used.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from test_resume import _cfg, _rows, _same, _task_identity, _train  # noqa: F401 (the fixture is autouse)

ROUNDS = 3


def _wire(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "wire.jsonl").read_text().splitlines()]


def _egress(run: Path, site: str) -> list[dict]:
    return [json.loads(x) for x in (run / "egress" / f"{site}.jsonl").read_text().splitlines()]


def _run(tmp: Path, name: str, mode: str, **extra):
    cfg = _cfg(tmp, name, 2, ROUNDS, checkpoints=["final", "best_val"], **extra)
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"round_validation": mode})})
    models, fed = _train(cfg, audit=True)
    return models, fed, fed.run.path


@pytest.mark.parametrize("name", ["fedavg", "fedbn", "fedper"])
def test_validation_in_the_training_reply_gives_the_same_run_with_half_the_exchanges(tmp_path, name):
    # a large constant rate: the validation loss moves, so the best round is a real choice
    train = {"lr": 0.3}
    sep_models, sep, sep_run = _run(tmp_path / "sep", name, "separate", train=train)
    car_models, car, car_run = _run(tmp_path / "car", name, "with_training", train=train)
    assert [m.name for m in car_models] == [m.name for m in sep_models]
    for a, b in zip(car_models, sep_models):
        _same(a, b)
    rows = _rows(car_run)
    assert rows == _rows(sep_run)
    assert sorted({r["round"] for r in rows if "val_loss" in r}) == list(range(1, ROUNDS + 1))
    assert car.validation.best.keys() == sep.validation.best.keys() and car.validation.best
    for m, b in sep.validation.best.items():
        got = car.validation.best[m]
        assert (got.round, got.loss) == (b.round, b.loss)
        w, want = got.arrays.to_torch_state_dict(), b.arrays.to_torch_state_dict()
        assert all(torch.equal(w[k], want[k]) for k in want)

    def sent(run: Path, kind: str) -> int:
        return sum(1 for r in _wire(run) if r["dir"] == "out" and r["type"].startswith(kind))
    n_sites = 2
    assert sent(sep_run, "evaluate") == ROUNDS * n_sites
    assert sent(car_run, "evaluate") == n_sites  # the last round's, on its own
    assert sent(car_run, "train") == sent(sep_run, "train") == ROUNDS * n_sites
    # the carried numbers leave a site as a record of their own, in its egress log
    train_out = [r for r in _egress(car_run, "site0") if r["type"].startswith("train")]
    carried = [r for r in train_out if "validation" in r["records"]]
    assert len(carried) == ROUNDS - 1 and "validation" not in train_out[0]["records"]
    items = carried[0]["records"]["validation"]["items"]
    assert {"loss", "macro_auroc"} <= set(items) and items["loss"] == "float"
    # what the weights reply holds is unchanged (a FedPer head stays at the site either way)
    sep_out = [r for r in _egress(sep_run, "site0") if r["type"].startswith("train")]
    assert [r["records"]["arrays"] for r in train_out] == [r["records"]["arrays"] for r in sep_out]

def test_a_plateau_schedule_keeps_a_separate_validation_exchange(tmp_path):
    train = {"lr_schedule": "plateau", "plateau_patience": 0}
    _, _, run = _run(tmp_path, "fedavg", "with_training", train=train)
    assert sum(1 for r in _wire(run) if r["dir"] == "out" and r["type"].startswith("evaluate")) == ROUNDS * 2
    assert not any("validation" in r.get("records", {}) for r in _egress(run, "site0"))
