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

from chestfed.server.federation.federation import Federation
from chestfed.server.federation.trained import SiteFailure, Trained


def run_local(fed: Federation) -> list[Trained]:
    rounds, epochs = fed.strategy.rounds, fed.train.local_epochs
    sites = fed.sites.training_sites()
    init = fed.models.initial_arrays()
    weights = {s: init for s in sites}
    first = 1
    saved = fed.resume.resume("local")
    if saved is not None:  # --resume: every site's model after the last completed round
        first = int(saved["round"]) + 1
        weights = {s: ArrayRecord(w) for s, w in saved["weights"].items()}
    for rnd in range(first, rounds + 1):
        jobs = {s: (weights[s], epochs) for s in weights}
        new = {}
        for s in jobs:  # one model per site: each is its own "run", recorded under its name
            try:
                new.update(fed.train_at(rnd, f"local-{s}", {s: jobs[s]}))
            except SiteFailure:
                pass  # the reason is in fed.record.dropouts; marked failed below
        for s in [s for s in weights if s not in new]:
            weights.pop(s)  # its row is marked failed; the other sites go on
            fed.record.mark_failed(f"local-{s}", s, rnd)
        weights.update(new)
        for s, w in weights.items():
            fed.eval_at(rnd, f"local-{s}", {s: w})
        fed.record.end_round(rnd, rounds, None)
        fed.resume.save_state("local", {"round": rnd, "weights": {s: w.to_torch_state_dict()
                                                                  for s, w in weights.items()}},
                              f"round {rnd}/{rounds} of local")
    fed.record.require_sites("local", list(weights))
    return [Trained(f"local-{s}", w, [s]) for s, w in weights.items()]
