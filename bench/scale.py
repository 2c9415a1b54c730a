#!/usr/bin/env python
"""Does the federated machinery scale with the number of sites? By default a federation of 3, 32,
100 and 200 phantom hospitals (`population.sites`, --per-site images each) with client sampling
(--fraction of the sites train and are validated each round, at least strategy.min_sites), fedavg
in the Simulation Engine: time per round should follow the sampled sites, not the federation,
and peak memory stay flat (+<= 10 % from 32 to 200 sites). With --images instead, the sites share
that many images in total and every site trains every round (the earlier study: 3, 8, 16, 32).

Per site count it reports
  - wall time per round (median of rounds 2..N, from the timestamps of the progress lines;
    round 1 separately: it also pays each site worker's first-time costs, e.g. loading a site's
    data in the worker that first serves it, torch's lazy imports and kernel set-up);
  - CPU seconds per round summed over every process (less sensitive to other load than wall
    time), and the sites' own training seconds per round (metrics.jsonl `train_seconds`);
  - peak memory summed over the whole process tree (the launcher, Ray's GCS, raylet, agents
    and monitors, every site worker): PSS (shared pages split between the processes sharing
    them: what the tree really costs) and RSS (every process counted in full: an upper bound
    that counts torch's shared libraries once per process), with the PSS split by process kind.
Each is also given relative to the first site count; by default the first count runs again at
the end, and the baseline is the mean of its two runs (the spread shows the machine's drift).

Targets (--images): time per round within +-20 % as the sites grow; peak memory <= 1 GB + 150 MB
per site. The final cross-site evaluation scores the model at every site (its time is in wall_s).

    python bench/scale.py                                # 3, 32, 100, 200 sites, 10 % sampled
    python bench/scale.py --sites 3,8,16,32 --images 1800 --fraction 1   # all sites, same data
    python bench/scale.py --sites 3,32 --images 18000 --fraction 1       # ~10x the data
    python bench/scale.py --set runtime.cpus_per_site=2  # one site worker with 2 threads
Writes bench/results/scale.json.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util as U  # noqa: E402

ROUND = re.compile(r"^round (\d+)/(\d+)")


def run_one(n_sites: int, images: int | None, per_site: int, fraction: float, rounds: int,
            work: Path, extra: list[str], tag: str) -> dict:
    from chestfed.common.config.overrides import apply_override, parse_override

    if images is not None:  # the earlier study: the same total over more sites
        tree = U.site_overrides(n_sites=n_sites, total_images=images)
    else:  # a federation of n hospitals of per_site images each, from one option
        tree = U.site_overrides()
        tree.pop("sites")
        tree["population"] = {"sites": n_sites, "size": per_site}
    tree["experiment"] = f"bench-scale-{n_sites}"
    tree["strategy"]["rounds"] = rounds
    tree["strategy"]["fraction"] = tree["strategy"]["fraction_evaluate"] = fraction
    for text in extra:
        apply_override(tree, *parse_override(text))
    config = U.write_config(tree, work / f"sites{n_sites}.yaml")
    warm = U.warm_cache(config)
    run_dir = work / f"run{n_sites}-{tag}"
    r = U.run_timed([U.PYTHON, "launch/simulate.py", "--strategy", "fedavg", "--config", str(config),
                     "--run-dir", str(run_dir)],
                    marks={"joined": r" sites joined:"}, memory=True)
    smp = r["sampler"]
    t_prev = r["marks"]["joined"]
    wall: dict[int, float] = {}
    cpu: dict[int, float] = {}
    ends: dict[int, float] = {}  # round -> its end, seconds from the start
    for t, line in r["lines"]:
        m = ROUND.match(line)
        if m:
            k = int(m.group(1))
            wall[k], cpu[k], ends[k] = t - t_prev, smp.cpu_at(t) - smp.cpu_at(t_prev), t
            t_prev = t
    train_s: dict[int, float] = {}
    trained: dict[int, int] = {}  # sites that trained, per round (the sampled ones)
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            if "train_seconds" in row:
                train_s[row["round"]] = train_s.get(row["round"], 0.0) + row["train_seconds"]
                trained[row["round"]] = trained.get(row["round"], 0) + 1
    res = json.loads((run_dir / "results.json").read_text())
    steady = [k for k in sorted(wall) if k > 1]
    mem = r["peak_memory"]
    cpu_kind: dict[str, float] = {}
    if steady:  # the steady rounds run from the end of round 1 to the end of the last
        total = smp.cpu_by_kind(ends[steady[0] - 1], ends[steady[-1]])
        cpu_kind = {k: v / len(steady) for k, v in total.items()}
    steady_s = U.median([wall[k] for k in steady]) if steady else None
    sampled = U.median([trained[k] for k in steady if k in trained]) if steady else None
    total = images if images is not None else per_site * n_sites
    return {"sites": n_sites, "images_total": total, "images_per_site": total // n_sites,
            "fraction": fraction, "sampled_per_round": sampled,
            "steady_round_per_sampled_site_s": steady_s / sampled if steady_s and sampled else None,
            "budget": res.get("budget"), "sites_scored": len(res.get("matrix", {}).get("fedavg", {})),
            "rounds": rounds, "cache_warm_s": warm, "wall_s": r["wall_s"],
            "startup_s": r["marks"].get("joined"), "round_wall_s": wall, "round_cpu_s": cpu,
            "round_site_train_s": train_s, "steady_round_cpu_by_kind_s": cpu_kind,
            "round1_s": wall.get(1),
            "steady_round_s": steady_s,
            "steady_round_cpu_s": U.median([cpu[k] for k in steady]) if steady else None,
            "steady_site_train_s": U.median([train_s[k] for k in steady if k in train_s])
            if steady else None,
            "peak_pss_mb": mem["pss_mb"], "peak_rss_mb": mem["rss_mb"],
            "peak_processes": mem["processes"], "pss_by_kind_mb": mem["pss_by_kind_mb"],
            "memory_budget_mb": 1024 + 150 * n_sites,
            "output": [line for _, line in r["lines"]][-8:]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", default="3,32,100,200", help="site counts (default 3,32,100,200)")
    p.add_argument("--per-site", type=int, default=60, help="images per site (default 60)")
    p.add_argument("--fraction", type=float, default=0.1,
                   help="share of the sites sampled each round (default 0.1)")
    p.add_argument("--images", type=int, default=None,
                   help="instead of --per-site: this many images shared by all the sites")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--no-repeat", action="store_true",
                   help="do not run the first site count again at the end")
    p.add_argument("--set", action="append", default=[], metavar="key=value",
                   help="extra config override (e.g. runtime.cpus_per_site=2)")
    args = p.parse_args(argv)
    counts = [int(x) for x in args.sites.split(",")]
    order = counts + ([] if args.no_repeat else [counts[0]])
    work = Path(tempfile.mkdtemp(prefix="chestfed-scale-"))
    runs = []
    for i, n in enumerate(order):
        print(f"scale: {n} sites ...", flush=True)
        res = run_one(n, args.images, args.per_site, args.fraction, args.rounds, work, args.set,
                      tag=str(i))
        runs.append(res)
        print(f"scale: {n} sites ({res['sampled_per_round']} sampled): {res['steady_round_s']:.2f} s/round "
              f"({res['steady_round_cpu_s']:.1f} CPU s), peak PSS {res['peak_pss_mb']:.0f} MB, "
              f"wall {res['wall_s']:.1f} s", flush=True)
    first = [r for r in runs if r["sites"] == counts[0]]
    base_t = sum(r["steady_round_s"] for r in first) / len(first)
    base_c = sum(r["steady_round_cpu_s"] for r in first) / len(first)
    base_m = sum(r["peak_pss_mb"] for r in first) / len(first)
    sampling = args.images is None
    base_ps = sum(r["steady_round_per_sampled_site_s"] for r in first) / len(first)
    # the flat-memory reference: the second count (32 sites by default), else the first
    ref = next((r for r in runs if r["sites"] == counts[min(1, len(counts) - 1)]), first[0])
    for r in runs:
        r["round_vs_first"] = r["steady_round_s"] / base_t
        r["cpu_vs_first"] = r["steady_round_cpu_s"] / base_c
        r["memory_vs_first"] = r["peak_pss_mb"] / base_m
        r["memory_vs_reference"] = r["peak_pss_mb"] / ref["peak_pss_mb"]
        if sampling:  # a round costs what its sampled sites cost: at most linear in them
            r["time_met"] = r["steady_round_per_sampled_site_s"] <= 1.2 * base_ps
            r["memory_met"] = r["memory_vs_reference"] <= 1.10
        else:
            r["time_met"] = abs(r["round_vs_first"] - 1) <= 0.20
            r["memory_met"] = r["peak_pss_mb"] <= r["memory_budget_mb"]
    rows = [[r["sites"], r["sampled_per_round"], r["images_per_site"], r["steady_round_s"],
             r["steady_round_per_sampled_site_s"], r["round_vs_first"],
             r["steady_round_cpu_s"], r["cpu_vs_first"], r["round1_s"], r["peak_pss_mb"],
             r["peak_rss_mb"], r["memory_vs_reference"], "yes" if r["time_met"] else "NO",
             "yes" if r["memory_met"] else "NO"] for r in runs]
    print(U.table(rows, ["sites", "sampled", "img/site", "s/round", "s/sampled", "vs base",
                         "CPU s/rnd", "vs base", "round 1 s", "PSS MB", "RSS MB", "PSS vs ref",
                         "time ok", "mem ok"]))
    kinds = sorted({k for r in runs for k in r["steady_round_cpu_by_kind_s"]})
    print(U.table([[r["sites"], *(r["steady_round_cpu_by_kind_s"].get(k, 0.0) for k in kinds)]
                   for r in runs], ["sites: CPU s per steady round by process kind", *kinds]))
    kinds = sorted({k for r in runs for k in r["pss_by_kind_mb"]})
    print(U.table([[r["sites"], *(r["pss_by_kind_mb"].get(k, 0.0) for k in kinds)] for r in runs],
                  ["sites: PSS MB by process kind", *kinds]))
    spread = (max(r["steady_round_s"] for r in first) / min(r["steady_round_s"] for r in first)
              if len(first) > 1 else None)
    # Overrides change what is measured: keep scale.json for the defaults.
    name = "scale" + "".join("_" + re.sub(r"\W+", "-", s).strip("-") for s in args.set)
    dest = U.write_result(name, {
        "images": args.images, "per_site": None if args.images else args.per_site,
        "fraction": args.fraction, "rounds": args.rounds, "overrides": args.set, "order": order,
        "baseline": {"sites": counts[0], "steady_round_s": base_t, "steady_round_cpu_s": base_c,
                     "peak_pss_mb": base_m, "repeat_spread": spread},
        "runs": runs,
        "memory_reference_sites": ref["sites"],
        "targets": ({"round_time": "time per sampled site <= 1.2 x the first count's",
                     "memory": f"peak PSS <= 1.10 x the {ref['sites']}-site run's"} if sampling else
                    {"round_time": "within +-20% of the first count",
                     "memory": "peak PSS <= 1024 + 150 x sites MB"})})
    if spread:
        print(f"baseline ({counts[0]} sites) ran twice: its round times differ by "
              f"{100 * (spread - 1):.0f}% (the machine's drift during the benchmark)")
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
