"""Site-level differential privacy at the coordinator: a Flower strategy wrapped in Flower's own
DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping (flwr.serverapp.strategy).

McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially Private Recurrent Language Models"
(ICLR): DP-FedAvg, each client's update clipped and Gaussian noise added to their mean, which
protects a whole site's contribution (here: a hospital's). Adaptive clipping: Andrew, Thakkar,
McMahan, Ramaswamy 2021, "Differentially Private Learning with Adaptive Clipping" (NeurIPS).

`privacy.dp.mode: server` clips each site's update at the coordinator (the sites trust it with
their raw updates); `client` has each site clip its own update with Flower's fixedclipping_mod /
adaptiveclipping_mod (sites/privacy.py) before it leaves, and the coordinator only adds noise.
Either way Gaussian noise of std noise_multiplier x clipping_norm / (sites per round) goes on
the mean of the clipped updates, which is why the inner FedAvg weighs every site 1
(`common.privacy.UNIT_WEIGHT`) instead of by its image count. After every noised round the
coordinator's ledger (server/privacy/ledger.py) adds one subsampled Gaussian step and records epsilon
and the round's clipping norm in each site's row.
"""
from __future__ import annotations

from typing import Any, Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp import strategy as flwr_strategies

from chestfed.server.federation.federation import Federation


class LedgerTap:
    """Mixin for a Flower DP wrapper (it must come first among the bases): after every noised
    round, one step for the privacy ledger, and epsilon and the clipping norm into the record.
    Set `fed`, `model_name`, `n_sites` and `n_sampled` on an instance before it runs (`wrap`)."""

    fed: Federation
    model_name: str
    n_sites: int  # the sites the model trains on
    n_sampled: int  # the sites sampled per round

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        if arrays is not None:  # a noised release: one more step for the accountant
            record = self.fed.record
            spent = record.privacy.on_site_round(self.model_name, self.n_sampled, self.n_sites)
            rnd = server_round + getattr(self.strategy, "round_offset", 0)  # type: ignore[attr-defined]
            for r in replies:
                site = self.fed.sites.site_of.get(r.metadata.src_node_id)
                if site is not None and not r.has_error():
                    record.row(rnd, site, self.model_name).update(
                        {**spent, "dp_clipping_norm": float(self.clipping_norm)})  # type: ignore[attr-defined]
        return arrays, metrics


class DifferentialPrivacyServerSideFixedClipping(
        LedgerTap, flwr_strategies.DifferentialPrivacyServerSideFixedClipping):
    """Flower's wrapper (the coordinator clips, fixed norm) with the ledger's tap."""


class DifferentialPrivacyClientSideFixedClipping(
        LedgerTap, flwr_strategies.DifferentialPrivacyClientSideFixedClipping):
    """Flower's wrapper (each site clips, fixed norm) with the ledger's tap."""


class DifferentialPrivacyServerSideAdaptiveClipping(
        LedgerTap, flwr_strategies.DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's wrapper (the coordinator clips, adaptive norm) with the ledger's tap."""


class DifferentialPrivacyClientSideAdaptiveClipping(
        LedgerTap, flwr_strategies.DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's wrapper (each site clips, adaptive norm) with the ledger's tap."""


WRAPPERS = {("server", "fixed"): DifferentialPrivacyServerSideFixedClipping,
            ("client", "fixed"): DifferentialPrivacyClientSideFixedClipping,
            ("server", "adaptive"): DifferentialPrivacyServerSideAdaptiveClipping,
            ("client", "adaptive"): DifferentialPrivacyClientSideAdaptiveClipping}


def wrap(strategy: Any, fed: Federation, model_name: str, sites: list[str],
         n_sampled: int) -> LedgerTap:
    """`strategy` (a tapped Flower strategy) inside the configured Flower DP wrapper."""
    dp = fed.privacy.dp
    wrapper = WRAPPERS[(dp.mode, dp.clipping)]
    if dp.clipping == "fixed":
        out = wrapper(strategy, dp.noise_multiplier, dp.clipping_norm, n_sampled)
    else:
        # Adaptive clipping (Andrew et al. 2021) spends part of the noise on the count of clipped
        # updates. Flower's default count noise (sites/20) is meant for hundreds of sites and
        # refuses any noise_multiplier >= sites/10; with a handful of hospitals it is set to the
        # noise multiplier itself, which leaves the updates a multiplier of z / sqrt(3/4). The
        # pair is still equivalent to one Gaussian mechanism of multiplier z, which the ledger
        # accounts.
        count_std = max(n_sampled / 20, dp.noise_multiplier) if dp.noise_multiplier > 0 else None
        out = wrapper(strategy, dp.noise_multiplier, n_sampled, initial_clipping_norm=dp.clipping_norm,
                      clipped_count_stddev=count_std)
    out.fed, out.model_name, out.n_sites, out.n_sampled = fed, model_name, len(sites), n_sampled
    return out
