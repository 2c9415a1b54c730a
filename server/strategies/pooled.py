"""`pooled`: one model trained on the union of all sites' train splits (centralized baseline).

The upper reference of Chang et al. 2018, "Distributed deep learning networks among
institutions for medical imaging" (JAMIA): the model trained on centrally hosted patient data,
which collaborative methods try to match without moving it.

Pooling moves data between hospitals, so it exists only in simulation: a simulation-only node
('pooled') loads the sites' train splits, balanced as `strategy.balance` says (sites/pooled.py),
and trains there. The model is then scored at every site like any other. The coordinator
records, per round (one round = `train.local_epochs` epochs on the pool), the pool's training
numbers and every site's validation numbers, and saves the weights for `--resume`.
"""
from __future__ import annotations

from flwr.app import ArrayRecord

from chestfed.common import protocol as P
from chestfed.server.federation.discovery import POOLED
from chestfed.server.federation.federation import Federation
from chestfed.server.federation.trained import Trained


def run_pooled(fed: Federation, sites: list[str] | None = None, model_name: str = "pooled",
               label: str = "") -> list[Trained]:
    rounds = fed.strategy.rounds
    sites = sites or fed.sites.training_sites()
    done = fed.resume.finished_model(model_name)  # leave-one-site-out: finished before a resume
    if done is not None:
        return [done]
    weights = fed.models.initial_arrays()
    first = 1
    saved = fed.resume.resume(model_name)
    if saved is not None:  # --resume: the weights after the last completed epoch (round)
        first, weights = int(saved["round"]) + 1, ArrayRecord(saved["arrays"])
    for rnd in range(first, rounds + 1):
        out = fed.train_at(rnd, model_name, {POOLED: (weights, fed.train.local_epochs)},
                             **{P.POOL_SITES: ",".join(sites)})
        weights = out[POOLED]
        fed.eval_at(rnd, model_name, {s: weights for s in sites})
        fed.record.end_round(rnd, rounds, weights, label, trained_on=sites)
        fed.resume.save_state(model_name, {"round": rnd, "arrays": weights.to_torch_state_dict()},
                              f"round {rnd}/{rounds} of {model_name}")
    return [Trained(model_name, weights, sites, meta={"balance": fed.strategy.balance})]
