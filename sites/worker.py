"""The Ray worker a simulated site runs in: its node, the GPUs Ray gave it, what it can see.

Simulation only (a deployed site runs under a SuperNode, without Ray): Ray starts each site
worker with `runtime.gpus_per_site` GPUs and sets its CUDA_VISIBLE_DEVICES to them ('' with 0).
A site reports its node and GPU ids with its training reply; they say which machine and GPU
did the work, nothing about the site's images or patients.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from chestfed.common import protocol as P
from chestfed.common.config import SiteConfig
from chestfed.sites.adapters.base import SiteDataError


def _ray() -> Any | None:
    """Ray, when this process is one of its workers (never imported here: a deployed site has
    no Ray, and importing it costs a second)."""
    ray = sys.modules.get("ray")
    return ray if ray is not None and ray.is_initialized() else None


def assigned_gpus() -> list[str] | None:
    """The GPU ids Ray assigned to this worker ([] for none); None outside a Ray worker."""
    ray = _ray()
    return None if ray is None else [str(g) for g in ray.get_gpu_ids()]


def assigned_cpus() -> float | None:
    """The CPU share Ray gave this worker; None outside a Ray worker."""
    ray = _ray()
    if ray is None:
        return None
    return float(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))


def worker_info() -> dict[str, str]:
    """Node id, GPU ids and CUDA_VISIBLE_DEVICES of this Ray worker (common/protocol.py
    WORKER_*); {} outside Ray."""
    ray = _ray()
    if ray is None:
        return {}
    return {P.WORKER_NODE: str(ray.get_runtime_context().get_node_id()),
            P.WORKER_GPUS: ",".join(assigned_gpus() or []),
            P.WORKER_CUDA: os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)")}


def check_root_visible(site: SiteConfig) -> None:
    """One line when this worker's node cannot see the site's root (a cluster node without the
    shared filesystem); the launcher checked it only on its own machine."""
    ray = _ray()
    if ray is None or not site.root or Path(site.root).expanduser().exists():
        return
    node = ray.util.get_node_ip_address()
    raise SiteDataError(f"site '{site.name}': root '{site.root}' is not visible on Ray node "
                        f"{node}; every node of the cluster needs the site roots (and the image "
                        f"cache, or room to build it) at the same path (README 'Scale out')")
