"""`fedavg`: Federated Averaging, through Flower's own FedAvg.

McMahan, Moore, Ramage, Hampson, Aguera y Arcas 2017, "Communication-Efficient Learning of Deep
Networks from Decentralized Data" (AISTATS).

Every round each sampled site trains the global model for `train.local_epochs` epochs on its own
data and sends the weights back; the new global model is their mean weighted by each site's
train images (`strategy.fraction` of the sites per round, at least `strategy.min_sites`).
The coordinator records, per round and site: training loss, images, steps, seconds, the learning
rate, dropouts and rejoins; every `eval.every` rounds each site's validation numbers; after every
round the weights (checkpoint and `--resume` state). Under `privacy.secagg` the round runs
through Flower's SecAgg+ instead (secagg.py).
"""
from __future__ import annotations

from typing import Any

from flwr.serverapp import strategy as flwr_strategies

from chestfed.common.config.schema import StrategyConfig
from chestfed.server.federation.tap import CoordinatorTap


class FedAvg(CoordinatorTap, flwr_strategies.FedAvg):
    """Flower's FedAvg with the coordinator's tap."""

    local_bn = False  # every weight, BatchNorm included, is averaged

    @staticmethod
    def options(strategy: StrategyConfig) -> dict[str, Any]:
        """Settings of Flower's class beyond those every strategy gets (flower.py)."""
        return {}
