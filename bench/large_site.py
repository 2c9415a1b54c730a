#!/usr/bin/env python
"""Does one site of real size (CheXpert 224k, PadChest 160k, NIH 112k images) fit and scale?

For n = 1k, 10k, 100k phantom images at 64 px at one site, each in a fresh child process:
  - cache build: the site's records, then its image cache decoded by `data.workers` (2)
    spawned processes with the progress bar (images/s), streamed to disk a chunk at a time;
  - splits: `sites.splits.make_splits` seconds (patient-wise, stratified; should be O(n));
  - load: the site as a Ray worker loads it (`sites.data.load_site` on the built cache), the
    builder's records dropped first (in a run they are another process's);
  - one training epoch over its train split (smallcnn width 16, batch 32, one torch thread as
    a site worker runs; after a few warm-up batches), and scoring its test split (`predict`,
    batch by batch);
  - memory: the child's whole process tree (decode workers included) sampled every 0.2 s from
    /proc: peak summed RSS, and its two parts: anonymous (private heap: what copies would grow)
    and file-backed (pages of libraries, and of the memory-mapped cache while a batch is read:
    sites.cache.CacheView unmaps them after each; shared between processes, kept in the OS page
    cache, and dropped by the kernel under pressure).
Targets (issue 15): peak memory grows by < 200 MB from 1k to 100k; seconds per epoch grow in
proportion to n (within +-20 %).

    python bench/large_site.py                      # 1k, 10k, 100k (~6 min alone on 2 cores)
    python bench/large_site.py --sizes 1000,10000   # skip 100k
Writes bench/results/large_site.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util as U  # noqa: E402

SIZE = 64


class TreeMemory:
    """Peak over time of the summed RSS (and its anonymous / file parts) of a process tree."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval = pid, interval
        self.peak = {"rss_mb": 0.0, "anon_mb": 0.0, "file_mb": 0.0, "processes": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = U.descendants(self.pid)
            tot = {"rss_mb": 0.0, "anon_mb": 0.0, "file_mb": 0.0}
            for p in pids:
                status = f"/proc/{p}/status"
                tot["rss_mb"] += U._kib(status, "VmRSS:") / 1024
                tot["anon_mb"] += U._kib(status, "RssAnon:") / 1024
                tot["file_mb"] += (U._kib(status, "RssFile:") + U._kib(status, "RssShmem:")) / 1024
            for k, v in tot.items():
                self.peak[k] = max(self.peak[k], round(v, 1))
            self.peak["processes"] = max(self.peak["processes"], len(pids))
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def child(n: int, work: Path) -> dict[str, Any]:
    """One size, in this (fresh) process; prints one JSON line."""
    import torch

    from chestfed.common.config import TrainConfig, config_from_tree
    from chestfed.common.labels import targets
    from chestfed.common.models import build_model
    from chestfed.common.training import predict, train_epochs
    from chestfed.sites.data import load_site, make_adapter
    from chestfed.sites.cache import build_or_load
    from chestfed.sites.splits import make_splits

    torch.set_num_threads(1)
    cfg = config_from_tree({
        "experiment": "large-site", "data": {"image_size": SIZE, "cache_dir": str(work / "cache"),
                                             "workers": 2},
        "sites": [{"name": f"big{n}", "kind": "phantom",
                   "options": {"preset": "a", "population": {"size": n}}}],
        "strategy": {"min_sites": 1}}, "bench/large_site.py")
    site = cfg.sites[0]
    t0 = time.perf_counter()
    adapter = make_adapter(site)
    rec = adapter.records()
    records_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cached = build_or_load(adapter, rec.meta["image_id"].astype(str).tolist(), SIZE,
                           cfg.data.resize, cfg.data.cache_dir, cfg.data.workers, progress=True)
    build_s = time.perf_counter() - t0
    assert cached.built, "the cache was found built: give a fresh --work folder"
    cache_file = cached.path / "images.u8"
    y = targets(rec.labels, cfg.task.task(), rec.annotated)[:, 0]  # as sites.data splits
    t0 = time.perf_counter()
    make_splits(rec.meta, y, cfg.data.split, cfg.seed)
    splits_s = time.perf_counter() - t0
    # What follows is a site worker's part (in a run, another process than the launcher that
    # built the cache): the builder's records go, so that the load holds the site's one copy.
    del rec, y, adapter, cached
    t0 = time.perf_counter()
    data = load_site(cfg, site, progress=False)
    load_s = time.perf_counter() - t0
    tr, te = data.splits["train"], data.splits["test"]
    model = build_model(cfg.model, tr.y.shape[1])
    train_cfg = TrainConfig(batch_size=32, lr=1e-3)
    warm = TrainConfig(batch_size=32, lr=1e-3, max_batches=3)
    train_epochs(model, tr.images, tr.y, warm, 1, 0, torch.device("cpu"))
    t0 = time.perf_counter()
    stats = train_epochs(model, tr.images, tr.y, train_cfg, 1, 1, torch.device("cpu"))
    epoch_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = predict(model, te.images, torch.device("cpu"))
    score_s = time.perf_counter() - t0
    return {"n": n, "records_s": round(records_s, 2), "cache_build_s": round(build_s, 1),
            "cache_images_per_s": round(n / build_s, 1), "splits_s": round(splits_s, 3),
            "load_s": round(load_s, 2), "train_images": stats.images,
            "epoch_s": round(epoch_s, 1), "train_images_per_s": round(stats.images / epoch_s, 1),
            "test_images": int(scores.shape[0]), "score_s": round(score_s, 2),
            "cache_mb": round(os.path.getsize(cache_file) / 2**20, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="large_site.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,10000,100000")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, Path(args.work))), flush=True)
        return 0
    rows = []
    for n in [int(x) for x in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory(prefix="chestfed-large-") as work:
            env = {**os.environ, "PYTHONPATH": str(U.REPO)}
            proc = subprocess.Popen([U.PYTHON, __file__, "--child", str(n), "--work", work],
                                    stdout=subprocess.PIPE, text=True, env=env, cwd=U.REPO)
            t0 = time.perf_counter()
            with TreeMemory(proc.pid) as mem:
                out, _ = proc.communicate()
            if proc.returncode != 0:
                print(f"large_site.py: n={n} failed (exit {proc.returncode})", file=sys.stderr)
                return 1
            res = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:])
            res.update({"wall_s": round(time.perf_counter() - t0, 1), "peak": mem.peak,
                        "loadavg_1m": round(os.getloadavg()[0], 2)})
            rows.append(res)
            print(json.dumps(res), flush=True)
    base = rows[0]
    for r in rows:
        r["peak_growth_mb"] = {k: round(r["peak"][k] - base["peak"][k], 1)
                               for k in ("rss_mb", "anon_mb", "file_mb")}
        r["epoch_s_per_1k_images"] = round(1000 * r["epoch_s"] / r["train_images"], 3)
    per_img = [r["epoch_s_per_1k_images"] for r in rows]
    linear = max(per_img) / min(per_img) - 1
    big = rows[-1]
    payload = {
        "image_size": SIZE, "sizes": [r["n"] for r in rows], "rows": rows,
        "targets": {"peak_growth_mb": "< 200 from the smallest to the largest n",
                    "epoch_linear": "seconds per epoch per image within +-20 % across n"},
        "epoch_per_image_spread": round(linear, 3),
        "met": {"epoch_linear": bool(linear <= 0.2),
                "peak_growth_anon": bool(big["peak_growth_mb"]["anon_mb"] < 200),
                "peak_growth_rss": bool(big["peak_growth_mb"]["rss_mb"] < 200)},
    }
    print(U.table([[r["n"], r["cache_images_per_s"], r["splits_s"], r["epoch_s"],
                    r["epoch_s_per_1k_images"], r["peak"]["rss_mb"], r["peak"]["anon_mb"],
                    r["peak"]["file_mb"]] for r in rows],
                  ["n", "cache img/s", "splits s", "epoch s", "s/1k img", "peak RSS MB",
                   "anon MB", "file MB"]))
    print(f"wrote {U.write_result('large_site', payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
