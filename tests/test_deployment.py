"""Real deployment: launch/server.py + launch/site.py on loopback, TLS and node keys on.

The fast tests check certificates, keys, refusals and process hygiene without Flower processes.
The e2e tests run a real `flower-superlink` and three real `flower-supernode`s (phantom
hospitals, 32 px, width-4 CNN; tests/deploy_cluster.py): a 2-round FedBN run (the run folder,
what crossed the wire, what each site logged as leaving it), and a coordinator killed mid-run
that resumes to the same final weights as the uninterrupted run. A killed site and an
unregistered key are test_deployment_faults.py's (their own cluster, so another pytest worker
runs them at the same time). Every process is found again through its CHESTFED_DEPLOY_TAG in
/proc and must be gone when a test ends, passed or failed.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from chestfed.common.errors import ChestFedError  # noqa: E402
from deploy_cluster import (PY, SITES, Cluster, _certs, _config, _run_server,  # noqa: E402,F401
                            _server_log, _wait, cluster)
from chestfed.common.deploy.bundle import stage_app  # noqa: E402
from chestfed.server.deploy.flwr_cli import collect_site_keys  # noqa: E402
from chestfed.server.deploy.run_files import WireAudit, refuse_pooling  # noqa: E402
from chestfed.common.deploy.supervision import TAG_ENV, kill_tagged, tagged_pids  # noqa: E402


# --- fast -----------------------------------------------------------------------------------

def test_server_certificate_names_hosts_and_loopback_and_chains_to_the_ca(tmp_path):
    from cryptography import x509

    certs = _certs()
    paths = certs.make_server_cert(tmp_path, ["coordinator.example.org", "10.1.2.3"])
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    cert = x509.load_pem_x509_certificate(paths["cert"].read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = set(san.get_values_for_type(x509.DNSName)) | {
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    assert {"coordinator.example.org", "10.1.2.3", "localhost", "127.0.0.1", "::1"} <= names
    cert.verify_directly_issued_by(ca)
    assert oct(paths["key"].stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "ca.key").stat().st_mode & 0o777) == "0o600"
    # A second server certificate reuses the CA, so what the hospitals hold stays valid.
    again = certs.make_server_cert(tmp_path, ["other.example.org"])
    assert again["ca"].read_bytes() == paths["ca"].read_bytes()


def test_node_key_is_what_flower_loads(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
    from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

    priv, pub = _certs().make_node_key(tmp_path, "chexpert")
    key = load_ssh_private_key(priv.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert uses_nist_ec_curve(load_ssh_public_key(pub.read_bytes()))
    assert oct(priv.stat().st_mode & 0o777) == "0o600"
    assert _certs().make_node_key(tmp_path, "chexpert")[0].read_bytes() == priv.read_bytes()


def test_pooling_is_refused_outside_simulation(tmp_path):
    with pytest.raises(ChestFedError, match="move patient data between hospitals"):
        refuse_pooling("pooled", "fedavg")
    with pytest.raises(ChestFedError, match="loso_base=pooled"):
        refuse_pooling("loso", "pooled")
    refuse_pooling("loso", "fedavg")
    refuse_pooling("fedavg", "pooled")
    cfg = _config(tmp_path)
    for extra in (["--strategy", "pooled"], ["--strategy", "loso", "strategy.loso_base=pooled"]):
        p = subprocess.run([PY, str(REPO / "launch" / "server.py"), "--config", str(cfg),
                            "--insecure", *extra], capture_output=True, text=True, timeout=60)
        assert p.returncode == 2, p.stderr
        assert "move patient data between hospitals" in p.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("run.json"))


def test_every_site_needs_a_registered_key(tmp_path):
    (tmp_path / "a.pub").write_text("x")
    with pytest.raises(ChestFedError, match="no public key for site.*b"):
        collect_site_keys([], str(tmp_path), ["a", "b"])
    with pytest.raises(ChestFedError, match="not a site"):
        collect_site_keys(["zz=a.pub"], None, ["a"])


def test_stray_processes_are_found_by_tag_and_ended():
    tag = uuid.uuid4().hex
    env = {**os.environ, TAG_ENV: tag}
    # A child that detaches into its own session, like Flower's SuperExec does.
    p = subprocess.Popen([PY, "-c", "import subprocess, sys, time; subprocess.Popen([sys.executable,"
                          " '-c', 'import time; time.sleep(60)'], start_new_session=True); "
                          "time.sleep(60)"], env=env)
    try:
        deadline = time.time() + 20
        while len(tagged_pids(tag)) < 2 and time.time() < deadline:
            time.sleep(0.1)
        assert len(tagged_pids(tag)) == 2
        kill_tagged(tag, grace=2)
        p.wait(10)
        assert tagged_pids(tag) == []
    finally:
        kill_tagged(tag, grace=0)


def test_app_bundle_holds_code_only(tmp_path):
    app = stage_app(tmp_path / "app")
    files = {f.relative_to(app).as_posix() for f in app.rglob("*") if f.is_file()}
    # the code under the name it is imported by (chestfed.server.app, ...)
    assert {"pyproject.toml", "chestfed/server/app.py", "chestfed/sites/app.py"} <= files
    # Python code, plus the adapters' resources (phantom presets, report rules); no experiment
    # config of the coordinator (default.yaml, recipes/, real/), no runs, caches or docs
    inner = {f.removeprefix("chestfed/") for f in files - {"pyproject.toml"}}
    assert all(f.startswith("chestfed/") for f in files - {"pyproject.toml"})
    for f in inner:
        top = f.split("/")[0]
        assert (top in ("common", "sites", "server") and f.endswith(".py")) or \
            (f.startswith("configs/sites/") and f.endswith(".yaml")), f
    assert {"configs/sites/phantom_a.yaml", "configs/sites/report_rules.yaml"} <= inner
    assert not any(f.startswith(("configs/recipes", "configs/real")) or f == "configs/default.yaml"
                   for f in inner)
    # the resources are the repository's, byte for byte (nothing of a run written into them)
    for f in inner:
        assert (app / "chestfed" / f).read_bytes() == (REPO / f).read_bytes(), f
    assert (app / "pyproject.toml").read_bytes() == (REPO / "pyproject.toml").read_bytes()


def test_wire_audit_records_shapes_never_values():
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    from types import SimpleNamespace

    content = RecordDict({"arrays": ArrayRecord({"w": torch.zeros(4, 3)}),
                          "metrics": MetricRecord({"auc": 0.5, "roc": [0.1, 0.2]}),
                          "config": ConfigRecord({"secret": "abc", "n": 3})})
    msg = SimpleNamespace(content=content, has_error=lambda: False,  # a Message needs a live run
                          metadata=SimpleNamespace(message_type="train", dst_node_id=7, src_node_id=1))
    row = WireAudit.describe(msg, "out")
    assert row["records"]["arrays"]["items"]["w"]["shape"] == [4, 3]
    assert row["records"]["metrics"]["items"] == {"auc": "float", "roc": {"list": 2}}
    assert "abc" not in json.dumps(row)


# --- end to end -----------------------------------------------------------------------------

# The module's one uninterrupted run is FedBN's: it exercises everything FedAvg's does on the
# wire and at the sites (FedAvg itself runs in the killed-site test) plus each hospital's own
# BatchNorm on its disk, and the crash-and-resume test compares against it (one reference run
# instead of one per strategy: each costs minutes on 2 cores).
@pytest.fixture(scope="module")
def reference_run(cluster) -> Path:
    t0 = time.monotonic()
    rc, run = _run_server(cluster, "--config", str(cluster.config), "--strategy", "fedbn")
    cluster.timings["fedbn_2_rounds"] = round(time.monotonic() - t0, 1)
    assert rc == 0, _server_log(cluster)
    return run


@pytest.mark.e2e
def test_fedbn_on_three_supernodes_completes_with_a_full_run_folder(cluster, reference_run):
    run = reference_run
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "complete"
    for f in ("config.yaml", "deployment.json", "metrics.jsonl", "results.json", "progress.log",
              "wire.jsonl", "checkpoints/fedbn.pt", "checkpoints/latest.pt"):
        assert (run / f).is_file(), f
    spec = json.loads((run / "deployment.json").read_text())
    assert spec["tls"] and spec["supernode_auth"]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {(r["round"], r["site"]) for r in rows} == {(k, s) for k in (1, 2) for s in SITES}
    res = json.loads((run / "results.json").read_text())
    assert set(res["matrix"]["fedbn"]) == set(SITES)
    assert res["models"]["fedbn"]["local_batchnorm"] is True
    assert res["dropouts"] == []
    # Each hospital wrote its split table at home, not into the coordinator's run folder.
    assert not (run / "splits").exists()
    for s in SITES:
        assert (cluster.tmp / f"site-{s}" / "splits" / run.name / f"{s}.csv").is_file()
    assert "round 2/2" in (run / "progress.log").read_text()


@pytest.mark.e2e
def test_only_weights_configs_and_aggregates_cross_the_wire(reference_run):
    import torch

    from chestfed.common.config import load_config
    from chestfed.common.models import build_model

    cfg = load_config(reference_run / "config.yaml")
    model = build_model(cfg.model, len(cfg.task.task().names))
    param_shapes = {tuple(v.shape) for v in model.state_dict().values()}
    rows = [json.loads(x) for x in (reference_run / "wire.jsonl").read_text().splitlines()]
    assert {r["type"] for r in rows} >= {"query", "train", "evaluate"}
    assert sum(r["dir"] == "in" for r in rows) == sum(r["dir"] == "out" for r in rows)
    n_arrays = 0
    for r in rows:
        assert "error" not in r, r
        for name, rec in r["records"].items():
            assert rec["kind"] in ("ArrayRecord", "MetricRecord", "ConfigRecord"), rec
            for key, item in rec["items"].items():
                if rec["kind"] == "ArrayRecord":
                    n_arrays += 1
                    shape = tuple(item["shape"])
                    assert shape in param_shapes, f"{r['dir']} {r['type']}: {name}/{key} {shape}"
                    # nothing image-like: no array with two trailing dims of the image size
                    assert shape[-2:] != (cfg.data.image_size, cfg.data.image_size)
                elif rec["kind"] == "MetricRecord":
                    # lists only on the two fixed grids (ROC FPR grid, threshold grid)
                    assert item in ("int", "float") or item["list"] in (51, 321), (key, item)
                else:
                    assert isinstance(item, str) or item["type"] == "str", (key, item)
    assert n_arrays > 0
    assert torch.load(reference_run / "checkpoints" / "fedbn.pt", weights_only=True)["model"]
    # what the coordinator sent: each site its own part of the experiment (lengths only here;
    # tests/test_disclosure.py reads the values in process)
    outs = [r for r in rows if r["dir"] == "out" and "records" in r]
    assert all("chestfed.run-dir" not in r["records"]["config"]["items"] for r in outs)
    told = [r for r in outs if "chestfed.experiment" in r["records"]["config"]["items"]]
    assert told and all("chestfed.site" in r["records"]["config"]["items"] for r in told)
    hellos = [r for r in outs if "chestfed.hello" in r["records"]["config"]["items"]]
    assert len(hellos) == len(SITES) and all(len(r["records"]["config"]["items"]) == 1 for r in hellos)


@pytest.mark.e2e
def test_each_site_logs_what_left_it_and_only_aggregates_left(cluster, reference_run):
    """Each hospital's egress.jsonl (in its own workdir) against the coordinator's wire.jsonl:
    the same replies, no list as long as any split of the site, nothing image-shaped."""
    from chestfed.common.config import load_config
    from chestfed.common.privacy.disclosure import ROC_FPR_GRID
    from chestfed.common.metrics import THRESHOLD_GRID

    cfg = load_config(reference_run / "config.yaml")
    wire = [json.loads(x) for x in (reference_run / "wire.jsonl").read_text().splitlines()]
    wire_in = [r for r in wire if r["dir"] == "in"]
    n_from_sites = 0
    for s in SITES:
        work = cluster.tmp / f"site-{s}"
        rows = [json.loads(x) for x in (work / "egress.jsonl").read_text().splitlines()]
        assert rows and all(r["dir"] == "out" and r["site"] == s for r in rows)
        n_from_sites += len(rows)
        split = (work / "splits" / reference_run.name / f"{s}.csv").read_text().splitlines()[1:]
        sizes = {sum(1 for line in split if line.endswith(f",{k}")) for k in ("train", "val", "test")}
        for r in rows:
            for rec in r["records"].values():
                for key, item in rec["items"].items():
                    if rec["kind"] == "MetricRecord" and isinstance(item, dict):
                        assert item["list"] in (len(ROC_FPR_GRID), len(THRESHOLD_GRID)), (s, key, item)
                        assert item["list"] not in sizes, (s, key, item)
                    if rec["kind"] == "ArrayRecord":
                        assert item["shape"][-2:] != [cfg.data.image_size, cfg.data.image_size]
        # what the site logged is what reached the coordinator from it (same records and keys)
        types = sorted(r["type"] for r in rows)
        assert types.count("query") >= 2 and "train" in types and "evaluate" in types
    assert n_from_sites >= len(wire_in)  # every reply the coordinator got was logged at a site
    got = sorted(json.dumps(r["records"], sort_keys=True) for r in wire_in if "records" in r)
    logged = sorted(json.dumps(r["records"], sort_keys=True) for s in SITES for r in
                    (json.loads(x) for x in (cluster.tmp / f"site-{s}" / "egress.jsonl").read_text().splitlines()))
    assert all(g in logged for g in got)


def _kill_and_resume(cluster: Cluster, *args: str) -> Path:
    """Start a run, SIGKILL the coordinator once round 1's resume state is written (the machine
    dies), resume it; returns the resumed run's folder."""
    import torch

    before = cluster.runs()
    tag = uuid.uuid4().hex
    cluster.tags.append(tag)
    server = cluster.server("--config", str(cluster.config), *args, tag=tag)
    run = None
    try:
        run = _wait(lambda: next(iter(cluster.runs() - before), None), 60, "the run folder")
        _wait(lambda: (run / "resume" / "state.pt").is_file(), 300, "round 1's checkpoint")
        os.kill(server.pid, signal.SIGKILL)  # the coordinator machine dies
        server.wait(10)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
    # No strays: the SuperLink, its SuperExec and the ServerApp all follow the launcher down.
    _wait(lambda: not tagged_pids(tag), 30, "the coordinator's processes to end")
    assert json.loads((run / "run.json").read_text())["status"] != "complete"
    assert torch.load(run / "resume" / "state.pt", weights_only=True)["rounds_done"] == 1
    rc, _ = _run_server(cluster, "--resume", str(run))
    assert rc == 0, _server_log(cluster)
    assert json.loads((run / "resume.json").read_text())["from_round"] == 1
    assert json.loads((run / "run.json").read_text())["resumed_from"].startswith("round 1/2")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted((r["round"], r["site"]) for r in rows if "train_loss" in r) == sorted(
        (k, s) for k in (1, 2) for s in SITES)
    return run


def _same_model(a: Path, b: Path, name: str) -> None:
    import torch

    got = torch.load(a / "checkpoints" / f"{name}.pt", weights_only=True)["model"]
    want = torch.load(b / "checkpoints" / f"{name}.pt", weights_only=True)["model"]
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.e2e
def test_fedbn_coordinator_killed_then_resumed_equals_the_uninterrupted_run(cluster, reference_run):
    """FedBN: the server's weights from resume/state.pt, each hospital's own BatchNorm from its
    own disk (<workdir>/state/<run>/), which outlives the Flower run the dead coordinator had.
    (What a resume does for FedAvg is this without the BatchNorm; simulation tests FedAvg's.)"""
    t0 = time.monotonic()
    run = _kill_and_resume(cluster, "--strategy", "fedbn")  # the reference run's settings
    cluster.timings["fedbn_crash_and_resume"] = round(time.monotonic() - t0, 1)
    _same_model(run, reference_run, "fedbn")
    for s in SITES:
        assert list((cluster.tmp / f"site-{s}" / "state" / run.name).glob("bn-*.pt")), s


@pytest.mark.e2e
@pytest.mark.parametrize("name, part", [("ditto", "personal")])
def test_personalised_methods_keep_their_part_at_each_deployed_site(cluster, name, part):
    """One round of ditto on the three SuperNodes: each hospital keeps its personal model in its
    own workdir, no training reply carries more than the global model (the hospital's
    egress.jsonl and the coordinator's wire.jsonl), and each site's personal model comes back
    once, after the round, to be scored everywhere. (fedper runs in deployment in
    test_deployment_faults.py, with a site killed mid-round; the case takes ("fedper", "head")
    too, at ~2 minutes more of the suite.)"""
    from chestfed.common.config import load_config
    from chestfed.common.models import build_model, head_keys

    # one round, and no more scoring than the check needs (each message costs a deployed
    # site seconds of start-up: issue 27's warm site worker)
    rc, run = _run_server(cluster, "--config", str(cluster.config), "--strategy", name,
                          "strategy.rounds=1", "eval.batchnorm=running", "eval.bootstrap=0",
                          "eval.pairs=none", "eval.report=false")
    assert rc == 0, _server_log(cluster)
    res = json.loads((run / "results.json").read_text())
    want = {f"{name}-{s}" for s in SITES} | ({f"{name}-global"} if name == "ditto" else set())
    assert set(res["matrix"]) == want and res["failed"] == []
    cfg = load_config(run / "config.yaml")
    net = build_model(cfg.model, len(cfg.task.task().names))
    full, head = set(net.state_dict()), head_keys(net)

    def train_replies(rows, direction):
        return [set(r["records"]["arrays"]["items"]) for r in rows if r["dir"] == direction
                and r["type"].startswith("train") and "arrays" in r.get("records", {})]

    shared = full if name == "ditto" else full - head  # ditto sends its global model whole
    started = json.loads((run / "run.json").read_text())["started"]
    for s in SITES:
        work = cluster.tmp / f"site-{s}"
        assert list((work / "state" / run.name).glob(f"{part}-*.pt")), s
        rows = [json.loads(x) for x in (work / "egress.jsonl").read_text().splitlines()]
        sent = train_replies([r for r in rows if r["t"] >= started], "out")  # this run's
        assert len(sent) == 1 and sent[0] == shared, (s, sorted(sent[0] ^ shared) if sent else None)
    wire = [json.loads(x) for x in (run / "wire.jsonl").read_text().splitlines()]
    assert train_replies(wire, "in") == [shared] * len(SITES)  # one round, one reply per site
