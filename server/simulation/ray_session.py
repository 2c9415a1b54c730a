"""The one Ray session a simulation starts, and how it is ended without leftovers.

Flower's Ray backend calls `ray.init` itself, which (in the main thread) replaces the launcher's
SIGTERM handler with Ray's own `sys.exit`: a `kill` then aborted the launcher and left its run
'running'. So we start Ray first, the way Flower would (Flower skips `ray.init` when Ray is
already up), and put the launcher's handler back.

After a normal or interrupted end, `stop_ray` shuts Ray down, ends whatever of that session is
still alive (Ray's DashboardAgent and RuntimeEnvAgent outlive a SIGKILLed driver by a minute or
two) and removes the session folder under /tmp/ray. A run folder whose launcher died
(server/run/folder.py `settle`) ends its session the same way. Processes are found through
/proc (Linux): a process belongs to a session when its command line names the session folder or
one of its open files lies in it (every Ray process logs there); only our own user's processes
are looked at, so another user's or another run's Ray is never touched.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

from chestfed.common.processes import alive, terminate
from chestfed.server.simulation import warm_pool

_session_dir: str | None = None


def start_ray(init_args: dict[str, Any], env: dict[str, str] | None = None) -> str | None:
    """`ray.init` as Flower's RayBackend.init_ray does it; returns the session folder, or None
    when `init_args` has an `address` (an existing cluster: its session is not ours to end).

    `env` goes to every worker through the job's runtime env: a cluster's workers are started
    by raylets that `ray start` launched, so they do not inherit this process's environment.
    """
    global _session_dir

    import ray  # lazy: ray loads only when this runs

    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    # "local" unless told otherwise: without it ray.init joins any cluster that `ray start`
    # (another user, another test) left running on this machine, and then refuses num_cpus
    attach = init_args.get("address") not in (None, "local")
    init_args = {"address": "local", **init_args}
    with warnings.catch_warnings():
        # Ray's notice that a future version stops hiding GPUs from 0-GPU workers: we ask for
        # the hiding explicitly (server/simulation/engine.py), whatever Ray's default becomes.
        warnings.filterwarnings("ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO.*")
        ctx = ray.init(runtime_env={"env_vars": {**(env or {}), "PYTHONPATH": pythonpath}},
                       **init_args)
    for sig, handler in previous.items():
        if handler is not None:
            signal.signal(sig, handler)
    if main and not getattr(ray.shutdown, "_keeps_handlers", False):
        ray.shutdown = _keeping_handlers(ray.shutdown)
    try:
        _session_dir = None if attach else str(ctx.address_info["session_dir"])
    except (AttributeError, KeyError, TypeError):
        _session_dir = None
    return _session_dir


def _keeping_handlers(shutdown: Any) -> Any:
    """ray.shutdown (Flower calls it when the simulation ends or unwinds) puts SIGTERM back to
    the default action at the C level: a second SIGTERM during the close would kill the
    launcher outright. Put Python's handlers (ours: ignore, once the first signal came) back."""
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        main = threading.current_thread() is threading.main_thread()
        saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
        done = threading.Event()
        if saved.get(signal.SIGTERM) == signal.SIG_IGN:  # closing after a signal: keep ignoring
            threading.Thread(target=_keep_ignoring, args=(signal.SIGTERM, done), daemon=True).start()
        try:
            return shutdown(*args, **kwargs)
        finally:
            done.set()
            for sig, handler in saved.items():
                if handler is not None:
                    signal.signal(sig, handler)

    wrapped._keeps_handlers = True  # type: ignore[attr-defined]
    return wrapped


def _keep_ignoring(sig: int, done: threading.Event) -> None:
    """Re-ignore `sig` at the C level while Ray shuts down (Python's signal.signal only works in
    the main thread, which is busy shutting Ray down)."""

    try:
        libc = ctypes.CDLL(None)
        libc.signal.restype = ctypes.c_void_p
        libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
    except (OSError, AttributeError):
        return
    while not done.wait(0.005):
        libc.signal(sig, 1)  # SIG_IGN


def current_session() -> str | None:
    """The session folder `start_ray` started (None: attached to a cluster, or none started)."""
    return _session_dir


def stop_ray(wait: float = 8.0) -> None:
    """Shut Ray down and leave nothing of this process's session behind (attached to an
    existing cluster: only disconnect; the cluster and its workers stay). Site workers kept warm
    between runs (server/simulation/warm_pool.py) end with it."""
    global _session_dir
    warm_pool.close()
    try:
        import ray  # lazy: ray loads only when this runs

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # a half-started Ray: what is left is reaped below
        pass
    if _session_dir:
        end_session(_session_dir, wait)
        _session_dir = None


def _own(pid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}").st_uid == os.getuid()
    except OSError:
        return False


def session_pids(session_dir: str) -> list[int]:
    """Our user's processes (not this one) whose command line or open files are in the session."""
    root = Path("/proc")
    if not session_dir or not root.is_dir():
        return []
    session_dir = os.path.normpath(session_dir)
    found = []
    for entry in root.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid() or not _own(int(entry.name)):
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        hit = session_dir in cmd
        if not hit:
            try:
                for fd in (entry / "fd").iterdir():
                    try:
                        if os.readlink(fd).startswith(session_dir + os.sep):
                            hit = True
                            break
                    except OSError:
                        continue
            except OSError:
                continue
        if hit:
            found.append(int(entry.name))
    return found


def end_session(session_dir: str, wait: float = 8.0) -> None:
    """SIGTERM the session's processes, SIGKILL what is left after `wait` s, remove its folder."""
    terminate(session_pids(session_dir), wait)
    path = Path(session_dir)
    latest = path.parent / "session_latest"
    try:
        if latest.is_symlink() and os.path.realpath(latest) == os.path.realpath(path):
            latest.unlink()
    except OSError:
        pass
    if path.name.startswith("session_") and path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def launcher_alive(pid: int, start: int | None) -> bool:
    """Is the launcher that wrote a run.json still running (the same process, not a reuse)?"""
    if not alive(pid):
        return False
    return start is None or process_start(pid) == start
