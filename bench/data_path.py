#!/usr/bin/env python
"""Is training compute-bound? The data path from the image cache to a batch tensor against the
model's training speed, and the first-time cache build by worker count.

1. First-time cache build (decode/render + resize into the uint8 memmap), images/s, with
   `data.workers` 1 and 2, each into a fresh cache folder; the speed-up is a ratio in one run.
2. The data path, images/s, each measured in alternation with the model's training speed on
   the same split (so both see the same machine load):
     - batch: what common/training.train_epochs does per step before the model, from the
       site's in-memory split (`images[idx]` with a shuffled index, uint8 -> float [-1, 1]);
     - batch + augment: the same with `train.augment` (random affine);
     - from memmap: the same batch gathered straight from the memory-mapped cache file
       (the path a site whose split did not fit in memory would take);
     - load_site: a cache hit, records to ready tensors (once per process per site).
   Training images/s is train_epochs on the same split, at 1 torch thread (a site worker in
   simulation) and at all cores; the target compares against the faster of the two.

Target: data path >= 10 x training images/s (so training stays compute-bound).

    python bench/data_path.py                            # the demo: 64 px, smallcnn, 1200 images
    python bench/data_path.py --image-size 224 --arch resnet18 --images 600
Writes bench/results/data_path.json (or data_path_<size>px_<arch>.json).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util as U  # noqa: E402


def cache_build(images: int, size: int, workers: int, root: Path) -> dict:
    """Build one phantom site's cache from nothing into `root`; images/s of the build."""
    from chestfed.common.config import config_from_tree
    from chestfed.sites.cache import build_or_load
    from chestfed.sites.data import make_adapter

    cfg = config_from_tree(cache_tree(images, size, workers, root), "bench")
    adapter = make_adapter(cfg.sites[0])
    ids = adapter.records().meta["image_id"].astype(str).tolist()
    c0 = time.process_time() + _children_cpu()
    t0 = time.perf_counter()
    cached = build_or_load(adapter, ids, size, cfg.data.resize, root, workers, "skip", progress=False)
    dt = time.perf_counter() - t0
    cpu = time.process_time() + _children_cpu() - c0
    assert cached.built, "expected a first-time build"
    return {"workers": workers, "images": len(ids), "seconds": dt, "img_per_s": len(ids) / dt,
            "cpu_s": cpu, "cpu_ms_per_image": 1000 * cpu / len(ids)}


def _children_cpu() -> float:
    """CPU seconds of finished child processes (the cache's worker pool)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def cache_tree(images: int, size: int, workers: int, root: Path, arch: str = "smallcnn") -> dict:
    tree = U.site_overrides(n_sites=1, total_images=images)
    tree["sites"][0]["options"]["preset"] = "a"
    tree["data"].update({"image_size": size, "workers": workers, "cache_dir": str(root)})
    tree["model"]["arch"] = arch
    tree["experiment"] = "bench-data-path"
    return tree


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1200, help="images in the site (default 1200)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--arch", default="smallcnn")
    p.add_argument("--repeats", type=int, default=3, help="alternations data path / training")
    args = p.parse_args(argv)
    import os

    # Passive OpenMP waits before torch loads: multi-threaded training is measured at its best
    # (spinning intra-op threads collapse under other load), which makes the ratio conservative.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import numpy as np
    import torch

    from chestfed.common.config import config_from_tree
    from chestfed.common.models import build_model
    from chestfed.common.training import augment, seed_everything, to_input, train_epochs
    from chestfed.sites.data import load_site
    import chestfed.sites.data as sdata
    root = Path(tempfile.mkdtemp(prefix="chestfed-datapath-"))
    builds = []
    try:
        for rep in range(2):  # 1, 2, 2, 1 workers: alternated against drift in the machine's load
            for w in ((1, 2) if rep == 0 else (2, 1)):
                builds.append(cache_build(args.images, args.image_size, w, root / f"w{w}-{rep}"))
                print(f"data_path: cache build, {w} worker(s): {builds[-1]['img_per_s']:.0f} img/s, "
                      f"{builds[-1]['cpu_ms_per_image']:.1f} CPU ms/image", flush=True)

        cfg = config_from_tree(cache_tree(args.images, args.image_size, 2, root / "w2-0", args.arch),
                               "bench")
        site = cfg.sites[0]
        t0 = time.perf_counter()
        data = load_site(cfg, site, progress=False)
        load_s = time.perf_counter() - t0
        sdata._LOADED.clear()
        t0 = time.perf_counter()
        load_site(cfg, site, progress=False)
        load2_s = time.perf_counter() - t0
        n_all = sum(len(s) for s in data.splits.values())
        tr = data.splits["train"]
        bs, c_in = cfg.train.batch_size, cfg.model.in_channels
        n = len(tr)
        gen = seed_everything(0)
        memmap = np.memmap(next((root / "w2-0").glob("*/images.u8")), dtype=np.uint8, mode="r",
                           shape=(args.images, args.image_size, args.image_size))

        def batches(source: str):
            order = torch.randperm(n, generator=gen)
            for s in range(0, n - bs + 1, bs):
                idx = order[s:s + bs]
                if source == "memmap":
                    imgs = torch.from_numpy(memmap[np.sort(idx.numpy())])
                else:
                    imgs = tr.images[idx]
                x = to_input(imgs, c_in)
                if source == "augment":
                    x = augment(x, gen)
                x.contiguous()
            return (n // bs) * bs

        def rate(source: str) -> float:
            t0, imgs = time.perf_counter(), 0
            while time.perf_counter() - t0 < 1.0:
                imgs += batches(source)
            return imgs / (time.perf_counter() - t0)

        model = build_model(cfg.model, len(data.target_names))
        sub = min(n, bs * 6)
        train_cfg = cfg.train.model_copy(update={"max_batches": None})

        def train_rate(threads: int) -> float:
            torch.set_num_threads(threads)
            train_epochs(model, tr.images[:bs], tr.y[:bs], train_cfg, 1, 0, torch.device("cpu"), c_in)
            t0 = time.perf_counter()
            train_epochs(model, tr.images[:sub], tr.y[:sub], train_cfg, 1, 1, torch.device("cpu"), c_in)
            return sub / (time.perf_counter() - t0)

        cores = os.cpu_count() or 1
        samples: dict[str, list[float]] = {k: [] for k in ("batch", "augment", "memmap", "train_1",
                                                            f"train_{cores}")}
        for _ in range(args.repeats):
            torch.set_num_threads(1)
            for k in ("batch", "augment", "memmap"):
                samples[k].append(rate(k))
            samples["train_1"].append(train_rate(1))
            samples[f"train_{cores}"].append(train_rate(cores))
        med = {k: U.median(v) for k, v in samples.items()}
        train_best = max(med["train_1"], med[f"train_{cores}"])
        paths = {"batch": med["batch"], "batch + augment": med["augment"],
                 "batch from memmap": med["memmap"], "load_site (cache hit)": n_all / load2_s}
        ratios = {k: v / train_best for k, v in paths.items()}
    finally:
        shutil.rmtree(root, ignore_errors=True)

    build = {w: {"img_per_s": U.median([b["img_per_s"] for b in builds if b["workers"] == w]),
                 "cpu_ms_per_image": U.median([b["cpu_ms_per_image"] for b in builds
                                               if b["workers"] == w])} for w in (1, 2)}
    rows = [[f"cache build, {w} worker(s)", b["img_per_s"], b["img_per_s"] / build[1]["img_per_s"],
             ""] for w, b in build.items()]
    rows += [[k, v, "", ratios[k]] for k, v in paths.items()]
    rows += [["training, 1 thread", med["train_1"], "", ""],
             [f"training, {cores} threads", med[f"train_{cores}"], "", ""]]
    print(U.table(rows, ["path", "img/s", "vs 1 worker", "x training"]))
    met = ratios["batch"] >= 10 and ratios["batch + augment"] >= 10
    name = "data_path" if (args.image_size, args.arch) == (64, "smallcnn") else \
        f"data_path_{args.image_size}px_{args.arch}"
    dest = U.write_result(name, {
        "image_size": args.image_size, "arch": args.arch, "images": args.images,
        "cache_build": build, "cache_build_runs": builds,
        "cache_build_speedup_2_workers": build[2]["img_per_s"] / build[1]["img_per_s"],
        "data_path_img_per_s": paths, "training_img_per_s": {"1_thread": med["train_1"],
                                                             f"{cores}_threads": med[f"train_{cores}"]},
        "ratio_to_training": ratios, "samples": samples, "first_load_site_s": load_s,
        "target": "batch path >= 10 x training img/s", "met": met})
    print(f"data path / training: batch {ratios['batch']:.0f}x, with augment "
          f"{ratios['batch + augment']:.0f}x (target >= 10x: {'met' if met else 'NOT met'}); "
          f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
