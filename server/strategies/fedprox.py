"""`fedprox`: FedAvg with a proximal term at the sites, through Flower's own FedProx.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith 2020, "Federated Optimization in Heterogeneous
Networks" (MLSys).

As FedAvg, except that each site minimises its loss plus mu/2 ||w - w_global||^2, which keeps
its local model near the round's global one when sites' data differ. mu is
`strategy.proximal_mu`; Flower's FedProx sends it in every train message and the site adds the
term (sites/app.py -> common.training). The server averages as FedAvg.
The coordinator records what it records for FedAvg (fedavg.py). Under `privacy.secagg` the round
runs through Flower's SecAgg+ instead (secagg.py).
"""
from __future__ import annotations

from typing import Any

from flwr.serverapp import strategy as flwr_strategies

from chestfed.common.config.schema import StrategyConfig
from chestfed.server.federation.tap import CoordinatorTap


class FedProx(CoordinatorTap, flwr_strategies.FedProx):
    """Flower's FedProx with the coordinator's tap."""

    local_bn = False

    @staticmethod
    def options(strategy: StrategyConfig) -> dict[str, Any]:
        return {"proximal_mu": strategy.proximal_mu}
