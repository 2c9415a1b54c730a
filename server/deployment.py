"""Real deployment on Flower's Deployment Engine: processes, the SuperLink, submitting the run.

Used by launch/server.py (the coordinator), launch/site.py (a hospital) and the e2e tests.
Flower 1.41 serves the Fleet API (SuperNodes), the Control API (`flwr` CLI) and the Runtime
API (ServerApp) on ONE HTTPS port (`flower-superlink --host H --port P`); SuperNodes dial it
with `--superlink H:P`, the `flwr` CLI reads it from `$FLWR_HOME/config.toml`.

Process hygiene: every process started here runs in its own session (process group) with
PR_SET_PDEATHSIG, so it gets SIGTERM if its launcher dies, and carries `CHESTFED_DEPLOY_TAG` in its
environment. Flower's own helpers (flower-superexec, flwr-serverapp, flwr-clientapp) inherit that
tag even when they detach into a new session, so `stop()` finds and ends them through /proc too.

The ServerApp side (`prepared_run`, `WireAudit`) is imported inside the ServerApp process; keep
this module free of heavy imports at the top.
"""
from __future__ import annotations

import atexit
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from common.errors import ChestFedError
from server.processes import alive, terminate

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
TAG_ENV = "CHESTFED_DEPLOY_TAG"
CONNECTION = "chestfed"  # the connection name written to $FLWR_HOME/config.toml
DEPLOYMENT_FILE = "deployment.json"  # launch/server.py -> the ServerApp: how to run this folder
PROGRESS_FILE = "progress.log"  # the ServerApp's one-line-per-round progress
WIRE_FILE = "wire.jsonl"  # what crossed the wire at the server (shapes and types only)
APP_PARTS = ("common", "sites", "server")  # the FAB's code (Python files only)
# ... and the adapters' built-in resources, which are code too: the phantom hospitals' presets
# (sites/phantom/spec.py) and the report-keyword rules (sites/adapters/reports.py). No
# experiment config travels in the bundle: a site is told its part of the experiment in
# messages (common/protocol.py).
APP_RESOURCES = ("configs/sites",)
POOLING_REFUSED = (
    "{what} pools the sites' training images on one machine: in a real deployment that would "
    "move patient data between hospitals, so it exists only in simulation "
    "(python launch/simulate.py). Choose a strategy that keeps images at home: fedavg, fedprox, "
    "fedadam, fedyogi, fedbn, local, sequential, or loso with strategy.loso_base other than pooled.")


# --- processes ---------------------------------------------------------------------------------

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
    by name), the run's tag, FLWR_HOME kept out of ~/.flwr, no runtime `uv sync`."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env[TAG_ENV] = tag
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("WANDB_MODE", "offline")
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
    import fcntl

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
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "tag": tag, "started": time.time()}))
    os.replace(tmp, f)
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


# --- TLS / security ------------------------------------------------------------------------------

@dataclass
class Tls:
    ca: Path  # the CA certificate sites and tools verify the SuperLink with
    cert: Path | None = None  # server certificate (coordinator only)
    key: Path | None = None  # server private key (coordinator only)

    @classmethod
    def from_dir(cls, folder: str | Path) -> "Tls":
        d = Path(folder).expanduser().resolve()
        tls = cls(d / "ca.pem", d / "server.pem", d / "server.key")
        missing = [p.name for p in (tls.ca, tls.cert, tls.key) if not p.is_file()]  # type: ignore[union-attr]
        if missing:
            raise ChestFedError(
                f"TLS files missing in {d}: {', '.join(missing)}. Make them with: python "
                f"launch/certs.py server --host <name the hospitals dial> --out {folder}")
        return tls


INSECURE_BANNER = """
#################################################################################
#  WARNING: --insecure: TLS is OFF and SuperNode authentication is OFF.          #
#  Model weights and metrics travel in clear text, and ANY machine that can       #
#  reach this port can join the federation as a site and receive the model.      #
#  Use this only on a closed test network or loopback.                           #
#################################################################################
"""


def warn_insecure(stream: Any = None) -> None:
    print(INSECURE_BANNER, file=stream or sys.stderr, flush=True)
    log.warning("running WITHOUT TLS and WITHOUT SuperNode authentication (--insecure)")


def wait_listening(host: str, port: int, proc: Managed, timeout: float, tls: Tls | None) -> None:
    """Wait until `host:port` accepts connections (and completes a TLS handshake if TLS)."""
    deadline = time.monotonic() + timeout
    ctx = None
    if tls is not None:
        ctx = ssl.create_default_context(cafile=str(tls.ca))
        ctx.check_hostname = False
    while time.monotonic() < deadline:
        if not proc.alive():
            raise ChestFedError(f"{proc.name} exited during start-up; its log "
                                f"({proc.log_path}) ends with:\n{proc.tail()}")
        try:
            with socket.create_connection((host, port), timeout=2) as sock:
                if ctx is not None:
                    with ctx.wrap_socket(sock, server_hostname=host):
                        pass
            return
        except (OSError, ssl.SSLError):
            time.sleep(0.3)
    raise ChestFedError(f"{proc.name} did not listen on {host}:{port} within {timeout:.0f} s; "
                        f"see {proc.log_path}")


# --- the flwr CLI ------------------------------------------------------------------------------

class FlwrCli:
    """The `flwr` CLI with its own FLWR_HOME (nothing is written to ~/.flwr)."""

    def __init__(self, home: Path, address: str, tls: Tls | None, env: dict[str, str]):
        self.home, self.address, self.tls = home, address, tls
        self.env = dict(env, FLWR_HOME=str(home))
        home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "{address}"']
        if tls is None:
            lines.append("insecure = true")
        else:
            lines.append(f'root-certificates = "{tls.ca}"')
        (home / "config.toml").write_text("\n".join(lines) + "\n")

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> dict[str, Any]:
        argv = [flower_bin("flwr"), *args]
        if "--format" not in args:
            argv += ["--format", "json"]
        try:
            p = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout,
                               stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise ChestFedError(f"`flwr {' '.join(args)}` did not answer within {timeout:.0f} s") from None
        text = p.stdout.strip()
        start = text.find("{")
        try:
            out = json.loads(text[start:]) if start >= 0 else {}
        except json.JSONDecodeError:
            out = {}
        if check and (p.returncode != 0 or not out.get("success", False)):
            detail = out.get("error-message") or (p.stderr.strip() or text)[-800:]
            raise ChestFedError(f"`flwr {' '.join(args)}` failed: {detail}")
        return out

    def nodes(self) -> list[dict[str, Any]]:
        return list(self("supernode", "list", CONNECTION).get("nodes", []))

    def register(self, public_key: Path, name: str) -> int:
        out = self("supernode", "register", str(public_key), CONNECTION, "--name", name)
        return int(out["node-id"])

    def submit(self, app_dir: Path, run_config: dict[str, str]) -> int:
        args = ["run", str(app_dir), CONNECTION]
        for k, v in run_config.items():
            if "'" in v:
                raise ChestFedError(f"run config value for '{k}' must not contain a quote: {v!r}")
            args += ["--run-config", f"{k}='{v}'"]  # a TOML literal string: no escapes
        return int(self(*args)["run-id"])

    def run_status(self, run_id: int) -> str:
        """'pending' | 'starting' | 'running' | 'finished:completed' | 'finished:failed' | ..."""
        runs = self("ls", CONNECTION, "--run-id", str(run_id), timeout=60).get("runs", [])
        return str(runs[0]["status"]) if runs else "unknown"

    def stop_run(self, run_id: int, timeout: float = 60) -> None:
        self("stop", str(run_id), CONNECTION, timeout=timeout, check=False)


def collect_site_keys(keys: Iterable[str], keys_dir: str | None, sites: list[str]) -> dict[str, Path]:
    """Site name -> public key file, from `--site-key NAME=FILE` and/or `--keys-dir DIR`
    (DIR/<site>.pub). Every configured site needs one."""
    found: dict[str, Path] = {}
    if keys_dir:
        for s in sites:
            p = Path(keys_dir).expanduser() / f"{s}.pub"
            if p.is_file():
                found[s] = p.resolve()
    for item in keys:
        name, sep, file = item.partition("=")
        if not sep:
            raise ChestFedError(f"--site-key '{item}' must look like NAME=path/to/NAME.pub")
        if name not in sites:
            raise ChestFedError(f"--site-key names '{name}', which is not a site of this "
                                f"experiment ({', '.join(sites)})")
        p = Path(file).expanduser()
        if not p.is_file():
            raise ChestFedError(f"--site-key {name}: '{p}' not found")
        found[name] = p.resolve()
    missing = [s for s in sites if s not in found]
    if missing:
        raise ChestFedError(
            f"no public key for site(s) {', '.join(missing)}: every hospital makes one with "
            "`python launch/certs.py node-key --name <site>` and sends <site>.pub; pass them "
            "with --keys-dir DIR (DIR/<site>.pub) or --site-key NAME=FILE")
    return found


# --- the SuperLink -----------------------------------------------------------------------------

def guarded_superlink(allow: tuple[str, ...] = ()) -> None:
    """`flower-superlink` (arguments in sys.argv) with only its Fleet API answering other hosts:
    the Control and Runtime APIs, `/docs` and `/openapi.json` answer this machine only
    (server/superlink_guard.py says why this cannot be a bind address in Flower 1.41)."""
    from server.superlink_guard import install
    from flwr.superlink.cli.flower_superlink import flower_superlink

    install(tuple(allow))
    flower_superlink()


@dataclass
class SuperLink:
    """A `flower-superlink` this coordinator owns. Its SQLite database lives in `state_dir`,
    so SuperNode registrations survive a coordinator restart (`--resume`)."""

    state_dir: Path
    host: str
    port: int
    tls: Tls | None
    processes: ProcessSet
    auth: bool = True
    proc: Managed | None = field(default=None, init=False)

    @property
    def dial_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def address(self) -> str:
        h = self.dial_host
        return f"[{h}]:{self.port}" if ":" in h else f"{h}:{self.port}"

    def argv(self) -> list[str]:
        # flower-superlink, only its Fleet API open to other machines (guarded_superlink)
        own = "" if self.host in ("0.0.0.0", "::", "") else self.host
        launcher = [sys.executable, "-c", "import sys; from server.deployment import "
                    f"guarded_superlink as g; g(({own!r},) if {own!r} else ())"]
        argv = [*launcher, "--host", self.host, "--port", str(self.port),
                "--database", str(self.state_dir / "superlink.db"),
                "--disable-runtime-dependency-installation"]
        if self.tls is None:
            argv.append("--insecure")
        else:
            argv += ["--ssl-ca-certfile", str(self.tls.ca), "--ssl-certfile", str(self.tls.cert),
                     "--ssl-keyfile", str(self.tls.key)]
            if self.auth:
                argv.append("--enable-supernode-auth")
        return argv

    def start(self, timeout: float = 60.0) -> "SuperLink":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        env = child_env(self.processes.tag, self.state_dir / "flwr-home")
        self.proc = self.processes.start(Managed("flower-superlink", self.argv(), env,
                                                 self.state_dir / "superlink.log",
                                                 cwd=self.state_dir))
        wait_listening(self.dial_host, self.port, self.proc, timeout, self.tls)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()


# --- the app bundle ----------------------------------------------------------------------------

def stage_app(dest: Path, repo: Path = REPO) -> Path:
    """Copy just the Flower App to `dest`: pyproject.toml, the Python code of common/ sites/
    server/, and the adapters' resources (APP_RESOURCES, YAML). `flwr run` bundles that folder:
    code, never the coordinator's experiment configs, runs, caches or the venv."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copy2(repo / "pyproject.toml", dest / "pyproject.toml")
    for parts, keep in ((APP_PARTS, (".py",)), (APP_RESOURCES, (".yaml", ".yml"))):
        for part in parts:
            src = repo / part
            if not src.is_dir():
                continue
            for f in src.rglob("*"):
                if f.is_file() and f.suffix in keep and "__pycache__" not in f.parts:
                    target = dest / f.relative_to(repo)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, target)
    return dest


# --- inside the ServerApp ----------------------------------------------------------------------

def prepared_run(path: Path) -> tuple[Any, Any, dict[str, Any]]:
    """A run folder launch/server.py prepared: (config, RunFolder, deployment options)."""
    from common.config import load_config
    from server.runfolder import RunFolder

    spec_file = path / DEPLOYMENT_FILE
    if not spec_file.is_file():
        raise ChestFedError(f"'{path}' is not a run folder prepared by launch/server.py "
                            f"(no {DEPLOYMENT_FILE})")
    spec = json.loads(spec_file.read_text())
    return load_config(path / "config.yaml"), RunFolder(path), spec


def refuse_pooling(strategy: str, loso_base: str) -> None:
    """Pooling moves data between hospitals: refused outside simulation."""
    if strategy == "pooled":
        raise ChestFedError(POOLING_REFUSED.format(what="strategy 'pooled'"))
    if strategy == "loso" and loso_base == "pooled":
        raise ChestFedError(POOLING_REFUSED.format(what="strategy 'loso' with strategy.loso_base=pooled"))


class ProgressEcho:
    """The ServerApp's echo: stdout (-> `flwr log`) and <run>/progress.log (-> launch/server.py)."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line.rstrip("\n") + "\n")


class WireAudit:
    """A Grid wrapper that writes, for every message leaving or reaching the server, the shape
    and dtype of each array, the type (and length) of each metric and config value: never the
    values themselves. Lets an auditor (and a test) check that only weights, settings and
    aggregate numbers cross."""

    def __init__(self, grid: Any, path: Path):
        self._grid, self._path = grid, path
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    @staticmethod
    def describe(msg: Any, direction: str) -> dict[str, Any]:
        """One row of wire.jsonl (`common.disclosure.describe`, which sites use for egress.jsonl)."""
        from common.disclosure import describe

        return describe(msg, direction)

    def _write(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        text = "".join(json.dumps(r) + "\n" for r in rows)
        with self._lock, open(self._path, "a") as f:
            f.write(text)

    def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
        messages = list(messages)
        self._write([self.describe(m, "out") for m in messages])
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Any]:
        replies = list(self._grid.pull_messages(message_ids))
        self._write([self.describe(m, "in") for m in replies])
        return replies

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None
                         ) -> Iterable[Any]:
        messages = list(messages)
        self._write([self.describe(m, "out") for m in messages])
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self._write([self.describe(m, "in") for m in replies])
        return replies
