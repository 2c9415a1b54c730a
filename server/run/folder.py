"""One folder per run, written so a crash never leaves a file that looks complete.

runs/<experiment>/<strategy>-<timestamp>/
  config.yaml      the resolved config
  run.json         status, times, error (one line), the launcher's pid and Ray session:
                   written only by server/run/lifecycle.py
  error.log        the full traceback of a failed run
  splits/<site>.csv
  metrics.jsonl    one line per round per site
  results.json     the final matrix (rows: models, columns: test sites)
  checkpoints/     <model>.pt (final), latest.pt (the latest round's weights)
  resume/          state.pt (after every round) and finished models: --resume (server/run/resume.py)
  site-state/      simulation: what each site keeps between rounds (FedBN's BatchNorm)
  wandb/           the W&B (offline) run
"""
from __future__ import annotations

import json
import os
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

from chestfed.common import atomic
from chestfed.common.errors import ChestFedError
from chestfed.server.run.lifecycle import RunStatus, settle_experiment


def echo(line: str) -> None:
    """Progress for people: flushed at once, so a pipe (tee, a log, a test) sees every round live."""
    print(line, flush=True)


def read_json_file(path: Path) -> Any:
    """A results.json / comparison.json a person asked us to read: an empty or truncated file
    (a full disk, a copy cut short) is one line that names it, not a traceback."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ChestFedError(f"{path}: not a JSON text file") from None
    except OSError as exc:
        raise ChestFedError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not text.strip():
        raise ChestFedError(f"{path} is empty (the run did not finish writing it?)")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ChestFedError(f"{path} is not valid JSON (truncated? {exc})") from None
    if not isinstance(data, dict):
        raise ChestFedError(f"{path}: expected a JSON object")
    return data


class RunFolder:
    """A run's folder and the files in it; its status is `self.status` (server/run/lifecycle.py)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.status = RunStatus(self.path)

    @classmethod
    def create(cls, output_dir: str | Path, experiment: str, strategy: str) -> "RunFolder":
        base = Path(output_dir) / experiment
        base.mkdir(parents=True, exist_ok=True)
        settle_experiment(base)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        for n in range(1000):
            path = base / f"{strategy}-{stamp}{'' if n == 0 else f'-{n}'}"
            try:
                path.mkdir()
                return cls(path)
            except FileExistsError:
                continue
        raise RuntimeError(f"cannot create a run folder under {base}")

    @classmethod
    def new(cls, cfg: Any, run_dir: str | Path | None = None) -> "RunFolder":
        """A new run's folder holding its config.yaml: `run_dir` (which must not exist yet) or
        `<output_dir>/<experiment>/<strategy>-<time>`. The one way launchers make a run folder;
        ChestFedError (one line) when it cannot be made, and then nothing is left behind."""
        if run_dir is not None and Path(run_dir).exists():
            raise ChestFedError(f"--run-dir '{run_dir}' already exists; give a new folder")
        try:
            if run_dir is not None:
                Path(run_dir).mkdir(parents=True)
                run = cls(Path(run_dir))
            else:
                run = cls.create(cfg.output_dir, cfg.experiment, cfg.strategy.name)
        except OSError as exc:
            raise ChestFedError(f"output_dir '{cfg.output_dir}': cannot create the run folder "
                                f"({exc.strerror or exc}"
                                f"{f': {exc.filename}' if exc.filename else ''})") from None
        try:
            run.write_config(cfg.to_yaml())
        except BaseException as exc:  # a full disk, most likely (or Ctrl-C): no half folder
            run.discard()
            if isinstance(exc, OSError):
                raise ChestFedError(f"output_dir '{cfg.output_dir}': cannot write the run "
                                    f"folder ({exc.strerror or exc})") from None
            raise
        return run

    def discard(self) -> None:
        """Remove a run folder that never got a status (setting it up failed)."""
        if not self.status.exists():
            shutil.rmtree(self.path, ignore_errors=True)
            try:
                self.path.parent.rmdir()  # the experiment folder, if this was its only run
            except OSError:
                pass

    # --- files ------------------------------------------------------------------------------
    def write_config(self, yaml_text: str) -> None:
        atomic.write_text(self.path / "config.yaml", yaml_text)

    def append_metrics(self, rows: list[dict[str, Any]]) -> None:
        # One write per batch of whole lines; a reader never sees half a line of a finished batch.
        text = "".join(json.dumps(atomic.jsonable(r)) + "\n" for r in rows)
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
        atomic.write_json(self.path / "results.json", results)

    def save_checkpoint(self, name: str, state: dict[str, Any], meta: dict[str, Any]) -> Path:
        dest = self.path / "checkpoints" / f"{name}.pt"
        atomic.torch_save(dest, {"model": state, "meta": meta})
        return dest
