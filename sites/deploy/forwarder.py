"""The ClientApp a deployed SuperNode runs for every message: a thin forwarder (no torch) to the
site's warm worker (sites/deploy/warm_worker.py), which launch/site.py keeps running.

Flower starts one `flwr-clientapp` process per message; this is what it loads (pyproject.toml's
`clientapp`). It sends the message and its Context over the site's own Unix socket (named by
the SuperNode's node config, `worker-socket`) and returns the worker's reply, putting the
worker's Context state back so Flower keeps it for the next message (SecAgg+'s stages need it).
A SuperNode started without launch/site.py (no `worker-socket`) runs the ClientApp here, cold.

When the worker is down (the launcher restarts it), the forwarder waits for it up to
WAIT_FOR_WORKER_S; a worker that dies while handling a message, or never comes back, makes
this message fail with one line, so the coordinator records the site's failure for the round.
"""
from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from chestfed.common.deploy.array_packing import is_packed, pack, unpack
from chestfed.sites.deploy import worker_channel as channel



def bundle_dir(here: Path) -> str:
    """The app bundle this code runs from (<bundle>/chestfed/sites/deploy/forwarder.py, with the
    bundle's pyproject.toml beside chestfed/); '' in a checkout (pyproject.toml beside sites/)."""
    package, bundle = here.parents[2], here.parents[3]
    if (bundle / "pyproject.toml").is_file() and not (package / "pyproject.toml").is_file():
        return str(bundle)
    return ""


APP_DIR = bundle_dir(Path(__file__).resolve())
WAIT_FOR_WORKER_S = 180.0  # a restarted worker imports torch and the app: ~10-20 s on 2 cores


def _connect(path: Path, deadline: float) -> socket.socket:
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(str(path))
            return conn
        except OSError as exc:
            conn.close()
            if time.monotonic() >= deadline:
                raise RuntimeError(f"the site's worker is not answering at {path} ({exc}); "
                                   "launch/site.py starts it (see worker.log in its --workdir)") from None
            time.sleep(0.2)


def _task_identity() -> dict[str, Any]:
    """The ids flwr-clientapp set for this task, which the worker's process sets too."""
    from flwr.supercore.task_identity import TaskIdentity  # lazy: only a forwarded message needs it

    out: dict[str, Any] = {}
    for key in channel.TASK_IDENTITY:
        try:
            out[key] = getattr(TaskIdentity, key)
        except RuntimeError:  # not set outside flwr-clientapp (tests)
            pass
    return out


def forward(path: Path, message: Message, context: Context,
            wait: float = WAIT_FOR_WORKER_S) -> Message:
    """The worker's reply to `message`; `context.state` becomes the worker's."""
    # lazy: Flower's protobuf codecs, imported with Flower itself in flwr-clientapp
    from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
    from flwr.proto.message_pb2 import Context as ProtoContext, Message as ProtoMessage

    head = {"kind": "run", "app_dir": APP_DIR, **_task_identity()}
    parts = (message_to_proto(message).SerializeToString(),
             context_to_proto(context).SerializeToString())
    deadline = time.monotonic() + wait
    while True:
        with _connect(path, deadline) as conn:
            channel.send(conn, head, *parts)
            try:
                out, data = channel.receive(conn)
            except (EOFError, OSError):
                raise RuntimeError("the site's worker exited while handling this message; "
                                   "launch/site.py restarts it (see worker.log in its --workdir)") from None
        if out.get("restart"):  # it held another bundle's code: wait for its fresh start
            time.sleep(0.2)
            continue
        if not out.get("ok"):
            raise RuntimeError(str(out.get("error", "the site's worker failed")))
        context.state = context_from_proto(ProtoContext.FromString(data[1])).state
        return message_from_proto(ProtoMessage.FromString(data[0]))


class Forwarder(ClientApp):
    """Every message to the warm worker (or, without one, to sites/app.py in this process)."""

    def __call__(self, message: Message, context: Context) -> Message:
        # the coordinator sends each message's weights as one Array (common/deploy/array_packing.py):
        # the ClientApp gets them as they were, and the reply goes back the same way
        packed = message.has_content() and is_packed(message.content)
        if packed:
            message.content = unpack(message.content)
        path = str(context.node_config.get(channel.NODE_CONFIG_KEY, ""))
        if path:
            reply = forward(Path(path), message, context)
        else:
            from chestfed.sites.app import app as site_app  # lazy: the cold path imports torch here

            reply = site_app(message, context)
        if packed and reply.has_content():
            reply.content = pack(reply.content)
        return reply


app = Forwarder()
