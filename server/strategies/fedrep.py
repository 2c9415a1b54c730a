"""`fedrep`: a shared representation, a head per site, trained head first.

Collins, Hassani, Mokhtari, Shakkottai 2021, "Exploiting Shared Representations for
Personalized Federated Learning" (ICML), Algorithm 1: each round a site first trains its head
with the received body frozen, then the body with its new head frozen, and sends the body; the
server averages the bodies. Checked against fl4health's FedRepClient (head steps, then
representation steps, each with the other part frozen).

`strategy.fedrep_head_epochs` (default 1) epochs on the head, then `train.local_epochs` on the
body. The split is FedPer's (common.models.head_keys); the head stays in the site's own state
(sites/local_state.py, part `head`). Both phases count in the budget. Each site's personal
model is released once after the last round (server/federation/personal.py). Matrix rows:
`fedrep-<site>`.
"""
from __future__ import annotations

from typing import Any

from flwr.serverapp import strategy as flwr_strategies

from chestfed.common import protocol as P
from chestfed.common.config.schema import StrategyConfig
from chestfed.server.federation.tap import CoordinatorTap


class FedRep(CoordinatorTap, flwr_strategies.FedAvg):
    """Flower's FedAvg on the body, with the coordinator's tap; heads stay at the sites."""

    local_bn = False
    personal = "fedrep"
    has_global = False

    @staticmethod
    def site_settings(strategy: StrategyConfig) -> dict[str, Any]:
        return {P.PERSONAL: "fedrep", P.LOCAL_HEAD: True, P.HEAD_EPOCHS: strategy.fedrep_head_epochs}
