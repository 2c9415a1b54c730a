"""`fedbn`: FedAvg of everything but BatchNorm, which stays at each site.

Li, Jiang, Zhang, Kamp, Dou 2021, "FedBN: Federated Learning on Non-IID Features via Local Batch
Normalization" (ICLR).

Sites whose images differ in look (scanner, exposure, processing) keep their own BatchNorm
weights and statistics; only the other weights are averaged, with Flower's FedAvg. The global
model therefore never holds BatchNorm entries: flower.py leaves them out of the initial weights,
and the train message tells each site to keep its own (`protocol.KEEP_LOCAL_BN`, sites/app.py).
A site is scored with its own BatchNorm (the model is marked `local_bn`).
The coordinator records what it records for FedAvg (fedavg.py).
"""
from __future__ import annotations

from typing import Any

from flwr.serverapp import strategy as flwr_strategies

from chestfed.common.config.schema import StrategyConfig
from chestfed.server.federation.tap import CoordinatorTap


class FedBN(CoordinatorTap, flwr_strategies.FedAvg):
    """Flower's FedAvg with the coordinator's tap, run on the non-BatchNorm weights only."""

    local_bn = True  # BatchNorm weights and buffers never leave a site

    @staticmethod
    def options(strategy: StrategyConfig) -> dict[str, Any]:
        return {}
