#!/usr/bin/env python
"""What does the federated machinery cost? fedavg in Flower's Simulation Engine against a plain
PyTorch loop doing the same work.

  (a) `launch/simulate.py --strategy fedavg` on the config, timed as a whole command
      (Python start, Ray start, site discovery, rounds, final evaluation, report, W&B, exit);
  (b) this file's plain loop (`--plain`), also a whole command: the same sites (sites.data.
      load_site, same cached tensors and splits), the same initial model, the same per-site
      seeds, the same optimiser steps (common.training.train_epochs, with the round's learning
      rate and the loss weights a site uses), the same FedAvg weighting (Flower's arithmetic,
      site order), the same per-round validation scoring, PreciseBN on the sites' train splits
      and the same final evaluation (Youden thresholds on val, then sites/scoring.py on test
      with the bootstrap).
      Torch runs on whichever thread count (1 or all cores) a probe finds faster now, or
      `--plain-threads N`; nothing is sent anywhere.

Reported, each as a ratio a/b within one run (runs alternate a/b to cancel drift):
  ratio            whole command / whole command
  ratio_from_round1  from the start of round 1 (sites joined, data loaded) to exit, both sides
  ratio_rounds     training rounds only (round 1 start -> last round's line / last round end)
and the final weights of (a) and (b) are compared (bit-identical when the plain loop runs on
as many threads as each of the simulation's site workers: its CPU share, 1 on this 2-core
machine, so `--plain-threads 1`).

    python bench/overhead.py                       # default demo size (3 phantom sites, the demo's rounds)
    python bench/overhead.py --scale 10            # 10x the images per site (~15 min)
    python bench/overhead.py --repeats 3           # more a/b pairs (median)
Writes bench/results/overhead.json (or overhead_x<scale>.json; `_plain<N>t` with --plain-threads).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util as U  # noqa: E402

# Passive OpenMP waits for the plain loop: spinning intra-op threads collapse when another
# process wants the core (measured 16 vs 100-180 img/s here). The sim's site workers run one
# torch thread each, where this makes no difference.
PLAIN_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


# --- (b) the plain loop ------------------------------------------------------------------------


def probe_threads(config: Path) -> tuple[int, dict[int, float]]:
    """Training images/s at 1 thread and at all cores, now, on this machine: the plain loop
    takes the faster (intra-op threads lose badly to other load on a shared machine)."""
    import torch

    from chestfed.common.config import load_config
    from chestfed.common.models import build_model, pick_device
    from chestfed.common.training import train_epochs
    from chestfed.sites.data import load_site

    cfg = load_config(config, [], "fedavg")
    device = pick_device(cfg.runtime.device)
    tr = load_site(cfg, cfg.sites[0], progress=False).splits["train"]
    images, y = tr.images, tr.y

    n = min(len(images), cfg.train.batch_size * 8)
    small = cfg.train.model_copy(update={"max_batches": None})
    speed: dict[int, float] = {}
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        m = build_model(cfg.model.model_copy(update={"weights": None}), y.shape[1])
        train_epochs(m, images[:2 * small.batch_size], y[:2 * small.batch_size], small, 1, 0, device,
                     cfg.model.in_channels)  # warm-up
        t0 = time.perf_counter()
        train_epochs(m, images[:n], y[:n], small, 1, 0, device, cfg.model.in_channels)
        speed[threads] = n / (time.perf_counter() - t0)
    return max(speed, key=speed.get), speed


def plain_loop(config: Path, out: Path | None, threads: int) -> None:
    """Run fedavg as a plain loop, printing marks the parent times; optionally save weights."""
    t_start = time.perf_counter()
    import numpy as np
    import torch

    from chestfed.common import protocol as P
    from chestfed.common.config import load_config
    from chestfed.common.metrics import score_site
    from chestfed.common.models import build_model, pick_device
    from chestfed.common import batchnorm
    from chestfed.common.training import predict, round_lr, schedule_length, seed_everything, site_seed, train_epochs
    from chestfed.common.weights import loss_weights
    from chestfed.sites import scoring
    from chestfed.sites.data import load_site

    cfg = load_config(config, [], "fedavg")
    device = pick_device(cfg.runtime.device)
    data = [load_site(cfg, s, progress=False) for s in cfg.sites]
    n_out = len(cfg.task.task().names)
    torch.set_num_threads(threads)
    print(f"plain: loaded {len(data)} sites, torch threads {torch.get_num_threads()} "
          f"({time.perf_counter() - t_start:.1f} s)", flush=True)
    print("ROUND1_START", flush=True)

    # The coordinator's initial model, then the site model (built once, weights loaded per round).
    seed_everything(cfg.seed)
    global_state = {k: v.clone() for k, v in build_model(cfg.model, n_out).state_dict().items()}
    model = build_model(cfg.model.model_copy(update={"weights": None}), n_out)

    def labels(d, split):
        y = d.splits[split].y.numpy().copy()
        y[:, ~d.annotated] = float("nan")
        return y

    steps = images = 0
    for rnd in range(1, cfg.strategy.rounds + 1):
        t0 = time.perf_counter()
        states, weights = [], []
        for idx, d in enumerate(data):  # sites/app.py train(), without the message
            model.load_state_dict(global_state)
            tr = d.splits["train"]
            weights_kw = loss_weights(cfg.train, tr.y.numpy())  # train.pos_weight / task_weights
            pw = weights_kw.pop("pos_weight", None)
            seed = site_seed(cfg.seed, rnd, idx)  # as sites/app.py seeds a site's round
            lr = round_lr(cfg.train, rnd, schedule_length(cfg))  # train.lr_schedule (cosine)
            st = train_epochs(model, tr.images, tr.y, cfg.train, cfg.train.local_epochs, seed,
                              device, cfg.model.in_channels, 0.0, None, pw, lr=lr, **weights_kw)
            steps, images = steps + st.steps, images + st.images
            states.append({k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()})
            weights.append(float(len(tr)))
        # Flower's aggregate_arrayrecords: sum of value * (w / total) in site order, then
        # server/federation/tap.py cast_like casts back to the sites' dtypes.
        total = sum(weights)
        agg: dict[str, np.ndarray] = {}
        for st_, w in zip(states, weights):
            f = w / total
            for k, v in st_.items():
                agg[k] = v * f if k not in agg else agg[k] + v * f
        global_state = {k: torch.from_numpy(np.asarray(agg[k]).astype(states[0][k].dtype))
                        for k in agg}
        aucs = []
        if cfg.eval.every and rnd % cfg.eval.every == 0:  # sites/app.py evaluate()
            model.load_state_dict(global_state)
            for d in data:
                s = predict(model, d.splits["val"].images, device, cfg.model.in_channels)
                aucs.append(score_site(labels(d, "val"), s, d.target_names)["macro_auroc"])
        print(f"round {rnd}/{cfg.strategy.rounds}  val AUROC "
              f"{', '.join(f'{a:.3f}' for a in aucs)}  ({time.perf_counter() - t0:.1f} s)", flush=True)

    # The final evaluation (server/evaluation/evaluator.py + sites/scoring.py): thresholds on val, then test.
    from chestfed.server.evaluation.evaluator import combine_thresholds, eval_plan, settings_of

    class M:  # what _plan reads of a Trained
        name, local_bn = "fedavg", False

    # PreciseBN (eval.batchnorm: precise; server/evaluation/batchnorm.py): each site's statistics
    # of the final weights on its train split, combined by image count
    if cfg.eval.batchnorm == "precise" and batchnorm.has_batchnorm(model):
        parts = []
        for d in data:
            model.load_state_dict(global_state)
            n = batchnorm.reestimate(model, d.splits["train"].images, device, cfg.model.in_channels,
                                     cfg.train.batch_size)
            parts.append((n, batchnorm.running_stats(model)))
        for k, v in batchnorm.combine(parts).items():
            global_state[k] = v.to(global_state[k].dtype)
    model.load_state_dict(global_state)
    settings = settings_of(cfg.eval, cfg.seed)
    names = cfg.task.task().names
    sources: dict[str, dict[str, dict[str, float]]] = {n: {} for n in names}
    for d in data:
        s = predict(model, d.splits["val"].images, device, cfg.model.in_channels)
        m, _ = scoring.val_thresholds(labels(d, "val"), {"fedavg": s}, d.target_names)
        got = P.split_eval_reply(m)[0]["fedavg"]  # the reply's reader the evaluator uses
        for n in names:
            sources[n][d.name] = {k: got[f"labels/{n}/{k}"]
                                  for k in ("youden", "n_pos", "n_neg", "pos_above", "neg_above")}
    op = {"fedavg": {n: combine_thresholds(sources[n])[0] for n in names}}
    plan = scoring.read_plan(eval_plan("score", "test", [M()], op, [], settings))
    test_auc = []
    for d in data:
        te = d.splits["test"]
        s = predict(model, te.images, device, cfg.model.in_channels)
        groups = te.meta["patient_id"].to_numpy() if "patient_id" in te.meta else None
        m, _ = scoring.score_models(labels(d, "test"), {"fedavg": s}, d.target_names, groups, plan)
        test_auc.append(P.split_eval_reply(m)[0]["fedavg"].get("macro_auroc", float("nan")))
    print(f"plain: test AUROC {', '.join(f'{a:.3f}' for a in test_auc)}; {steps} steps, "
          f"{images} images", flush=True)
    if out is not None:
        torch.save({"model": global_state, "steps": steps, "images": images}, out)
    print(f"plain: done in {time.perf_counter() - t_start:.1f} s", flush=True)


# --- the comparison ----------------------------------------------------------------------------


def run_sim(config: Path, run_dir: Path) -> dict:
    r = U.run_timed([U.PYTHON, "launch/simulate.py", "--strategy", "fedavg", "--config", str(config),
                     "--run-dir", str(run_dir)],
                    marks={"round1": r" sites joined:", "last_round": r"^round (\d+)/\1\b",
                           "matrix": r"^AUROC ", "done": r"^done in"}, memory=True)
    return r


def run_plain(config: Path, out: Path, threads: int) -> dict:
    return U.run_timed([U.PYTHON, __file__, "--plain", "--config", str(config), "--out", str(out),
                        "--plain-threads", str(threads)],
                       marks={"round1": r"^ROUND1_START", "last_round": r"^round (\d+)/\1\b",
                              "threads": r"torch threads", "done": r"^plain: done"},
                       env=PLAIN_ENV, memory=True)


def phases(r: dict) -> dict:
    m, wall, smp = r["marks"], r["wall_s"], r["sampler"]
    cpu = r["cpu_s"]
    return {"wall_s": wall, "startup_s": m.get("round1"), "from_round1_s": wall - m["round1"],
            "rounds_s": m["last_round"] - m["round1"], "after_rounds_s": wall - m["last_round"],
            "cpu_s": cpu, "cpu_from_round1_s": cpu - smp.cpu_at(m["round1"]),
            "cpu_rounds_s": smp.cpu_at(m["last_round"]) - smp.cpu_at(m["round1"]),
            "peak_memory": r.get("peak_memory")}


def compare_weights(sim_ckpt: Path, plain_out: Path) -> dict:
    import torch

    a = torch.load(sim_ckpt, map_location="cpu", weights_only=True)["model"]
    b = torch.load(plain_out, map_location="cpu", weights_only=True)["model"]
    diffs = [float((a[k].double() - b[k].double()).abs().max()) for k in a]
    return {"identical": all(torch.equal(a[k], b[k]) for k in a), "max_abs_diff": max(diffs),
            "tensors": len(a)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, default=1.0, help="images per site x this (default 1)")
    p.add_argument("--repeats", type=int, default=1, help="a/b pairs to run (median; default 1)")
    p.add_argument("--rounds", type=int, default=None, help="override strategy.rounds")
    p.add_argument("--set", action="append", default=[], metavar="key=value",
                   help="extra config override for both sides (e.g. runtime.cpus_per_site=2)")
    p.add_argument("--plain-threads", default="auto",
                   help="torch threads of the plain loop: auto (probe 1 vs all cores, take the "
                        "faster; default) or a number")
    p.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        best, speed = probe_threads(Path(args.config))
        print(json.dumps({"best": best, "speed": speed}))
        return 0
    if args.plain:
        plain_loop(Path(args.config), Path(args.out) if args.out else None, int(args.plain_threads))
        return 0

    from chestfed.common.config.overrides import apply_override, parse_override

    work = Path(tempfile.mkdtemp(prefix="chestfed-overhead-"))
    tree = U.site_overrides(size_scale=args.scale)
    tree["experiment"] = "bench-overhead"
    if args.rounds:
        tree["strategy"]["rounds"] = args.rounds
    for text in args.set:
        apply_override(tree, *parse_override(text))
    config = U.write_config(tree, work / "config.yaml")
    from chestfed.common.config import load_config  # lazy, as in the plain loop's phases

    rounds_run = load_config(config, [], "fedavg").strategy.rounds
    warm = U.warm_cache(config)
    probe: dict[int, float] = {}
    if args.plain_threads == "auto":  # in a child, with the plain loop's environment
        r = U.run_timed([U.PYTHON, __file__, "--probe", "--config", str(config)], env=PLAIN_ENV)
        got = json.loads(r["lines"][-1][1])
        threads, probe = int(got["best"]), {int(k): round(v, 1) for k, v in got["speed"].items()}
    else:
        threads = int(args.plain_threads)
    print(f"overhead: config {config} (cache ready in {warm:.1f} s); plain loop on {threads} "
          f"torch thread(s) (probe, img/s: {probe or 'not run'}); {args.repeats} a/b pair(s)",
          flush=True)

    pairs = []
    for i in range(args.repeats):
        order = ("plain", "sim") if i % 2 == 0 else ("sim", "plain")
        got = {}
        for which in order:
            print(f"  run {i + 1}: {which} ...", flush=True)
            if which == "sim":
                got["sim"] = run_sim(config, work / f"sim{i}")
            else:
                got["plain"] = run_plain(config, work / f"plain{i}.pt", threads)
            print(f"  run {i + 1}: {which} {got[which]['wall_s']:.1f} s", flush=True)
        a, b = phases(got["sim"]), phases(got["plain"])
        same = compare_weights(work / f"sim{i}" / "checkpoints" / "fedavg.pt", work / f"plain{i}.pt")
        pairs.append({"sim": a, "plain": b, "weights": same,
                      "ratio": a["wall_s"] / b["wall_s"],
                      "ratio_from_round1": a["from_round1_s"] / b["from_round1_s"],
                      "ratio_rounds": a["rounds_s"] / b["rounds_s"],
                      "cpu_ratio": a["cpu_s"] / b["cpu_s"],
                      "cpu_ratio_from_round1": a["cpu_from_round1_s"] / b["cpu_from_round1_s"],
                      "sim_output": [f"[{t:6.1f}s] {line}" for t, line in got["sim"]["lines"]][-40:],
                      "plain_output": [f"[{t:6.1f}s] {line}" for t, line in got["plain"]["lines"]][-40:]})

    def med(key: str, side: str | None = None) -> float:
        return U.median([(pr[side][key] if side else pr[key]) for pr in pairs])

    result = {
        # the rounds run (the config's, else the schema's default: the demo budget)
        "scale": args.scale, "sites": len(tree["sites"]), "rounds": rounds_run,
        "overrides": args.set,
        "ratio": med("ratio"), "ratio_from_round1": med("ratio_from_round1"),
        "ratio_rounds": med("ratio_rounds"), "cpu_ratio": med("cpu_ratio"),
        "cpu_ratio_from_round1": med("cpu_ratio_from_round1"),
        "plain_threads": threads, "thread_probe_img_per_s": probe,
        "target": 1.15 if args.scale < 5 else 1.05,
        "definitions": {
            "ratio": "wall time of the whole simulate.py command / whole plain-loop command",
            "ratio_from_round1": "from the start of round 1 (sim: the 'sites joined' line; plain: "
                                 "after imports and load_site) to exit",
            "ratio_rounds": "round 1 start to the last round's line (training + per-round "
                            "validation + per-round checkpoint)",
            "cpu_ratio": "CPU seconds (user+system) summed over each command's process tree: "
                         "the work done, less sensitive to other load than wall time; the sim "
                         "spreads it over more cores, so its wall ratio can be below its CPU ratio"},
        "pairs": pairs,
    }
    result["met"] = result["ratio"] <= result["target"]
    name = "overhead" if args.scale == 1 else f"overhead_x{args.scale:g}"
    if args.plain_threads != "auto":
        name += f"_plain{threads}t"
    dest = U.write_result(name, result)
    rows = []
    for label, key in (("whole command", "wall_s"), ("start-up (to round 1)", "startup_s"),
                       ("round 1 -> exit", "from_round1_s"), ("rounds", "rounds_s"),
                       ("after last round", "after_rounds_s"), ("CPU s, whole command", "cpu_s"),
                       ("CPU s, round 1 -> exit", "cpu_from_round1_s")):
        a, b = med(key, "sim"), med(key, "plain")
        rows.append([label, a, b, a / b if b else float("nan")])
    print(U.table(rows, ["phase (median s)", "fedavg sim (a)", "plain (b)", "a/b"]))
    print(f"peak memory (PSS, MB): sim {pairs[0]['sim']['peak_memory']['pss_mb']:.0f}, "
          f"plain {pairs[0]['plain']['peak_memory']['pss_mb']:.0f}")
    print(f"final weights identical: {[pr['weights']['identical'] for pr in pairs]} "
          f"(max |diff| {max(pr['weights']['max_abs_diff'] for pr in pairs):.2e})")
    print(f"ratio {result['ratio']:.3f} (target <= {result['target']}: "
          f"{'met' if result['met'] else 'NOT met'}); wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
