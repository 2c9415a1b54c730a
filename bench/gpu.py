#!/usr/bin/env python
"""How fast do sites train on a GPU inside Flower's Simulation Engine, against a raw PyTorch loop?

DenseNet-121 at 224 px, batch 64, on one CUDA GPU:
  (a) a raw PyTorch loop in this process, fp32 and bf16 autocast: the union of the sites' train
      splits (the same cached uint8 images, via sites.data.load_site), one pinned non-blocking
      copy per batch, channels-last, cuDNN autotuner, Adam; images/s over whole epochs after a
      warm-up;
  (b) `launch/simulate.py --strategy fedavg` on the same 4 phantom sites sharing the GPU
      (`runtime.gpus_per_site: auto`, so 0.25 each, all four training at once;
      `train.precision: auto`, bf16 where the GPU supports it): images/s = the images the sites
      trained in rounds 2.. (round 1 pays CUDA start-up and cuDNN's autotuning in every worker)
      over the wall time of those rounds (training, weights to and fro, aggregation; per-round
      validation is off). Each site's own rate (its images over its own training seconds) too.
ratio = (b) / (a) at the precision (b) used; target >= 0.9. Also the ratio to the fp32 loop.

    python bench/gpu.py                  # needs CUDA; ~3-5 min on one H200 (8 min at most)
    python bench/gpu.py --smoke          # the plumbing on the CPU: tiny model and images
Writes bench/results/gpu.json (--smoke: a temporary folder, never results/). Without CUDA (and
without --smoke) it stops at once with one line and exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util as U  # noqa: E402

from chestfed.server.run.lifecycle import RunStatus

EXIT_USAGE = 2


def bench_config(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """4 phantom sites (presets a, b, c, a) at the benchmark's size; the sim's and the raw loop's
    data both come from here."""
    smoke = args.smoke
    return {
        "experiment": "bench-gpu",
        "seed": 0,
        "output_dir": str(work / "runs"),
        "data": {"image_size": 32 if smoke else 224, "cache_dir": str(work / "cache"),
                 "workers": max(1, min(16, os.cpu_count() or 1))},
        "sites": [{"name": f"site{i}", "kind": "phantom",
                   "options": {"preset": "abca"[i], "seed": 100 + i,
                               "population": {"size": args.images}}} for i in range(args.sites)],
        "model": ({"arch": "smallcnn", "width": 4} if smoke else {"arch": "densenet121"}),
        "train": {"batch_size": args.batch, "local_epochs": args.epochs, "lr": 1e-4,
                  "precision": "auto"},
        "strategy": {"name": "fedavg", "rounds": args.rounds, "min_sites": args.sites},
        "eval": {"every": 0, "bootstrap": 0, "pairs": "none", "report": False},
        "wandb": {"enabled": False, "mode": "disabled"},
        "runtime": {"device": "auto", "gpus_per_site": "auto", "cpus_per_site": 1},
    }


def raw_loop(config: Path, precision: str, epochs: int, warmup: int) -> dict[str, Any]:
    """Images/s of a plain training loop over the union of the sites' train splits."""
    import torch

    from chestfed.common.config import load_config
    from chestfed.common.models import build_model
    from chestfed.common.training import to_input
    from chestfed.sites.data import load_site

    cfg = load_config(config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":  # --smoke: one thread, as a site worker runs (spinning OpenMP
        torch.set_num_threads(1)  # threads collapse on a loaded machine)
    images = torch.cat([load_site(cfg, s, progress=False).splits["train"].images for s in cfg.sites])
    ys = torch.cat([load_site(cfg, s, progress=False).splits["train"].y for s in cfg.sites])
    ys = torch.nan_to_num(ys, nan=0.0)
    if device.type == "cuda":
        images, ys = images.pin_memory(), ys.pin_memory()
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = build_model(cfg.model, ys.shape[1]).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    bs, n = cfg.train.batch_size, len(images)

    def step(idx: torch.Tensor) -> None:
        x = images[idx].to(device, non_blocking=True)
        t = ys[idx].to(device, non_blocking=True)
        x = to_input(x, cfg.model.in_channels)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32"):
            logits = model(x)
        loss = loss_fn(logits.float(), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    model.train()
    gen = torch.Generator().manual_seed(0)
    for _ in range(warmup):  # CUDA context, cuDNN autotuning, allocator
        step(torch.randperm(n, generator=gen)[:bs])
    sync()
    seen, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - bs + 1, bs):  # whole batches only (fixed shape)
            step(order[start:start + bs])
            seen += bs
    sync()
    secs = time.perf_counter() - t0
    return {"precision": precision, "images": seen, "seconds": round(secs, 3),
            "images_per_s": round(seen / secs, 1), "device": str(device),
            "train_images": n, "batch": bs}


def sim_rate(run: Path) -> dict[str, Any]:
    """Images/s of the sim over rounds 2.. (metrics.jsonl), and each site's own rate."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in rows if "train_loss" in r]
    later = [r for r in train if r["round"] >= 2] or train  # one round: nothing to leave out
    round_secs = {r["round"]: r["round_seconds"] for r in later}
    images = sum(r["images"] for r in later)
    per_site: dict[str, dict[str, float]] = {}
    for r in later:
        s = per_site.setdefault(r["site"], {"images": 0, "seconds": 0.0})
        s["images"] += r["images"]
        s["seconds"] += r["train_seconds"]
    status = RunStatus(run).read()
    return {"rounds_timed": sorted(round_secs), "images": images,
            "seconds": round(sum(round_secs.values()), 3),
            "images_per_s": round(images / sum(round_secs.values()), 1),
            "per_site_images_per_s": {k: round(v["images"] / v["seconds"], 1)
                                      for k, v in sorted(per_site.items())},
            "workers": sorted({(r.get("ray_node", "")[:8], ",".join(r.get("gpu_ids", [])))
                               for r in later}),
            "resources": status.get("resources"), "run": str(run)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="CPU plumbing check: smallcnn, 32 px, 2 sites of 40 images; writes to a temp folder")
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--images", type=int, default=1200, help="images per site")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2, help="local epochs per round (and raw-loop epochs)")
    p.add_argument("--timeout", type=float, default=420, help="seconds the sim may take")
    args = p.parse_args(argv)
    if args.smoke:
        args.sites, args.images, args.batch, args.rounds, args.epochs = 2, 40, 8, 2, 1

    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("gpu.py: no CUDA GPU here (torch.cuda.is_available() is False); run it on a GPU "
              "machine, or --smoke for the CPU plumbing", file=sys.stderr)
        return EXIT_USAGE
    t_all = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="chestfed-bench-gpu-"))
    config = U.write_config(bench_config(args, work), work / "bench_gpu.yaml")
    t0 = time.perf_counter()
    U.warm_cache(config)
    cache_s = time.perf_counter() - t0
    print(f"cache: {args.sites} sites x {args.images} images in {cache_s:.1f} s", flush=True)

    raw = {}
    warmup = 2 if args.smoke else 15
    for precision in ("fp32", "bf16"):
        raw[precision] = raw_loop(config, precision, args.epochs, warmup)
        print(f"raw loop {precision}: {raw[precision]['images_per_s']} img/s", flush=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # leave the GPU's memory to the site workers

    import subprocess

    t0 = time.perf_counter()
    try:
        sim = subprocess.run([U.PYTHON, str(U.REPO / "launch" / "simulate.py"), "--config",
                              str(config), "--strategy", "fedavg"], cwd=U.REPO, text=True,
                             capture_output=True, timeout=args.timeout,
                             env={**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired:
        print(f"gpu.py: the simulation took over {args.timeout:.0f} s (--timeout); stopped", file=sys.stderr)
        return 1
    sim_wall = time.perf_counter() - t0
    runs = sorted((work / "runs" / "bench-gpu").glob("fedavg-*"))
    if sim.returncode != 0 or not runs:
        tail = "\n".join((sim.stdout + sim.stderr).splitlines()[-20:])
        print(f"gpu.py: the simulation failed (exit {sim.returncode}):\n{tail}", file=sys.stderr)
        return 1
    s = sim_rate(runs[-1])
    cuda = torch.cuda.is_available()
    sim_precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    s["precision"] = sim_precision
    s["wall_seconds"] = round(sim_wall, 1)
    ratio = s["images_per_s"] / raw[sim_precision]["images_per_s"]
    payload = {
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "smoke": args.smoke,
        "setup": {"model": "smallcnn" if args.smoke else "densenet121",
                  "image_size": 32 if args.smoke else 224, "batch": args.batch,
                  "sites": args.sites, "images_per_site": args.images, "rounds": args.rounds,
                  "local_epochs": args.epochs},
        "cache_build_seconds": round(cache_s, 1),
        "raw": raw, "sim": s,
        "ratio": round(ratio, 3),
        "ratio_vs_raw_fp32": round(s["images_per_s"] / raw["fp32"]["images_per_s"], 3),
        "bf16_speedup_raw": round(raw["bf16"]["images_per_s"] / raw["fp32"]["images_per_s"], 3),
        "target": ">= 0.9 (sim / raw loop at the sim's precision)",
        "met": bool(ratio >= 0.9),
        "total_seconds": round(time.perf_counter() - t_all, 1),
    }
    print(U.table([["raw fp32", raw["fp32"]["images_per_s"]], ["raw bf16", raw["bf16"]["images_per_s"]],
                   [f"sim ({sim_precision}, {args.sites} sites)", s["images_per_s"]]],
                  ["loop", "images/s"]))
    print(f"ratio sim / raw {sim_precision}: {ratio:.3f} (target >= 0.9)")
    if args.smoke:
        dest = work / "gpu_smoke.json"
        dest.write_text(json.dumps({"benchmark": "gpu (smoke, CPU)", "machine": U.machine(),
                                    **payload}, indent=2, default=str) + "\n")
    else:
        dest = U.write_result("gpu", payload)
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
