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

from chestfed.common.config import ExperimentConfig, load_config
from chestfed.common.errors import ChestFedError
from chestfed.server.federation.federation import Federation
from chestfed.server.federation.round_record import RoundObserver
from chestfed.server.evaluation.batchnorm import reestimate_all
from chestfed.server.evaluation.evaluator import evaluate, settings_of
from chestfed.server.evaluation.results import build_results, format_table
from chestfed.server.evaluation.selection import select_checkpoints
from chestfed.server.run.folder import RunFolder, echo
from chestfed.server.strategies.registry import RUNNERS, needs_pooled_node
from chestfed.server.tracking import Tracker
from chestfed.common.deploy.supervision import start_watchdog
from chestfed.server.deploy.packed_grid import PackedGrid
from chestfed.server.deploy.short_poll import ShortPollGrid
from chestfed.server.deploy.run_files import PROGRESS_FILE, WIRE_FILE, ProgressEcho, WireAudit, prepared_run, refuse_pooling

log = logging.getLogger(__name__)


def run_experiment(grid: Grid, cfg: ExperimentConfig, run: RunFolder,
                   echo: Callable[[str], None] = echo, join_timeout: float | None = None,
                   site_nodes: dict[str, int] | None = None,
                   observer: RoundObserver | None = None) -> dict[str, Any]:
    """Run the configured strategy and write results.json. Status is left to the caller.
    `join_timeout`: cfg.runtime.join_timeout unless given (a deployment's --join-timeout);
    `site_nodes` (deployment): site -> the node id its registered key has; `observer` sees
    each round (launch/tune.py)."""
    name = cfg.strategy.name
    if name not in RUNNERS:
        raise ChestFedError(f"strategy '{name}' is not available yet in this version")
    tracker = Tracker(cfg, run.path, name=run.path.name)
    ok = False
    try:
        fed = Federation.open(grid, cfg, run, tracker, echo, observer)
        sites = fed.sites
        sites.registered = {int(node): site for site, node in (site_nodes or {}).items()}
        t0 = time.perf_counter()
        fed.discover(timeout=join_timeout or cfg.runtime.join_timeout,
                     pooled=needs_pooled_node(name, cfg.strategy.loso_base))
        echo(f"{len(cfg.sites)} sites joined: " + ", ".join(
            f"{s} ({int(sites.site_info[s]['n_train'])} train / {int(sites.site_info[s]['n_test'])} test)"
            for s in sites.training_sites() if s in sites.site_info) +
            "".join(f", {s} (data failed)" for s in sites.unavailable) +
            f"  ({time.perf_counter() - t0:.1f} s)")
        models = RUNNERS[name](fed)
        t_end = time.perf_counter()  # training done: what follows is choosing, saving, scoring
        # eval.checkpoints: final / best_val
        models = select_checkpoints(models, cfg.eval.checkpoints, fed.validation.best)
        settings = settings_of(cfg.eval, cfg.seed)
        # PreciseBN: statistics of the final weights on the models' own training data, before
        # anything is saved or scored (server/evaluation/batchnorm.py).
        reestimate_all(sites, models, cfg.eval.batchnorm, fed.models.probe(), settings)
        ckpts = fed.models.save_final(run, models, name)
        t1 = time.perf_counter()
        # the shared evaluator (thresholds, CIs, pairs). eval.final_split: test, or val for a
        # tuning trial (never a test split: SiteLink.check_split)
        evaluation = evaluate(sites, models, fed.models.labels, settings, split=cfg.eval.final_split)
        eval_seconds = time.perf_counter() - t1
        results = build_results(cfg, models, evaluation.matrix, ckpts, record=fed.record,
                                sites=sites, eval_seconds=eval_seconds, evaluation=evaluation)
        results["privacy"] = fed.record.privacy.summary()  # epsilon per site, SecAgg+ (server/privacy/ledger.py)
        # where the run's time went after training (bench/compare_overhead.py counts it as work)
        results["finish_seconds"] = {"select_recalibrate_save": t1 - t_end, "evaluate": eval_seconds}
        run.write_results({"status": "complete", "scored_on": cfg.eval.final_split, **results})
        figures: dict[str, Path] = {}
        if cfg.eval.report and cfg.eval.final_split == "test":  # the report reads a test matrix
            from chestfed.server.report import write_report  # lazy: brings in matplotlib

            try:  # the numbers are safe in results.json; a report bug must not fail the run
                t2 = time.perf_counter()
                figures = write_report(run.path)
                run.status.note(report_seconds=round(time.perf_counter() - t2, 3))
                echo(f"report: {run.path / 'report.html'}")
            except Exception as exc:  # noqa: BLE001
                log.exception("report not written")
                echo(f"report not written ({type(exc).__name__}: {exc}); "
                     f"re-render with: python launch/report.py {run.path}")
        tracker.summary({"images_processed": fed.record.images_processed,
                         "optimizer_steps": fed.record.optimizer_steps})
        rows, columns = results["table"]["rows"], results["table"]["columns"]
        tracker.log_matrix(rows, columns, image=figures.get("heatmap"))
        if cfg.eval.final_split == "test":  # a trial's validation matrix is launch/tune.py's to show
            for line in format_table(results):
                echo(line)
        ok = True
        return results
    finally:
        tracker.finish(0 if ok else 1)


def make_server_app(cfg: ExperimentConfig, run: RunFolder, echo: Callable[[str], None] = echo,
                    observer: RoundObserver | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:  # noqa: ARG001 (context: flwr's signature)
        if cfg.privacy.secagg:  # what the coordinator saw of each site (masked) in wire.jsonl

            grid = WireAudit(grid, run.path / WIRE_FILE)
        run_experiment(grid, cfg, run, echo, observer=observer)

    return app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry for `flwr run` (the Deployment Engine). The run config key `config` names either an
    experiment YAML, or a run folder that launch/server.py prepared (config.yaml +
    deployment.json: join timeout, resume); the latter is how `launch/server.py` submits runs."""

    target = str(context.run_config.get("config", "")) or None
    spec: dict[str, Any] = {}
    join_timeout = None  # the config's runtime.join_timeout
    if target and Path(target).is_dir():
        cfg, run, spec = prepared_run(Path(target))
        join_timeout = float(spec.get("join_timeout", 120.0))
        if spec.get("coordinator_pid"):  # die with launch/server.py: no orphaned ServerApp
            start_watchdog(int(spec["coordinator_pid"]))
    else:
        cfg = load_config(target)
        run = RunFolder.new(cfg)
    run.status.set("running", strategy=cfg.strategy.name, experiment=cfg.experiment)
    echo = ProgressEcho(run.path / PROGRESS_FILE)
    try:
        refuse_pooling(cfg.strategy.name, cfg.strategy.loso_base)
        # Every message in and out is described (shapes and types, no values) in wire.jsonl,
        # as the strategies see it; on the wire each message's weights are one Array.
        run_experiment(WireAudit(ShortPollGrid(PackedGrid(grid)), run.path / WIRE_FILE), cfg, run, echo,
                       join_timeout,
                       spec.get("site_nodes"))
    except KeyboardInterrupt:
        run.status.set("interrupted")
        raise
    except BaseException as exc:
        echo(f"failed: {run.status.fail(exc)}")
        raise
    run.status.set("complete")
    echo(f"run folder: {Path(run.path).resolve()}")
