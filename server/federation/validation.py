"""The validation-driven part of a run: which rounds validate (`eval.every`), the learning rate
a training message carries under `train.lr_schedule: plateau`, and each model's best weights so
far (`eval.checkpoints: best_val`). The schedules themselves are common/schedules.py."""
from __future__ import annotations

from typing import Any, Mapping

from flwr.app import ArrayRecord

from chestfed.common import protocol as P
from chestfed.common.config.schema import EvalConfig, StrategyConfig, TrainConfig
from chestfed.common.schedules import BestCheckpoint, Plateau


class ValidationSchedule:
    """Per trained model: its plateau schedule and its best-validation checkpoint."""

    def __init__(self, train: TrainConfig, eval_: EvalConfig):
        self.train, self.eval = train, eval_
        self.plateaus: dict[str, Plateau] = {}
        self.best: dict[str, BestCheckpoint] = {}

    def due(self, round_: int) -> bool:
        """Whether round `round_` validates (eval.every; 0: never during training)."""
        every = self.eval.every
        return every != 0 and round_ % every == 0

    def carried(self, strategy: StrategyConfig) -> bool:
        """Whether a Flower strategy's per-round validation rides in the next round's training
        message (eval.round_validation with_training). Not under train.lr_schedule plateau
        (round r+1's rate is set from round r's validation before it is sent) nor with client
        sampling (the sites that validate would be those sampled to train next)."""
        return (self.eval.round_validation == "with_training"
                and self.train.lr_schedule != "plateau"
                and strategy.fraction >= 1 and strategy.fraction_evaluate >= 1)

    def lr_config(self, model: str) -> dict[str, float]:
        """The learning rate a training message for `model` carries under train.lr_schedule
        plateau (nothing otherwise: the site computes constant / cosine rates itself)."""
        if self.train.lr_schedule != "plateau":
            return {}
        return {P.LR: self.plateaus.setdefault(model, Plateau(self.train)).lr}

    def after_validation(self, round_: int, model: str, val_loss: float,
                         arrays: ArrayRecord | None, schedule: bool = True) -> None:
        """One round's mean validation loss of `model`: steps its plateau schedule (unless
        `schedule` is False) and keeps its weights when they are the best so far
        (eval.checkpoints: best_val; `arrays` None: the sites held different weights)."""
        if schedule and self.train.lr_schedule == "plateau":
            self.plateaus.setdefault(model, Plateau(self.train)).step(val_loss)
        if "best_val" in self.eval.checkpoints:
            self.best.setdefault(model, BestCheckpoint()).offer(round_, val_loss, arrays)

    # --- resume ---------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"plateaus": {m: p.state() for m, p in self.plateaus.items()},
                "best": {m: b.state() for m, b in self.best.items()}}

    def load(self, saved: Mapping[str, Any]) -> None:
        """train.lr_schedule plateau and eval.checkpoints best_val go on where they were."""
        self.plateaus = {m: Plateau(self.train).load(st) for m, st in saved.get("plateaus", {}).items()}
        self.best = {m: BestCheckpoint().load(st) for m, st in saved.get("best", {}).items()}
