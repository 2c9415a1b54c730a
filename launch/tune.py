#!/usr/bin/env python
"""Tune every strategy on validation with the same budget, then compare the tuned strategies.

    python launch/tune.py --strategies local,fedavg --trials 8 [--seeds 3] [--config C]
                          [--run-dir DIR] [key=value ...]
    python launch/tune.py --resume DIR        # a killed or finished study: never reruns a trial

For each strategy, `--trials` Optuna trials (TPE) search `tune.space` (the config's, else the
schema's: learning rate, local epochs, FedProx's mu, the FedOpt server rate; a key a strategy
does not use is left out of its search). A trial is a whole run scored on the *validation*
splits only (`tune.objective`: val_auroc or val_loss; eval.final_split: val, so no trial reads a
test split); a trial whose per-round validation curve trails the others is pruned
(`tune.pruner`). Then each strategy's best configuration is retrained for `--seeds` seeds and
scored once on the test splits, as launch/compare.py does. Everything runs in this process, in
one Ray session with warm site workers (launch/warm_runs.py).

DIR (default runs/<experiment>/tune-<time>/) holds study.db (the Optuna study; `tune.storage`
takes any database URL instead), tune.json (what was asked), tuning.json, trials/<strategy>-t<k>/
and finals/<strategy>-seed<s>/ (run folders), runs.json, report.md and report.html.
With `runtime.ray_address` (a Ray cluster) trials run side by side, as many as the cluster holds
(`tune.jobs` or --jobs to say how many; on one machine 1 unless told).
Exit codes: 0 done, 1 some final failed, 2 bad arguments, config, space, storage or site data
(nothing started), 130 / 143 interrupted (the study keeps every finished trial: --resume).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from chestfed.launch.before_run import hard_exit, prepare_sites
from chestfed.launch.cli import (EXIT_FAILED, EXIT_USAGE, fail, ignore_interrupts, interrupt_exit_code,
                                 setup_logging, sigterm_as_interrupt)
from chestfed.launch.warm_runs import REPEATING, WarmRuns

from chestfed.common.atomic import write_json
from chestfed.common.config import STRATEGIES, ExperimentConfig, load_config
from chestfed.common.errors import ChestFedError, ConfigError, StopRun
from chestfed.server.run.lifecycle import RunStatus
from chestfed.server.simulation.resources import ray_address
from chestfed.server.tuning import space as S
from chestfed.server.tuning import study as T

# What makes a run a trial: scored on validation only, no bootstrap CIs, pairs or report (the
# trial's number is its validation score), its W&B job type.
TRIAL = ["eval.final_split=val", "eval.bootstrap=0", "eval.pairs=none", "eval.report=false",
         "wandb.job_type=trial"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tune.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--strategies", help=f"comma-separated, from: {', '.join(STRATEGIES)}")
    p.add_argument("--trials", type=int, help="trials per strategy (the same for every strategy)")
    p.add_argument("--seeds", type=int, default=1, help="seeds of each strategy's final runs")
    p.add_argument("--config", help="experiment YAML (default: configs/default.yaml)")
    p.add_argument("--run-dir", help="the study folder (default: runs/<experiment>/tune-<time>)")
    p.add_argument("--resume", metavar="DIR", help="continue the study in DIR")
    p.add_argument("--jobs", type=int, help="trials side by side (default: tune.jobs)")
    p.add_argument("--worker", metavar="DIR", help=argparse.SUPPRESS)  # a parallel trial job
    p.add_argument("--verbose", "-v", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_args(argv)


class Study:
    """One tuning run: its folder, what was asked, the strategies' configs, space and studies."""

    def __init__(self, folder: Path, asked: dict[str, Any]) -> None:
        self.folder, self.asked = folder, asked
        self.strategies: list[str] = asked["strategies"]
        self.trials, self.seeds = int(asked["trials"]), int(asked["seeds"])
        self.cfgs = {s: self.load(s) for s in self.strategies}
        base = self.base = self.cfgs[self.strategies[0]]
        tune = base.tune
        self.params = S.parse_space(tune.space, lambda key, value: self.load(
            self.strategies[0], [f"{key}={value}"]))
        self.direction = "maximize" if tune.objective == "val_auroc" else "minimize"
        self.url = T.storage_url(tune.storage, folder)
        self.mark = T.fingerprint(_comparable(base), tune.space, tune.objective)

    def load(self, strategy: str, extra: list[str] = ()) -> ExperimentConfig:
        return load_config(self.asked.get("config"), [*self.asked["overrides"], *extra], strategy)

    def open(self) -> dict[str, Any]:
        storage = T.open_storage(self.url)
        T.check_owner(storage, self.base.experiment, self.mark)
        return {s: T.open_study(storage, self.base.experiment, s, self.mark, self.direction,
                                self.base.tune.pruner, self.base.seed + i)
                for i, s in enumerate(self.strategies)}

    def searched(self, strategy: str) -> list[S.Param]:
        return S.for_strategy(self.params, strategy, self.cfgs[strategy].strategy.loso_base)


def _comparable(cfg: ExperimentConfig) -> str:
    """The config a study's trials are comparable under (not where W&B or the runs go)."""
    dump = cfg.model_dump(mode="json")
    for key in ("wandb", "output_dir", "fallbacks"):
        dump.pop(key, None)
    dump["strategy"].pop("name", None)
    return str(sorted(dump.items()))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    if args.worker:
        return _worker(Path(args.worker), args.verbose)
    try:
        folder, asked, study = _setup(args)
    except ChestFedError as exc:
        fail(str(exc))
        return EXIT_USAGE
    code = prepare_sites(study.base, verbose=args.verbose, configs=list(study.cfgs.values()))
    if code is not None:
        return code
    try:
        studies = study.open()
    except ChestFedError as exc:
        fail(str(exc))
        return EXIT_USAGE
    write_json(folder / "tune.json", asked)
    for strategy, keys in S.unused_keys(study.params, study.strategies,
                                        study.base.strategy.loso_base).items():
        if keys:
            print(f"tune: {strategy} does not use {', '.join(keys)}; left out of its search", flush=True)
    for strategy, st in studies.items():
        again = T.abandon_running(st)
        if again:
            print(f"tune: {strategy}: {len(again)} trial(s) the last session left running will run again",
                  flush=True)
    print(f"chestfed tune: {', '.join(study.strategies)} x {study.trials} trials, then "
          f"{study.seeds} seed(s) each -> {folder}", flush=True)
    print(f"tune: space: {'; '.join(p.describe() for p in study.params)}; objective "
          f"{study.base.tune.objective} (validation only)", flush=True)
    sigterm_as_interrupt()
    warm = WarmRuns(verbose=args.verbose)
    clock = _Clock(study)
    workers: list[subprocess.Popen] = []
    try:
        jobs = _jobs(args.jobs, study.base)
        workers = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker",
                                     str(folder)] + (["-v"] if args.verbose else []))
                   for _ in range(jobs - 1)]
        _trials(study, studies, warm, clock)
        for w in workers:
            w.wait()
        runs = _finals(study, studies, warm, clock)
    except ChestFedError as exc:  # every trial would fail the same way (a site's data, the config)
        ignore_interrupts()
        for w in workers:
            w.terminate()
        fail(str(exc))
        try:
            _write(study, studies, _final_runs(study))
        finally:
            warm.close()
        return EXIT_FAILED
    except KeyboardInterrupt as exc:
        ignore_interrupts()
        for w in workers:
            w.terminate()
        fail(f"interrupted; the study keeps its finished trials: python launch/tune.py --resume {folder}")
        _write(study, studies, _final_runs(study))
        hard_exit(interrupt_exit_code(exc))
        return 130  # not reached
    ignore_interrupts()
    try:
        paths = _write(study, studies, runs)
    finally:
        warm.close()
    print(f"\ntuned comparison in {clock.elapsed() / 60:.1f} min: {paths['md']}", flush=True)
    failed = [r for r in runs if r["status"] != "complete"]
    if failed:
        fail("finals failed: " + "; ".join(f"{r['strategy']} seed {r['seed']} ({r['status']}, "
                                          f"see {r['run']})" for r in failed))
        return EXIT_FAILED
    return 0


def _setup(args: argparse.Namespace) -> tuple[Path, dict[str, Any], Study]:
    """The study folder, what was asked and the checked study; ChestFedError: one line, exit 2."""
    if args.resume:
        folder = Path(args.resume)
        asked_file = folder / "tune.json"
        if not asked_file.is_file():
            raise ConfigError(f"--resume {folder}: no tune.json there (not a study folder)")
        if args.strategies or args.trials or args.config or args.overrides or args.run_dir:
            raise ConfigError("--resume continues the study as it was asked; give no other options")
        asked = json.loads(asked_file.read_text())
        return folder, asked, Study(folder, asked)
    if not args.strategies:
        raise ConfigError("--strategies is required, e.g. --strategies local,fedavg")
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    twice = sorted({s for s in strategies if strategies.count(s) > 1})
    if twice:
        raise ConfigError(f"--strategies names {', '.join(twice)} more than once")
    if not strategies:
        raise ConfigError("--strategies is empty")
    if args.trials is None or args.trials < 1:
        raise ConfigError("--trials must be at least 1 (the same number for every strategy)")
    if args.seeds < 1:
        raise ConfigError("--seeds must be at least 1")
    if "loso" in strategies:
        raise ConfigError("loso is an evaluation protocol (one model per held-out site), not a "
                          "strategy to tune; tune its base (strategy.loso_base) instead")
    asked = {"strategies": strategies, "trials": args.trials, "seeds": args.seeds,
             "config": args.config, "overrides": list(args.overrides),
             "created": datetime.now().isoformat(timespec="seconds")}
    base = load_config(args.config, args.overrides, strategies[0])
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = Path(args.run_dir) if args.run_dir else Path(base.output_dir) / base.experiment / f"tune-{stamp}"
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(f"study folder '{folder}' exists and is not empty (continue it with "
                          f"--resume {folder})")
    asked["group"] = f"{base.experiment}-tune-{stamp}"
    study = Study(folder, asked)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the study folder '{folder}' ({exc.strerror or exc})") from None
    return folder, asked, study


def _jobs(given: int | None, cfg: ExperimentConfig) -> int:
    """Trials side by side: as asked, else tune.jobs, else 1 on one machine and as many as the
    Ray cluster holds (its CPUs over a run's: one worker per site)."""
    if given is not None:
        if given < 1:
            raise ConfigError("--jobs must be at least 1")
        return given
    if cfg.tune.jobs:
        return cfg.tune.jobs
    if not cfg.runtime.ray_address:
        return 1
    import ray  # lazy: only on a cluster

    ray.init(address=ray_address(cfg.runtime.ray_address), logging_level="ERROR")
    try:
        cpus = float(ray.cluster_resources().get("CPU", 1))
    finally:
        ray.shutdown()
    # 'auto' shares a cluster out for one run alone; side by side, count the smallest worker
    # (give runtime.cpus_per_site a number to size the trials' workers yourself).
    from chestfed.server.simulation.resources import MIN_CPUS_PER_WORKER  # lazy: with Ray above

    share = cfg.runtime.cpus_per_site
    per_run = (MIN_CPUS_PER_WORKER if share == "auto" else share) * (len(cfg.sites) + 1)
    return max(1, int(cpus // per_run))


class _Clock:
    """Time per trial and per final so far, for the 'time left' of each progress line."""

    def __init__(self, study: Study) -> None:
        self.t0, self.study = time.perf_counter(), study
        self.trial_s: list[float] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self, trials_left: int, finals_left: int) -> str:
        if not self.trial_s:
            return "?"
        per = sum(self.trial_s) / len(self.trial_s)
        secs = per * trials_left + per * 1.3 * finals_left  # a final also scores the test splits
        return f"~{secs / 60:.0f} min" if secs >= 90 else f"~{secs:.0f} s"


def _lock(folder: Path) -> Any:
    from filelock import FileLock  # lazy: only for a study

    return FileLock(str(folder / ".tune.lock"))


def _next(study: Study, studies: dict[str, Any]) -> tuple[str, Any, int] | None:
    """The next (strategy, Optuna trial, k) to run, asked under the study folder's lock so that
    parallel jobs never start more than `--trials` per strategy."""
    with _lock(study.folder):
        for strategy in study.strategies:
            st = studies[strategy]
            c = T.counts(st)
            started = sum(c.get(k, 0) for k in (*T.FINISHED, "RUNNING"))
            if started < study.trials:
                return strategy, st.ask(), started + 1
    return None


def _trials(study: Study, studies: dict[str, Any], warm: WarmRuns, clock: _Clock) -> None:
    import optuna  # lazy: brings in sqlalchemy

    while True:
        nxt = _next(study, studies)
        if nxt is None:
            return
        strategy, trial, k = nxt
        params = study.searched(strategy)
        values = {p.key: p.suggest(trial) for p in params}
        cfg = study.load(strategy, [*S.overrides(values), *TRIAL, f"wandb.group={study.asked['group']}"])
        run_dir = study.folder / "trials" / f"{strategy}-t{trial.number:03d}"
        shown = " ".join(f"{k_}={_short(v)}" for k_, v in values.items()) or "(defaults)"
        print(f"\n== tune: {strategy} trial {k}/{study.trials}: {shown}", flush=True)
        out = warm.run(cfg, run_dir, f"tune.py trial {strategy} {trial.number}",
                       observer=_pruning(trial, cfg.tune.objective))
        trial.set_user_attr("run", str(run_dir))
        trial.set_user_attr("seconds", round(out["seconds"], 1))
        res = _results(run_dir)  # read once: the trial's images and its validation score
        trial.set_user_attr("images", int((res.get("budget") or {}).get("images_processed") or 0))
        clock.trial_s.append(out["seconds"])
        if out["status"] == "complete":
            value = _score(res, run_dir, cfg.tune.objective)
            if value is None:
                studies[strategy].tell(trial, state=optuna.trial.TrialState.FAIL)
                outcome = "no validation score (failed)"
            else:
                studies[strategy].tell(trial, value)
                outcome = f"{cfg.tune.objective} {value:.4f}"
        elif out["status"] == "pruned":
            trial.set_user_attr("pruned_after", out["error"])
            studies[strategy].tell(trial, state=optuna.trial.TrialState.PRUNED)
            outcome = f"pruned ({out['error']})"
        else:
            studies[strategy].tell(trial, state=optuna.trial.TrialState.FAIL)
            outcome = f"failed: {out['error']}"
            if out["error_kind"] in REPEATING:
                raise ChestFedError(f"stopping the study: every trial would fail the same way ({out['error']})")
        trials_left = sum(max(0, study.trials - sum(T.counts(st).get(x, 0) for x in T.FINISHED))
                          for st in studies.values())
        print(f"tune: {strategy} trial {k}/{study.trials}: {outcome}  ({out['seconds']:.0f} s; "
              f"{clock.left(trials_left, len(study.strategies) * study.seeds)} left)", flush=True)


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _pruning(trial: Any, objective: str) -> Any:
    """A round observer: report the round's validation score; raise StopRun when Optuna prunes."""
    key = "val_auroc" if objective == "val_auroc" else "val_loss"

    def observe(round_: int, total: int, rows: list[dict[str, Any]]) -> None:
        vals = [float(r[key]) for r in rows if key in r and r[key] == r[key]]
        if not vals:
            return
        trial.report(sum(vals) / len(vals), step=round_)
        if round_ < total and trial.should_prune():
            raise StopRun("pruned", f"after round {round_}/{total}")

    return observe


def _results(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return {}


def _score(res: dict[str, Any], run_dir: Path, objective: str) -> float | None:
    """The trial's validation score: mean AUROC over every (model, validation site) cell of its
    final models, or the mean validation loss of its last validated round."""
    if res.get("scored_on") != "val":  # never a test matrix
        return None
    if objective == "val_auroc":
        cells = [v for row in (res.get("table") or {}).get("rows", [])
                 for v in row[1:1 + len(res.get("sites", {}))]]
        vals = [float(v) for v in cells if isinstance(v, (int, float)) and not math.isnan(float(v))]
        return sum(vals) / len(vals) if vals else None
    rows = []
    try:
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            if "val_loss" in row and row["val_loss"] == row["val_loss"]:
                rows.append(row)
    except (OSError, ValueError):
        return None
    if not rows:
        return None
    last = max(r["round"] for r in rows)
    vals = [r["val_loss"] for r in rows if r["round"] == last]
    return sum(vals) / len(vals)


def _final_runs(study: Study) -> list[dict[str, Any]]:
    runs = []
    for k in range(study.seeds):
        for strategy in study.strategies:
            seed = study.base.seed + k
            run_dir = study.folder / "finals" / f"{strategy}-seed{seed}"
            info = RunStatus(run_dir).read() if RunStatus(run_dir).exists() else {}
            runs.append({"strategy": strategy, "seed": seed, "run": str(run_dir),
                         "status": info.get("status", "not started") if isinstance(info, dict) else "?"})
    return runs


def _finals(study: Study, studies: dict[str, Any], warm: WarmRuns, clock: _Clock) -> list[dict[str, Any]]:
    """Each strategy's best configuration for --seeds seeds, scored once on the test splits. A
    final already complete (a resumed study) is kept, not rerun."""
    split_seed = study.base.data.split.seed if study.base.data.split.seed is not None else study.base.seed
    runs = []
    plan = _final_runs(study)
    for n, r in enumerate(plan, start=1):
        strategy, seed = r["strategy"], r["seed"]
        if r["status"] == "complete":
            runs.append({**r, "exit_code": 0, "seconds": 0.0})
            continue
        best = T.best(studies[strategy], study.trials)
        if best is None:
            print(f"tune: {strategy}: no trial completed; no final", flush=True)
            runs.append({**r, "status": "no completed trial", "exit_code": EXIT_FAILED, "seconds": 0.0})
            continue
        run_dir = Path(r["run"])
        if run_dir.exists():  # an interrupted final: start it again from nothing
            shutil.rmtree(run_dir)
        cfg = study.load(strategy, [*S.overrides(best.params), f"seed={seed}",
                                    f"data.split.seed={split_seed}", "wandb.job_type=final",
                                    f"wandb.group={study.asked['group']}"])
        chosen = " ".join(f"{k}={_short(v)}" for k, v in best.params.items()) or "(defaults)"
        print(f"\n== final: {strategy}, seed {seed} ({n}/{len(plan)}): {chosen}", flush=True)
        out = warm.run(cfg, run_dir, f"tune.py final {strategy} seed {seed}")
        runs.append({**r, "status": out["status"], "exit_code": 0 if out["status"] == "complete" else 1,
                     "seconds": round(out["seconds"], 1)})
    return runs


def _summary(study: Study, studies: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"trials": study.trials, "seeds": study.seeds,
                           "objective": study.base.tune.objective, "direction": study.direction,
                           "pruner": study.base.tune.pruner,
                           "storage": study.url.split("@")[-1],  # never a password
                           "space": [p.describe() for p in study.params], "strategies": {}}
    unused = S.unused_keys(study.params, study.strategies, study.base.strategy.loso_base)
    for strategy, st in studies.items():
        best = T.best(st, study.trials)
        out["strategies"][strategy] = {
            "searched": [p.key for p in study.searched(strategy)],
            "unused": unused[strategy],
            "trials": T.trial_rows(T.finished(st, study.trials) + [
                t for t in st.get_trials(deepcopy=False) if t.state.name == "FAIL"]),
            "best": {"number": best.number, "value": best.value, "params": dict(best.params),
                     "run": best.user_attrs.get("run")} if best else None,
            "importance": T.importance(st, study.trials)}
    return out


def _write(study: Study, studies: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Path]:
    # lazy: brings in matplotlib, scipy, sklearn
    from chestfed.server.report.comparison import write_comparison
    from chestfed.server.report.tuning import tuning_section

    summary = _summary(study, studies)
    write_json(study.folder / "tuning.json", summary)
    write_json(study.folder / "runs.json", runs)
    return write_comparison(study.folder, runs, study.strategies, preface=tuning_section(summary))


def _worker(folder: Path, verbose: bool) -> int:
    """A parallel trial job (started by the main tune.py): runs trials until every strategy has
    its count, then leaves; the main process runs the finals."""
    asked = json.loads((folder / "tune.json").read_text())
    study = Study(folder, asked)
    studies = study.open()
    sigterm_as_interrupt()
    warm = WarmRuns(verbose=verbose)
    try:
        _trials(study, studies, warm, _Clock(study))
    except KeyboardInterrupt as exc:
        hard_exit(interrupt_exit_code(exc))
    finally:
        warm.close()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    sys.exit(main())
