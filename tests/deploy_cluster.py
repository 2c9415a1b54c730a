"""A loopback deployment for the end-to-end tests: three hospitals (launch/site.py) with TLS and
registered node keys dialling one port, coordinators (launch/server.py) that come and go, and
the helpers to wait on them. Used by test_deployment.py, test_deployment_faults.py and
test_deployment_security.py; each module that uses the `cluster` fixture gets its own cluster,
so the slow deployment modules can run on different pytest workers."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from chestfed.common.deploy.supervision import TAG_ENV, free_port, stop_launchers, tagged_pids  # noqa: E402
from e2e import TINY_TRAIN  # noqa: E402

SITES = ("clinic_a", "icu_b", "trauma_c")
PY = sys.executable


def _certs():
    spec = importlib.util.spec_from_file_location("chestfed_certs_t", REPO / "launch" / "certs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod



def _config(tmp: Path, **top) -> Path:
    presets = {"clinic_a": "a", "icu_b": "b", "trauma_c": "c"}
    cfg = {
        "experiment": "deploy",
        "seed": 0,
        "output_dir": str(tmp / "runs"),
        "data": {"image_size": 32, "cache_dir": str(tmp / "cache"), "workers": 1},
        "sites": [{"name": s, "kind": "phantom",
                   "options": {"preset": p, "population": {"size": 70}}} for s, p in presets.items()],
        "model": {"width": 4},
        "train": dict(TINY_TRAIN),
        "strategy": {"name": "fedavg", "rounds": 2, "min_sites": 2, "round_timeout": 600},
        "eval": {"every": 0},
        "wandb": {"enabled": False},
        "runtime": {"threads_per_site": 1},
    }
    cfg.update(top)
    f = tmp / "deploy.yaml"
    f.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return f


def _wait(pred, timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Cluster:
    """Three hospitals (launch/site.py) dialling one port; coordinators come and go."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.certs = tmp / "certs"
        self.keys = tmp / "keys"
        self.state = tmp / "coordinator"
        certs = _certs()
        certs.make_server_cert(self.certs, ["localhost"])
        for s in (*SITES, "rogue"):
            certs.make_node_key(self.keys / ("rogue" if s == "rogue" else "registered"), s)
        self.config = _config(tmp)
        self.sites: dict[str, tuple[subprocess.Popen, str]] = {}
        self.tags: list[str] = []
        self.timings: dict[str, float] = {}

    def _tag(self) -> str:
        tag = uuid.uuid4().hex
        self.tags.append(tag)
        return tag

    def start_site(self, name: str, *extra: str, key_dir: str = "registered") -> subprocess.Popen:
        tag = self._tag()
        out = open(self.tmp / f"site-{name}.out", "ab")
        p = subprocess.Popen([PY, str(REPO / "launch" / "site.py"), "--name", name,
                              "--superlink", self.address, "--ca", str(self.certs / "ca.pem"),
                              "--key", str(self.keys / key_dir / name), "--retry-every", "2",
                              "--workdir", str(self.tmp / f"site-{name}"), *extra],
                             stdout=out, stderr=subprocess.STDOUT, env={**os.environ, TAG_ENV: tag},
                             start_new_session=True)
        self.sites[name] = (p, tag)
        return p

    def site_log(self, name: str) -> Path:
        return self.tmp / f"site-{name}" / "supernode.log"

    def crash_site(self, name: str) -> None:
        """Power cut: SIGKILL the launcher, the SuperNode and everything under it at once."""
        p, tag = self.sites.pop(name)
        for pid in [p.pid, *tagged_pids(tag)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        p.wait(10)
        _wait(lambda: not tagged_pids(tag), 10, f"site {name}'s processes to die")

    def server(self, *args: str, tag: str | None = None) -> subprocess.Popen:
        tag = tag or self._tag()
        out = open(self.tmp / "server.out", "ab")
        out.write(f"\n### launch/server.py {' '.join(args)}\n".encode())
        out.flush()
        return subprocess.Popen([PY, str(REPO / "launch" / "server.py"), "--certs", str(self.certs),
                                 "--keys-dir", str(self.keys / "registered"), "--host", "127.0.0.1",
                                 "--port", str(self.port), "--state-dir", str(self.state),
                                 "--join-timeout", "180", *args],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, TAG_ENV: tag},
                                start_new_session=True)

    def runs(self) -> set[Path]:
        return {p.parent for p in (self.tmp / "runs").glob("*/*/run.json")}

    def stop(self) -> list[int]:
        return stop_launchers([p for p, _ in self.sites.values()], self.tags, wait=20, grace=2)


@pytest.fixture(scope="module")
def cluster():
    # Our own temp folder: pytest prunes old basetemp folders when other sessions start, which
    # would pull the SuperLink's database out from under a long run.
    tmp = Path(tempfile.mkdtemp(prefix="chestfed-deploy-"))
    c = Cluster(tmp)
    try:
        for s in SITES:
            c.start_site(s)
        yield c
    finally:
        strays = c.stop()
        print(f"\ndeployment timings (s): {json.dumps(c.timings)}")
        if not os.environ.get("CHESTFED_KEEP_DEPLOY_TMP"):
            shutil.rmtree(tmp, ignore_errors=True)
    assert strays == [], f"processes left running after the sites were stopped: {strays}"


def _finish(p: subprocess.Popen, timeout: float) -> int:
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGTERM)
        p.wait(30)
        raise


# A tiny two-round deployment takes ~1-2 min on an idle 2-core machine; the limit only catches a
# hang, and a loaded machine (the suite beside a benchmark) took 405 s for the same run.
def _run_server(cluster: Cluster, *args: str, timeout: float = 900) -> tuple[int, Path]:
    before = cluster.runs()
    p = cluster.server(*args)
    rc = _finish(p, timeout)
    new = cluster.runs() - before
    run = new.pop() if new else Path(args[args.index("--resume") + 1])
    return rc, run


def _server_log(cluster: Cluster) -> str:
    return (cluster.tmp / "server.out").read_text(errors="replace")[-4000:]


def _read(p: Path) -> str:
    return p.read_text(errors="replace") if p.is_file() else ""
