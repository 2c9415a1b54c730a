#!/usr/bin/env python
"""Run several strategies on the same sites, splits and seeds, and compare them side by side.

    python launch/compare.py --strategies local,pooled,sequential,fedavg [--config C] [--seeds N] [key=value ...]

Every (strategy, seed) is one run as simulate.py makes it (its own folder and W&B run; all share
a project and a group), all in this process: one Ray session and the same warm site workers serve
every run (launch/warm_runs.py), so a run after the first starts in about a second.
Seeds vary the training (initialisation, batch order); the splits stay those of the base seed,
so every run is scored on the same test images. The comparison folder
`runs/<experiment>/compare-<time>/` holds the runs, the strategy x site table (internal /
external, mean ± sd over seeds), the generalization gap, a heatmap per strategy, the
in/out/all-domain bar chart (Cohen et al., Fig. 2) and report.md / report.html.
Every site's data, and the files each strategy starts from (model.weights,
strategy.sequential.init), are checked once, before anything is written (sites/preflight.py,
server/run/start_files.py).
Exit codes: 0 all runs complete, 1 some run failed (named), 2 bad arguments, config or site data,
130 (Ctrl-C) / 143 (SIGTERM) interrupted: the running run ends `interrupted`, and runs.json and
the report of the runs that finished are still written.
A data or config error, which every strategy would hit again, stops the comparison at once.
"""
from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path

from chestfed.launch.before_run import hard_exit, prepare_sites
from chestfed.launch.cli import (EXIT_FAILED, EXIT_USAGE, fail, ignore_interrupts, interrupt_exit_code,
                                 setup_logging, sigterm_as_interrupt)
from chestfed.launch.warm_runs import REPEATING, WarmRuns

from chestfed.common.config import STRATEGIES, load_config
from chestfed.common.errors import ChestFedError
from chestfed.common.atomic import write_json
from chestfed.server.run.lifecycle import settle_experiment


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="compare.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--strategies", default="local,pooled,sequential,fedavg",
                   help=f"comma-separated, from: {', '.join(STRATEGIES)}")
    p.add_argument("--config", help="experiment YAML (default: configs/default.yaml)")
    p.add_argument("--seeds", type=int, default=1, help="number of training seeds per strategy")
    p.add_argument("--out", help="comparison folder (default: runs/<experiment>/compare-<time>)")
    p.add_argument("--verbose", "-v", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    twice = sorted({s for s in strategies if strategies.count(s) > 1})
    if twice:
        fail(f"--strategies names {', '.join(twice)} more than once")
        return EXIT_USAGE
    if args.seeds < 1:
        fail("--seeds must be at least 1")
        return EXIT_USAGE
    try:
        if not strategies:
            raise ChestFedError("--strategies is empty")
        cfgs = {s: load_config(args.config, args.overrides, s) for s in strategies}
    except ChestFedError as exc:
        fail(str(exc))
        return EXIT_USAGE
    base = next(iter(cfgs.values()))
    # The sites are the same for every strategy: check them once, before any folder or run.
    code = prepare_sites(base, verbose=args.verbose, configs=list(cfgs.values()))
    if code is not None:
        return code
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = Path(args.out) if args.out else Path(base.output_dir) / base.experiment / f"compare-{stamp}"
    if folder.exists() and any(folder.iterdir()):
        fail(f"comparison folder '{folder}' exists and is not empty")
        return EXIT_USAGE
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"cannot create the comparison folder '{folder}' ({exc.strerror or exc})")
        return EXIT_USAGE

    settle_experiment(Path(base.output_dir) / base.experiment)  # runs whose launcher died
    group = f"{base.experiment}-compare-{stamp}"
    split_seed = base.data.split.seed if base.data.split.seed is not None else base.seed
    print(f"chestfed compare: {', '.join(strategies)} x {args.seeds} seed(s) -> {folder}", flush=True)

    plan = [(base.seed + k, strategy) for k in range(args.seeds) for strategy in strategies]
    runs: list[dict] = []
    t0 = time.perf_counter()
    interrupted, repeats = 0, ""
    current: dict | None = None
    sigterm_as_interrupt()  # from here on, Ctrl-C and SIGTERM end the running run `interrupted`
    warm = WarmRuns(verbose=args.verbose)
    try:
        for seed, strategy in plan:
            run_dir = folder / "runs" / f"{strategy}-seed{seed}"
            cfg = load_config(args.config, [*args.overrides, f"seed={seed}",  # checked above
                                            f"data.split.seed={split_seed}",
                                            f"wandb.group={group}"], strategy)
            current = {"strategy": strategy, "seed": seed, "run": str(run_dir)}
            command = " ".join(["compare.py", "--strategy", strategy, *args.overrides, f"seed={seed}"])
            print(f"\n== {strategy}, seed {seed}", flush=True)
            out = warm.run(cfg, run_dir, command)
            current = None
            runs.append({"strategy": strategy, "seed": seed, "run": str(run_dir),
                         "exit_code": 0 if out["status"] == "complete" else EXIT_FAILED,
                         "status": out["status"], "seconds": round(out["seconds"], 1)})
            if out["error_kind"] in REPEATING:
                repeats = out["error"]
                break
    except KeyboardInterrupt as exc:
        interrupted = interrupt_exit_code(exc)
        ignore_interrupts()
        if current is not None:
            runs.append({**current, "exit_code": interrupted, "status": "interrupted", "seconds": 0.0})
    if repeats:
        fail(f"stopping the comparison: every strategy would fail the same way ({repeats})")
    failed = [r for r in runs if r["status"] != "complete" or r["exit_code"] != 0]
    ignore_interrupts()  # the comparison of what finished is written whatever comes now
    try:
        # lazy: brings in matplotlib, scipy, sklearn
        from chestfed.server.report.comparison import write_comparison

        paths = write_comparison(folder, runs, strategies)
        write_json(folder / "runs.json", runs)
        print(f"\ncomparison of {len(runs) - len(failed)} run(s) in {time.perf_counter() - t0:.0f} s: "
              f"{paths['md']}", flush=True)
    finally:
        if interrupted:  # Flower's blocked threads: leave at once (launch/before_run.py hard_exit)
            fail(f"interrupted; {len(runs) - len(failed)} finished run(s) compared in {folder}")
            hard_exit(interrupted)
        warm.close()
    if failed:
        fail("runs failed: " + "; ".join(f"{r['strategy']} seed {r['seed']} ({r['status']}, "
                                        f"see {r['run']})" for r in failed))
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
