"""`fedtrimmedavg`: the coordinate-wise trimmed mean of the sites' weights, through Flower's
FedTrimmedAvg.

Yin, Chen, Ramchandran, Bartlett 2018, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates" (ICML): per coordinate, drop the largest and smallest `beta` fraction of the
workers' values and average the rest.

`strategy.trim_beta` (default 0.2, in [0, 0.5)) is the fraction cut from each end; with few
sites it must leave at least one: with 5 sites, 0.2 cuts one from each end (Flower: int(beta*n)
per side), with 3 sites it cuts none and is FedAvg's unweighted mean. Unweighted, like the median.
Everything else is as under FedAvg (fedavg.py); not under SecAgg+ or site-level DP.
"""
from __future__ import annotations

from typing import Any

from flwr.serverapp import strategy as flwr_strategies

from chestfed.common.config.schema import StrategyConfig
from chestfed.server.federation.tap import CoordinatorTap


class FedTrimmedAvg(CoordinatorTap, flwr_strategies.FedTrimmedAvg):
    """Flower's FedTrimmedAvg with the coordinator's tap."""

    local_bn = False

    @staticmethod
    def options(strategy: StrategyConfig) -> dict[str, Any]:
        return {"beta": strategy.trim_beta}
