#!/usr/bin/env python
"""Which dataset shift hurts which strategy? One kind of shift switched on at a time.

Three phantom hospitals start identical in kind (preset a's population, acquisition and
labeller; each its own seed, so its own patients). Each condition then gives sites 2 and 3 one
knob of presets b and c only:
  none         no shift (the reference)
  acquisition  b's / c's contrast curve, noise, blur, collimation, rotation, marker (covariate)
  prevalence   b's / c's finding prevalences (prior)
  labeller     b's / c's thresholds, label noise and unannotated findings (concept)
  shortcut     site 3 draws a chest drain with pneumothorax (a spurious device)
For every condition it runs launch/compare.py over the strategies, then tabulates in-domain,
out-of-domain AUROC and the gap. The seeds claim a same-source advantage (gap > 0) and that
label shift matters more than image shift; this is evidence for or against, on phantoms.

    python bench/shift_study.py [--strategies local,pooled,...] [--seeds 1] [--size 400] [--rounds 4]

Writes bench/results/shift_study.json (and the comparison folders under runs/shift-study/).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sites.phantom.spec import load_preset  # noqa: E402

ALL = "local,pooled,sequential,fedavg,fedprox,fedadam,fedyogi,fedbn,loso"
CONDITIONS = ("none", "acquisition", "prevalence", "labeller", "shortcut")


def site_options(condition: str, preset: str, size: int, seed: int) -> dict:
    """Preset a, with one section taken from `preset` according to the condition."""
    base = load_preset("a")
    other = load_preset(preset)
    opts = {"preset": "a", "seed": seed, "population": {"size": size}}
    if condition == "acquisition":
        opts["acquisition"] = other["acquisition"]
    elif condition == "prevalence":
        opts["population"]["prevalence"] = other["population"]["prevalence"]
    elif condition == "labeller":
        opts["labeller"] = other["labeller"]
    elif condition == "shortcut" and other.get("shortcut"):
        opts["shortcut"] = other["shortcut"]
    assert base  # preset a is the common ground
    return opts


def config(condition: str, size: int, rounds: int, out: Path) -> Path:
    sites = [{"name": "site1", "kind": "phantom", "options": site_options("none", "a", size, 11)},
             {"name": "site2", "kind": "phantom", "options": site_options(condition, "b", size, 12)},
             {"name": "site3", "kind": "phantom", "options": site_options(condition, "c", size, 13)}]
    cfg = {"experiment": f"shift-{condition}", "output_dir": str(REPO / "runs" / "shift-study"),
           "data": {"image_size": 64}, "sites": sites, "model": {"arch": "smallcnn", "width": 16},
           "train": {"local_epochs": 1, "batch_size": 32}, "strategy": {"rounds": rounds},
           "eval": {"bootstrap": 0}, "wandb": {"mode": "offline"}}
    f = out / f"shift-{condition}.yaml"
    f.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return f


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strategies", default=ALL)
    p.add_argument("--conditions", default=",".join(CONDITIONS))
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--size", type=int, default=400, help="images per site")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", default="shift_study.json", help="file name under bench/results/")
    args = p.parse_args()
    out = REPO / "bench" / "results"
    cfg_dir = REPO / "runs" / "shift-study" / "configs"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    table: dict[str, dict] = {}
    t0 = time.perf_counter()
    for condition in args.conditions.split(","):
        f = config(condition, args.size, args.rounds, cfg_dir)
        folder = REPO / "runs" / "shift-study" / f"compare-{condition}-{time.strftime('%Y%m%d-%H%M%S')}"
        code = subprocess.call([sys.executable, str(REPO / "launch" / "compare.py"), "--config", str(f),
                                "--strategies", args.strategies, "--seeds", str(args.seeds),
                                "--out", str(folder)])
        comp = json.loads((folder / "comparison.json").read_text())
        table[condition] = {"exit_code": code, "folder": str(folder),
                            "strategies": {s: {k: row[k] for k in ("in_domain", "out_domain", "all_domain", "gap")}
                                           for s, row in comp["strategies"].items()}}
    result = {"conditions": table, "strategies": args.strategies.split(","), "seeds": args.seeds,
              "size_per_site": args.size, "rounds": args.rounds,
              "wall_seconds": round(time.perf_counter() - t0, 1)}
    (out / args.out).write_text(json.dumps(result, indent=2))
    print_table(result)
    return 0


def print_table(result: dict) -> None:
    strategies = result["strategies"]
    print("\ngap = in-domain AUROC - out-of-domain AUROC (mean over seeds); all = all-domain AUROC")
    print(f"{'condition':<12}" + "".join(f"{s:>18}" for s in strategies))
    for condition, row in result["conditions"].items():
        cells = []
        for s in strategies:
            r = row["strategies"].get(s)
            if r is None:
                cells.append(f"{'failed':>18}")
                continue
            gap, allm = r["gap"][0], r["all_domain"][0]
            gap_s = "   n/a" if gap is None or gap != gap else f"{gap:+.3f}"
            all_s = "n/a" if allm is None or allm != allm else f"{allm:.3f}"
            cells.append(f"{gap_s} / {all_s}".rjust(18))
        print(f"{condition:<12}" + "".join(cells))


if __name__ == "__main__":
    sys.exit(main())
