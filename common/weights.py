"""Per-label loss weights computed from a site's own training split (nothing leaves the site).

`train.pos_weight` (the positive term of each label's BCE) and `train.task_weights` (the whole
loss of each label) are chosen by name; each function says exactly which formula it is.
"""
from __future__ import annotations

import numpy as np
import torch

from chestfed.common.config import TrainConfig
# `inverse_prevalence` (negatives / positives, clipped to [0.1, 100]) is the older option and
# stays where it was; it balances the BCE's two terms and is 1/prevalence - 1, not Neuhaus's.
from chestfed.common.training import inverse_prevalence


def _counts(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positives, labelled images) per label of y [N, T] (1/0/NaN; NaN = not labelled)."""
    y = np.asarray(y, dtype=np.float64)
    known = ~np.isnan(y)
    return (known & (y == 1)).sum(axis=0), known.sum(axis=0)


def reciprocal_prevalence(y: np.ndarray) -> torch.Tensor:
    """`reciprocal_prevalence`: Neuhaus's weighting, the positive term of each label's BCE
    multiplied by 1 / prevalence = labelled images / positives, unclipped (1 where a label has
    no positive, since 1/0 is undefined)."""
    pos, known = _counts(y)
    w = np.where(pos > 0, known / np.maximum(pos, 1), 1.0)
    return torch.tensor(w, dtype=torch.float32)


def cohen2020_task_weights(y: np.ndarray) -> torch.Tensor:
    """Cohen et al.'s task weights (2020, section 3): with c_t the positive count of
    task t, alpha_t = max_i(c_i) - c_t + mean_i(c_i) and w_t = alpha_t / max_i(alpha_i).
    Rare tasks weigh most (w = 1 for the rarest); one task alone gets w = 1. All-zero counts
    (no positives anywhere) give w = 1 for every task instead of 0/0."""
    pos, _ = _counts(y)
    c = pos.astype(np.float64)
    alpha = c.max() - c + c.mean()
    w = alpha / alpha.max() if alpha.max() > 0 else np.ones_like(c)
    return torch.tensor(w, dtype=torch.float32)


POS_WEIGHTS = {"inverse_prevalence": inverse_prevalence, "reciprocal_prevalence": reciprocal_prevalence}
TASK_WEIGHTS = {"cohen2020": cohen2020_task_weights}


def loss_weights(cfg: TrainConfig, y: np.ndarray) -> dict[str, torch.Tensor]:
    """The keyword arguments of `common.training.train_epochs` that `cfg` asks for, from the
    site's train labels y [N, T]: `pos_weight` and/or `task_weights` (absent when 'none')."""
    out: dict[str, torch.Tensor] = {}
    if cfg.pos_weight != "none":
        out["pos_weight"] = POS_WEIGHTS[cfg.pos_weight](y)
    if cfg.task_weights != "none":
        out["task_weights"] = TASK_WEIGHTS[cfg.task_weights](y)
    return out
