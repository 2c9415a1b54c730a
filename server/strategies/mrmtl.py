"""`mrmtl`: mean-regularised multi-task learning: no global model is trained; each site's own
model is pulled towards the mean of the sites' models.

Liu, Hu, Wu, Smith 2022, "On Privacy and Personalization in Cross-Silo Federated Learning"
(NeurIPS), MR-MTL: site k minimises its loss plus lambda/2 ||v_k - v_bar||^2, where v_bar is the
mean of the sites' models at the end of the previous round; unlike FedAvg, a site never
replaces its model with the mean. Checked against fl4health's MrMtlClient (the received
average is only the penalty's anchor; the local model is kept and sent for averaging).

`strategy.mrmtl_lambda` is lambda (default 0.1; 0 is local training). What leaves a site in a
training reply is its own model v_k, because the mean is computed from it (the method shares
it, as FedAvg shares its local update); what stays is that v_k carries on from the site's own
state (sites/local_state.py, part `personal`), not from the mean. The mean is not scored (no
one trains it). After the last round each site's v_k is released once
(server/federation/personal.py). Matrix rows: `mrmtl-<site>`.
"""
from __future__ import annotations

from typing import Any

from flwr.serverapp import strategy as flwr_strategies

from chestfed.common import protocol as P
from chestfed.common.config.schema import StrategyConfig
from chestfed.server.federation.tap import CoordinatorTap


class MrMtl(CoordinatorTap, flwr_strategies.FedAvg):
    """Flower's FedAvg (the mean the sites are pulled to) with the coordinator's tap."""

    local_bn = False
    personal = "mrmtl"
    has_global = False

    @staticmethod
    def site_settings(strategy: StrategyConfig) -> dict[str, Any]:
        return {P.PERSONAL: "mrmtl", P.MRMTL_LAMBDA: strategy.mrmtl_lambda}
