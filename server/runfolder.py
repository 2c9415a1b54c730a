"""One folder per run, written so a crash never leaves a file that looks complete.

runs/<experiment>/<strategy>-<timestamp>/
  config.yaml      the resolved config
  run.json         status (running | complete | failed | interrupted), times, error
  splits/<site>.csv
  metrics.jsonl    one line per round per site
  results.json     the final matrix (rows: models, columns: test sites)
  checkpoints/     <model>.pt (final), round-<k>.pt (latest round, for resuming)
  wandb/           the W&B (offline) run
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch


def echo(line: str) -> None:
    """Progress for people: flushed at once, so a pipe (tee, a log, a test) sees every round live."""
    print(line, flush=True)


def _jsonable(x: Any) -> Any:
    """NaN and inf become null: strict JSON readers (browsers, jq) reject NaN."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item):  # numpy scalars
        return _jsonable(x.item())
    return x


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; done once, at import
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_read_umask()


def _umask_mode() -> int:
    """The mode a plain open() would give: mkstemp's 0600 would hide results from colleagues."""
    return _FILE_MODE


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2) + "\n")


def atomic_torch_save(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunFolder:
    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def create(cls, output_dir: str | Path, experiment: str, strategy: str) -> "RunFolder":
        base = Path(output_dir) / experiment
        base.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        for n in range(1000):
            path = base / f"{strategy}-{stamp}{'' if n == 0 else f'-{n}'}"
            try:
                path.mkdir()
                return cls(path)
            except FileExistsError:
                continue
        raise RuntimeError(f"cannot create a run folder under {base}")

    # --- status -----------------------------------------------------------------------------
    def read_status(self) -> dict[str, Any]:
        f = self.path / "run.json"
        return json.loads(f.read_text()) if f.is_file() else {}

    def set_status(self, status: str, **extra: Any) -> None:
        info = self.read_status()
        info.update(extra)
        info["status"] = status
        info.setdefault("started", time.time())
        if status != "running":
            info["ended"] = time.time()
            info["wall_seconds"] = info["ended"] - info["started"]
        atomic_write_json(self.path / "run.json", info)

    # --- files ------------------------------------------------------------------------------
    def write_config(self, yaml_text: str) -> None:
        atomic_write_text(self.path / "config.yaml", yaml_text)

    def append_metrics(self, rows: list[dict[str, Any]]) -> None:
        # One write per batch of whole lines; a reader never sees half a line of a finished batch.
        text = "".join(json.dumps(_jsonable(r)) + "\n" for r in rows)
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        f = self.path / "metrics.jsonl"
        if not f.is_file():
            return []
        return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]

    def write_results(self, results: dict[str, Any]) -> None:
        atomic_write_json(self.path / "results.json", results)

    def save_checkpoint(self, name: str, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
        dest = self.path / "checkpoints" / f"{name}.pt"
        atomic_torch_save(dest, {"model": state, "meta": meta})
        return dest
