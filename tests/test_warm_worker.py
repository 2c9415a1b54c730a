"""A deployed site's warm worker (sites/deploy/warm_worker.py) and the thin ClientApp that
forwards to it (sites/deploy/forwarder.py): the worker's reply is the ClientApp's own, bit for
bit; the socket is the site user's alone; a worker that dies mid-message fails that message
with one line, and launch/site.py's supervisor brings it back for the next one."""
from __future__ import annotations

import os
import signal
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from chestfed.common import protocol as P
from chestfed.common.deploy.supervision import ProcessSet, child_env
from chestfed.common.models import build_model
from chestfed.launch import site as site_launcher
from chestfed.sites import app as site_app
from chestfed.sites.deploy import forwarder, worker_channel
from chestfed.sites.deploy.warm_worker import Worker
from chestfed.server.strategies.fedavg import FedAvg
from test_site_train import LABELS, _cfg, _task_identity, _train_message  # noqa: F401  (an autouse fixture)


def _train(cfg, epochs: int = 1) -> Message:
    """Round 1 of FedAvg as the SuperLink hands it to the site (with its message id)."""
    torch.manual_seed(0)  # the same initial weights in every copy
    msg = _train_message(cfg, (FedAvg, {}), build_model(cfg.model, len(LABELS)).state_dict())
    msg.content[P.CONFIG][P.LOCAL_EPOCHS] = epochs
    msg.metadata.__dict__["_message_id"] = "m-train-1"
    return msg


def _context(tmp_path: Path, sock: Path | None = None) -> Context:
    nc = {"site": "s0", "workdir": str(tmp_path / "site"), "splits-dir": str(tmp_path / "site" / "splits"),
          "cache-dir": str(tmp_path / "cache")}
    if sock is not None:
        nc[worker_channel.NODE_CONFIG_KEY] = str(sock)
    return Context(run_id=1, node_id=1, node_config=nc, state=RecordDict(), run_config={})


def _arrays(reply: Message) -> list[np.ndarray]:
    return reply.content[P.ARRAYS].to_numpy_ndarrays()


def test_the_worker_answers_as_the_client_app_does_and_holds_one_bundle(tmp_path):
    cfg = _cfg(tmp_path)
    direct = site_app.app(_train(cfg), _context(tmp_path))
    worker = Worker()
    from flwr.common.serde import context_to_proto, message_from_proto, message_to_proto  # lazy: test only

    parts = [message_to_proto(_train(cfg)).SerializeToString(),
             context_to_proto(_context(tmp_path)).SerializeToString()]
    head, out = worker.handle({"kind": "run", "app_dir": ""}, parts)
    assert head == {"ok": True}
    from flwr.proto.message_pb2 import Message as ProtoMessage  # lazy: test only

    reply = message_from_proto(ProtoMessage.FromString(out[0]))
    assert reply.metadata.reply_to_message_id == "m-train-1"
    for a, b in zip(_arrays(reply), _arrays(direct), strict=True):
        np.testing.assert_array_equal(a, b)
    assert reply.content[P.METRICS]["num-examples"] == direct.content[P.METRICS]["num-examples"]
    # another bundle (new code) is never served by the process holding this one
    assert worker.handle({"kind": "run", "app_dir": "/elsewhere"}, parts)[0] == {"restart": True}
    assert worker.handle({"kind": "ping"}, [])[0]["handled"] == 1


def test_the_client_apps_error_comes_back_as_flower_would_report_it(tmp_path):
    from flwr.common.serde import context_to_proto, message_to_proto  # lazy: test only

    msg = Message(RecordDict({P.CONFIG: ConfigRecord({P.EXPERIMENT: "not: [a config"})}),
                  dst_node_id=1, message_type="train")
    head, out = Worker().handle({"kind": "run", "app_dir": ""},
                                [message_to_proto(msg).SerializeToString(),
                                 context_to_proto(_context(tmp_path)).SerializeToString()])
    # what flwr-clientapp puts in its error reply: "<class ...>:<'message'>"
    assert head["ok"] is False and out == [] and head["error"].startswith("<class 'yaml.")


@pytest.mark.e2e
def test_a_forwarded_message_is_answered_by_the_warm_worker_which_restarts_after_a_crash(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    workdir = tmp_path / "site"
    workdir.mkdir()
    procs = ProcessSet()
    sock = worker_channel.socket_path(workdir)
    supervisor = site_launcher.SiteWorker(procs, child_env(procs.tag), workdir, sock)
    try:
        supervisor.start()
        reply = forwarder.forward(sock, _train(cfg), _context(tmp_path, sock), wait=120)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600  # the site's user only
        direct = site_app.app(_train(cfg), _context(tmp_path))
        for a, b in zip(_arrays(reply), _arrays(direct), strict=True):
            np.testing.assert_array_equal(a, b)
        assert (workdir / "egress.jsonl").read_text().count("\n") == 2  # worker's and ours, same log

        # the worker dies while training: this message fails, with one line
        failed: list[BaseException] = []

        def long_round() -> None:
            try:
                forwarder.forward(sock, _train(cfg, epochs=5000), _context(tmp_path, sock), wait=5)
            except RuntimeError as exc:
                failed.append(exc)
        t = threading.Thread(target=long_round)
        t.start()
        time.sleep(2.0)
        os.kill(supervisor.managed.pid, signal.SIGKILL)
        t.join(30)
        assert failed and "exited while handling this message" in str(failed[0])

        supervisor.managed.proc.wait(10)  # (its socket closes a moment before it is reaped)
        supervisor.check()  # what launch/site.py does every half second
        assert supervisor.restarts == 1 and "restarting it" in capsys.readouterr().out
        again = forwarder.forward(sock, _train(cfg), _context(tmp_path, sock), wait=120)
        for a, b in zip(_arrays(again), _arrays(direct), strict=True):
            np.testing.assert_array_equal(a, b)
    finally:
        procs.stop()
    with pytest.raises(RuntimeError, match="not answering"):
        forwarder.forward(sock, _train(cfg), _context(tmp_path, sock), wait=0.5)


def test_a_node_without_a_worker_runs_the_client_app_in_process(tmp_path):
    cfg = _cfg(tmp_path)
    reply = forwarder.app(_train(cfg), _context(tmp_path))
    direct = site_app.app(_train(cfg), _context(tmp_path))
    for a, b in zip(_arrays(reply), _arrays(direct), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_bundle_folder_is_told_apart_from_a_checkout(tmp_path):
    bundle = tmp_path / "fab"
    (bundle / "chestfed" / "sites" / "deploy").mkdir(parents=True)
    (bundle / "pyproject.toml").write_text("")
    here = bundle / "chestfed" / "sites" / "deploy" / "forwarder.py"
    assert forwarder.bundle_dir(here) == str(bundle)
    checkout = tmp_path / "repo"
    (checkout / "sites" / "deploy").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("")
    assert forwarder.bundle_dir(checkout / "sites" / "deploy" / "forwarder.py") == ""


# --- the waits on the message path ----------------------------------------------------------------

def test_flowers_supernode_waits_are_where_the_shortening_expects_them():
    """Fails when a Flower upgrade moves the SuperNode loop's fixed waits (then
    sites/deploy/supernode.py must be read against the new source)."""
    import flwr.supernode.start_client_internal as loop  # lazy: test only

    from chestfed.sites.deploy import supernode

    assert supernode.waits_found(loop) == supernode.EXPECTED
    saved = loop.time
    try:
        assert supernode.shorten_waits() and isinstance(loop.time, supernode.ShortWaits)
        t0 = time.monotonic()
        loop.time.sleep(3)  # the idle wait
        loop.time.sleep(0.5)  # the wait for the ClientApp's reply
        assert time.monotonic() - t0 < 1.0 and loop.time.monotonic() > 0  # the rest is `time`'s
    finally:
        loop.time = saved


def test_the_grid_pulls_at_short_intervals_until_every_reply_is_in():
    from chestfed.server.deploy.short_poll import ShortPollGrid

    class Reply:
        def __init__(self, to):
            self.metadata = type("M", (), {"reply_to_message_id": to})()

    class SlowGrid:  # replies become ready 0.3 s and 0.6 s after the push
        def push_messages(self, messages):
            self.t0 = time.monotonic()
            self.pulls = 0
            return ["a", "b"]

        def pull_messages(self, ids):
            self.pulls += 1
            ready = {"a": 0.3, "b": 0.6}
            return [Reply(i) for i in ids if time.monotonic() - self.t0 >= ready[i]]

        def get_node_ids(self):
            return [1, 2]

    inner = SlowGrid()
    grid = ShortPollGrid(inner)
    t0 = time.monotonic()
    replies = grid.send_and_receive([object(), object()], timeout=10)
    took = time.monotonic() - t0
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b"]
    assert 0.6 <= took < 1.2 and inner.pulls >= 4  # Flower's grid: 3.0 s after the push
    assert grid.get_node_ids() == [1, 2]  # everything else is the wrapped grid's
    # a timeout still ends the wait
    inner2 = SlowGrid()
    assert len(ShortPollGrid(inner2).send_and_receive([object()], timeout=0.1)) == 0


def test_the_object_pull_backoff_is_flowers_where_it_is_shortened():
    """Fails when a Flower upgrade changes pull_objects' retry defaults (then
    common/deploy/object_pulls.py must be read against the new source)."""
    from flwr.supercore.inflatable import inflatable_utils as pulls  # lazy: test only

    from chestfed.common.deploy import object_pulls

    fns = (pulls.pull_objects, pulls.pull_and_inflate_object_from_tree)
    saved = [dict(f.__kwdefaults__) for f in fns]
    try:
        for f in fns:
            assert {k: f.__kwdefaults__[k] for k in object_pulls.FLOWER} in (object_pulls.FLOWER, object_pulls.SHORT)
        assert object_pulls.shorten_pull_backoff()
        for f in fns:
            assert {k: f.__kwdefaults__[k] for k in object_pulls.SHORT} == object_pulls.SHORT
        # the same overall patience: tries x cap still reaches Flower's PULL_MAX_TIME
        assert object_pulls.SHORT["max_tries_per_object"] * object_pulls.SHORT["backoff_cap"] >= 7200
    finally:
        for f, kw in zip(fns, saved):
            f.__kwdefaults__.clear()
            f.__kwdefaults__.update(kw)


def test_the_site_puts_its_clientapp_wrapper_first_on_the_path(tmp_path):
    folder = site_launcher.clientapp_wrapper(tmp_path)
    script = folder / "flwr-clientapp"
    assert os.access(script, os.X_OK) and site_launcher.CLIENTAPP_ENTRY.is_file()
    assert str(site_launcher.CLIENTAPP_ENTRY) in script.read_text()
    import subprocess  # lazy: test only

    p = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "runtime-api-address" in p.stdout  # Flower's own flwr-clientapp
