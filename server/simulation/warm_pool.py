"""Site workers kept warm between the runs of one comparison or tuning study.

Flower 1.41's Simulation Engine builds a pool of Ray actors (the site workers) for every
`run_simulation` and shuts Ray down at its end (flwr/server/superlink/fleet/vce/backend/
raybackend.py `RayBackend.terminate`). A comparison of 8 runs then pays Ray's start, one Python +
torch import per worker and the workers' data loading 8 times. Flower has no backend registry:
`vce_api.start_vce` imports `RayBackend` from that module at call time (vce_api.py, `backend_fn`),
so replacing the module attribute with a subclass is enough, and the subclass behaves exactly like
Flower's unless its backend config names a pool (`{"warm_pool": name}`):

- `build` takes a cached pool of the same name, Ray session and per-worker resources (every actor
  must still answer; a crashed one is replaced by a fresh pool), else builds one as Flower does;
- `terminate` (called after Flower's worker threads have all joined, so every actor is back in
  the pool) keeps the pool and Ray instead of ending them.

The workers' own caches (a site's decoded images, its model skeleton: sites/data.py, sites/app.py)
are keyed by the config they came from, so a later run with other settings never sees an
earlier run's state; what differs per run (the run folder's splits/, egress/, site-state/) reaches
a worker with every message (server/simulation/node_app.py), not through its environment.
"""
from __future__ import annotations

import json
import logging
import threading
from typing import Any

log = logging.getLogger(__name__)

POOL_KEY = "warm_pool"
_POOLS: dict[tuple[str, str, str], Any] = {}
_LOCK = threading.Lock()
_installed = False


def install() -> None:
    """Make Flower's Simulation Engine build `WarmRayBackend` (Flower's own behaviour for a
    backend config without POOL_KEY). Idempotent."""
    global _installed
    if _installed:
        return
    import ray  # lazy: ray and flwr load only when a warm run starts
    from flwr.server.superlink.fleet.vce.backend import raybackend  # lazy: as above
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool, ClientAppActor  # lazy: as above

    stock = raybackend.RayBackend

    class WarmRayBackend(stock):  # type: ignore[misc, valid-type]
        def __init__(self, backend_config: dict[str, Any]) -> None:
            self._warm = str(backend_config.get(POOL_KEY) or "")
            super().__init__(backend_config)  # init_ray: skipped, Ray is already up

        def _key(self) -> tuple[str, str, str]:
            session = str(ray.get_runtime_context().get_job_id())
            return (self._warm, session, json.dumps(self.client_resources, sort_keys=True))

        def build(self, app_fn: Any) -> None:
            if not self._warm:
                return super().build(app_fn)
            with _LOCK:
                pool = _POOLS.pop(self._key(), None)  # one simulation owns a pool at a time
                if pool is not None and not _answers(pool):
                    _end(pool)
                    pool = None
                if pool is None:
                    pool = BasicActorPool(actor_type=ClientAppActor,
                                          client_resources=self.client_resources,
                                          actor_kwargs=self.actor_kwargs)
                    pool.add_actors_to_pool(pool.actors_capacity)
                self.pool = pool
                self.app_fn = app_fn

        def terminate(self) -> None:
            if not self._warm:
                return super().terminate()
            with _LOCK:
                if self.pool is not None:
                    _POOLS[self._key()] = self.pool
                self.pool = None
                self.app_fn = None

    raybackend.RayBackend = WarmRayBackend
    _installed = True


def _answers(pool: Any, timeout: float = 30.0) -> bool:
    """Every actor of the pool is alive and idle (a worker that crashed in the last run, or
    one still busy with an abandoned job, means a fresh pool)."""
    import ray  # lazy: ray loads only when this runs

    try:
        if getattr(pool, "_future_to_actor", None):
            return False
        ray.get([a.__ray_ready__.remote() for a in pool.pool], timeout=timeout)
        return True
    except Exception as exc:  # noqa: BLE001 (an actor's death surfaces as any of Ray's errors)
        log.warning("site workers of the last run did not answer (%s); starting fresh ones", exc)
        return False


def _end(pool: Any) -> None:
    import ray  # lazy: ray loads only when this runs

    for actor in list(getattr(pool, "pool", [])):
        try:
            ray.kill(actor)
        except Exception:  # noqa: BLE001 (already gone)
            pass


def close() -> None:
    """End every kept worker (before Ray shuts down, or when a study is done)."""
    with _LOCK:
        for pool in _POOLS.values():
            _end(pool)
        _POOLS.clear()
