"""`ditto`: a global model by FedAvg, and at each site a personal model pulled towards it.

Li, Hu, Beirami, Smith 2021, "Ditto: Fair and Robust Federated Learning Through
Personalization" (ICML), Algorithm 1: each round a site trains the global model w as FedAvg
does and, on the same data, its personal model v on its loss plus lambda/2 ||v - w^t||^2, where
w^t is the global model the site received that round. Checked against fl4health's DittoClient
(the personal model starts as the first global model; the penalty is towards the round's
received global weights; both models see the same batches).

`strategy.ditto_lambda` is lambda (default 0.1; the paper tunes it in {0.01, 0.1, 1, 2}: tune it
with launch/tune.py). lambda 0 is local training; a very large lambda keeps v at the global
model. Only the global model leaves a site in a training reply; v stays in the site's own
state (sites/local_state.py, part `personal`), so a resumed run goes on from it. Both models'
training counts in the budget (results.json `budget`: images and steps are twice FedAvg's).
After the last round each site releases v once (server/federation/personal.py).
Matrix rows: `ditto-global`, and `ditto-<site>` per site (internal at its own site).
"""
from __future__ import annotations

from typing import Any

from flwr.serverapp import strategy as flwr_strategies

from chestfed.common import protocol as P
from chestfed.common.config.schema import StrategyConfig
from chestfed.server.federation.tap import CoordinatorTap


class Ditto(CoordinatorTap, flwr_strategies.FedAvg):
    """Flower's FedAvg (the global model) with the coordinator's tap; the sites add v."""

    local_bn = False
    personal = "ditto"
    has_global = True  # w is a whole model: scored as ditto-global

    @staticmethod
    def site_settings(strategy: StrategyConfig) -> dict[str, Any]:
        return {P.PERSONAL: "ditto", P.DITTO_LAMBDA: strategy.ditto_lambda}
