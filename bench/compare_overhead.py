#!/usr/bin/env python
"""What does a comparison pay per run besides training and scoring? The same strategies x seeds
(a) through `launch/compare.py` (one process, one Ray session, warm site workers) and (b) as
separate `launch/simulate.py` commands, in one run of this benchmark.

Per run, its work is what it spent in rounds, in choosing / recalibrating / saving its models,
in the final evaluation and on its report (metrics.jsonl `round_seconds`, results.json
`finish_seconds`, run.json `report_seconds`); the fixed cost per run is (wall time - the runs'
work) / runs, for each side: Python, torch, Ray, the site workers, data loading, discovery. Reported: both fixed costs and `ratio` = (b) wall / (a) wall.
Goal (issue 24): fixed cost per run through compare.py <= 3 s, ratio >= 1.3.

    python bench/compare_overhead.py                 # local,pooled,sequential,fedavg x 2 seeds
    python bench/compare_overhead.py --rounds 3 --size 64
Writes bench/results/compare_overhead.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util as U  # noqa: E402


def work_seconds(run: Path) -> float:
    """What one run spends on its own job: its rounds (each counted once), choosing, recalibrating
    and saving its models, the final evaluation and its report. The rest of its wall time is the
    fixed cost (start-up, discovery, teardown)."""
    rounds: dict[int, float] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "round_seconds" in row:
            rounds[int(row["round"])] = float(row["round_seconds"])
    results = json.loads((run / "results.json").read_text())
    finish = results.get("finish_seconds") or {"evaluate": results.get("eval_seconds") or 0.0}
    report = json.loads((run / "run.json").read_text()).get("report_seconds") or 0.0
    return sum(rounds.values()) + sum(float(v) for v in finish.values()) + float(report)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strategies", default="local,pooled,sequential,fedavg")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--size", type=int, default=32)
    args = p.parse_args()
    strategies = args.strategies.split(",")
    with tempfile.TemporaryDirectory(prefix="chestfed-compare-bench-") as tmp:
        root = Path(tmp)
        common = [f"strategy.rounds={args.rounds}", f"data.image_size={args.size}",
                  "train.local_epochs=1", f"output_dir={root / 'runs'}", "wandb.mode=disabled"]
        U.warm_cache(U.REPO / "configs" / "default.yaml")
        # (b) separate commands first, then (a): the page cache is as warm for both
        separate_dir = root / "separate"
        separate_wall, separate_work = 0.0, 0.0
        for k in range(args.seeds):
            for s in strategies:
                run = separate_dir / f"{s}-seed{k}"
                r = U.run_timed([U.PYTHON, "launch/simulate.py", "--strategy", s, "--run-dir", str(run),
                                 *common, f"seed={k}", "data.split.seed=0"], timeout=1800)
                separate_wall += r["wall_s"]
                separate_work += work_seconds(run)
        out = root / "compare"
        r = U.run_timed([U.PYTHON, "launch/compare.py", "--strategies", args.strategies,
                         "--seeds", str(args.seeds), "--out", str(out), *common], timeout=3600)
        compare_wall = r["wall_s"]
        compare_work = sum(work_seconds(run) for run in (out / "runs").iterdir())
    n = args.seeds * len(strategies)
    payload = {"strategies": strategies, "seeds": args.seeds, "runs": n, "rounds": args.rounds,
               "image_size": args.size,
               "compare_wall_s": compare_wall, "separate_wall_s": separate_wall,
               "compare_work_s": compare_work, "separate_work_s": separate_work,
               "fixed_cost_per_run_s": (compare_wall - compare_work) / n,
               "separate_fixed_cost_per_run_s": (separate_wall - separate_work) / n,
               "ratio": separate_wall / compare_wall,
               "goal": {"fixed_cost_per_run_s": 3.0, "ratio": 1.3}}
    path = U.write_result("compare_overhead", payload)
    print(U.table([["compare.py (one process)", compare_wall, compare_work, payload["fixed_cost_per_run_s"]],
                   ["separate simulate.py", separate_wall, separate_work,
                    payload["separate_fixed_cost_per_run_s"]]],
                  ["side", "wall s", "work s", "fixed s / run"]))
    print(f"ratio (separate / compare wall): {payload['ratio']:.2f}   -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
