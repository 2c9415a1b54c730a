"""The deployment's processes: start each one in its own session with PR_SET_PDEATHSIG (it gets
SIGTERM if its launcher dies) and the run's tag in its environment (`CHESTFED_DEPLOY_TAG`), find
and end tagged ones through /proc (Flower's own helpers inherit the tag even when they detach),
hold a launcher's folder with a lock, and the small socket helpers the launchers share."""
from __future__ import annotations

import atexit
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from chestfed.common.atomic import write_json
from chestfed.common.errors import ChestFedError
from chestfed.common.processes import alive, terminate

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
TAG_ENV = "CHESTFED_DEPLOY_TAG"
SUPEREXEC_POLL_S = "0.1"


def flower_bin(name: str) -> str:
    """A Flower console script from this interpreter's environment (then PATH)."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise ChestFedError(f"'{name}' not found: install flwr[simulation]==1.41.0 in this environment")
    return found


def child_env(tag: str, flwr_home: Path | None = None, **extra: str) -> dict[str, str]:
    """Environment for Flower processes: our bin dir first on PATH (Flower starts its helpers
    by name), the run's tag, FLWR_HOME kept out of ~/.flwr, no runtime `uv sync`, short SuperExec polls."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env[TAG_ENV] = tag
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("WANDB_MODE", "offline")
    # A SuperExec polls for a new app to start every 1 s by default (flwr/supercore/superexec/
    # run_superexec.py); each message to a site, and each run's ServerApp, waits ~0.05 s instead.
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", SUPEREXEC_POLL_S)
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    env.update(extra)
    return env


def _die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def tagged_pids(tag: str) -> list[int]:
    """Live processes whose environment carries CHESTFED_DEPLOY_TAG=<tag> (read from /proc)."""
    needle = f"{TAG_ENV}={tag}".encode()
    me, out = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0") and alive(int(entry.name)):
            out.append(int(entry.name))
    return out


def kill_tagged(tag: str, grace: float = 5.0) -> list[int]:
    """SIGTERM every live process carrying `tag`, then SIGKILL what is left after `grace`."""
    pids = tagged_pids(tag)
    terminate(pids, grace, remaining=lambda: tagged_pids(tag))
    return pids


def stop_launchers(procs: "list[subprocess.Popen]", tags: "list[str]", wait: float = 30.0,
                   grace: float = 1.0) -> list[int]:
    """End launchers started with their own tags (tests, bench): SIGTERM each live one, give them
    `wait` s to close (SIGKILL after), then end whatever still carries a tag. Returns the pids
    that were still running under a tag when the launchers were gone (a clean stop: none)."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(wait)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
    left = [pid for tag in tags for pid in tagged_pids(tag)]
    for tag in tags:
        kill_tagged(tag, grace=grace)
    return left


class Managed:
    """One process we started: its own process group, output to a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path,
                 cwd: Path | None = None):
        self.name, self.argv, self.env, self.log_path, self.cwd = name, argv, env, log_path, cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "Managed":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            out.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(self.argv)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=_die_with_parent)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 8.0, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except OSError:
                pass
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left in its group (its children), and the process itself
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def tail(self, n: int = 15) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


class ProcessSet:
    """Everything one launcher started; stopped on exit, on SIGTERM/SIGHUP and on Ctrl-C."""

    def __init__(self, tag: str | None = None):
        # A caller (a test, a supervisor) may hand the tag down to find our processes later.
        self.tag = tag or os.environ.get(TAG_ENV) or uuid.uuid4().hex
        self.items: list[Managed] = []
        self._stopped = False
        atexit.register(self.stop)

    def start(self, m: Managed) -> Managed:
        self.items.append(m.start())
        return m

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for m in reversed(self.items):
            m.stop()
        kill_tagged(self.tag)

    def install_signal_handlers(self) -> None:
        """SIGTERM / SIGHUP end the launcher like Ctrl-C (KeyboardInterrupt), so `finally`
        blocks run and every child is stopped."""
        def handler(signum: int, frame: object) -> None:
            raise KeyboardInterrupt(f"signal {signum}")
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, handler)


LAUNCHER_FILE = "launcher.json"


LOCK_FILE = "launcher.lock"
_HELD_LOCKS: list[Any] = []  # open lock files: held (and so locked) for the launcher's lifetime


def claim_folder(folder: Path, tag: str, what: str) -> list[int]:
    """Mark `folder` (a coordinator's state dir, a site's workdir) as used by this launcher.

    An exclusive `flock` on `launcher.lock` in the folder is taken and held until this process
    exits (the kernel drops it however the process ends, SIGKILL included; child processes do
    not inherit it). If another live launcher holds it, refuse, naming its pid: two coordinators
    (or two copies of one site) must not share a database, a port and a Flower home. If the lock
    is free but `launcher.json` names an earlier launcher, that one died without cleaning up
    (SIGKILL, power cut): its leftover processes still carry its tag, and are ended here, by
    pid, and returned.
    """
    import fcntl  # POSIX only: imported where it is used

    folder.mkdir(parents=True, exist_ok=True)
    f = folder / LAUNCHER_FILE
    try:
        old = json.loads(f.read_text()) if f.is_file() else {}
    except (json.JSONDecodeError, OSError):
        old = {}
    lock = open(folder / LOCK_FILE, "a+")  # noqa: SIM115 (held open on purpose)
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        pid = int(old.get("pid", 0) or 0)
        who = f"pid {pid}" if pid and alive(pid) else "another process"
        raise ChestFedError(f"another {what} ({who}) is using {folder}; stop it first") from None
    _HELD_LOCKS.append(lock)
    ended: list[int] = []
    old_tag = str(old.get("tag", ""))
    if old_tag and old_tag != tag:
        ended = kill_tagged(old_tag)
        if ended:
            log.warning("ended %d process(es) left by a %s that died: %s", len(ended), what, ended)
    write_json(f, {"pid": os.getpid(), "tag": tag, "started": time.time()}, indent=None)
    return ended


def start_watchdog(pid: int, what: str = "launch/server.py", every: float = 1.0) -> None:
    """End this process at once if `pid` dies (used by the ServerApp: when the coordinator's
    launcher is killed, Flower's ServerApp would otherwise retry a dead SuperLink forever, and
    could even resume talking to the SuperLink a later `--resume` starts)."""
    def watch() -> None:
        while alive(pid):
            time.sleep(every)
        print(f"chestfed: {what} (pid {pid}) is gone; stopping this ServerApp", flush=True)
        os._exit(70)
    threading.Thread(target=watch, name="chestfed-watchdog", daemon=True).start()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ChestFedError(f"'{address}' is not HOST:PORT")
    return host.strip("[]"), int(port)
