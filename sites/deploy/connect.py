"""Why a site cannot reach its coordinator, in one line: probed before the SuperNode starts.

Flower's SuperNode reports a wrong CA, a coordinator that is down, TLS on one side only and an
unregistered key alike ("Failed to activate SuperNode", or endless "Connection attempt failed").
`probe` tells them apart with a TCP connection and a TLS handshake against the coordinator's
port (Python's socket and ssl, the same checks the SuperNode's HTTPS client makes);
`classify` sorts the SuperNode's own log lines once it runs.
"""
from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

OK, UNREACHABLE, TLS_FAILED, ONE_SIDED = "ok", "unreachable", "tls", "one-sided"


@dataclass
class Probe:
    kind: str  # OK | UNREACHABLE | TLS_FAILED | ONE_SIDED
    line: str = ""  # what to tell the hospital's operator (empty when OK)


def _tcp(host: str, port: int, timeout: float) -> socket.socket | Probe:
    where = f"{host}:{port}"
    try:
        return socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror:
        return Probe(UNREACHABLE, f"the coordinator's host name '{host}' does not resolve "
                                  "(DNS); check --superlink")
    except ConnectionRefusedError:
        return Probe(UNREACHABLE, f"the coordinator {where} is unreachable: connection refused "
                                  "(the coordinator is not running, or a wrong port)")
    except (socket.timeout, TimeoutError):
        return Probe(UNREACHABLE, f"the coordinator {where} is unreachable: no answer within "
                                  f"{timeout:.0f} s (down, or a firewall drops the connection)")
    except OSError as exc:
        return Probe(UNREACHABLE, f"the coordinator {where} is unreachable: "
                                  f"{exc.strerror or exc}")


def _plain_answer(sock: socket.socket, host: str) -> bytes:
    """The first bytes the server answers to a plain HTTP request (b'' if it hung up)."""
    try:
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return sock.recv(16)
    except OSError:
        return b""


def probe(host: str, port: int, ca: Path | None, timeout: float = 10.0) -> Probe:
    """Can a SuperNode reach `host:port`? `ca` None means the site runs --insecure."""
    where = f"{host}:{port}"
    sock = _tcp(host, port, timeout)
    if isinstance(sock, Probe):
        return sock
    with sock:
        if ca is None:
            answer = _plain_answer(sock, host)
            if answer.startswith(b"HTTP/"):
                return Probe(OK)
            return Probe(ONE_SIDED, f"TLS on one side only: the coordinator {where} expects TLS "
                                    "but this site runs --insecure; drop --insecure and pass "
                                    "--ca <the coordinator's ca.pem>")
        ctx = ssl.create_default_context(cafile=str(ca))
        try:
            with ctx.wrap_socket(sock, server_hostname=host) as tls:
                tls.do_handshake()
            return Probe(OK)
        except ssl.SSLCertVerificationError as exc:
            if exc.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH / IP_ADDRESS_MISMATCH
                return Probe(TLS_FAILED, f"TLS handshake with {where} failed: the coordinator's "
                                         f"certificate does not name '{host}' (wrong host name: "
                                         "dial a name it was issued for, or ask its operator to "
                                         f"reissue it with launch/certs.py server --host {host})")
            return Probe(TLS_FAILED, f"TLS handshake with {where} failed: its certificate is not "
                                     f"signed by --ca {ca} (wrong CA: get ca.pem from the "
                                     f"coordinator's operator; {exc.verify_message})")
        except ssl.SSLError as exc:
            reason = str(getattr(exc, "reason", "") or exc)
            if any(k in reason.upper() for k in ("WRONG_VERSION_NUMBER", "RECORD_LAYER",
                                                 "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST")):
                return Probe(ONE_SIDED, f"TLS on one side only: the coordinator {where} answers "
                                        "without TLS (started with --insecure?) but this site "
                                        "uses TLS; both sides must agree")
            return Probe(TLS_FAILED, f"TLS handshake with {where} failed: {reason}")
        except (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError, OSError) as exc:
            return Probe(TLS_FAILED, f"TLS handshake with {where} failed: the coordinator closed "
                                     f"the connection ({exc.__class__.__name__})")


# --- the SuperNode's log ------------------------------------------------------------------------

JOINED, REFUSED, LOST, FAB_REFUSED = "joined", "refused", "lost", "fab-refused"


def classify(line: str) -> str | None:
    """One SuperNode log line -> what it means for the site, or None."""
    if "SuperNode ID:" in line:
        return JOINED
    if "Failed to activate SuperNode" in line:  # exit 305: the key, or a connection still held
        return REFUSED
    if "Connection attempt failed" in line:
        return LOST
    if "chestfed: refused the app bundle" in line:
        return FAB_REFUSED
    return None
