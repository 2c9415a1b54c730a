"""Start Flower's Simulation Engine (Ray backend) for one experiment.

Simulation only: it moves nothing between sites except Flower messages. The sites run as Ray
workers (Flower's ClientApp actors), each with `runtime.cpus_per_site` CPUs and
`runtime.gpus_per_site` GPUs, on this machine or on an existing Ray cluster
(`runtime.ray_address` / RAY_ADDRESS), whose nodes must see the site roots and the image cache
at the same paths (README "Scale out").
"""
from __future__ import annotations

import gc
import logging
import os
from typing import Any

from chestfed.common.config import ExperimentConfig
from chestfed.common.errors import ConfigError
from chestfed.server.run.folder import RunFolder
from chestfed.server.simulation import warm_pool
from chestfed.server.simulation.resources import check_fits, cpus_per_site, gpus_per_site, nodes_from_ray
from chestfed.server.simulation.resources import workers_that_fit
from chestfed.server.simulation.resources import ray_address

log = logging.getLogger(__name__)


def simulate(cfg: ExperimentConfig, run: RunFolder, client_app: Any, verbose: bool = False,
             keep_warm: bool = False, observer: Any = None) -> None:
    """`client_app` is the sites' ClientApp, handed in by the launcher: server/ never imports
    sites/ (in a deployment they are different machines).

    `keep_warm` (launch/compare.py, launch/tune.py): Ray and the site workers outlive the run, so
    the next run of the same comparison starts in ~1 s instead of paying Ray's start, a Python +
    torch import per worker and the sites' data loading again (server/simulation/warm_pool.py);
    the caller ends them with `stop_ray`. `observer` sees each round's record
    (server/federation/round_record.py `RoundObserver`; launch/tune.py prunes with it)."""
    os.environ.setdefault("WANDB_MODE", cfg.wandb.mode)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not verbose:  # read by Flower at import, in this process and in every Ray worker
        # CRITICAL, not ERROR: a site's exception reaches the coordinator as the reply's error
        # and the run reports it on one line (the whole text in error.log); Flower's own dump of
        # it is a multi-screen traceback. --verbose shows everything.
        os.environ.setdefault("FLWR_LOG_LEVEL", "CRITICAL")
    # Keep Ray quiet and local: no dashboard, no usage stats, no metrics exporter.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")
    # A worker sees only the GPUs Ray assigned to it, and a 0-GPU worker none (Ray sets
    # CUDA_VISIBLE_DEVICES to ''); said explicitly because Ray plans to change that default.
    os.environ["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "1"
    # Ray prestarts one idle worker per CPU for the first driver, but the site workers (actors)
    # need the job's runtime env, so those never serve a site: on 2 cores they only slow the
    # actors' own start-up (a Python + Ray import each) and are killed later.
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    # A simulated node's own settings (sites/node.py `node_settings`): the image cache is the
    # config's (one machine); split tables, the sites' egress logs and what a site keeps between
    # rounds on its own disk (FedBN's BatchNorm, for --resume) go into the run folder. They
    # travel with every message (server/simulation/node_app.py), so a warm worker serves any run.
    settings = {
        "cache-dir": str(cfg.data.cache_dir),
        "splits-dir": str((run.path / "splits").resolve()),
        "egress-dir": str((run.path / "egress").resolve()),
        "state-dir": str((run.path / "site-state").resolve())}
    from flwr.simulation import run_simulation  # lazy: Flower loads only when a run starts

    # Flower sets its own logger up at import; its per-round dumps drown our one-line progress.
    flwr_log = logging.getLogger("flwr")
    flwr_log.setLevel(logging.DEBUG if verbose else logging.CRITICAL)
    flwr_log.propagate = False

    from chestfed.server.app import make_server_app  # lazy: brings in flwr, scipy, sklearn, torch

    address = ray_address(cfg.runtime.ray_address)
    logging_level = logging.INFO if verbose else logging.ERROR
    n_cpus = os.cpu_count() or 1
    if address:  # an existing cluster: its CPUs and GPUs are what it has, not this machine's
        init_args: dict[str, Any] = {"address": address, "logging_level": logging_level,
                                     "log_to_driver": True}
    else:
        init_args = {"include_dashboard": False, "num_cpus": n_cpus,
                     "logging_level": logging_level, "log_to_driver": True}
        if cfg.runtime.cpus_per_site != "auto" and cfg.runtime.cpus_per_site > n_cpus:
            raise ConfigError(f"runtime.cpus_per_site is {cfg.runtime.cpus_per_site} but this "
                              f"machine has {n_cpus} CPUs")
    from chestfed.server.strategies.registry import needs_pooled_node  # lazy: brings in flwr, torch

    # One node per site; pooling adds a simulation-only node holding the union of their data.
    nodes = len(cfg.sites) + int(needs_pooled_node(cfg.strategy.name, cfg.strategy.loso_base))
    # Ray is started here, not by Flower, so the launcher's SIGTERM handler survives ray.init
    # and run.json names the session to clean up if the launcher dies (server/simulation/ray_session.py).
    from chestfed.server.simulation.ray_session import current_session, start_ray

    import ray  # lazy: ray loads only when this runs

    if keep_warm and ray.is_initialized():
        session = current_session()
    else:
        try:
            session = start_ray(init_args, env=_worker_env())
        except ConnectionError as exc:  # nothing at that address, or not a Ray cluster
            raise ConfigError(f"runtime.ray_address / RAY_ADDRESS '{address}': cannot attach to a "
                              f"Ray cluster there ({str(exc).splitlines()[0] if str(exc) else exc!r}); "
                              f"start one with `ray start --head` (README 'Scale out')") from None
    resources = _site_resources(cfg, nodes, address)
    backend_config: dict[str, Any] = {"client_resources": resources["per_site"], "init_args": init_args}
    if keep_warm:
        warm_pool.install()
        backend_config[warm_pool.POOL_KEY] = "sites"
    run.status.note(ray_session=session, ray_address=address, resources=resources)
    from chestfed.server.simulation.node_app import SimulatedNodeApp  # lazy: brings in flwr

    run_simulation(server_app=make_server_app(cfg, run, observer=observer),
                   client_app=SimulatedNodeApp(client_app, settings),  # type: ignore[arg-type]
                   num_supernodes=nodes, backend_name="ray",
                   backend_config=backend_config, verbose_logging=verbose)
    if not keep_warm:
        # What follows is the launcher's exit, whose final garbage collection would walk every
        # object torch, Ray, Flower and W&B made (3-7 s here) only to free memory the OS takes
        # back anyway. Frozen objects are skipped; anything made after this is collected as usual.
        gc.freeze()


# What every site worker needs from the launcher's environment (see server/simulation/ray_session.py
# start_ray: a cluster's workers do not inherit it).
_WORKER_ENV = ("FLWR_LOG_LEVEL", "WANDB_MODE", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "OMP_WAIT_POLICY")
# (OMP_WAIT_POLICY is passed on, not set: spinning threads are 14-38 % faster on cores of their
# own here, passive ones far better when other jobs want the cores; docs/performance.md.)


def _worker_env() -> dict[str, str]:
    return {k: os.environ[k] for k in _WORKER_ENV if k in os.environ}


def _site_resources(cfg: ExperimentConfig, n_sites: int, address: str | None) -> dict[str, Any]:
    """Each site worker's Ray resources from the cluster Ray reports (runtime.cpus_per_site and
    gpus_per_site 'auto' resolved), and what they came from; run.json keeps it as `resources`."""
    import ray  # lazy: ray loads only when this runs

    nodes = nodes_from_ray(ray.nodes())
    cpus = cpus_per_site(cfg.runtime.cpus_per_site, cfg.runtime.gpus_per_site, nodes, n_sites)
    gpus = gpus_per_site(cfg.runtime.gpus_per_site, nodes, cpus, n_sites)
    where = f"the Ray cluster at {address}" if address else "this machine"
    total_gpus = sum(n.gpus for n in nodes)
    if gpus > 0 and total_gpus == 0:
        raise ConfigError(f"runtime.gpus_per_site is {gpus:g} but {where} has no GPU; "
                          f"use runtime.gpus_per_site: auto (or 0) to train on CPUs")
    check_fits(nodes, cpus, gpus, where)
    return {"per_site": {"num_cpus": cpus, "num_gpus": gpus},
            "cpus_per_site_setting": cfg.runtime.cpus_per_site,
            "gpus_per_site_setting": cfg.runtime.gpus_per_site,
            "cluster": {"nodes": len(nodes), "CPU": sum(n.cpus for n in nodes), "GPU": total_gpus},
            "concurrent_sites": min(n_sites, workers_that_fit(nodes, cpus, gpus)),
            "sites": n_sites}
