"""`fedyogi`: FedAvg's mean update applied by a server-side Yogi step, through Flower's FedYogi.

Reddi, Charles, Zaheer, Garrett, Rush, Konecny, Kumar, McMahan 2021, "Adaptive Federated
Optimization" (ICLR), Algorithm 2 (FedYogi).

As FedAdam (fedadam.py), but the second moment moves by
v_t = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2), which grows it more slowly
when updates are large. Learning rate `strategy.server_lr`; BatchNorm running statistics get
the plain weighted mean (`buffers_by_mean`, tap.py).
The coordinator records what it records for FedAvg (fedavg.py), and keeps the server's moments
m_t and v_t in the `--resume` state so a resumed run takes the same steps.
"""
from __future__ import annotations

from typing import Any

from flwr.serverapp import strategy as flwr_strategies

from chestfed.common.config.schema import StrategyConfig
from chestfed.server.federation.tap import CoordinatorTap


class FedYogi(CoordinatorTap, flwr_strategies.FedYogi):
    """Flower's FedYogi with the coordinator's tap; BatchNorm buffers averaged, not stepped."""

    local_bn = False
    buffers_by_mean = True

    @staticmethod
    def options(strategy: StrategyConfig) -> dict[str, Any]:
        return {"eta": strategy.server_lr}
