"""Learning-rate schedules the coordinator drives from validation losses (train.lr_schedule).

'plateau' is torch's own ReduceLROnPlateau (Bajwa et al. and Baltruschat et al.: reduce the
rate by a factor when the validation loss has not improved for `patience` evaluations). It is
stepped here, at the coordinator, on the mean validation loss over the sites that evaluated
the model, because in a federation no single optimizer sees every site; the rate it gives is
sent to the sites in the next round's training message. One schedule per trained model (each
`local-<site>` model has its own, driven by its own site's validation loss).
"""
from __future__ import annotations

import math

import torch

from chestfed.common.config import TrainConfig


class Plateau:
    """ReduceLROnPlateau on a stand-in optimizer: the schedule's state without a model."""

    def __init__(self, cfg: TrainConfig):
        self._opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
        self._sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self._opt, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience)

    @property
    def lr(self) -> float:
        return float(self._opt.param_groups[0]["lr"])

    def step(self, val_loss: float) -> float:
        """One evaluation's loss; returns the rate for the next round. A NaN loss (no site had
        a validation split) leaves the schedule where it is."""
        if not math.isnan(val_loss):
            self._sched.step(val_loss)
        return self.lr

    def state(self) -> dict:
        """What `--resume` needs (server/run/resume.py): the rate and the scheduler's counters."""
        return {"lr": self.lr, "scheduler": self._sched.state_dict()}

    def load(self, state: dict) -> "Plateau":
        self._sched.load_state_dict(dict(state["scheduler"]))
        for group in self._opt.param_groups:
            group["lr"] = float(state["lr"])
        return self


class BestCheckpoint:
    """The round with the lowest mean validation loss so far, and its weights (eval.checkpoints:
    best_val). Ties keep the earlier round."""

    def __init__(self) -> None:
        self.round: int | None = None
        self.loss = math.inf
        self.arrays = None

    def state(self) -> dict:
        """What `--resume` needs: the best round, its loss and its weights (tensors)."""
        return {"round": self.round, "loss": self.loss,
                "weights": None if self.arrays is None else self.arrays.to_torch_state_dict()}

    def load(self, state: dict) -> "BestCheckpoint":
        from flwr.app import ArrayRecord  # lazy: flwr loads only when this runs

        self.round = None if state["round"] is None else int(state["round"])
        self.loss = float(state["loss"])
        self.arrays = None if state["weights"] is None else ArrayRecord(dict(state["weights"]))
        return self

    def offer(self, round_: int, val_loss: float, arrays) -> bool:
        if math.isnan(val_loss) or val_loss >= self.loss or arrays is None:
            return False
        self.round, self.loss, self.arrays = round_, float(val_loss), arrays
        return True
