"""Helpers for end-to-end runs of the real launchers on tiny phantom hospitals."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

# Tests check mechanics on tiny sites, so they train one constant-rate epoch without class
# weights, not the schema's (the demo's) budget of 6 rounds x 2 epochs with cosine decay.
TINY_TRAIN = {"batch_size": 16, "local_epochs": 1, "lr": 0.001, "lr_schedule": "constant",
              "pos_weight": "none"}


def tiny_config(tmp_path: Path, n_sites: int = 2, size: int = 90, **top: object) -> Path:
    """A config small enough for a whole run in ~15 s on 2 CPU cores (Ray start included)."""
    presets = ["a", "b", "c"]
    cfg = {
        "experiment": "tiny",
        "seed": 0,
        "output_dir": str(tmp_path / "runs"),
        "data": {"image_size": 32, "cache_dir": str(tmp_path / "cache"), "workers": 1},
        "sites": [{"name": f"site{i}", "kind": "phantom",
                   "options": {"preset": presets[i % 3], "population": {"size": size}}}
                  for i in range(n_sites)],
        "model": {"width": 4},
        "train": dict(TINY_TRAIN),
        "strategy": {"rounds": 1, "min_sites": 1},
        "wandb": {"mode": "offline"},
    }
    for key, value in top.items():
        cfg[key] = value
    f = tmp_path / "tiny.yaml"
    f.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return f


def one_epoch(n: int, batch_size: int = 16) -> tuple[int, int]:
    """(images, optimizer steps) of one pass over n images (train_epochs skips a last single image:
    BatchNorm cannot train on it)."""
    return n - (n % batch_size == 1), n // batch_size + (n % batch_size >= 2)


# A tiny run takes ~20 s alone; CI saw one take over 240 s beside two busy test workers on two
# cores. The limit only has to catch a hang.
def simulate(config: Path, *args: str, timeout: float = 600,
             failing: str = "") -> subprocess.CompletedProcess[str]:
    """launch/simulate.py; with `failing` (e.g. "site1" or "site1:setup"), tests/failing_sites.py
    runs it with those sites' training (or SecAgg+ setup) failing."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    script = REPO / "launch" / "simulate.py"
    if failing:
        env["CHESTFED_TEST_FAILING_SITES"] = failing
        script = REPO / "tests" / "failing_sites.py"
    return subprocess.run([sys.executable, str(script), "--config", str(config), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=config.parent, env=env)


def only_run(tmp_path: Path) -> Path:
    runs = [p for p in (tmp_path / "runs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())
