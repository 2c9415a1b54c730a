"""What a strategy calls so that `--resume` continues where a run stopped (server/run/resume.py
keeps the files): per-unit state after each round, models already finished, and with each save
the run's counters (the round record's, the validation schedule's, the privacy ledger's, the
alias salt), which `counters` gathers. The sequence `resume` -> RNGs restored -> `save_state`
after every round lives here once; every strategy calls it."""
from __future__ import annotations

from typing import Any, Callable

import torch
from flwr.app import ArrayRecord

from chestfed.server.federation.trained import Trained


class ResumeHooks:
    """One run's resume state (`state`, a RunState) and the function that returns the counters
    saved with it."""

    def __init__(self, state: Any, counters: Callable[[], dict[str, Any]]):
        self.state, self._counters = state, counters

    @property
    def resumed(self) -> bool:
        return bool(self.state.resumed)

    def resume(self, unit: str) -> dict[str, Any] | None:
        """The saved state of training unit `unit` (a model being trained) if this run resumes
        it, else None. When there is one, the server's RNGs are put back as they were after
        the last completed round (Flower samples nodes with Python's random), so a strategy
        calls this once its start has done any re-seeding, and continues from the state."""
        saved = self.state.unit(unit) if self.state.resumed else None
        if saved is not None:
            self.state.restore_rng()
        return saved

    def save_state(self, unit: str, state: dict[str, Any] | None, position: str) -> None:
        """After `end_round`: record that `unit` completed a round and where it stands."""
        self.state.save(unit, state, self._counters(), position)

    def finished_model(self, name: str) -> Trained | None:
        """A model this run finished before it was interrupted (`keep_finished`), else None."""
        info = self.state.finished().get(name) if self.state.resumed else None
        if info is None:
            return None
        blob = torch.load(self.state.model_file(name), map_location="cpu", weights_only=True)
        return Trained(name, ArrayRecord(blob["model"]), list(info["trained_on"]),
                       local_bn=bool(info["local_bn"]), meta=dict(info["meta"]))

    def keep_finished(self, model: Trained, unit: str | None = None, save: bool = True) -> None:
        """Keep a model the strategy will not train again (a sequential stage, a finished
        leave-one-site-out model) for a resume; `unit`: the training unit it closes. `save`
        False: the caller's next `save_state` records it."""
        self.state.keep_model(model.name, model.arrays.to_torch_state_dict(),
                              {"trained_on": list(model.trained_on), "local_bn": model.local_bn,
                               "meta": dict(model.meta)})
        if save:
            self.state.save(unit, None, self._counters(), f"{model.name} finished",
                            count_round=False)
