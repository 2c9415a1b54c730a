"""eval.checkpoints: which weights of each trained model go into the matrix.

'final' is what the strategy returned; 'best_val' is the same model at the round with the
lowest mean validation loss over the sites that evaluated it (Bajwa et al.'s best-epoch selection;
Tavakoli et al., MLHC 2024, recommend reporting both for federated benchmarks). The best weights
are kept as the rounds go (server/federation/validation.py `ValidationSchedule.best`).
"""
from __future__ import annotations

from typing import Iterable, Mapping

from chestfed.common.schedules import BestCheckpoint
from chestfed.server.federation.trained import Trained

BEST_VAL_SUFFIX = "@best_val"


def select_checkpoints(models: list[Trained], wanted: Iterable[str],
                       best_of: Mapping[str, BestCheckpoint]) -> list[Trained]:
    """The models to save and score: the finals and/or each one's best-validation weights,
    labelled `<model>@best_val` (with the round in its meta). A model that was never validated
    (e.g. `sequential-stage-k`, which are already per-stage models) has no best_val entry."""
    wanted = set(wanted)
    out: list[Trained] = []
    for m in models:
        best = best_of.get(m.name)
        if "final" in wanted or best is None or best.arrays is None:
            out.append(m)
        if "best_val" in wanted and best is not None and best.arrays is not None:
            trained_on = m.trained_on
            stage = next((s for s in models if s.meta.get("stage") == best.round), None)
            if stage is not None:  # sequential: only the sites visited up to that stage
                trained_on = stage.trained_on
            out.append(Trained(m.name + BEST_VAL_SUFFIX, best.arrays, list(trained_on),
                               local_bn=m.local_bn,
                               meta={**m.meta, "weights_from": "best_val", "best_round": best.round,
                                     "best_val_loss": best.loss}))
    return out
