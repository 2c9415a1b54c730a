"""One folder per run, written so a crash never leaves a file that looks complete.

runs/<experiment>/<strategy>-<timestamp>/
  config.yaml      the resolved config
  run.json         status (running | complete | failed | interrupted), times, error (one line),
                   the launcher's pid and Ray session (to settle a run whose launcher died)
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

import errno
import json
import math
import os
import re
import shutil
import tempfile
import traceback
import time
from datetime import datetime
from pathlib import Path
from typing import Any



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
    import torch  # here, not at the top: launchers that fail early should not wait for torch

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


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def _picked(exc: BaseException) -> BaseException:
    """The user's error (a ChestFedError) in an exception's cause chain, else its innermost."""
    from chestfed.common.errors import ChestFedError

    chain, cur = [], exc
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    return next((e for e in chain if isinstance(e, ChestFedError)), chain[-1])


root_cause = _picked


def one_line(exc: BaseException) -> str:
    """What went wrong, on one clean line: the user's error (a ChestFedError anywhere in the
    cause chain: Flower wraps the ServerApp's exception in its own) or the innermost cause,
    without terminal colour codes or line breaks."""
    from chestfed.common.errors import ChestFedError

    picked = _picked(exc)
    text = _ANSI.sub("", str(picked))
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    if not isinstance(picked, ChestFedError):
        text = f"{type(picked).__name__}: {text}" if text else type(picked).__name__
    return text[:500] + ("..." if len(text) > 500 else "")


def launcher_identity() -> dict[str, Any]:
    """Who runs this run: a later command marks the run interrupted if this process is gone."""
    from chestfed.server.simulation.ray_session import process_start

    return {"launcher_pid": os.getpid(), "launcher_start": process_start(os.getpid())}


def read_json_file(path: Path) -> Any:
    """A results.json / comparison.json a person asked us to read: an empty or truncated file
    (a full disk, a copy cut short) is one line that names it, not a traceback."""
    from chestfed.common.errors import ChestFedError

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


LIVE = ("running", "starting")


def settle(path: Path) -> bool:
    """A run left 'running' by a launcher that died (SIGKILL, a crash, a power cut) becomes
    'interrupted (launcher died)', and what is left of its Ray session ends. True if settled.
    Runs of a live launcher, and runs that do not say who launched them, are left alone."""
    from chestfed.server.simulation.ray_session import end_session, launcher_alive

    run = RunFolder(path)
    try:
        info = run.read_status()
    except (OSError, ValueError):
        return False
    pid = info.get("launcher_pid")
    if info.get("status") not in LIVE or not isinstance(pid, int):
        return False
    if launcher_alive(pid, info.get("launcher_start")):
        return False
    try:
        run.set_status("interrupted", interrupted_by="launcher died",
                       error=f"the launcher (pid {pid}) died while the run was "
                             f"{info.get('status')}")
    except OSError:
        return False
    if info.get("ray_session"):
        end_session(str(info["ray_session"]), wait=5.0)
    return True


def settle_experiment(folder: Path) -> list[Path]:
    """settle() every run under an experiment folder (its runs and its comparisons' runs)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    candidates = [*folder.glob("*/run.json"), *folder.glob("*/runs/*/run.json")]
    return [f.parent for f in candidates if settle(f.parent)]


class RunFolder:
    def __init__(self, path: Path):
        self.path = Path(path)

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
        try:
            atomic_write_json(self.path / "run.json", info)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not (self.path / "run.json").is_file():
                raise
            # A full disk has no room for the temporary copy; rewriting the file in place
            # frees its blocks first, so the status still gets out.
            with open(self.path / "run.json", "w") as f:
                f.write(json.dumps(_jsonable(info), indent=2) + "\n")

    def record_failure(self, exc: BaseException) -> str:
        """status 'failed' with one clean line in run.json; the traceback goes to error.log.
        Returns the line. Never raises: a run must not stay 'running' because of this."""
        line = one_line(exc)
        try:
            with open(self.path / "error.log", "a") as f:
                f.write("".join(traceback.format_exception(exc)))
                detail = getattr(_picked(exc), "detail", "")
                if detail:  # e.g. a site's own traceback, as Flower handed it back
                    f.write(f"\n{detail}\n")
        except OSError:
            pass
        try:
            # error_kind lets launch/compare.py tell a data or config error, which every
            # strategy would hit again, from a failure of this one run.
            self.set_status("failed", error=line, error_kind=type(_picked(exc)).__name__)
        except OSError:
            pass
        return line

    def discard(self) -> None:
        """Remove a run folder that never got a status (setting it up failed)."""
        if not (self.path / "run.json").is_file():
            shutil.rmtree(self.path, ignore_errors=True)
            try:
                self.path.parent.rmdir()  # the experiment folder, if this was its only run
            except OSError:
                pass

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

    def save_checkpoint(self, name: str, state: dict[str, Any], meta: dict[str, Any]) -> Path:
        dest = self.path / "checkpoints" / f"{name}.pt"
        atomic_torch_save(dest, {"model": state, "meta": meta})
        return dest
