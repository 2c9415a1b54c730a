"""Site-level differential privacy at the coordinator: a Flower strategy wrapped in Flower's own
DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping (flwr.serverapp.strategy).

`privacy.dp.mode: server` clips each site's update at the coordinator (the sites trust it with
their raw updates); `client` has each site clip its own update with Flower's fixedclipping_mod /
adaptiveclipping_mod (sites/privacy.py) before it leaves, and the coordinator only adds noise.
Either way Gaussian noise of std noise_multiplier x clipping_norm / (sites per round) goes on
the mean of the clipped updates, which is why the inner FedAvg weighs every site 1
(`common.privacy.UNIT_WEIGHT`) instead of by its image count. After every noised round the
coordinator's ledger (server/privacy.py) adds one subsampled Gaussian step and records epsilon.
"""
from __future__ import annotations

from typing import Any, Iterable

from flwr.app import ArrayRecord, Message, MetricRecord

from server.coordinator import Coordinator


def _wrapper_class(mode: str, clipping: str) -> type:
    from flwr.serverapp import strategy as S

    return {("server", "fixed"): S.DifferentialPrivacyServerSideFixedClipping,
            ("client", "fixed"): S.DifferentialPrivacyClientSideFixedClipping,
            ("server", "adaptive"): S.DifferentialPrivacyServerSideAdaptiveClipping,
            ("client", "adaptive"): S.DifferentialPrivacyClientSideAdaptiveClipping}[(mode, clipping)]


def wrap(strategy: Any, coord: Coordinator, model_name: str, sites: list[str],
         n_sampled: int) -> Any:
    """`strategy` (a tapped Flower strategy) inside the configured Flower DP wrapper."""
    dp = coord.cfg.privacy.dp
    base = _wrapper_class(dp.mode, dp.clipping)

    class Recorded(base):  # type: ignore[misc, valid-type]
        def aggregate_train(self, server_round: int, replies: Iterable[Message]
                            ) -> tuple[ArrayRecord | None, MetricRecord | None]:
            replies = list(replies)
            arrays, metrics = super().aggregate_train(server_round, replies)
            if arrays is not None:  # a noised release: one more step for the accountant
                spent = coord.privacy.on_site_round(model_name, n_sampled, len(sites))
                rnd = server_round + getattr(strategy, "round_offset", 0)
                for r in replies:
                    site = coord.site_of.get(r.metadata.src_node_id)
                    if site is not None and not r.has_error():
                        coord._row(rnd, site, model_name).update(
                            {**spent, "dp_clipping_norm": float(self.clipping_norm)})
            return arrays, metrics

    Recorded.__name__ = base.__name__
    if dp.clipping == "fixed":
        return Recorded(strategy, dp.noise_multiplier, dp.clipping_norm, n_sampled)
    # Adaptive clipping (Andrew et al. 2021) spends part of the noise on the count of clipped
    # updates. Flower's default count noise (sites/20) is meant for hundreds of sites and refuses
    # any noise_multiplier >= sites/10; with a handful of hospitals it is set to the noise
    # multiplier itself, which leaves the updates a multiplier of z / sqrt(3/4). The pair is
    # still equivalent to one Gaussian mechanism of multiplier z, which the ledger accounts.
    count_std = max(n_sampled / 20, dp.noise_multiplier) if dp.noise_multiplier > 0 else None
    return Recorded(strategy, dp.noise_multiplier, n_sampled, initial_clipping_norm=dp.clipping_norm,
                    clipped_count_stddev=count_std)
