"""`krum`: each round's global model is the one site's model closest to its neighbours, through
Flower's Krum.

Blanchard, El Mhamdi, Guerraoui, Stainer 2017, "Machine Learning with Adversaries: Byzantine
Tolerant Gradient Descent" (NeurIPS): with n workers of which at most f are Byzantine, score
each worker by the summed squared distance to its n - f - 2 nearest others and take the
lowest-scoring one (n > 2f + 2 for the guarantee).

`strategy.krum_byzantine` is f (default 0: Krum still picks the most central site; set it to the
number of sites you do not trust). A config whose sites cannot satisfy n > 2f + 2 is refused at
config time. Distances between the sites' weights equal distances between their updates (every
site starts the round from the same global model). One site's weights become the global model,
so Krum trades FedAvg's averaging for robustness. Everything else is as under FedAvg
(fedavg.py); not under SecAgg+ or site-level DP.
"""
from __future__ import annotations

from typing import Any

from flwr.serverapp import strategy as flwr_strategies

from chestfed.common.config.schema import StrategyConfig
from chestfed.server.federation.tap import CoordinatorTap


class Krum(CoordinatorTap, flwr_strategies.Krum):
    """Flower's Krum with the coordinator's tap."""

    local_bn = False

    @staticmethod
    def options(strategy: StrategyConfig) -> dict[str, Any]:
        return {"num_malicious_nodes": strategy.krum_byzantine}
