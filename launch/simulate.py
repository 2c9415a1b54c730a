#!/usr/bin/env python
"""Run one experiment in Flower's Simulation Engine (Ray): every site is a simulated node.

    python launch/simulate.py --strategy fedavg [--config configs/x.yaml] [key=value ...]

With no --config it runs configs/default.yaml (three phantom hospitals; needs no data).
Every site's data is checked first, as `launch/sites.py describe` does (sites/preflight.py): a
mistake there is one line and exit 2, before Ray starts and with no run folder.
Exit codes: 0 complete, 1 the run failed (its folder says why), 2 bad arguments, config or site
data (nothing written), 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repo on sys.path)
from _common import (EXIT_FAILED, EXIT_USAGE, fail, hard_exit, preflight, setup_logging,
                     sigterm_as_interrupt)

from common.config import STRATEGIES, load_config
from common.errors import ChestFedError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="simulate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--strategy", help=f"one of: {', '.join(STRATEGIES)} (default: the config's)")
    p.add_argument("--config", help="experiment YAML (default: configs/default.yaml)")
    p.add_argument("--verbose", "-v", action="store_true", help="show Flower's and Ray's logs")
    p.add_argument("--run-dir", help="write the run into exactly this (new) folder instead of "
                   "runs/<experiment>/<strategy>-<time>/ (launch/compare.py uses it)")
    p.add_argument("--no-preflight", action="store_true", help=argparse.SUPPRESS)  # compare.py
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override config values, e.g. strategy.rounds=5 data.image_size=32")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    try:
        cfg = load_config(args.config, args.overrides, args.strategy)
    except ChestFedError as exc:
        fail(str(exc))
        return EXIT_USAGE
    # Every site's data, before Ray starts and before the run folder exists; then every site's
    # image cache, built here with a progress bar and a line per site (Ray's workers then find
    # it built). compare.py does both once for all its runs and passes --no-preflight.
    if not args.no_preflight and not preflight(cfg, verbose=args.verbose):
        return EXIT_USAGE
    from sites.data import build_caches
    try:
        if not args.no_preflight:
            build_caches(cfg)
    except ChestFedError as exc:  # e.g. data.on_bad_image: error and an unreadable image
        fail(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        fail("interrupted while caching images (no cache is left half-written)")
        return 130

    from server.runfolder import RunFolder
    from server.simulation import simulate
    from sites.app import app as client_app

    if args.run_dir:
        if Path(args.run_dir).exists():
            fail(f"--run-dir '{args.run_dir}' already exists; give a new folder")
            return EXIT_USAGE
        Path(args.run_dir).mkdir(parents=True)
        run = RunFolder(Path(args.run_dir))
    else:
        run = RunFolder.create(cfg.output_dir, cfg.experiment, cfg.strategy.name)
    run.write_config(cfg.to_yaml())
    run.set_status("running", strategy=cfg.strategy.name, experiment=cfg.experiment,
                   command=" ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]))
    print(f"chestfed: {cfg.strategy.name} on {len(cfg.sites)} sites -> {run.path}", flush=True)
    for note in cfg.fallbacks:
        print(f"chestfed: fallback {note}", flush=True)
    sigterm_as_interrupt()
    t0 = time.perf_counter()
    try:
        simulate(cfg, run, client_app, verbose=args.verbose)
    except KeyboardInterrupt:
        run.set_status("interrupted")
        fail(f"interrupted; partial results in {run.path}")
        hard_exit(130)
    except ChestFedError as exc:
        run.set_status("failed", error=str(exc))
        fail(f"{exc}\nrun folder (failed): {run.path}")
        return EXIT_FAILED
    except Exception as exc:
        run.set_status("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    run.set_status("complete")
    print(f"done in {time.perf_counter() - t0:.1f} s; run folder: {run.path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
