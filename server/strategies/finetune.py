"""`finetune`: FedAvg, then each site fine-tunes the global model on its own train split.

The standard personalisation baseline (e.g. Wang, Mathews, Kiddon, Eichner, Beaufays, Ramage
2019, "Federated Evaluation of On-device Personalization", arXiv:1910.10252; Tavakoli et al.
2024 report it next to the personalised methods): train one global model with FedAvg
(fedavg.py, every option it honours), then `strategy.finetune_epochs` epochs at each site,
starting from the final global model, on that site's data alone.

The fine-tuning is one more round in the record (round `strategy.rounds + 1`, model
`finetune`, at the last round's learning rate) and counts in the budget. With
`finetune_epochs: 0` every site's model is the global one (tests/test_personalised.py checks
that it is FedAvg's). Matrix rows: `finetune-global` and `finetune-<site>` (internal at its
own site). A site that fails its fine-tuning is marked failed; the others finish.
"""
from __future__ import annotations

from chestfed.server.federation.federation import Federation
from chestfed.server.federation.flower_loop import run_flower
from chestfed.server.federation.trained import SiteFailure, Trained


def run_finetune(fed: Federation) -> list[Trained]:
    sites = fed.sites.training_sites()
    (global_,) = run_flower(fed, "fedavg", model_name="finetune")
    epochs = fed.strategy.finetune_epochs
    rnd = fed.strategy.rounds + 1
    tuned = {s: global_.arrays for s in sites}
    if epochs > 0:
        try:
            tuned = fed.train_at(rnd, "finetune", {s: (global_.arrays, epochs) for s in sites})
        except SiteFailure:
            tuned = {}  # fewer than strategy.min_sites answered: marked below, then checked
        for s in [s for s in sites if s not in tuned]:
            fed.record.mark_failed(f"finetune-{s}", s, rnd)
        fed.record.end_round(rnd, rnd, None, f" [fine-tuning {epochs} epoch(s) at each site]")
        fed.record.require_sites("finetune", list(tuned))
    return [Trained("finetune-global", global_.arrays, list(global_.trained_on),
                    meta={"finetune_epochs": epochs})] + [
        Trained(f"finetune-{s}", w, [s], meta={"personal": "finetune", "finetune_epochs": epochs})
        for s, w in tuned.items()]
