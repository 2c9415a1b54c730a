"""Many runs in one process: one Ray session and warm site workers for a whole comparison or
tuning study (launch/compare.py, launch/tune.py).

Each run still gets its own run folder, run.json, W&B run, results and report, exactly as a
simulate.py run; what it no longer pays is a Python + torch import, a Ray start and the sites'
data loading (server/simulation/warm_pool.py). A run that fails is recorded and the next one
starts with fresh workers if the old ones stopped answering. Ctrl-C / SIGTERM (the caller turns
SIGTERM into KeyboardInterrupt) marks the running run `interrupted` and reaches the caller, which
writes what finished and leaves with launch/before_run.py `hard_exit`.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from chestfed.common.config import ExperimentConfig
from chestfed.common.errors import ChestFedError, StopRun, root_cause
from chestfed.launch.cli import fail
from chestfed.server.run.folder import RunFolder

# Failures that do not depend on the run's strategy or settings (a site's data, a phantom's
# options, the config): every later run of a comparison or study would hit them again.
REPEATING = ("DataError", "SiteDataError", "PhantomOptionError", "ConfigError")


def _outcome(status: str, t0: float, run: RunFolder | None = None, error: str = "",
             error_kind: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"status": status, "error": error, "error_kind": error_kind,
                           "seconds": time.perf_counter() - t0 if run is not None else 0.0}
    if run is not None:
        out["run"] = run.path
    return out


def announce(cfg: ExperimentConfig, run: RunFolder, resumed: bool = False) -> None:
    """A run's first lines: where it goes, its budget, fallbacks and warnings (simulate.py too)."""
    if not resumed:
        print(f"chestfed: {cfg.strategy.name} on {len(cfg.sites)} sites -> {run.path}", flush=True)
    print(f"chestfed: {cfg.budget_line()}", flush=True)
    for note in cfg.fallbacks:
        print(f"chestfed: fallback {note}", flush=True)
    for note in cfg.warnings():
        print(f"chestfed: warning: {note}", file=sys.stderr, flush=True)


class WarmRuns:
    """`run` one experiment after another in this process; `close` ends Ray and the workers."""

    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose

    def run(self, cfg: ExperimentConfig, run_dir: Path, command: str,
            observer: Any = None) -> dict[str, Any]:
        """The run's outcome: status (complete / failed / pruned / not started), error,
        error_kind, seconds. `observer`: server/federation/round_record.py RoundObserver.
        KeyboardInterrupt propagates after the run is marked interrupted."""
        t0 = time.perf_counter()
        try:
            run = RunFolder.new(cfg, str(run_dir))
            run.status.start(strategy=cfg.strategy.name, experiment=cfg.experiment, command=command)
        except (ChestFedError, OSError) as exc:
            line = str(exc) if isinstance(exc, ChestFedError) else \
                f"cannot write the run folder '{run_dir}' ({exc.strerror or exc})"
            fail(line)
            return _outcome("not started", t0, error=line, error_kind=type(exc).__name__)
        announce(cfg, run)
        try:
            # lazy: brings in torch, Flower, Ray, PIL, pandas, scipy, sklearn
            from chestfed.server.simulation.engine import simulate
            from chestfed.sites.app import app as client_app

            simulate(cfg, run, client_app, verbose=self.verbose, keep_warm=True, observer=observer)
        except KeyboardInterrupt:
            run.status.set("interrupted")
            raise
        except BaseException as exc:  # noqa: BLE001 (a run's failure is recorded, the next runs go on)
            cause = root_cause(exc)
            if isinstance(cause, StopRun):
                run.status.set(cause.status, note=str(cause))
                return _outcome(cause.status, t0, run, error=str(cause))
            line = run.status.fail(exc)
            where = "" if isinstance(cause, ChestFedError) else \
                f" (traceback in {run.path / 'error.log'})"
            fail(f"{line}{where}\nrun folder (failed): {run.path}")
            return _outcome("failed", t0, run, error=line, error_kind=type(cause).__name__)
        run.status.set("complete")
        out = _outcome("complete", t0, run)
        print(f"done in {out['seconds']:.1f} s; run folder: {run.path}", flush=True)
        return out

    def close(self) -> None:
        from chestfed.server.simulation.ray_session import stop_ray  # Ray: only when leaving

        stop_ray()
