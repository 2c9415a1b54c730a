"""What each site's Ray worker asks for, from what the Ray cluster has.

Ray does the placing: a site worker (one of Flower's ClientApp actors) that asks for a GPU share
gets the GPU id(s) Ray picks, and Ray sets its CUDA_VISIBLE_DEVICES to them. This module only
chooses the shares (`runtime.cpus_per_site: auto`, `runtime.gpus_per_site: auto`) and checks
that one site fits somewhere.
"""
from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from typing import Any

from chestfed.common.errors import ConfigError

# Ray accepts GPU shares to four decimals; rounding down keeps k shares within one GPU.
_GRAIN = 10_000


@dataclass(frozen=True)
class Node:
    cpus: float
    gpus: float


def nodes_from_ray(ray_nodes: list[dict[str, Any]]) -> list[Node]:
    """The alive nodes of `ray.nodes()` (a node that left keeps an entry with no resources)."""
    return [Node(float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0)))
            for n in ray_nodes if n.get("Alive", True) and n.get("Resources")]


def _floor(share: float) -> float:
    return math.floor(share * _GRAIN + 1e-6) / _GRAIN


def workers_that_fit(nodes: list[Node], cpus: float, gpus: float) -> int:
    """How many site workers the cluster holds at once, node by node (as Flower sizes its pool)."""
    total = 0
    for node in nodes:
        fit = int(node.cpus / cpus + 1e-9)
        if gpus > 0:
            fit = min(fit, int(node.gpus / gpus + 1e-9)) if node.gpus > 0 else 0
        total += fit
    return total


# 'auto' CPU share on CPU-only clusters: a site worker gets at least this many cores. Measured on
# this 2-core machine (docs/performance.md): two 1-thread workers training at once did 357
# images/s together, one 2-thread worker 266-304 alone, so workers beat intra-op threads while
# there are sites to run side by side; each worker is a process holding torch (~0.65 GB PSS),
# which `runtime.cpus_per_site: 2` trades for those images/s.
MIN_CPUS_PER_WORKER = 1


def cpus_per_site(setting: float | str, gpus_setting: float | str, nodes: list[Node],
                  n_sites: int) -> float:
    """The CPU share of one site worker. A number is used as given. 'auto': 1 where the site
    workers get GPUs (the GPUs set the pace, and `gpus_per_site: auto` shares them out by
    workers that fit); else one worker per site while the cores last (at least
    MIN_CPUS_PER_WORKER each), the cores shared out among them in whole CPUs (each within one
    node): 3 sites on 2 cores get two workers of 1 CPU, on 16 cores three of 5."""
    if setting != "auto":
        return float(setting)
    has_gpus = any(n.gpus > 0 for n in nodes)
    if (gpus_setting == "auto" and has_gpus) or (gpus_setting != "auto" and float(gpus_setting) > 0):
        return 1.0
    total = sum(n.cpus for n in nodes)
    if total < 1:
        return 1.0
    workers = max(1, min(n_sites, int(total // MIN_CPUS_PER_WORKER)))
    share = max(1.0, float(math.floor(total / workers)))
    return min(share, max(1.0, math.floor(max(n.cpus for n in nodes))))


def gpus_per_site(setting: float | str, nodes: list[Node], cpus: float, n_sites: int) -> float:
    """The GPU share of one site worker. A number is used as given; 'auto' is 0 without GPUs,
    else the largest share (at most one GPU) with which every site trains at the same time, or,
    when the CPUs cannot hold them all anyway, as many as the CPUs allow."""
    if setting != "auto":
        return float(setting)
    gpu_nodes = [n for n in nodes if n.gpus > 0]
    if not gpu_nodes:
        return 0.0
    most = min(n_sites, workers_that_fit(gpu_nodes, cpus, 0.0))
    shares = sorted({_floor(min(1.0, n.gpus / k)) for n in gpu_nodes
                     for k in range(1, max(n_sites, 1) + 1)}, reverse=True)
    for share in shares:
        if share > 0 and workers_that_fit(gpu_nodes, cpus, share) >= most:
            return share
    return shares[-1]


def check_fits(nodes: list[Node], cpus: float, gpus: float, where: str) -> None:
    """One line when not even one site worker fits on any node (Flower's pool would be empty)."""
    if workers_that_fit(nodes, cpus, gpus) >= 1:
        return
    have = ", ".join(f"{n.cpus:g} CPU / {n.gpus:g} GPU" for n in nodes) or "no nodes"
    raise ConfigError(f"runtime.cpus_per_site {cpus:g} and runtime.gpus_per_site {gpus:g}: no "
                      f"node of {where} can hold one site worker (nodes: {have}); lower them")


def ray_address(setting: str | None) -> str | None:
    """The cluster to attach to: runtime.ray_address, else RAY_ADDRESS, else None (a new Ray)."""
    return setting or os.environ.get("RAY_ADDRESS") or None


def check_ray_address(address: str | None, timeout: float = 5.0) -> None:
    """One line, before anything starts, when nothing answers at a cluster's `host:port` (ray.init
    would otherwise retry for minutes). 'auto' and ray:// addresses are left to Ray."""
    if not address or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"runtime.ray_address / RAY_ADDRESS '{address}' is not HOST:PORT "
                          f"(e.g. 10.0.0.5:6379, as `ray start --head` prints it) or 'auto'")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(f"runtime.ray_address / RAY_ADDRESS '{address}': no Ray cluster answers "
                          f"there ({exc.strerror or exc}); start one with `ray start --head` "
                          f"(README 'Scale out')") from None
