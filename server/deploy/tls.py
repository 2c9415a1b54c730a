"""TLS for the deployment: the coordinator's certificate files and waiting for the SuperLink to
listen (checking its certificate when TLS is on). The --insecure banner both launchers print is
in common/deploy/insecure.py."""
from __future__ import annotations

import logging
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from chestfed.common.errors import ChestFedError
from chestfed.common.deploy.supervision import Managed

log = logging.getLogger(__name__)



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
