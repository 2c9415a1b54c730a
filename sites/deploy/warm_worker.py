"""A deployed site's warm worker: one long-lived process beside the SuperNode (launch/site.py
starts it, and restarts it when it dies) that holds torch, the site's data, its splits and its
model between messages, and runs the site's ClientApp (sites/app.py, with its mods) on each.

Flower 1.41's SuperNode starts a fresh single-shot `flwr-clientapp` process for every message
(flwr/supernode/runtime/run_clientapp.py), which paid ~7 s of imports (torch, scikit-learn,
pandas) before it could answer. That process now runs the thin forwarder (sites/deploy/
forwarder.py), which hands the message and its Context to this worker over a Unix socket only
the site's user can open (sites/deploy/worker_channel.py) and returns the reply and the updated
Context state. The egress audit, the disclosure rules, the site's own state on disk, SecAgg+ and
site-level DP are the ClientApp's own and run here unchanged.

The code run is the app bundle's, the one the SuperNode installed (and pinned with --trust): the
forwarder names its bundle folder with every message; the worker imports the ClientApp from it
the first time, and exits when a message names another bundle (new code), so the launcher
restarts it clean. At start it imports this checkout's ClientApp only to warm up the
third-party libraries it needs, then forgets the project's own modules.

    python -m chestfed.sites.deploy.warm_worker --socket <workdir>/worker.sock
"""
from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from chestfed.sites.deploy import worker_channel as channel

log = logging.getLogger("chestfed.worker")
EXIT_NEW_BUNDLE = 75  # a message named another app bundle: restart to load it


def _forget_project_modules() -> None:
    """Drop the project's modules from sys.modules so the bundle's copy is imported next; the
    third-party ones (torch, flwr, ...) stay loaded. This module keeps its own references."""
    for name in [n for n in sys.modules if n == "chestfed" or n.startswith("chestfed.")]:
        del sys.modules[name]


def warm_up() -> float:
    """Import this checkout's ClientApp once for its third-party imports; seconds taken."""
    t0 = time.perf_counter()
    try:
        importlib.import_module("chestfed.sites.app")  # the point: pay its imports once, here
    except Exception as exc:  # a broken checkout still serves the bundle's code
        log.warning("warm-up import failed (%s); the first message pays the imports", exc)
    _forget_project_modules()
    return time.perf_counter() - t0


class Worker:
    """Runs the bundle's ClientApp on each message; one message at a time, as the SuperNode
    sends them."""

    def __init__(self) -> None:
        self.app_dir: str | None = None
        self.app: Any = None
        self.handled = 0

    def load(self, app_dir: str) -> Any:
        if self.app is None:
            if app_dir:  # as flwr-clientapp loads a bundle: its folder first ('' a checkout's)
                sys.path.insert(0, app_dir)
            from chestfed.sites.app import app  # lazy: the bundle's code, known only now
            self.app_dir, self.app = app_dir, app
            log.info("loaded the ClientApp from %s", app_dir)
        return self.app

    def handle(self, head: dict[str, Any], parts: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
        """(reply header, reply parts) for one request."""
        if head.get("kind") == "ping":
            return {"ok": True, "handled": self.handled, "app_dir": self.app_dir}, []
        app_dir = str(head["app_dir"])
        if self.app_dir is not None and app_dir != self.app_dir:
            return {"restart": True}, []
        # lazy: Flower's protobufs, loaded with the ClientApp's own imports
        from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
        from flwr.proto.message_pb2 import Context as ProtoContext, Message as ProtoMessage
        from flwr.supercore.task_identity import TaskIdentity  # lazy: as above

        for key in channel.TASK_IDENTITY:  # as flwr-clientapp sets them for its task
            if head.get(key) is not None:
                setattr(TaskIdentity, key, int(head[key]))
        message = message_from_proto(ProtoMessage.FromString(parts[0]))
        context = context_from_proto(ProtoContext.FromString(parts[1]))
        t0 = time.perf_counter()
        try:
            reply = self.load(app_dir)(message, context)
        except Exception as exc:  # the ClientApp raised: the forwarder raises it in Flower's process
            log.error("the ClientApp raised:\n%s", traceback.format_exc())
            return {"ok": False, "error": f"{type(exc)}:<'{exc}'>"}, []
        self.handled += 1
        log.info("%s message answered in %.2f s", message.metadata.message_type, time.perf_counter() - t0)
        return {"ok": True}, [message_to_proto(reply).SerializeToString(),
                              context_to_proto(context).SerializeToString()]


def serve(path: Path, worker: Worker | None = None) -> int:
    """Answer requests on `path` until SIGTERM (0) or a message for another bundle."""
    worker = worker or Worker()
    server = channel.listen(path)
    log.info("listening on %s", path)
    try:
        while True:
            conn, _ = server.accept()
            with conn:
                if not channel.same_user(conn):
                    log.warning("refused a connection from another user")
                    continue
                try:
                    head, parts = channel.receive(conn)
                except (EOFError, OSError, ValueError):
                    continue  # the forwarder went away before it finished asking
                out_head, out_parts = worker.handle(head, parts)
                try:
                    channel.send(conn, out_head, *out_parts)
                except OSError:
                    log.warning("the forwarder went away before the reply was sent")
                if out_head.get("restart"):
                    log.info("a message names another app bundle; exiting to load it fresh")
                    return EXIT_NEW_BUNDLE
    finally:
        server.close()
        path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="warm_worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--socket", required=True, help="the Unix socket to listen on")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)
    signal.signal(signal.SIGTERM, stop)
    log.info("warmed up in %.1f s", warm_up())
    return serve(Path(args.socket))


if __name__ == "__main__":
    sys.exit(main())
