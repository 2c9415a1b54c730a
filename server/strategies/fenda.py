"""`fenda`: FENDA-FL, a local and a global feature extractor concatenated before a local head.

Tavakoli, Emerson, Kolesnik, Peng, Krishnan, Wallace, Chauhan, Leng, Lhotak, Rudzicz 2024,
"FENDA-FL: Personalized Federated Learning on Heterogeneous Clinical Datasets" (and the same
group's "A Comprehensive View of Personalized Federated Learning on Heterogeneous Clinical
Datasets", MLHC 2024, where it is among the strongest on FLamby's clinical tasks). Checked
against fl4health's FendaModel (a FendaLocalModule and a FendaGlobalModule whose outputs the
FendaHeadModule joins, mode CONCATENATE; only the global module's layers are exchanged).

The network (model.structure: fenda, set by this strategy; common/models.py Fenda) is two
copies of the configured image network without their classifiers, `local.` and `shared.`, and a
linear classifier over their concatenated features. Every round a site trains the whole network
on its own train split; only the global extractor goes back, and Flower's FedAvg averages it.
The local extractor and the classifier stay in the site's own state (sites/local_state.py,
part `head`, as FedPer's head; common.models.head_keys); in round 1 each site starts from the
common initial weights. There is no global model to score; each site's personal network is
released once after the last round. Matrix rows: `fenda-<site>`.
"""
from __future__ import annotations

from typing import Any

from chestfed.common import protocol as P
from chestfed.common.config.schema import StrategyConfig
from chestfed.server.strategies.fedper import FedPer


class Fenda(FedPer):
    """FedPer's exchange on FENDA's network: the kept 'head' is the local extractor and the
    classifier, the averaged 'body' the global extractor."""

    personal = "fenda"

    @staticmethod
    def site_settings(strategy: StrategyConfig) -> dict[str, Any]:
        return {P.PERSONAL: "fenda", P.LOCAL_HEAD: True}
