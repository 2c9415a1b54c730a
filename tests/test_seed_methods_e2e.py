"""Issue 16's keys in phantom experiments through the real launcher: each run is recorded, and
the test checks what the keys computed (the plateau's rates from the recorded validation
losses, the best-validation round, the calibrated agreement aggregates)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from e2e import only_run, results, simulate, tiny_config  # noqa: E402

from chestfed.common.config import TrainConfig  # noqa: E402
from chestfed.common.schedules import Plateau  # noqa: E402


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _check_plateau_and_best(run: Path, train: dict, models: list[str]) -> None:
    rows = _rows(run)
    res = results(run)
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        rounds = sorted({r["round"] for r in mine})
        val = {k: float(np.mean([r["val_loss"] for r in mine if r["round"] == k])) for k in rounds}
        plateau = Plateau(TrainConfig(**train))
        for k in rounds:  # the rate of round k follows the validation losses of rounds < k
            assert all(r["lr"] == pytest.approx(plateau.lr) for r in mine if r["round"] == k), (model, k)
            plateau.step(val[k])
        best = min(rounds, key=lambda k: (val[k], k))
        info = res["models"][f"{model}@best_val"]
        assert info["best_round"] == best and info["best_val_loss"] == pytest.approx(val[best])
        assert (run / "checkpoints" / f"{model}@best_val.pt").is_file()


@pytest.mark.e2e
def test_local_with_meta_weights_plateau_best_val_and_agreement(tmp_path):
    train = {"batch_size": 16, "lr": 0.05, "lr_schedule": "plateau", "plateau_patience": 0,
             "plateau_factor": 0.5}
    cfg = tiny_config(tmp_path, size=60,
                      model={"width": 4, "meta": ["age", "sex", "view"]},
                      train={**train, "task_weights": "cohen2020", "pos_weight": "reciprocal_prevalence"},
                      eval={"checkpoints": ["final", "best_val"], "bootstrap": 0},
                      privacy={"min_cell": 3}, strategy={"rounds": 3, "min_sites": 1})
    proc = simulate(cfg, "--strategy", "local")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run = only_run(tmp_path)
    _check_plateau_and_best(run, train, ["local-site0", "local-site1"])
    res = results(run)
    assert set(res["matrix"]) == {"local-site0", "local-site1", "local-site0@best_val", "local-site1@best_val"}
    st = res["pairs"]["site0"]["local-site0|local-site1"]["labels"]["Abnormal"]
    assert -1 <= st["kappa_calibrated"] <= 1 and len(st["ba_hist"]) == 100
    cells = [c for c in st["ba_hist"] if c is not None]
    assert all(c == 0 or c >= 3 for c in cells)  # privacy.min_cell 3: small cells suppressed
    assert sum(cells) + (len(st["ba_hist"]) - len(cells)) <= st["ba_n"]  # each suppressed >= 1
    assert (run / "figures" / "bland_altman.png").is_file()
    assert "Agreement on calibrated outputs" in (run / "report.md").read_text()


@pytest.mark.e2e
def test_fedavg_plateau_per_round_on_a_frozen_resnet38(tmp_path):
    train = {"batch_size": 16, "lr": 0.05, "lr_schedule": "plateau", "plateau_patience": 0,
             "plateau_factor": 0.5}
    cfg = tiny_config(tmp_path, size=50, model={"arch": "resnet38", "freeze": "backbone",
                                                "meta": ["view"]},
                      train=train, eval={"checkpoints": ["best_val"], "bootstrap": 0},
                      strategy={"rounds": 2, "min_sites": 1})
    proc = simulate(cfg, "--strategy", "fedavg")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "model.freeze: backbone without model.weights" in proc.stdout + proc.stderr
    run = only_run(tmp_path)
    _check_plateau_and_best(run, train, ["fedavg"])
    assert list(results(run)["matrix"]) == ["fedavg@best_val"]  # checkpoints: [best_val] only
