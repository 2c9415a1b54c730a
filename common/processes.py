"""Process bookkeeping shared by the deployment launchers and the Ray session clean-up: is a
pid alive, and ending a set of processes politely, then firmly."""
from __future__ import annotations

import os
import signal
import time
from typing import Callable, Iterable


def alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False


def _signal(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def terminate(pids: list[int], grace: float,
              remaining: Callable[[], Iterable[int]] | None = None) -> None:
    """SIGTERM `pids`, wait up to `grace` s for them to go, then SIGKILL what is left
    (`remaining()` if given: e.g. every process still carrying a tag, newcomers included)."""
    _signal(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    left = list(pids)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if alive(p)]
    _signal(remaining() if remaining is not None else left, signal.SIGKILL)
