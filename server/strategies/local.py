"""`local`: every site trains its own model on its own data only (the seeds' single-site models).

Same budget as the federated strategies: `strategy.rounds` x `train.local_epochs` epochs per
site, trained in rounds so the per-round record lines up with theirs.
"""
from __future__ import annotations

from server.coordinator import Coordinator, Trained


def run_local(coord: Coordinator) -> list[Trained]:
    cfg = coord.cfg
    sites = coord.training_sites()
    init = coord.initial_arrays()
    weights = {s: init for s in sites}
    for rnd in range(1, cfg.strategy.rounds + 1):
        jobs = {s: (weights[s], cfg.train.local_epochs) for s in weights}
        new = {}
        for s in jobs:  # one model per site: each is its own "run", recorded under its name
            new.update(coord.train_at(rnd, f"local-{s}", {s: jobs[s]}))
        failed = [s for s in weights if s not in new]
        for s in failed:
            weights.pop(s)  # a site whose training failed drops out of the comparison
        weights.update(new)
        for s, w in weights.items():
            coord.eval_at(rnd, f"local-{s}", {s: w})
        coord.end_round(rnd, cfg.strategy.rounds, None)
    return [Trained(f"local-{s}", w, [s]) for s, w in weights.items()]
