#!/usr/bin/env python
"""What record-level differential privacy costs: AUROC against epsilon on the phantom hospitals.

For each target epsilon it picks DP-SGD's noise multiplier with Opacus' get_noise_multiplier so
that *every* site ends the run at or below that epsilon at delta = 1/N (N: the site's train
images; the sampling rate batch/N and the steps rounds x local_epochs x N/batch come from the
site's split, so the site with the largest rate sets the noise), then runs launch/simulate.py
for each strategy and seed with `privacy.dp.level=record` and that noise. epsilon = inf is
DP-SGD with clipping and no noise (GroupNorm, per-image clipping: the same model and optimiser
as the private runs, so the columns differ only by the noise). Seeds vary the training, the
splits stay seed 0's (as in launch/compare.py).

Reports per strategy and epsilon the mean internal AUROC (mean ± sd over seeds; for local, the
mean over the per-site models) and the largest epsilon any site actually spent (from
results.json). Writes bench/results/<out>.json and prints the table.

    python bench/privacy.py [--config C] [--strategies fedavg,local] [--epsilons inf,8,3,1]
        [--seeds 3] [--set key=value ...] [--out privacy] [--dry-run]

`--epsilons none` runs the reference without DP-SGD at all (BatchNorm, no per-image clipping).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _util import table, write_result  # noqa: E402


def site_sizes(config: str | None, overrides: list[str]) -> dict[str, int]:
    """Each site's train-split size, as a run makes it (builds the image caches once)."""
    from chestfed.common.config import load_config
    from chestfed.sites.data import load_site

    cfg = load_config(config, overrides, strategy="fedavg")
    return {s.name: len(load_site(cfg, s, progress=False).splits["train"]) for s in cfg.sites}


def noise_for(target: float, sizes: dict[str, int], batch: int, rounds: int, epochs: int) -> float:
    """The smallest noise multiplier that keeps every site at or below `target` at delta 1/N."""
    from chestfed.common.privacy import noise_for_epsilon

    if not math.isfinite(target):  # inf: DP-SGD without noise; NaN (`none`): no DP-SGD at all
        return 0.0
    zs = []
    for n in sizes.values():
        per_epoch = math.ceil(n / min(batch, n))  # Opacus: rate 1 / len(loader), len(loader) steps
        zs.append(noise_for_epsilon(target, 1.0 / n, 1.0 / per_epoch, rounds * epochs * per_epoch))
    return max(zs)


def _internal(res: dict[str, Any]) -> float:
    vals = [s["internal_mean"] for s in res["summary"].values()
            if isinstance(s.get("internal_mean"), (int, float)) and math.isfinite(s["internal_mean"])]
    return sum(vals) / len(vals) if vals else math.nan


def _spent(res: dict[str, Any]) -> float:
    sites = ((res.get("privacy") or {}).get("dp") or {}).get("sites") or {}
    eps = [s["epsilon"] for s in sites.values()]
    return math.inf if any(e == "inf" for e in eps) else max(eps, default=math.nan)


def run_one(config: str | None, strategy: str, eps: float, noise: float, seed: int,
            overrides: list[str], out_dir: Path) -> dict[str, Any]:
    tag = "none" if math.isnan(eps) else "inf" if not math.isfinite(eps) else f"{eps:g}".replace(".", "p")
    experiment = f"privacy-{strategy}-e{tag}-s{seed}"
    dp = (["privacy.dp.level=none"] if math.isnan(eps)  # the reference: no DP-SGD at all
          else ["privacy.dp.level=record", f"privacy.dp.noise_multiplier={noise}"])
    cmd = [sys.executable, str(REPO / "launch" / "simulate.py"), "--strategy", strategy,
           *(["--config", config] if config else []), *overrides, *dp, f"seed={seed}",
           "data.split.seed=0", f"experiment={experiment}", f"output_dir={out_dir}",
           "eval.report=false"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "offline"})
    row: dict[str, Any] = {"strategy": strategy, "target_epsilon": eps, "noise_multiplier": noise,
                           "seed": seed, "seconds": time.perf_counter() - t0, "rc": proc.returncode}
    runs = sorted((out_dir / experiment).glob(f"{strategy}-*/results.json"))
    if proc.returncode != 0 or not runs:
        row["error"] = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["no output"]
        return row
    res = json.loads(runs[-1].read_text())
    row.update({"auroc_internal": _internal(res), "epsilon_spent_max": _spent(res),
                "run": str(runs[-1].parent)})
    return row


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def _finite(x: Any) -> Any:
    """JSON has no infinity or NaN: epsilon inf (no noise) is written as the string 'inf', the
    no-DP reference's epsilon (NaN: there is none) as null."""
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("--strategies", default="fedavg,local")
    ap.add_argument("--epsilons", default="inf,8,3,1")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides for every run (e.g. strategy.rounds=2)")
    ap.add_argument("--out", default="privacy", help="bench/results/<out>.json")
    ap.add_argument("--dry-run", action="store_true", help="print the noise multipliers only")
    args = ap.parse_args(argv)

    from chestfed.common.config import load_config

    cfg = load_config(args.config, args.set, strategy="fedavg")
    sizes = site_sizes(args.config, args.set)
    targets = [math.nan if e == "none" else float(e) for e in args.epsilons.split(",")]
    noise = {e: noise_for(e, sizes, cfg.train.batch_size, cfg.strategy.rounds, cfg.train.local_epochs)
             for e in targets}
    print("train images per site: " + ", ".join(f"{s} {n}" for s, n in sizes.items()))
    print("noise multiplier per target epsilon (delta = 1/N): "
          + ", ".join(f"{e:g}: {z:.3f}" for e, z in noise.items()))
    if args.dry_run:
        return 0
    out_dir = REPO / "runs" / "privacy-bench"
    rows = []
    for strategy in args.strategies.split(","):
        for e in targets:
            for seed in range(args.seeds):
                row = run_one(args.config, strategy, e, noise[e], seed, args.set, out_dir)
                rows.append(row)
                print(f"{strategy} eps {e:g} seed {seed}: AUROC {row.get('auroc_internal', math.nan):.3f}, "
                      f"spent {row.get('epsilon_spent_max', math.nan)}, {row['seconds']:.0f} s"
                      + (f"  FAILED {row['error']}" if "error" in row else ""), flush=True)
    summary = []
    for strategy in args.strategies.split(","):
        for e in targets:
            sel = [r for r in rows if r["strategy"] == strategy and _same(r["target_epsilon"], e)]
            m, sd = _mean_sd([r.get("auroc_internal", math.nan) for r in sel])
            spent = [r.get("epsilon_spent_max", math.nan) for r in sel]
            summary.append({"strategy": strategy, "target_epsilon": e, "noise_multiplier": noise[e],
                            "auroc_mean": m, "auroc_sd": sd, "n": len(sel),
                            "epsilon_spent_max": max((x for x in spent if x == x), default=math.nan)})
    path = write_result(args.out, _finite({"sizes": sizes, "overrides": args.set, "seeds": args.seeds,
                                           "summary": summary, "runs": rows}))
    print(table([[s["strategy"], "no DP" if math.isnan(s["target_epsilon"]) else f"{s['target_epsilon']:g}",
                  s["noise_multiplier"],
                  f"{s['auroc_mean']:.3f} ± {s['auroc_sd']:.3f}", s["epsilon_spent_max"], s["n"]]
                 for s in summary],
                ["strategy", "target eps", "noise", "internal AUROC", "max eps spent", "runs"]))
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
