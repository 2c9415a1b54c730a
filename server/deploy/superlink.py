"""The coordinator's `flower-superlink`: started behind the Fleet-only guard
(server/deploy/superlink_guard.py), its SQLite state in the state dir, stopped with the run.
Flower 1.41 serves the Fleet API (SuperNodes), the Control API (`flwr` CLI) and the Runtime API
(ServerApp) on ONE HTTPS port (`--host H --port P`); SuperNodes dial it with `--superlink H:P`."""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from chestfed.common.deploy.supervision import Managed, ProcessSet, child_env
from chestfed.server.deploy.tls import Tls, wait_listening
from chestfed.server.deploy.superlink_guard import install

log = logging.getLogger(__name__)


def guarded_superlink(allow: tuple[str, ...] = ()) -> None:
    """`flower-superlink` (arguments in sys.argv) with only its Fleet API answering other hosts:
    the Control and Runtime APIs, `/docs` and `/openapi.json` answer this machine only
    (server/deploy/superlink_guard.py says why this cannot be a bind address in Flower 1.41)."""
    from flwr.superlink.cli.flower_superlink import flower_superlink  # lazy: flwr loads only when this runs

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
        launcher = [sys.executable, "-c", "import sys; from chestfed.server.deploy.superlink import "
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
