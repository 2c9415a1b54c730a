"""`local`: every site trains its own model on its own data only (single-institution models).

The baseline that collaborative training is measured against, as in Chang et al. 2018,
"Distributed deep learning networks among institutions for medical imaging" (JAMIA), which
compares single-institution models with centrally hosted data and with weight transfer.

Same budget as the federated strategies: `strategy.rounds` x `train.local_epochs` epochs per
site, trained in rounds so the per-round record lines up with theirs. The coordinator records,
per round, each site's training numbers and its own model's validation numbers under
`local-<site>`, and saves every site's weights for `--resume`.

A site whose training fails (its data cannot be loaded, its training raises, it does not answer)
does not sink the others: its row is marked failed with the reason (results.json `failed`, the
matrix and the report) and the other sites finish. The run then needs `strategy.min_sites`
sites that finished (server/app.py says so and sets the exit code).
"""
from __future__ import annotations

from flwr.app import ArrayRecord

from chestfed.server.federation.coordinator import Coordinator, SiteFailure, Trained


def run_local(coord: Coordinator) -> list[Trained]:
    cfg = coord.cfg
    sites = coord.training_sites()
    init = coord.initial_arrays()
    weights = {s: init for s in sites}
    first = 1
    saved = coord.resume("local")
    if saved is not None:  # --resume: every site's model after the last completed round
        first = int(saved["round"]) + 1
        weights = {s: ArrayRecord(w) for s, w in saved["weights"].items()}
    for rnd in range(first, cfg.strategy.rounds + 1):
        jobs = {s: (weights[s], cfg.train.local_epochs) for s in weights}
        new = {}
        for s in jobs:  # one model per site: each is its own "run", recorded under its name
            try:
                new.update(coord.train_at(rnd, f"local-{s}", {s: jobs[s]}))
            except SiteFailure:
                pass  # the reason is in coord.dropouts; marked failed below
        for s in [s for s in weights if s not in new]:
            weights.pop(s)  # its row is marked failed; the other sites go on
            coord.mark_failed(f"local-{s}", s, rnd)
        weights.update(new)
        for s, w in weights.items():
            coord.eval_at(rnd, f"local-{s}", {s: w})
        coord.end_round(rnd, cfg.strategy.rounds, None)
        coord.save_state("local", {"round": rnd, "weights": {s: w.to_torch_state_dict()
                                                             for s, w in weights.items()}},
                         f"round {rnd}/{cfg.strategy.rounds} of local")
    coord.require_sites("local", list(weights))
    return [Trained(f"local-{s}", w, [s]) for s, w in weights.items()]
