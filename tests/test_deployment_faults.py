"""Faults in a real deployment (tests/deploy_cluster.py's loopback cluster: TLS, registered
node keys, three hospitals): a site SIGKILLed mid-round drops out and comes back, and a node
whose key is not registered is refused. A module of its own so that its cluster and
test_deployment.py's run on two pytest workers at once (both mostly wait on Flower)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid

import pytest

from deploy_cluster import PY, REPO, SITES, _finish, _read, _server_log, _wait, cluster  # noqa: F401
from chestfed.common.deploy.supervision import TAG_ENV, free_port, tagged_pids


@pytest.mark.e2e
def test_a_node_with_an_unregistered_key_is_refused(cluster):
    from chestfed.server.deploy.flwr_cli import CONNECTION, FlwrCli
    from chestfed.server.deploy.superlink import SuperLink
    from chestfed.common.deploy.supervision import ProcessSet, child_env
    from chestfed.server.deploy.tls import Tls

    procs = ProcessSet(uuid.uuid4().hex)
    cluster.tags.append(procs.tag)
    try:
        port = free_port()
        tls = Tls.from_dir(cluster.certs)
        link = SuperLink(cluster.tmp / "refusal-link", "127.0.0.1", port, tls, procs).start()
        cli = FlwrCli(cluster.tmp / "refusal-link" / "flwr-home", link.address, tls,
                      child_env(procs.tag))
        cli.register(cluster.keys / "registered" / "clinic_a.pub", "clinic_a")
        tag = uuid.uuid4().hex
        cluster.tags.append(tag)
        p = subprocess.run([PY, str(REPO / "launch" / "site.py"), "--name", "rogue",
                            "--superlink", link.address, "--ca", str(cluster.certs / "ca.pem"),
                            "--key", str(cluster.keys / "rogue" / "rogue"), "--max-wait", "1",
                            "--workdir", str(cluster.tmp / "site-rogue")],
                           capture_output=True, text=True, timeout=120,
                           env={**os.environ, TAG_ENV: tag})
        assert p.returncode == 3, p.stdout + p.stderr
        assert "refused site 'rogue'" in p.stderr
        assert "Failed to activate SuperNode" in (cluster.tmp / "site-rogue" / "supernode.log").read_text()
        nodes = cli("supernode", "list", CONNECTION)["nodes"]
        assert len(nodes) == 1 and nodes[0]["status"] == "registered"  # only clinic_a, never online
        assert tagged_pids(tag) == []
        # Flower's Control API (submit runs, register keys) shares the Fleet port; it answers
        # the coordinator's own machine only: another address, even on loopback, gets 403.
        import httpx

        url = f"https://127.0.0.1:{port}/v1/control/list-nodes"
        for source, allowed in (("127.0.0.1", True), ("127.0.0.2", False)):
            transport = httpx.HTTPTransport(local_address=source, verify=str(tls.ca))
            with httpx.Client(transport=transport) as http:
                r = http.post(url, content=b"", headers={"content-type": "application/protobuf"})
            assert (r.status_code != 403) == allowed, (source, r.status_code, r.text)
    finally:
        procs.stop()
    assert tagged_pids(procs.tag) == []


@pytest.mark.e2e
def test_a_site_killed_mid_round_drops_out_and_comes_back(cluster):
    """FedPer (FedAvg's round on the body, each hospital's head on its own disk): a SuperNode
    killed in round 1 misses it, rejoins, trains on, and after the last round releases its
    personal model like the others."""
    victim = "icu_b"
    log = cluster.site_log(victim)
    # (a site starts its SuperNode once a coordinator answers: the log may not exist yet)
    offset = log.stat().st_size if log.is_file() else 0
    t0 = time.monotonic()
    before = cluster.runs()
    server = cluster.server("--config", str(cluster.config), "--strategy", "fedper",
                            "strategy.rounds=3", "experiment=deploy-kill")
    try:
        _wait(lambda: log.is_file() and b"Receiving: train message" in log.read_bytes()[offset:], 300,
              f"{victim} to receive its first train message")
        cluster.crash_site(victim)
        run = _wait(lambda: next(iter(cluster.runs() - before), None), 30, "the run folder")
        _wait(lambda: "round 1/3" in _read(run / "progress.log"), 240, "round 1 to end without it")
        cluster.start_site(victim)
        assert _finish(server, 420) == 0, _server_log(cluster)
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
    cluster.timings["killed_site_3_rounds"] = round(time.monotonic() - t0, 1)
    res = json.loads((run / "results.json").read_text())
    assert any(d["site"] == victim and d["round"] == 1 for d in res["dropouts"]), res["dropouts"]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    by_round = {k: {r["site"] for r in rows if r["round"] == k} for k in (1, 2, 3)}
    assert by_round[1] == set(SITES) - {victim}
    assert any(victim in by_round[k] for k in (2, 3)), by_round  # it took part again
    assert set(res["matrix"]) == {f"fedper-{s}" for s in SITES} and res["failed"] == []
    for s in SITES:  # each kept its head at home, the victim too (written after it rejoined)
        assert list((cluster.tmp / f"site-{s}" / "state" / run.name).glob("head-*.pt")), s
    # the coordinator's console said so, once each
    said = (run / "progress.log").read_text()
    assert said.count(f"site {victim} dropped out") == 1 and said.count(f"site {victim} rejoined") == 1, said
