"""Resume: what a run keeps after each completed round so that `--resume` continues it exactly.

A run folder holds, besides the models (checkpoints/):

  resume/state.pt        rewritten atomically (common/atomic.py) after every completed round:
                         each training unit's position and weights (a unit is one model being
                         trained: `fedavg`, `local`, `sequential`, `loso-<site>`, ...), a server
                         optimiser's moments (FedAdam/FedYogi), the coordinator's counters and
                         dropouts, the model-name alias salt (so a FedBN site finds its own
                         BatchNorm again), the server's RNG states (torch, numpy, python: Flower
                         samples nodes with python's `random`), the length of metrics.jsonl
                         at that moment, and a digest of the config the run was made with
  resume/model-<name>.pt a model a strategy has finished (a sequential stage, a leave-one-site-out
                         model): written once, named in state.pt
  resume.json            written by a resume: from where, and the history of resumes

What the sites do needs nothing here: a site's data order, augmentation and dropout come from a
seed derived from (experiment seed, round, site index) (common.training.site_seed), so round k+1
replays the same way whether or not the coordinator restarted in between. FedBN's BatchNorm is
the one piece of training state that lives at a site; the site keeps it on its own disk, keyed
by run and round (sites/local_state.py).

`prepare_resume` is the launchers' half (simulate.py and server.py --resume): it refuses what
cannot be resumed with one line, and trims what the interrupted round left behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

from chestfed.common.errors import ChestFedError
from chestfed.common.atomic import torch_save
from chestfed.common.atomic import write_json
from chestfed.common.config import load_config
from chestfed.server.run.folder import RunFolder
from chestfed.server.run.lifecycle import refuse_unless_resumable
import numpy as np

STATE_FILE = Path("resume") / "state.pt"
MARKER_FILE = "resume.json"
# Tests only: the process SIGKILLs itself right after writing its n-th checkpoint, which is a
# crash at the worst moment a test can hit deterministically (tests/test_resume.py).
KILL_ENV = "CHESTFED_KILL_AFTER_CHECKPOINT"
# What a resumed run writes again; progress.log (a deployment's) is appended to, never dropped
_STALE = ("results.json", "report.html", "report.md")


def config_digest(cfg: Any) -> str:
    """The config a run was made with, as a digest of its resolved form (config.yaml)."""
    return hashlib.sha256(cfg.to_yaml().encode()).hexdigest()


def _tensors(tree: Any) -> Any:
    """numpy arrays -> torch tensors (same dtype), so the file loads with weights_only=True."""
    import torch  # lazy: torch loads only when this runs

    if isinstance(tree, (np.ndarray, np.generic)):  # a 0-d result of numpy maths is a scalar
        return torch.from_numpy(np.ascontiguousarray(tree))
    if isinstance(tree, dict):
        return {k: _tensors(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_tensors(v) for v in tree]
    return tree


def rng_state() -> dict[str, Any]:
    import torch  # lazy: torch loads only when this runs

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}


def set_rng_state(state: dict[str, Any]) -> None:
    import torch  # lazy: torch loads only when this runs

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


class RunState:
    """The coordinator's resume state: read once at the start, rewritten after every round."""

    def __init__(self, folder: Path, digest: str, loaded: dict[str, Any] | None = None):
        self.folder = Path(folder)
        self.digest = digest
        self.data: dict[str, Any] = loaded or {"units": {}, "finished": {}, "rounds_done": 0}
        self.resumed = loaded is not None
        # as saved: later saves of this process overwrite data["rng"] before a unit resumes
        self._rng = (loaded or {}).get("rng")
        self._saves = 0

    @classmethod
    def open(cls, folder: Path, cfg: Any) -> "RunState":
        """A resumed run (resume.json present and a state file): its state; else a new one."""
        folder = Path(folder)
        digest = config_digest(cfg)
        if not (folder / MARKER_FILE).is_file() or not (folder / STATE_FILE).is_file():
            return cls(folder, digest)
        data = read_state(folder)
        if data.get("config") != digest:
            raise ChestFedError(f"{folder}: config.yaml differs from the config this run was "
                                f"started with; it cannot be resumed")
        return cls(folder, digest, data)

    # --- what the strategies read on resume ---------------------------------------------------
    def unit(self, name: str) -> dict[str, Any] | None:
        return self.data["units"].get(name)

    def finished(self) -> dict[str, dict[str, Any]]:
        return self.data["finished"]

    def model_file(self, name: str) -> Path:
        return self.folder / "resume" / f"model-{_safe(name)}.pt"

    def restore_rng(self) -> None:
        if self._rng is not None:
            set_rng_state(self._rng)

    # --- what the coordinator writes ------------------------------------------------------------
    def save(self, unit: str | None, state: dict[str, Any] | None, counters: dict[str, Any],
             position: str, count_round: bool = True) -> None:
        """Atomically record a completed round (`count_round`) or a finished model."""

        if unit is not None:
            if state is None:
                self.data["units"].pop(unit, None)
            else:
                self.data["units"][unit] = _tensors(state)
        if count_round:
            self.data["rounds_done"] = int(self.data.get("rounds_done", 0)) + 1
        metrics = self.folder / "metrics.jsonl"
        self.data.update(counters, config=self.digest, rng=rng_state(), position=position,
                         metrics_bytes=metrics.stat().st_size if metrics.is_file() else 0,
                         saved=time.time())
        torch_save(self.folder / STATE_FILE, self.data)
        if count_round:
            self._saves += 1
            _after_save(self._saves)

    def keep_model(self, name: str, arrays: dict[str, Any], info: dict[str, Any]) -> None:
        """A finished model, written once; state.pt names it from the next save on."""

        torch_save(self.model_file(name), {"model": arrays})
        self.data["finished"][name] = info


def _after_save(count: int) -> None:
    want = os.environ.get(KILL_ENV, "")
    if want.isdigit() and count == int(want):
        os.kill(os.getpid(), signal.SIGKILL)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def read_state(folder: Path) -> dict[str, Any]:
    import torch  # lazy: torch loads only when this runs

    path = Path(folder) / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (a truncated or foreign file: one line)
        raise ChestFedError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None


def _differences(a: Any, b: Any, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in list(a) + [k for k in b if k not in a]:
            out += _differences(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))
        return out
    return [] if a == b else [where or "(config)"]


def prepare_resume(folder: str | Path, given: Any = None) -> tuple[Any, Any, dict[str, Any]]:
    """The launchers' checks and clean-up before resuming `folder`; returns (config, RunFolder,
    resume info: {rounds_done, position}). `given`: a config the command line also named, which
    must be the run's own. Raises ChestFedError (one line) for a folder that is not a run, a
    complete or still running run, or a different config."""

    path = Path(folder).expanduser()
    if not (path / "config.yaml").is_file():
        raise ChestFedError(f"--resume: '{path}' is not a run folder (no config.yaml)")
    run = RunFolder(path.resolve())
    # a run whose launcher died is settled 'interrupted' first (its Ray leftovers end)
    status = refuse_unless_resumable(run.path).get("status")
    cfg = load_config(run.path / "config.yaml")
    if given is not None and given.to_yaml() != cfg.to_yaml():
        keys = _differences(given.model_dump(mode="json"), cfg.model_dump(mode="json"))
        raise ChestFedError(f"--resume: '{path}' was made with a different config "
                            f"({', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''} differ); "
                            f"resume it with its own (drop --config and overrides)")
    state = read_state(run.path) if (run.path / STATE_FILE).is_file() else None
    if state is not None and state.get("config") != config_digest(cfg):
        raise ChestFedError(f"--resume: {run.path / 'config.yaml'} was changed after the run "
                            f"started; it cannot be resumed")
    # What the interrupted round wrote after the last checkpoint never completed: metrics rows
    # past the checkpoint go, and so do results and reports of an unfinished evaluation.
    keep = int(state.get("metrics_bytes", 0)) if state else 0
    metrics = run.path / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > keep:
        with open(metrics, "r+b") as f:
            f.truncate(keep)
    for stale in _STALE:
        (run.path / stale).unlink(missing_ok=True)
    run.status.clear_ending()
    marker = run.path / MARKER_FILE
    done = int(state.get("rounds_done", 0)) if state else 0
    position = str(state.get("position", "")) if state else ""
    history = []
    if marker.is_file():
        try:
            history = json.loads(marker.read_text()).get("history", [])
        except ValueError:
            history = []
    history.append({"from_round": done, "position": position, "at": time.time(),
                    "previous_status": status})
    write_json(marker, {"from_round": done, "position": position, "history": history})
    return cfg, run, {"rounds_done": done, "position": position or "nothing (starting over)"}
