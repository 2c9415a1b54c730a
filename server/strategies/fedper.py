"""`fedper`: the body is federated, the classifier head stays at each site.

Arivazhagan, Aggarwal, Singh, Choudhary 2019, "Federated Learning with Personalization Layers"
(arXiv:1912.00818): base layers are averaged by FedAvg, personalisation layers (here the
classifier head: the last linear layer, and the metadata layer of a fusion model;
common.models.head_keys) are trained and kept by each site. Checked against fl4health's
FedPer (a shared feature extractor and a local head module).

Every round a site trains the whole model (the received body with its own head) for
`train.local_epochs` and sends back the body only; Flower's FedAvg averages the bodies. The
head stays in the site's own state (sites/local_state.py, part `head`); in round 1 each site
starts from the common initial head. There is no global model to score (no global head); each
site's personal model (body + its head) is released once after the last round
(server/federation/personal.py). Matrix rows: `fedper-<site>`.
"""
from __future__ import annotations

from typing import Any

from flwr.serverapp import strategy as flwr_strategies

from chestfed.common import protocol as P
from chestfed.common.config.schema import StrategyConfig
from chestfed.server.federation.tap import CoordinatorTap


class FedPer(CoordinatorTap, flwr_strategies.FedAvg):
    """Flower's FedAvg on the body, with the coordinator's tap; heads stay at the sites."""

    local_bn = False
    personal = "fedper"
    has_global = False

    @staticmethod
    def site_settings(strategy: StrategyConfig) -> dict[str, Any]:
        return {P.PERSONAL: "fedper", P.LOCAL_HEAD: True}
