"""Scale-out: GPU shares per site worker, an existing Ray cluster, and what each site's worker saw.

No GPU is needed: Ray accepts GPUs declared as resources (`num_gpus`) on a machine without one,
assigns their ids to workers and sets CUDA_VISIBLE_DEVICES as it would for real ones; the site
then finds CUDA unusable and trains on the CPU.
"""
from __future__ import annotations

import json
import mmap
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from chestfed.common.config import load_config
from chestfed.common.config.schema import RuntimeConfig
from chestfed.common.errors import ChestFedError, ConfigError
from chestfed.common.models import pick_device
from e2e import only_run, simulate, tiny_config
from chestfed.server.simulation.resources import Node, check_fits, cpus_per_site, gpus_per_site, workers_that_fit


# --- runtime.cpus_per_site ------------------------------------------------------------------
def test_auto_cpus_is_one_worker_per_core_while_sites_outnumber_cores():
    # this machine's case: 2 cores, 3 sites -> two workers of 1 CPU, the third site waits
    assert cpus_per_site("auto", "auto", [Node(2, 0)], 3) == 1.0
    assert workers_that_fit([Node(2, 0)], 1.0, 0) == 2
    assert cpus_per_site("auto", "auto", [Node(4, 0)], 3) == 1.0  # whole CPUs: 3 of 4 used
    assert cpus_per_site("auto", "auto", [Node(1, 0)], 3) == 1.0
    assert cpus_per_site("auto", "auto", [Node(16, 0)], 200) == 1.0


def test_auto_cpus_gives_spare_cores_to_the_sites_workers():
    assert cpus_per_site("auto", "auto", [Node(16, 0)], 3) == 5.0
    assert workers_that_fit([Node(16, 0)], 5.0, 0) == 3
    assert cpus_per_site("auto", "auto", [Node(16, 0)], 1) == 16.0
    # a share never exceeds one node: three 2-core nodes hold one 2-CPU worker each
    share = cpus_per_site("auto", "auto", [Node(2, 0)] * 3, 3)
    assert share == 2.0 and workers_that_fit([Node(2, 0)] * 3, share, 0) == 3


def test_auto_cpus_is_one_where_workers_get_gpus_and_a_number_is_kept():
    assert cpus_per_site("auto", "auto", [Node(16, 1)], 4) == 1.0
    assert cpus_per_site("auto", 0.5, [Node(16, 0)], 4) == 1.0
    assert cpus_per_site("auto", 0, [Node(16, 1)], 3) == 5.0  # GPUs there but not asked for
    assert cpus_per_site(3, "auto", [Node(16, 0)], 3) == 3.0


def test_cpus_per_site_refuses_nonsense():
    for bad in (0, -1, True, "many"):
        with pytest.raises(ValueError, match="cpus_per_site"):
            RuntimeConfig(cpus_per_site=bad)
    assert RuntimeConfig().cpus_per_site == "auto" and RuntimeConfig(cpus_per_site=1.5).cpus_per_site == 1.5


# --- runtime.gpus_per_site ------------------------------------------------------------------
def test_auto_is_zero_without_gpus():
    assert gpus_per_site("auto", [Node(16, 0)], 1, 4) == 0.0
    assert gpus_per_site("auto", [], 1, 4) == 0.0


def test_auto_shares_one_gpu_so_all_sites_train_at_once():
    # 4 sites, one GPU, 16 CPUs: a quarter each, and all four fit
    assert gpus_per_site("auto", [Node(16, 1)], 1, 4) == 0.25
    assert workers_that_fit([Node(16, 1)], 1, 0.25) == 4
    # 3 sites: a share rounded down to Ray's 4 decimals, so three fit on the one GPU
    share = gpus_per_site("auto", [Node(16, 1)], 1, 3)
    assert share == 0.3333 and workers_that_fit([Node(16, 1)], 1, share) == 3


def test_auto_gives_at_most_one_gpu_per_site():
    assert gpus_per_site("auto", [Node(32, 8)], 1, 3) == 1.0
    assert gpus_per_site("auto", [Node(32, 2)], 1, 2) == 1.0
    # two nodes of one GPU each, three sites: half a GPU each (two fit on each node)
    share = gpus_per_site("auto", [Node(4, 1), Node(4, 1)], 1, 3)
    assert share == 0.5 and workers_that_fit([Node(4, 1), Node(4, 1)], 1, share) >= 3


def test_auto_when_cpus_bind_takes_the_largest_share_that_uses_them():
    # 2 CPUs hold only 2 of 4 site workers at once: half a GPU each is enough for that
    assert gpus_per_site("auto", [Node(2, 1)], 1, 4) == 0.5
    # CPU-only nodes of a mixed cluster cannot hold a GPU worker (as Flower sizes its pool)
    assert workers_that_fit([Node(8, 0), Node(8, 1)], 1, 0.5) == 2


def test_a_number_is_used_as_given():
    assert gpus_per_site(0, [Node(8, 4)], 1, 4) == 0.0
    assert gpus_per_site(0.5, [Node(8, 4)], 1, 4) == 0.5


def test_no_node_fits_one_site_worker_is_one_line():
    with pytest.raises(ConfigError, match="no node of this machine can hold one site worker"):
        check_fits([Node(2, 0)], 1, 0.5, "this machine")
    with pytest.raises(ConfigError, match="lower them"):
        check_fits([Node(1, 1), Node(1, 1)], 2, 0, "the cluster")


def test_config_gpus_per_site_and_ray_address(tmp_path):
    cfg = load_config(None, [])
    assert cfg.runtime.gpus_per_site == "auto" and cfg.runtime.ray_address is None
    cfg = load_config(None, ["runtime.gpus_per_site=0.25", "runtime.ray_address=10.0.0.5:6379"])
    assert cfg.runtime.gpus_per_site == 0.25 and cfg.runtime.ray_address == "10.0.0.5:6379"
    for bad, msg in (("x", "must be 'auto' or a number"), ("-1", "must be 'auto' or a number"),
                     ("1.5", "whole number of GPUs"), ("yes", "not a yes/no")):
        with pytest.raises(ConfigError, match=msg):
            load_config(None, [f"runtime.gpus_per_site={bad}"])


def test_device_auto_follows_the_workers_assignment():
    assert pick_device("auto", []) == torch.device("cpu")  # a 0-GPU Ray worker
    expected = "cuda" if torch.cuda.is_available() else "cpu"  # a declared GPU CUDA cannot open
    assert pick_device("auto", ["0"]).type == expected
    assert pick_device("auto", None).type == expected  # outside Ray: whatever CUDA offers


def test_worker_that_cannot_see_a_root_is_one_line(monkeypatch, tmp_path):
    import ray

    from chestfed.common.config import SiteConfig
    from chestfed.sites import worker

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.0.0.7")
    site = SiteConfig(name="st_mary", kind="csv", root=str(tmp_path / "elsewhere"))
    with pytest.raises(ChestFedError) as err:
        worker.check_root_visible(site)
    line = str(err.value)
    assert "\n" not in line and "st_mary" in line and "10.0.0.7" in line and "same path" in line
    worker.check_root_visible(site.model_copy(update={"root": str(tmp_path)}))  # visible: fine


# --- an existing Ray cluster with GPUs declared as resources ----------------------------------
@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes on this machine, 1 CPU and 1 (declared) GPU each: a site worker fits on
    each node once, so two sites train on both."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True,
                head_node_args={"num_cpus": 1, "num_gpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1, num_gpus=1)
    c.wait_for_nodes()
    try:
        yield c
    finally:
        c.shutdown()


def _train_rows(run):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "train_loss" in r]


@pytest.mark.e2e
@pytest.mark.filterwarnings("ignore:.*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO")
def test_fedavg_on_a_two_node_cluster_one_gpu_per_site(cluster, tmp_path):
    cfg = tiny_config(tmp_path, size=40, runtime={"ray_address": cluster.address})
    proc = simulate(cfg, "--strategy", "fedavg")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_run(tmp_path)
    status = json.loads((run / "run.json").read_text())
    assert status["ray_address"] == cluster.address and status["ray_session"] is None
    res = status["resources"]
    assert res["cluster"] == {"nodes": 2, "CPU": 2.0, "GPU": 2.0}
    assert res["per_site"] == {"num_cpus": 1.0, "num_gpus": 1.0}  # auto: one GPU each
    assert res["gpus_per_site_setting"] == "auto" and res["concurrent_sites"] == 2
    rows = _train_rows(run)
    assert {r["site"] for r in rows} == {"site0", "site1"}
    # one site on each node, each worker seeing the one GPU Ray gave it
    assert len({r["ray_node"] for r in rows}) == 2
    for r in rows:
        assert r["gpu_ids"] == ["0"] and r["cuda_visible_devices"] == "0", r
    # attached, not owned: the cluster is still up after the run
    import ray

    ray.init(address=cluster.address, logging_level="ERROR")
    try:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    finally:
        ray.shutdown()


@pytest.mark.e2e
def test_a_zero_gpu_worker_sees_no_gpu(cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)  # the environment variable attaches too
    cfg = tiny_config(tmp_path, size=40, runtime={"gpus_per_site": 0})
    proc = simulate(cfg, "--strategy", "fedavg")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_run(tmp_path)
    status = json.loads((run / "run.json").read_text())
    assert status["resources"]["per_site"]["num_gpus"] == 0.0
    rows = _train_rows(run)
    assert len(rows) == 2
    for r in rows:
        assert r["gpu_ids"] == [] and r["cuda_visible_devices"] == "", r


def test_no_cluster_at_the_address_is_one_line_and_exit_2(tmp_path):
    cfg = tiny_config(tmp_path, size=40, runtime={"ray_address": "127.0.0.1:1"})
    proc = simulate(cfg, "--strategy", "fedavg", timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "127.0.0.1:1" in lines[0] and "ray start --head" in lines[0]
    assert not (tmp_path / "runs").exists()


# --- train.precision ---------------------------------------------------------------------------
def _train_recording_dtype(precision: str):
    from chestfed.common.config import ModelConfig, TrainConfig
    from chestfed.common.models import build_model
    from chestfed.common.training import train_epochs

    model = build_model(ModelConfig(width=4), 1)
    seen = []
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    before = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (24, 32, 32), dtype=torch.uint8, generator=gen)
    y = (torch.rand(24, 1, generator=gen) > 0.5).float()
    cfg = TrainConfig(batch_size=8, precision=precision, augment=True)
    stats = train_epochs(model, images, y, cfg, 1, 0, torch.device("cpu"))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # it trained
    return stats, set(seen), model


def test_bf16_autocast_trains_on_the_cpu():
    stats, dtypes, model = _train_recording_dtype("bf16")
    assert dtypes == {torch.bfloat16}  # the forward pass ran in bf16
    assert stats.steps == 3 and torch.isfinite(torch.tensor(stats.loss))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32


def test_auto_precision_is_fp32_on_the_cpu():
    stats, dtypes, _ = _train_recording_dtype("auto")
    assert dtypes == {torch.float32} and stats.steps == 3


def test_fp16_without_cuda_is_one_line():
    from chestfed.common.training import Precision

    with pytest.raises(ChestFedError, match="fp16 needs a CUDA GPU"):
        Precision("fp16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="precision"):
        load_config(None, ["train.precision=fp8"])


@pytest.mark.e2e
def test_gpu_bench_without_cuda_stops_with_one_line():
    import subprocess
    import sys

    from e2e import REPO

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: bench/gpu.py would run for minutes")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py")], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "--smoke" in lines[0]


# --- sites of real size -------------------------------------------------------------------------
def test_a_split_is_a_view_of_the_memory_mapped_cache(tmp_path):
    from chestfed.sites.cache import CacheView

    path = tmp_path / "images.u8"
    full = np.random.default_rng(0).integers(0, 255, (20, 8, 8), dtype=np.uint8)
    full.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r", shape=(20, 8, 8))
    rows = np.array([17, 3, 9, 4, 12])
    view = CacheView(mm, rows)
    assert len(view) == 5 and tuple(view.shape) == (5, 8, 8) and view.dtype == torch.uint8
    assert torch.equal(view[torch.tensor([4, 0, 2])], torch.from_numpy(full[[12, 17, 9]]))
    assert torch.equal(view[1:3], torch.from_numpy(full[[3, 9]]))
    assert torch.equal(view[2], torch.from_numpy(full[9]))
    assert np.array_equal(view.numpy(), full[rows])  # whole-split access still works (a copy)


def _mapped_rss_kb(path) -> int:
    """Resident kB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):  # a mapping's header: address range ... path
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/self/smaps")
def test_reading_a_split_leaves_no_cache_pages_in_the_resident_set(tmp_path):
    from chestfed.sites.cache import CacheView

    path = tmp_path / "images.u8"
    full = np.random.default_rng(1).integers(0, 255, (1024, 64, 64), dtype=np.uint8)  # 4 MB
    full.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r", shape=full.shape)
    rows = np.random.default_rng(2).permutation(1024)
    view = CacheView(mm, rows)
    for s in range(0, len(rows), 32):
        assert torch.equal(view[np.arange(s, s + 32)], torch.from_numpy(full[rows[s:s + 32]]))
        assert _mapped_rss_kb(path) == 0, "read pages left mapped"
    assert torch.equal(view[5], torch.from_numpy(full[rows[5]])) and _mapped_rss_kb(path) == 0
    for s in range(0, len(rows), 32):  # the same reads straight from the mapping keep them
        np.array(mm[np.sort(rows[s:s + 32])])
    assert _mapped_rss_kb(path) > 3000


def test_load_site_keeps_images_memory_mapped(tmp_path):
    from chestfed.common.config import config_from_tree
    from chestfed.sites.cache import CacheView
    from chestfed.sites.data import load_site

    cfg = config_from_tree({"data": {"image_size": 16, "cache_dir": str(tmp_path), "workers": 1},
                            "sites": [{"name": "m", "kind": "phantom",
                                       "options": {"preset": "a", "population": {"size": 40}}}],
                            "strategy": {"min_sites": 1}}, "test")
    data = load_site(cfg, cfg.sites[0], progress=False)
    for split in data.splits.values():
        assert isinstance(split.images, CacheView)
        assert isinstance(split.images._images, np.memmap)  # the file's pages, not a copy
