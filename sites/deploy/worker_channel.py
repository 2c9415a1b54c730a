"""The local channel between a deployed site's thin ClientApp (sites/deploy/forwarder.py) and its
warm worker (sites/deploy/warm_worker.py): a Unix socket in the site's --workdir that only the
site's own user can open (0600, and the peer's uid checked), carrying length-prefixed frames.

Standard library only: the worker imports this file before it knows which app bundle it will
load, and the forwarder must not pay for torch.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import tempfile
from pathlib import Path
from typing import Any

SOCKET_NAME = "worker.sock"
NODE_CONFIG_KEY = "worker-socket"  # the SuperNode's node config names the socket
TASK_IDENTITY = ("run_id", "node_id", "task_id")  # what flwr-clientapp sets for its task; the worker sets the same
MAX_PATH = 100  # AF_UNIX paths are limited to 108 bytes on Linux
_LEN = struct.Struct("!Q")


def socket_path(workdir: Path) -> Path:
    """`<workdir>/worker.sock`, or, when that path is too long for AF_UNIX, one in a fresh 0700
    folder under the system's temp dir."""
    path = Path(workdir) / SOCKET_NAME
    if len(str(path)) <= MAX_PATH:
        return path
    return Path(tempfile.mkdtemp(prefix="chestfed-worker-")) / SOCKET_NAME


def listen(path: Path) -> socket.socket:
    """A listening socket at `path` that only this user can connect to (mode 0600)."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        path.unlink()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # created 0600: no window in which another user could connect
    try:
        server.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    server.listen(4)
    return server


def same_user(conn: socket.socket) -> bool:
    """Is the peer this process's own user (SO_PEERCRED)? Where the platform cannot say, the
    socket's 0600 mode is the guard."""
    opt = getattr(socket, "SO_PEERCRED", None)
    if opt is None:
        return True
    creds = conn.getsockopt(socket.SOL_SOCKET, opt, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid == os.getuid()


def send(conn: socket.socket, header: dict[str, Any], *parts: bytes) -> None:
    """One frame: a JSON header, then each binary part, each length-prefixed."""
    head = json.dumps({**header, "parts": len(parts)}).encode()
    conn.sendall(_LEN.pack(len(head)) + head)
    for part in parts:
        conn.sendall(_LEN.pack(len(part)))
        conn.sendall(part)


def _exact(conn: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = conn.recv(min(left, 1 << 22))
        if not chunk:
            raise EOFError("the other end closed the channel")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def receive(conn: socket.socket) -> tuple[dict[str, Any], list[bytes]]:
    """The next frame: (header, binary parts). EOFError when the other end is gone."""
    head = json.loads(_exact(conn, _LEN.unpack(_exact(conn, _LEN.size))[0]))
    parts = [_exact(conn, _LEN.unpack(_exact(conn, _LEN.size))[0]) for _ in range(int(head["parts"]))]
    return head, parts
