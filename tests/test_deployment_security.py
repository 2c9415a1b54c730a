"""A deployment a hospital can trust (issue 13, items 2, 5, 6): the SuperLink's one open door,
names bound to keys, messages that name the real cause, and a site pinning the code it runs.

Fast: the guard's rule, the FAB pin against Flower's own message loop (fakes), and the site's
connection probe against in-process TCP/TLS servers (wrong CA, wrong host name, TLS on one side
only, nothing listening), plus `launch/site.py` itself for its exit codes (no Flower process).
End to end (loopback, real Flower processes): only the Fleet API answers a non-loopback address
of this machine; a killed site restarted at once rejoins; an impostor (one site's key, another's
name) is refused at join while the real site, pinned to the bundle's hash, runs the experiment.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from chestfed.common.deploy.supervision import TAG_ENV, free_port, kill_tagged, stop_launchers, tagged_pids  # noqa: E402
from chestfed.sites.deploy import connect  # noqa: E402
from deploy_cluster import _certs, _config, _wait  # noqa: E402

PY = sys.executable


def _site(*args: str, timeout: float = 60, tag: str | None = None) -> subprocess.CompletedProcess:
    tag = tag or uuid.uuid4().hex
    try:
        return subprocess.run([PY, str(REPO / "launch" / "site.py"), *args], capture_output=True,
                              text=True, timeout=timeout, env={**os.environ, TAG_ENV: tag})
    finally:
        kill_tagged(tag, grace=1)


def _outside_address() -> str | None:
    """A non-loopback IPv4 address of this machine (`hostname -I`), or None."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return next((a for a in out.split() if "." in a and not a.startswith("127.")), None)


# --- fast: the guard's rule -------------------------------------------------------------------

def test_only_fleet_paths_are_open_to_other_hosts():
    from chestfed.server.deploy.superlink_guard import LOOPBACK, allowed

    local = frozenset(LOOPBACK)
    for path in ("/v1/runtime/acquire-task", "/v1/control/list-nodes", "/docs", "/openapi.json",
                 "/v1/runtime/responses", "/health", "/v1/fleetx", "/"):
        assert not allowed(path, "10.0.0.9", local), path
        assert allowed(path, "127.0.0.1", local), path
    assert allowed("/v1/fleet/pull-messages", "10.0.0.9", local)


# --- fast: the FAB pin against Flower's message loop ------------------------------------------

def test_a_pinned_site_refuses_any_other_bundle_before_it_is_stored():
    import hashlib

    import flwr.supernode.start_client_internal as sci
    from flwr.app import Message, RecordDict
    from flwr.common.constant import ErrorCode
    from flwr.supercore.fab import Fab

    from chestfed.sites.deploy.fab_pin import parse_trust, pinned

    good, bad = b"the audited bundle", b"something else"
    trusted = frozenset(parse_trust([hashlib.sha256(good).hexdigest().upper()]))
    with pytest.raises(ValueError, match="not a SHA-256"):
        parse_trust(["abc"])
    stored, lines, inserted = [], [], []

    def original(*, state, object_store, receive, get_fab, **kw):  # Flower's loop, reduced
        msg, _ = receive()
        fab = get_fab("h", 7)
        stored.append(fab.content)
        return msg.metadata.run_id

    from flwr.supercore.task_identity import TaskIdentity

    real_insert = sci._insert_message
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 3, 7, 1  # a live task
    sci._insert_message = lambda m, state, store: inserted.append(m)
    try:
        incoming = Message(RecordDict(), dst_node_id=1, message_type="query")
        for content in (good, bad):
            pull = pinned(original, trusted, lines.append)
            run_id = pull(state=None, object_store=None, receive=lambda: (incoming, None),
                          get_fab=lambda h, r, c=content: Fab(hashlib.sha256(c).hexdigest(), c, {}),
                          node_config={})
            assert run_id == 7
    finally:
        sci._insert_message = real_insert
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
    assert stored == [good]  # the other bundle was never stored (so never installed or run)
    assert len(lines) == 1 and hashlib.sha256(bad).hexdigest() in lines[0]
    assert "trusts only" in lines[0] and hashlib.sha256(good).hexdigest() in lines[0]
    assert len(inserted) == 1 and inserted[0].error.code == ErrorCode.INVALID_FAB


# --- fast: the connection probe -----------------------------------------------------------------

class _Server:
    """A TCP server on 127.0.0.1 that speaks TLS (with `cert`) or plain HTTP."""

    def __init__(self, cert: dict | None):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.ctx = None
        if cert:
            self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ctx.load_cert_chain(cert["cert"], cert["key"])
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                if self.ctx is not None:
                    conn = self.ctx.wrap_socket(conn, server_side=True)
                conn.recv(1024)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            except (OSError, ssl.SSLError):
                pass
            finally:
                conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    certs = _certs()
    return {"good": certs.make_server_cert(d / "good", ["localhost"]),
            "other": certs.make_server_cert(d / "other", ["localhost"])}


def test_the_probe_names_each_cause(tls_files):
    good = tls_files["good"]
    tls, plain = _Server(good), _Server(None)
    try:
        cases = [
            ("localhost", tls.port, good["ca"], connect.OK, ""),
            ("127.0.0.1", plain.port, None, connect.OK, ""),
            ("localhost", tls.port, tls_files["other"]["ca"], connect.TLS_FAILED, "wrong CA"),
            ("localhost", plain.port, good["ca"], connect.ONE_SIDED, "answers without TLS"),
            ("127.0.0.1", tls.port, None, connect.ONE_SIDED, "expects TLS"),
            ("127.0.0.1", free_port(), None, connect.UNREACHABLE, "connection refused"),
            ("no-such-host.invalid", 9093, None, connect.UNREACHABLE, "does not resolve"),
        ]
        for host, port, ca, kind, words in cases:
            got = connect.probe(host, port, ca, timeout=5)
            assert got.kind == kind and words in got.line, (host, port, ca, got)
            assert "\n" not in got.line
    finally:
        tls.close()
        plain.close()


def test_a_certificate_for_another_name_is_a_wrong_host_name(tmp_path, tls_files):
    other_name = _certs().make_server_cert(tmp_path, ["coordinator.example.org"])
    # a certificate for another name only (no loopback): build one without the loopback SANs
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import datetime as dt

    ca_key = serialization.load_pem_private_key((tmp_path / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate(other_name["ca"].read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "elsewhere")]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("elsewhere.example.org")]),
                           critical=False)
            .sign(ca_key, hashes.SHA384()))
    (tmp_path / "e.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "e.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    srv = _Server({"cert": tmp_path / "e.pem", "key": tmp_path / "e.key"})
    try:
        got = connect.probe("localhost", srv.port, other_name["ca"], timeout=5)
        assert got.kind == connect.TLS_FAILED and "wrong host name" in got.line, got
        assert "does not name 'localhost'" in got.line
    finally:
        srv.close()


def test_site_exit_codes_name_the_cause(tmp_path, tls_files):
    """launch/site.py: 4 unreachable after --max-wait (a line while it retries), 3 for a wrong CA
    or TLS on one side only; each one line, and no SuperNode is started for them."""
    key = _certs().make_node_key(tmp_path / "keys", "clinic_a")[0]
    common = ["--name", "clinic_a", "--key", str(key), "--workdir", str(tmp_path / "w")]
    p = _site(*common, "--superlink", f"127.0.0.1:{free_port()}", "--max-wait", "2",
              "--ca", str(tls_files["good"]["ca"]))
    assert p.returncode == 4, p.stdout + p.stderr
    assert "unreachable: connection refused" in p.stdout and "retrying" in p.stdout
    assert "gave up after" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    tls, plain = _Server(tls_files["good"]), _Server(None)
    try:
        for extra, words in (
                (["--superlink", f"localhost:{tls.port}", "--ca", str(tls_files["other"]["ca"])],
                 "wrong CA"),
                (["--superlink", f"localhost:{plain.port}", "--ca", str(tls_files["good"]["ca"])],
                 "TLS on one side only"),
                (["--superlink", f"localhost:{tls.port}", "--insecure"], "expects TLS")):
            p = _site(*common, *extra)
            assert p.returncode == 3, (extra, p.stdout + p.stderr)
            said = [x for x in p.stderr.splitlines() if x.startswith("chestfed:")]
            assert len(said) == 1 and words in said[0], p.stderr
            assert not (tmp_path / "w" / "supernode.log").exists()  # refused before starting
    finally:
        tls.close()
        plain.close()


def test_bundle_hash_is_what_the_coordinator_ships(tmp_path):
    """A hospital's `launch/site.py --bundle-hash` equals the SHA-256 of the .fab file Flower's
    own `flwr build` makes from the folder launch/server.py stages (the bytes `flwr run` sends),
    and a one-byte change to the shipped code gives another hash."""
    from chestfed.common.deploy.bundle import stage_app

    p = _site("--bundle-hash")
    assert p.returncode == 0, p.stderr
    printed = p.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{64}", printed), printed

    def flwr_build(app: Path) -> str:
        out = tmp_path / f"out-{app.name}"
        out.mkdir()
        b = subprocess.run([str(Path(sys.executable).parent / "flwr"), "build", "--app", str(app)],
                           cwd=out, capture_output=True, text=True, timeout=120)
        assert b.returncode == 0, b.stdout + b.stderr
        (fab,) = out.glob("*.fab")
        return hashlib.sha256(fab.read_bytes()).hexdigest()

    assert flwr_build(stage_app(tmp_path / "app")) == printed
    changed = stage_app(tmp_path / "changed")
    with open(changed / "chestfed" / "sites" / "app.py", "a") as f:
        f.write("\n")
    assert flwr_build(changed) != printed


# --- end to end ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def link(tmp_path_factory):
    """One real SuperLink on all addresses (TLS, SuperNode authentication), clinic_a registered."""
    from chestfed.server.deploy.flwr_cli import FlwrCli
    from chestfed.server.deploy.superlink import SuperLink
    from chestfed.common.deploy.supervision import ProcessSet, child_env
    from chestfed.server.deploy.tls import Tls

    tmp = tmp_path_factory.mktemp("link")
    certs = _certs()
    certs.make_server_cert(tmp / "certs", ["localhost"])
    for s in ("clinic_a", "icu_b"):
        certs.make_node_key(tmp / "keys", s)
    procs = ProcessSet(uuid.uuid4().hex)
    tls = Tls.from_dir(tmp / "certs")
    try:
        sl = SuperLink(tmp / "state", "0.0.0.0", free_port("0.0.0.0"), tls, procs).start()
        cli = FlwrCli(tmp / "state" / "flwr-home", sl.address, tls, child_env(procs.tag))
        cli.register(tmp / "keys" / "clinic_a.pub", "clinic_a")
        yield SimpleNamespace(tmp=tmp, port=sl.port, tls=tls, cli=cli, procs=procs)
    finally:
        procs.stop()
    assert tagged_pids(procs.tag) == []


@pytest.mark.e2e
def test_only_the_fleet_api_answers_another_address_of_this_machine(link):
    import httpx

    outside = _outside_address()
    if outside is None:
        pytest.skip("this machine has no non-loopback IPv4 address to test from")
    # Our certificate names localhost only: the outside address is dialled without host name
    # check (the chain is still verified); what matters here is who answers what.
    ctx = ssl.create_default_context(cafile=str(link.tls.ca))
    ctx.check_hostname = False
    closed = {"post": ["/v1/runtime/acquire-task", "/v1/runtime/pull-messages",
                       "/v1/control/list-nodes", "/v1/control/start-run"],
              "get": ["/docs", "/openapi.json", "/health"]}
    with httpx.Client(verify=ctx) as http:
        for method, paths in closed.items():
            for path in paths:
                kw = {"content": b"", "headers": {"content-type": "application/protobuf"}} \
                    if method == "post" else {}
                far = getattr(http, method)(f"https://{outside}:{link.port}{path}", **kw)
                near = getattr(http, method)(f"https://127.0.0.1:{link.port}{path}", **kw)
                assert far.status_code == 403, (path, far.status_code, far.text[:200])
                assert "only the Fleet API" in far.text
                assert near.status_code != 403, (path, near.status_code)
        # the Fleet API does answer (and asks for a SuperNode's signature)
        r = http.post(f"https://{outside}:{link.port}/v1/fleet/get-run", content=b"",
                      headers={"content-type": "application/protobuf"})
        assert r.status_code != 403 and "SuperNode" in r.text, (r.status_code, r.text)


@pytest.mark.e2e
def test_unregistered_key_and_a_killed_site_restarted_at_once(link):
    """An unregistered key: one line naming it, exit 3. A registered site killed outright and
    restarted with the same command: Flower still holds its connection for about a minute; the
    site says so (not a refusal) and rejoins."""
    from chestfed.server.deploy.flwr_cli import CONNECTION

    base = ["--superlink", f"127.0.0.1:{link.port}", "--ca", str(link.tls.ca), "--retry-every", "2"]
    p = _site("--name", "icu_b", "--key", str(link.tmp / "keys" / "icu_b"), "--max-wait", "4",
              "--workdir", str(link.tmp / "site-icu_b"), *base)
    assert p.returncode == 3, p.stdout + p.stderr
    assert "its public key is not registered there" in p.stderr

    argv = [PY, str(REPO / "launch" / "site.py"), "--name", "clinic_a", "--key",
            str(link.tmp / "keys" / "clinic_a"), "--workdir", str(link.tmp / "site-a"), *base]
    tag = uuid.uuid4().hex
    out = link.tmp / "site-a.out"
    first = subprocess.Popen(argv, stdout=open(out, "ab"), stderr=subprocess.STDOUT,
                             env={**os.environ, TAG_ENV: tag}, start_new_session=True)
    try:
        _wait(lambda: "SuperNode ID" in out.read_text(), 60, "clinic_a to join")
        for pid in [first.pid, *tagged_pids(tag)]:  # power cut
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        first.wait(10)
        out2 = link.tmp / "site-a2.out"
        tag2 = uuid.uuid4().hex
        again = subprocess.Popen(argv, stdout=open(out2, "ab"), stderr=subprocess.STDOUT,
                                 env={**os.environ, TAG_ENV: tag2}, start_new_session=True)
        try:
            _wait(lambda: "SuperNode ID" in out2.read_text(), 200, "clinic_a to rejoin", every=2)
            text = out2.read_text()
            assert "not registered" not in text and "refused" not in text, text
            assert again.poll() is None
            online = [n for n in link.cli("supernode", "list", CONNECTION)["nodes"]
                      if n["status"] == "online"]
            assert len(online) == 1
        finally:
            again.send_signal(signal.SIGTERM)
            again.wait(30)
            kill_tagged(tag2, grace=1)
    finally:
        kill_tagged(tag, grace=1)


@pytest.mark.e2e
def test_an_impostor_is_refused_at_join_and_the_pinned_real_sites_run_a_private_round(tmp_path):
    """clinic_a's key with `--name icu_b`: the coordinator refuses it with one line naming both
    names; the real icu_b (pinned to the bundle's hash) is unaffected; once the impostor is
    gone, the real clinic_a (pinned too) joins and the run completes. The round is a private
    one, SecAgg+ with record-level DP-SGD at both sites (issue 14: both work in a deployment):
    one deployment run serves both checks, since each costs minutes on 2 cores."""
    certs = _certs()
    certs.make_server_cert(tmp_path / "certs", ["localhost"])
    for s in ("clinic_a", "icu_b"):
        certs.make_node_key(tmp_path / "keys", s)
    import yaml

    cfg_file = _config(tmp_path)
    cfg = yaml.safe_load(cfg_file.read_text())
    cfg["sites"] = cfg["sites"][:2]
    cfg["strategy"]["rounds"] = 1
    cfg["privacy"] = {"secagg": True, "dp": {"level": "record", "noise_multiplier": 1.0}}
    cfg_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    bundle = _site("--bundle-hash").stdout.strip()
    port = free_port()
    tags: list[str] = []

    def start(name: str, key: str, *extra: str) -> tuple[subprocess.Popen, Path]:
        tag = uuid.uuid4().hex
        tags.append(tag)
        out = tmp_path / f"{name}-{key}.out"
        p = subprocess.Popen([PY, str(REPO / "launch" / "site.py"), "--name", name,
                              "--superlink", f"127.0.0.1:{port}", "--ca",
                              str(tmp_path / "certs" / "ca.pem"), "--key",
                              str(tmp_path / "keys" / key), "--retry-every", "2",
                              "--workdir", str(tmp_path / f"w-{name}-{key}"), *extra],
                             stdout=open(out, "ab"), stderr=subprocess.STDOUT,
                             env={**os.environ, TAG_ENV: tag}, start_new_session=True)
        return p, out

    server_out = tmp_path / "server.out"
    stag = uuid.uuid4().hex
    tags.append(stag)
    procs = []
    try:
        procs.append(start("icu_b", "icu_b", "--trust", bundle)[0])
        impostor, _ = start("icu_b", "clinic_a")
        server = subprocess.Popen(
            [PY, str(REPO / "launch" / "server.py"), "--config", str(cfg_file), "--certs",
             str(tmp_path / "certs"), "--keys-dir", str(tmp_path / "keys"), "--host", "127.0.0.1",
             "--port", str(port), "--state-dir", str(tmp_path / "state"), "--join-timeout", "300"],
            stdout=open(server_out, "ab"), stderr=subprocess.STDOUT,
            env={**os.environ, TAG_ENV: stag}, start_new_session=True)
        procs.append(server)
        _wait(lambda: "refused node" in server_out.read_text(), 240, "the impostor's refusal")
        text = server_out.read_text()
        line = next(x for x in text.splitlines() if "refused node" in x)
        assert "registered for site 'clinic_a'" in line and "says it is site 'icu_b'" in line
        assert f"app bundle sha256 {bundle}" in text  # what the hospitals pinned
        impostor.send_signal(signal.SIGTERM)
        impostor.wait(30)
        procs.append(start("clinic_a", "clinic_a", "--trust", bundle)[0])
        assert server.wait(400) == 0, server_out.read_text()[-3000:]
        run = next((tmp_path / "runs").glob("*/*/run.json")).parent
        spec = json.loads((run / "deployment.json").read_text())
        assert spec["app_sha256"] == bundle and set(spec["site_nodes"]) == {"clinic_a", "icu_b"}
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert {r["site"] for r in rows} == {"clinic_a", "icu_b"}
        assert server_out.read_text().count("refused node") == 1  # one line, not one per poll
        # The private round: SecAgg+ carried the update (no loss left a site), DP-SGD spent a
        # finite epsilon at each site, and each site's own egress log shows the masked vector.
        assert all(r.get("secagg") and "train_loss" not in r for r in rows if "images" in r), rows
        res = json.loads((run / "results.json").read_text())
        assert res["privacy"]["secagg"] is True and res["privacy"]["dp"]["level"] == "record"
        for site in ("clinic_a", "icu_b"):
            eps = res["privacy"]["dp"]["sites"][site]["epsilon"]
            assert 0 < eps < float("inf"), (site, eps)
            egress = (tmp_path / f"w-{site}-{site}" / "egress.jsonl").read_text()
            assert "masked_params" in egress, site
    finally:
        stop_launchers(procs, tags)


# --- fast: --resume reuses how the run was launched, and appends --------------------------------

def test_resume_reuses_connection_args_and_appends_to_progress(tmp_path):
    from chestfed.launch import server
    run = tmp_path / "runs" / "deploy" / "fedavg-1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(_config(tmp_path).read_text())
    (run / "progress.log").write_text("round 1/2  loss 0.5\n")
    (run / "deployment.json").write_text(json.dumps({
        "connection": {"host": "10.0.0.5", "port": 9555, "certs": "/srv/certs",
                       "keys_dir": "/srv/keys"}}))
    args = server.parse_args(["--resume", str(run), "--port", "9600"])
    before = server.fill_connection_args(args)
    assert (args.host, args.port, args.certs, args.keys_dir) == ("10.0.0.5", 9600, "/srv/certs",
                                                                 "/srv/keys")
    assert before["connection"]["port"] == 9555
    fresh = server.parse_args([])
    assert server.fill_connection_args(fresh) == {}
    assert (fresh.host, fresh.port, fresh.certs, fresh.keys_dir) == ("0.0.0.0", 9093, "certs", "keys")
    server._prepare_resume(args)
    lines = (run / "progress.log").read_text().splitlines()
    assert lines[0] == "round 1/2  loss 0.5" and lines[1].startswith("--- resumed after ")


@pytest.mark.e2e
def test_site_nodes_survive_a_coordinator_restart(link):
    """A restarted (or resumed) coordinator finds the node ids of keys that are already
    registered: from its own record, or, for a key registered before the record existed
    (clinic_a, by the fixture), from the SuperLink's database. (Runs last: it registers icu_b.)"""
    from chestfed.server.deploy.flwr_cli import CONNECTION
    from chestfed.server.deploy.site_nodes import REGISTRY_FILE, register_sites

    keys = {s: link.tmp / "keys" / f"{s}.pub" for s in ("clinic_a", "icu_b")}
    lines: list[str] = []
    first = register_sites(link.cli, keys, link.tmp / "state", lines.append)
    listed = {int(n["node-id"]) for n in link.cli("supernode", "list", CONNECTION)["nodes"]}
    assert set(first.values()) == listed and len(listed) == 2
    assert any("registered icu_b's key" in x for x in lines) and "already registered: clinic_a" in lines
    again = register_sites(link.cli, keys, link.tmp / "state", lines.append)
    assert again == first
    record = json.loads((link.tmp / "state" / REGISTRY_FILE).read_text())
    assert {s: r["node_id"] for s, r in record.items()} == first
