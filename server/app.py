"""The Flower ServerApp: one experiment from site discovery to the final matrix.

`app` is the component `flwr run` loads (it reads the config path from the run config key
`config`); `make_server_app(cfg, run)` builds the same thing for the simulation launcher,
which has already validated the config and created the run folder.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import ExperimentConfig, load_config
from common.errors import ChestFedError
from server.coordinator import Coordinator
from server.matrix import build_results, format_table
from server.runfolder import RunFolder
from server.strategies import RUNNERS, needs_pooled_node
from server.tracking import Tracker

log = logging.getLogger(__name__)


def run_experiment(grid: Grid, cfg: ExperimentConfig, run: RunFolder,
                   echo: Callable[[str], None] = print, join_timeout: float = 120.0) -> dict[str, Any]:
    """Run the configured strategy and write results.json. Status is left to the caller."""
    name = cfg.strategy.name
    if name not in RUNNERS:
        raise ChestFedError(f"strategy '{name}' is not available yet in this version")
    tracker = Tracker(cfg, run.path, name=f"{name}-{run.path.name}")
    ok = False
    try:
        coord = Coordinator(grid, cfg, run, tracker, echo)
        t0 = time.perf_counter()
        coord.discover(timeout=join_timeout,
                       pooled=needs_pooled_node(name, cfg.strategy.loso_base))
        echo(f"{len(cfg.sites)} sites joined: " + ", ".join(
            f"{s} ({int(coord.site_info[s]['n_train'])} train / {int(coord.site_info[s]['n_test'])} test)"
            for s in coord.training_sites()) + f"  ({time.perf_counter() - t0:.1f} s)")
        models = RUNNERS[name](coord)
        ckpts = coord.save_models(models)
        t1 = time.perf_counter()
        matrix = coord.evaluate_matrix(models, split="test")
        eval_seconds = time.perf_counter() - t1
        results = build_results(cfg, models, matrix, ckpts, coord, eval_seconds)
        run.write_results({"status": "complete", **results})
        tracker.summary({"images_processed": coord.images_processed,
                         "optimizer_steps": coord.optimizer_steps})
        rows, columns = results["table"]["rows"], results["table"]["columns"]
        tracker.log_matrix(rows, columns)
        for line in format_table(results):
            echo(line)
        ok = True
        return results
    finally:
        tracker.finish(0 if ok else 1)


def make_server_app(cfg: ExperimentConfig, run: RunFolder, echo: Callable[[str], None] = print) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:  # noqa: ARG001 (context: flwr's signature)
        run_experiment(grid, cfg, run, echo)

    return app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry for `flwr run`: the run config names the experiment YAML (`config`)."""
    cfg = load_config(str(context.run_config.get("config", "")) or None)
    run = RunFolder.create(cfg.output_dir, cfg.experiment, cfg.strategy.name)
    run.write_config(cfg.to_yaml())
    run.set_status("running", strategy=cfg.strategy.name, experiment=cfg.experiment)
    try:
        run_experiment(grid, cfg, run, log.info)
    except KeyboardInterrupt:
        run.set_status("interrupted")
        raise
    except BaseException as exc:
        run.set_status("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    run.set_status("complete")
    log.info("run folder: %s", Path(run.path).resolve())
