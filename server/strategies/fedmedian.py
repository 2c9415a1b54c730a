"""`fedmedian`: the coordinate-wise median of the sites' weights, through Flower's FedMedian.

Yin, Chen, Ramchandran, Bartlett 2018, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates" (ICML): the coordinate-wise median of the workers' models tolerates a
fraction of arbitrarily wrong ones.

A hospital whose export is corrupt, or whose software misbehaves, can send a wild update;
FedAvg's mean follows it, the median does not (tests/test_robust_aggregation.py: one of five
sites scaled by 100). The median ignores each site's image count: every site is one vote.
BatchNorm statistics take the median too. Everything else (sampling, rounds, the record, resume)
is as under FedAvg (fedavg.py). It needs each site's update in the clear, so it does not run
under SecAgg+ or site-level DP (common/privacy: refused at config time).
"""
from __future__ import annotations

from flwr.serverapp import strategy as flwr_strategies

from chestfed.server.federation.tap import CoordinatorTap


class FedMedian(CoordinatorTap, flwr_strategies.FedMedian):
    """Flower's FedMedian with the coordinator's tap."""

    local_bn = False
