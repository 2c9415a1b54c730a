#!/usr/bin/env python
"""Run one experiment in Flower's Simulation Engine (Ray): every site is a simulated node.

    python launch/simulate.py --strategy fedavg [--config configs/x.yaml] [key=value ...]
    python launch/simulate.py --resume runs/<experiment>/<strategy>-<time>   # after a crash

With no --config it runs configs/default.yaml (three phantom hospitals; needs no data).
Every site's data is checked first, as `launch/describe.py` does (sites/preflight.py), and so
are the files the run starts from (model.weights, strategy.sequential.init:
server/run/start_files.py): a mistake there is one line and exit 2, before Ray starts and with no
run folder.
--resume continues an interrupted or failed run in its own folder after its last completed round
(server/run/resume.py); the final model equals an uninterrupted run's. A complete run, or a
--config / overrides that differ from the run's own config, is refused (exit 2).
Exit codes: 0 complete, 1 the run failed (its folder says why), 2 bad arguments, config or site
data (nothing written), 130 interrupted (Ctrl-C), 143 (SIGTERM).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from chestfed.launch.before_run import hard_exit, prepare_sites
from chestfed.launch.warm_runs import announce
from chestfed.launch.cli import (EXIT_FAILED, EXIT_USAGE, fail, ignore_interrupts, interrupt_exit_code,
                                 setup_logging, sigterm_as_interrupt)

from chestfed.common.config import STRATEGIES, load_config
from chestfed.common.errors import ChestFedError, root_cause
from chestfed.server.run.folder import RunFolder
from chestfed.server.run.resume import prepare_resume
from chestfed.server.simulation.ray_session import stop_ray


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="simulate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--strategy", help=f"one of: {', '.join(STRATEGIES)} (default: the config's)")
    p.add_argument("--config", help="experiment YAML (default: configs/default.yaml)")
    p.add_argument("--verbose", "-v", action="store_true", help="show Flower's and Ray's logs")
    p.add_argument("--run-dir", help="write the run into exactly this (new) folder instead of "
                   "runs/<experiment>/<strategy>-<time>/ (scripts and benchmarks use it)")
    p.add_argument("--resume", metavar="RUN_FOLDER",
                   help="continue an interrupted run from its last completed round")
    p.add_argument("--no-preflight", action="store_true", help=argparse.SUPPRESS)  # tests: a check the preflight would catch
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override config values, e.g. strategy.rounds=5 data.image_size=32")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    resume = None
    try:
        if args.resume:
            if args.run_dir:
                raise ChestFedError("--resume continues in the run's own folder; drop --run-dir")

            given = load_config(args.config, args.overrides, args.strategy) \
                if (args.config or args.overrides or args.strategy) else None
            cfg, resume_run, resume = prepare_resume(args.resume, given)
        else:
            cfg = load_config(args.config, args.overrides, args.strategy)
    except ChestFedError as exc:
        fail(str(exc))
        return EXIT_USAGE
    # Every site's data, before Ray starts and before the run folder exists; then every site's
    # image cache, built here with a progress bar and a line per site (Ray's workers then find
    # it built). compare.py and tune.py do both once for all their runs, in one process.
    if not args.no_preflight:
        code = prepare_sites(cfg, verbose=args.verbose)
        if code is not None:
            return code

    sigterm_as_interrupt()  # from here on, Ctrl-C and SIGTERM end the run `interrupted`
    command = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    try:
        if resume is not None:  # the folder keeps its config and what it has written
            run = resume_run
            run.status.start(resumed_from=resume["position"], resume_command=command)
        else:
            run = RunFolder.new(cfg, args.run_dir)
            try:
                run.status.start(strategy=cfg.strategy.name, experiment=cfg.experiment,
                                 command=command)
            except BaseException:
                run.discard()  # a full disk or Ctrl-C: leave no half-written folder behind
                raise
    except ChestFedError as exc:
        fail(str(exc))
        return EXIT_USAGE
    except OSError as exc:  # a full disk, most likely
        fail(f"output_dir '{cfg.output_dir}': cannot write the run folder ({exc.strerror or exc})")
        return EXIT_USAGE
    except KeyboardInterrupt as exc:
        return interrupt_exit_code(exc)
    if resume is not None:
        print(f"chestfed: resuming {run.path} after {resume['position']}", flush=True)
    announce(cfg, run, resumed=resume is not None)
    t0 = time.perf_counter()
    try:
        from chestfed.server.simulation.engine import simulate  # torch, Flower, Ray: after the cheap checks
        # lazy: brings in PIL, flwr, pandas, scipy, sklearn, torch
        from chestfed.sites.app import app as client_app

        simulate(cfg, run, client_app, verbose=args.verbose)
    except KeyboardInterrupt as exc:
        ignore_interrupts()
        try:
            run.status.set("interrupted")
            fail(f"interrupted; partial results in {run.path}")
        finally:  # whatever fails here, never wait on Flower's blocked threads (hard_exit says why)
            hard_exit(interrupt_exit_code(exc))
    except BaseException as exc:  # ChestFedError: the user's to fix; anything else: a bug or I/O
        ignore_interrupts()
        line = run.status.fail(exc)
        stop_ray()
        where = "" if isinstance(root_cause(exc), ChestFedError) else \
            f" (traceback in {run.path / 'error.log'})"
        fail(f"{line}{where}\nrun folder (failed): {run.path}")
        return EXIT_FAILED
    ignore_interrupts()
    run.status.set("complete")
    stop_ray()
    print(f"done in {time.perf_counter() - t0:.1f} s; run folder: {run.path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
