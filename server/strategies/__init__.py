"""Training regimes, one file each. Each runner takes a Coordinator and returns the models to compare.

`RUNNERS[name](coord) -> list[Trained]`; the evaluator then scores every returned model at every
site. Flower's own strategy classes are used wherever one exists: fedavg.py, fedprox.py,
fedadam.py, fedyogi.py and fedbn.py each declare one, with the coordinator's tap (tap.py), and
share one round loop (flower.py); site-level DP wraps them in Flower's DP wrappers (site_dp.py),
and FedAvg / FedProx run through Flower's SecAgg+ under `privacy.secagg` (secagg.py). local.py,
pooled.py, sequential.py and loso.py (leave-one-site-out) have no Flower class and are written
here. Each file's docstring cites its paper and says what the coordinator records.
"""
from __future__ import annotations

from typing import Callable

from chestfed.server.federation.coordinator import Coordinator, Trained
from chestfed.server.federation.flower_loop import run_flower
from chestfed.server.strategies.local import run_local
from chestfed.server.strategies.loso import run_loso
from chestfed.server.strategies.pooled import run_pooled
from chestfed.server.strategies.sequential import run_sequential

RUNNERS: dict[str, Callable[[Coordinator], list[Trained]]] = {
    "local": run_local,
    "pooled": run_pooled,
    "sequential": run_sequential,
    "fedavg": run_flower,
    "fedprox": run_flower,
    "fedadam": run_flower,
    "fedyogi": run_flower,
    "fedbn": run_flower,
    "loso": run_loso,
}


def needs_pooled_node(strategy: str, loso_base: str) -> bool:
    """Pooling needs a simulation-only node that holds the union of the sites' data."""
    return strategy == "pooled" or (strategy == "loso" and loso_base == "pooled")
