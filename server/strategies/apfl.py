"""`apfl`: adaptive personalised FL: each site's model is a learned mixture of its own model and
the global one.

Deng, Kamani, Mahdavi 2020, "Adaptive Personalized Federated Learning" (arXiv:2003.13461),
Algorithm 1 and Eq. 3: the global model w is trained as FedAvg trains it; each site also keeps
a local model v and a weight alpha in [0, 1], and its personal model is
v_bar = alpha v + (1 - alpha) w; v and alpha move along the gradient of the site's loss at
v_bar (alpha projected onto [0, 1]). fl4health's ApflClient mixes the two models' outputs
instead; the parameter mixture is the paper's and gives one network, which the evaluator can
score at every site.

`strategy.apfl_alpha` (0.5) starts alpha; `strategy.apfl_learn_alpha: false` keeps it fixed
(alpha 0: the personal model is the global one). Each round a site trains w (sent back), then
v and alpha for `train.local_epochs` with w at this round's local result (both count in the
budget); v and alpha stay in the site's state (sites/local_state.py, part `personal`). After
the last round each site releases v_bar with the final global model. Matrix rows:
`apfl-global` (FedAvg's model) and `apfl-<site>`.
"""
from __future__ import annotations

from typing import Any

from flwr.serverapp import strategy as flwr_strategies

from chestfed.common import protocol as P
from chestfed.common.config.schema import StrategyConfig
from chestfed.server.federation.tap import CoordinatorTap


class Apfl(CoordinatorTap, flwr_strategies.FedAvg):
    """Flower's FedAvg (the global model) with the coordinator's tap; the sites add v, alpha."""

    local_bn = False
    personal = "apfl"
    has_global = True

    @staticmethod
    def site_settings(strategy: StrategyConfig) -> dict[str, Any]:
        return {P.PERSONAL: "apfl", P.APFL_ALPHA: strategy.apfl_alpha,
                P.APFL_LEARN_ALPHA: strategy.apfl_learn_alpha}
