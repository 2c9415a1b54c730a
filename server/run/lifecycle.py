"""A run's life, in its `run.json`: the one module that reads or writes that file.

    starting (launch/server.py: SuperLink up, waiting for sites) -> running
        -> complete | failed (error: one line; error.log: the traceback) | interrupted

A launcher records who it is (pid and start time) when the run starts, so that a later command
that finds the run still `running` while that process is gone settles it as
`interrupted (launcher died)` and ends what is left of its Ray session (`settle`).
A resumed run keeps its file: the previous ending's fields go, its counters stay.
"""
from __future__ import annotations

import errno
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any

from chestfed.common import atomic
from chestfed.common.errors import ChestFedError, one_line, root_cause

RUN_FILE = "run.json"
ERROR_LOG = "error.log"
LIVE = ("running", "starting")
TERMINAL = ("complete", "failed", "interrupted", "pruned")  # pruned: a tuning trial stopped early
# what a run's ending adds; a resumed run drops them when it starts again
ENDING = ("error", "error_kind", "ended", "wall_seconds", "interrupted_by")


class RunStatus:
    """The status of the run in folder `path`."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.file = self.path / RUN_FILE

    def exists(self) -> bool:
        return self.file.is_file()

    def read(self) -> dict[str, Any]:
        return json.loads(self.file.read_text()) if self.file.is_file() else {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.read().get(key, default)

    def set(self, status: str, **extra: Any) -> None:
        info = self.read()
        info.update(extra)
        info["status"] = status
        info.setdefault("started", time.time())
        if status not in LIVE:
            info["ended"] = time.time()
            info["wall_seconds"] = info["ended"] - info["started"]
        self._write(info)

    def note(self, **extra: Any) -> None:
        """Add fields (a Ray session, a Flower run id) without changing the status."""
        info = self.read()
        info.update(extra)
        self._write(info)

    def fail(self, exc: BaseException) -> str:
        """Status 'failed' with one clean line; the traceback goes to error.log. Returns the
        line. Never raises: a run must not stay 'running' because its failure could not be
        written."""
        line = one_line(exc)
        try:
            with open(self.path / ERROR_LOG, "a") as f:
                f.write("".join(traceback.format_exception(exc)))
                detail = getattr(root_cause(exc), "detail", "")
                if detail:  # e.g. a site's own traceback, as Flower handed it back
                    f.write(f"\n{detail}\n")
        except OSError:
            pass
        try:
            # error_kind lets launch/compare.py tell a data or config error, which every
            # strategy would hit again, from a failure of this one run.
            self.set("failed", error=line, error_kind=type(root_cause(exc)).__name__)
        except OSError:
            pass
        return line

    def start(self, status: str = "running", *, resumed_from: str | None = None,
              **info: Any) -> None:
        """The launcher takes the run: its identity (to settle the run if it dies) and, for a
        resumed run, where it goes on from and how many times it was resumed."""
        if resumed_from is not None:
            info.update(resumed_from=resumed_from, resumes=int(self.get("resumes", 0)) + 1)
        self.set(status, **info, **launcher_identity())

    def clear_ending(self) -> None:
        """Before a resume: the previous ending's fields go; its status stays until the
        launcher starts the run again."""
        self._write({k: v for k, v in self.read().items() if k not in ENDING})

    def _write(self, info: dict[str, Any]) -> None:
        try:
            atomic.write_json(self.file, info)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not self.file.is_file():
                raise
            # A full disk has no room for the temporary copy; rewriting the file in place
            # frees its blocks first, so the status still gets out.
            with open(self.file, "w") as f:
                f.write(json.dumps(atomic.jsonable(info), indent=2) + "\n")


def launcher_identity() -> dict[str, Any]:
    """Who runs this run: a later command marks the run interrupted if this process is gone."""
    from chestfed.server.simulation.ray_session import process_start  # psutil: only when starting

    return {"launcher_pid": os.getpid(), "launcher_start": process_start(os.getpid())}


def settle(path: str | os.PathLike[str]) -> bool:
    """A run left 'running' by a launcher that died (SIGKILL, a crash, a power cut) becomes
    'interrupted (launcher died)', and what is left of its Ray session ends. True if settled.
    Runs of a live launcher, and runs that do not say who launched them, are left alone."""
    # psutil and Ray's session files: only when a run folder is being looked at
    from chestfed.server.simulation.ray_session import end_session, launcher_alive

    status = RunStatus(path)
    try:
        info = status.read()
    except (OSError, ValueError):
        return False
    pid = info.get("launcher_pid")
    if info.get("status") not in LIVE or not isinstance(pid, int):
        return False
    if launcher_alive(pid, info.get("launcher_start")):
        return False
    try:
        status.set("interrupted", interrupted_by="launcher died",
                   error=f"the launcher (pid {pid}) died while the run was {info.get('status')}")
    except OSError:
        return False
    if info.get("ray_session"):
        end_session(str(info["ray_session"]), wait=5.0)
    return True


def settle_experiment(folder: str | os.PathLike[str]) -> list[Path]:
    """settle() every run under an experiment folder (its runs and its comparisons' runs)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    candidates = [*folder.glob(f"*/{RUN_FILE}"), *folder.glob(f"*/runs/*/{RUN_FILE}")]
    return [f.parent for f in candidates if settle(f.parent)]


def refuse_unless_resumable(path: Path) -> dict[str, Any]:
    """The status of a run about to be resumed; ChestFedError (one line) for a complete run or
    one whose launcher still runs it (after settling one whose launcher died)."""
    settle(path)
    info = RunStatus(path).read()
    status = info.get("status")
    if status == "complete" or (path / "results.json").is_file() and status not in LIVE:
        raise ChestFedError(f"--resume: '{path}' is already complete; nothing to resume")
    if status in LIVE:
        raise ChestFedError(f"--resume: '{path}' is still {status} (launcher pid "
                            f"{info.get('launcher_pid', '?')}); stop it first")
    return info
