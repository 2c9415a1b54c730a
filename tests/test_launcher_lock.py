"""Launchers never kill each other: a second launch/site.py on the same --workdir (or a second
launch/server.py on the same --state-dir) refuses, naming the running one's pid, and leaves it
running; a launcher that truly died (SIGKILL) leaves its lock free and its stray children are
ended by the next start. The launchers are started the way a user starts them: plain commands,
no tag in their environment."""
from __future__ import annotations

import os
import signal
import socketserver
import threading
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chestfed.common.deploy.supervision import free_port, tagged_pids

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def _env():
    env = {k: v for k, v in os.environ.items() if k != "CHESTFED_DEPLOY_TAG"}
    return {**env, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}


def _site(workdir: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen([PY, str(REPO / "launch" / "site.py"), "--name", "clinic_a",
                             "--superlink", f"127.0.0.1:{port}", "--insecure", "--workdir",
                             str(workdir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(), cwd=workdir.parent)


class _Answers(socketserver.BaseRequestHandler):
    """Any request gets an HTTP 503: the site's reachability probe (sites/deploy/connect.py) passes, so
    the launcher starts its SuperNode, which then keeps retrying, as with a coordinator that is
    up but not yet serving."""

    def handle(self) -> None:
        try:
            self.request.recv(4096)
            self.request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")
        except OSError:
            pass


@pytest.fixture
def answering_port():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Answers)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _wait_for(cond, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def _tag(workdir: Path) -> str:
    import json

    return json.loads((workdir / "launcher.json").read_text())["tag"]


@pytest.mark.e2e
def test_a_second_site_launcher_refuses_and_a_dead_ones_strays_are_ended(tmp_path, answering_port):
    workdir = tmp_path / "site-clinic_a"
    port = answering_port  # the launcher starts its SuperNode, which keeps retrying
    first = _site(workdir, port)
    procs = [first]
    try:
        _wait_for(lambda: (workdir / "launcher.json").is_file() and tagged_pids(_tag(workdir)))
        tag = _tag(workdir)
        second = subprocess.run([PY, str(REPO / "launch" / "site.py"), "--name", "clinic_a",
                                 "--superlink", f"127.0.0.1:{port}", "--insecure", "--workdir",
                                 str(workdir)], capture_output=True, text=True, env=_env(),
                                timeout=60, cwd=tmp_path)
        assert second.returncode == 2, second.stderr
        lines = [line for line in second.stderr.splitlines() if line.startswith("chestfed:")]
        assert len(lines) == 1 and f"pid {first.pid}" in lines[0] and str(workdir) in lines[0], lines
        assert first.poll() is None and tagged_pids(tag)  # the running site was left alone

        strays = tagged_pids(tag)
        first.send_signal(signal.SIGKILL)  # the launcher dies; its SuperNode would live on
        first.wait(timeout=10)
        third = _site(workdir, port)
        procs.append(third)
        _wait_for(lambda: _tag(workdir) != tag)
        _wait_for(lambda: not (set(strays) & set(tagged_pids(tag))), timeout=60)
        assert third.poll() is None
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()


@pytest.mark.e2e
def test_a_second_coordinator_on_the_same_state_dir_refuses(tmp_path):
    state = tmp_path / "state"
    port = free_port()
    cmd = [PY, str(REPO / "launch" / "server.py"), "--insecure", "--host", "127.0.0.1",
           "--port", str(port), "--state-dir", str(state), "--join-timeout", "120",
           f"output_dir={tmp_path / 'runs'}", "strategy.rounds=1"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=_env(), cwd=tmp_path)
    try:
        _wait_for(lambda: (state / "launcher.json").is_file() and tagged_pids(_tag(state)))
        second = subprocess.run(cmd[:6] + [str(free_port())] + cmd[7:], capture_output=True,
                                text=True, env=_env(), timeout=60, cwd=tmp_path)
        assert second.returncode == 2, second.stderr
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert any(f"pid {first.pid}" in line and "is using" in line for line in lines), lines
        assert first.poll() is None and tagged_pids(_tag(state))
    finally:
        first.send_signal(signal.SIGINT)
        try:
            first.wait(timeout=60)
        except subprocess.TimeoutExpired:
            first.kill()
