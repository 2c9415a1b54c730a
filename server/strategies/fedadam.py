"""`fedadam`: FedAvg's mean update applied by a server-side Adam step, through Flower's FedAdam.

Reddi, Charles, Zaheer, Garrett, Rush, Konecny, Kumar, McMahan 2021, "Adaptive Federated
Optimization" (ICLR), Algorithm 2 (FedAdam).

The sites train as under FedAvg; the server treats the weighted mean of their updates as a
pseudo-gradient and takes one Adam step with it (learning rate `strategy.server_lr`, Flower's
betas and tau; tests/test_strategy_updates.py checks the step against the paper and says where
Flower departs from it). BatchNorm running statistics are not weights: they get the plain
weighted mean (`buffers_by_mean`, tap.py), since an Adam step can push a variance below zero.
The coordinator records what it records for FedAvg (fedavg.py), and keeps the server's moments
m_t and v_t in the `--resume` state so a resumed run takes the same steps.
"""
from __future__ import annotations

from typing import Any

from flwr.serverapp import strategy as flwr_strategies

from chestfed.common.config.schema import StrategyConfig
from chestfed.server.federation.tap import CoordinatorTap


class FedAdam(CoordinatorTap, flwr_strategies.FedAdam):
    """Flower's FedAdam with the coordinator's tap; BatchNorm buffers averaged, not stepped."""

    local_bn = False
    buffers_by_mean = True

    @staticmethod
    def options(strategy: StrategyConfig) -> dict[str, Any]:
        return {"eta": strategy.server_lr}
