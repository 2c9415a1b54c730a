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
from chestfed.server.federation.coordinator import POOLED, Coordinator, Trained


def run_pooled(coord: Coordinator, sites: list[str] | None = None, model_name: str = "pooled",
               label: str = "") -> list[Trained]:
    cfg = coord.cfg
    sites = sites or coord.training_sites()
    done = coord.finished_model(model_name)  # leave-one-site-out: finished before a resume
    if done is not None:
        return [done]
    weights = coord.initial_arrays()
    first = 1
    saved = coord.resume(model_name)
    if saved is not None:  # --resume: the weights after the last completed epoch (round)
        first, weights = int(saved["round"]) + 1, ArrayRecord(saved["arrays"])
    for rnd in range(first, cfg.strategy.rounds + 1):
        out = coord.train_at(rnd, model_name, {POOLED: (weights, cfg.train.local_epochs)},
                             **{P.POOL_SITES: ",".join(sites)})
        weights = out[POOLED]
        coord.eval_at(rnd, model_name, {s: weights for s in sites})
        coord.end_round(rnd, cfg.strategy.rounds, weights, label, trained_on=sites)
        coord.save_state(model_name, {"round": rnd, "arrays": weights.to_torch_state_dict()},
                         f"round {rnd}/{cfg.strategy.rounds} of {model_name}")
    return [Trained(model_name, weights, sites, meta={"balance": cfg.strategy.balance})]
