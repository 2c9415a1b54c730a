#!/usr/bin/env python
"""Run several strategies on the same sites, splits and seeds, and compare them side by side.

    python launch/compare.py --strategies local,pooled,sequential,fedavg [--config C] [--seeds N] [key=value ...]

Every (strategy, seed) is one simulate.py run (one W&B run; all share a project and a group).
Seeds vary the training (initialisation, batch order); the splits stay those of the base seed,
so every run is scored on the same test images. The comparison folder
`runs/<experiment>/compare-<time>/` holds the runs, the strategy x site table (internal /
external, mean ± sd over seeds), the generalization gap, a heatmap per strategy, the
in/out/all-domain bar chart (Cohen et al., Fig. 2) and report.md / report.html.
Every site's data, and the files each strategy starts from (model.weights,
strategy.sequential.init), are checked once, before anything is written (sites/preflight.py,
server/run/start_files.py).
Exit codes: 0 all runs complete, 1 some run failed (named), 2 bad arguments, config or site data,
130 (Ctrl-C) / 143 (SIGTERM) interrupted: the running strategy is asked to stop and ends
`interrupted`, and runs.json and the report of the runs that finished are still written.
A data or config error, which every strategy would hit again, stops the comparison at once.
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from chestfed.launch.before_run import prepare_sites
from chestfed.launch.cli import EXIT_FAILED, EXIT_USAGE, REPO, fail, ignore_interrupts, setup_logging

from chestfed.common.config import STRATEGIES, load_config
from chestfed.common.errors import ChestFedError
from chestfed.server.run.lifecycle import RunStatus
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

    runs: list[dict] = []
    stop = _Stop()
    t0 = time.perf_counter()
    for k in range(args.seeds):
        seed = base.seed + k
        for strategy in strategies:
            if stop.signum or stop.repeats:
                break
            run_dir = folder / "runs" / f"{strategy}-seed{seed}"
            cmd = [sys.executable, str(REPO / "launch" / "simulate.py"), "--strategy", strategy,
                   "--run-dir", str(run_dir), "--no-preflight"]
            if args.config:
                cmd += ["--config", args.config]
            cmd += [*args.overrides, f"seed={seed}", f"data.split.seed={split_seed}",
                    f"wandb.group={group}"]
            print(f"\n== {strategy}, seed {seed}", flush=True)
            t1 = time.perf_counter()
            code = stop.run(cmd)
            info = _info(run_dir)
            status = info.get("status", "not started")
            runs.append({"strategy": strategy, "seed": seed, "run": str(run_dir), "exit_code": code,
                         "status": status, "seconds": round(time.perf_counter() - t1, 1)})
            if code == EXIT_USAGE or info.get("error_kind") in REPEATING:
                stop.repeats = info.get("error") or f"simulate.py exited {code}"
    if stop.signum:
        ignore_interrupts()
    if stop.repeats:
        fail(f"stopping the comparison: every strategy would fail the same way ({stop.repeats})")
    failed = [r for r in runs if r["status"] != "complete" or r["exit_code"] != 0]

    # lazy: brings in matplotlib, scipy, sklearn
    from chestfed.server.report.comparison import write_comparison

    paths = write_comparison(folder, runs, strategies)
    (folder / "runs.json").write_text(json.dumps(runs, indent=2))
    print(f"\ncomparison of {len(runs) - len(failed)} run(s) in {time.perf_counter() - t0:.0f} s: "
          f"{paths['md']}", flush=True)
    if stop.signum:
        fail(f"interrupted; {len(runs) - len(failed)} finished run(s) compared in {folder}")
        return 128 + stop.signum
    if failed:
        fail("runs failed: " + "; ".join(f"{r['strategy']} seed {r['seed']} ({r['status']}, "
                                        f"see {r['run']})" for r in failed))
        return EXIT_FAILED
    return 0


# Failures that do not depend on the strategy: a site's data, a phantom's options, the config.
REPEATING = ("DataError", "SiteDataError", "PhantomOptionError", "ConfigError")


def _info(run_dir: Path) -> dict:
    try:
        info = RunStatus(run_dir).read()
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


class _Stop:
    """Runs one simulate.py at a time. Ctrl-C or SIGTERM is handed to the running child (which
    ends its run `interrupted` and stops Ray), waited for (at most GRACE s, then killed), and no
    further run starts."""

    GRACE = 30.0

    def __init__(self) -> None:
        self.signum = 0
        self.repeats = ""
        self.child: subprocess.Popen | None = None
        self._since = 0.0
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.signum:  # a second Ctrl-C changes nothing
            return
        self.signum, self._since = signum, time.monotonic()
        child = self.child
        if child is not None and child.poll() is None:
            try:  # Ctrl-C in a terminal reached the child too; it ignores the second one
                child.send_signal(signum)
            except OSError:
                pass

    def run(self, cmd: list[str]) -> int:
        self.child = subprocess.Popen(cmd)
        try:
            while True:
                try:
                    return self.child.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    if self.signum and time.monotonic() - self._since > self.GRACE:
                        self.child.kill()
        finally:
            self.child = None


if __name__ == "__main__":
    sys.exit(main())
