"""Which runner trains each strategy: `RUNNERS[name](fed) -> list[Trained]`, where `fed` is the
run's parts (server/federation/federation.py).

Its own module, not the package's __init__: the Flower round loop imports the strategy classes
of this package, and a registry in __init__ would import the loop back (a cycle).
"""
from __future__ import annotations

from typing import Callable

from chestfed.server.federation.federation import Federation
from chestfed.server.federation.trained import Trained
from chestfed.server.federation.flower_loop import run_flower
from chestfed.server.strategies.finetune import run_finetune
from chestfed.server.strategies.local import run_local
from chestfed.server.strategies.loso import run_loso
from chestfed.server.strategies.pooled import run_pooled
from chestfed.server.strategies.sequential import run_sequential

RUNNERS: dict[str, Callable[[Federation], list[Trained]]] = {
    "local": run_local,
    "pooled": run_pooled,
    "sequential": run_sequential,
    "fedavg": run_flower,
    "fedprox": run_flower,
    "fedadam": run_flower,
    "fedyogi": run_flower,
    "fedbn": run_flower,
    "fedmedian": run_flower,
    "fedtrimmedavg": run_flower,
    "krum": run_flower,
    "ditto": run_flower,
    "fedper": run_flower,
    "fedrep": run_flower,
    "mrmtl": run_flower,
    "apfl": run_flower,
    "fenda": run_flower,
    "finetune": run_finetune,
    "loso": run_loso,
}


def needs_pooled_node(strategy: str, loso_base: str) -> bool:
    """Pooling needs a simulation-only node that holds the union of the sites' data."""
    return strategy == "pooled" or (strategy == "loso" and loso_base == "pooled")
