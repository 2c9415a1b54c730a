"""`pooled`: one model trained on the union of all sites' train splits (centralized baseline).

Pooling moves data between hospitals, so it exists only in simulation: a simulation-only node
('pooled') loads the sites' train splits, balanced as `strategy.balance` says (sites/pooled.py),
and trains there. The model is then scored at every site like any other.
"""
from __future__ import annotations

from common import protocol as P
from server.coordinator import POOLED, Coordinator, Trained


def run_pooled(coord: Coordinator, sites: list[str] | None = None, model_name: str = "pooled",
               label: str = "") -> list[Trained]:
    cfg = coord.cfg
    sites = sites or coord.training_sites()
    weights = coord.initial_arrays()
    for rnd in range(1, cfg.strategy.rounds + 1):
        out = coord.train_at(rnd, model_name, {POOLED: (weights, cfg.train.local_epochs)},
                             **{P.POOL_SITES: ",".join(sites)})
        weights = out[POOLED]
        coord.eval_at(rnd, model_name, {s: weights for s in sites})
        coord.end_round(rnd, cfg.strategy.rounds, weights, label, trained_on=sites)
    return [Trained(model_name, weights, sites, meta={"balance": cfg.strategy.balance})]
