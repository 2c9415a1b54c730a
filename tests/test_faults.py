"""Every run survives and tells the truth (issue 17, items 1, 2 and 5): signals, compare.py,
and one line for every user mistake, with the real launchers run as a user would.

Most cases fail before Ray starts and take about a second each; three start Ray (a SIGTERMed
simulation, a Ctrl-C'd comparison, a comparison whose data fails).
"""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from e2e import REPO, tiny_config

ENV = {**os.environ, "WANDB_MODE": "offline"}


def launch(script: str, *args: str, cwd: Path, timeout: float = 120, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "launch" / script), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=ENV, **kw)


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The launcher said what is wrong on exactly one line, without a traceback (a library's
    own warning, such as joblib's on a full disk, is not ours to silence)."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("chestfed: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def run_folders(root: Path) -> list[Path]:
    return [p.parent for p in root.rglob("config.yaml")] + [p.parent for p in root.rglob("run.json")]


def ray_leftovers(session: str | None) -> list[int]:
    from chestfed.server.simulation.ray_session import session_pids

    return session_pids(session) if session else []


# --- item 5: one line for every user mistake -----------------------------------------------

@pytest.mark.parametrize("override, needle", [
    ("strategy.rounds=yes", "'strategy.rounds': must be a number"),
    ("train.batch_size=true", "'train.batch_size': must be a number"),
    ("strategy.min_sites=3", "strategy.min_sites is 3 but the config has 2 sites"),
    ("train.lr.value=0.1", "'train.lr'"),
    ("strategy.rounds=0", "command line 'strategy.rounds=0'"),
])
def test_bad_override_is_one_line_exit_2_no_folder(tmp_path, override, needle):
    cfg = tiny_config(tmp_path)
    proc = launch("simulate.py", "--config", str(cfg), override, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc)
    assert needle in line and "command line" in line, line  # the command line is blamed, not the file
    assert not (tmp_path / "runs").exists()


def test_bad_config_files_are_one_line(tmp_path):
    cfg = tiny_config(tmp_path)
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(cfg.read_bytes() + "# café\n".encode("latin-1"))
    proc = launch("simulate.py", "--config", str(bad), cwd=tmp_path)
    assert proc.returncode == 2 and "not UTF-8" in one_line(proc)
    tree = yaml.safe_load(cfg.read_text())
    tree["strategy"]["rounds"] = True  # `rounds: yes` in a file
    yes = tmp_path / "yes.yaml"
    yes.write_text(yaml.safe_dump(tree))
    proc = launch("simulate.py", "--config", str(yes), cwd=tmp_path)
    assert proc.returncode == 2 and "'strategy.rounds': must be a number" in one_line(proc)
    assert not (tmp_path / "runs").exists()


def test_text_fields_keep_text_and_one_site_fedavg_warns(tmp_path):
    from chestfed.common.config import load_config

    cfg = load_config(tiny_config(tmp_path, n_sites=1), ["experiment=007", "wandb.project=2024"])
    assert cfg.experiment == "007" and cfg.wandb.project == "2024"
    assert cfg.strategy.min_sites == 1  # config sets 1; the default 2 would say what is used
    assert any("one site" in w for w in cfg.warnings())
    assert not load_config(tiny_config(tmp_path, n_sites=2)).warnings()


@pytest.mark.parametrize("script, extra, needle", [
    ("simulate.py", [], "cannot create the run folder"),
    ("compare.py", ["--strategies", "local,fedavg"], "cannot create the comparison folder"),
    ("server.py", ["--insecure"], "cannot create the run folder"),
])
def test_output_dir_that_is_a_file_is_one_line(tmp_path, script, extra, needle):
    (tmp_path / "afile").write_text("x")
    proc = launch(script, "--config", str(tiny_config(tmp_path)), *extra,
                  f"output_dir={tmp_path / 'afile'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert needle in one_line(proc)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_dir_is_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    proc = launch("simulate.py", "--config", str(tiny_config(tmp_path)), f"output_dir={ro}", cwd=tmp_path)
    assert proc.returncode == 2 and "cannot create the run folder" in one_line(proc)


def test_full_disk_at_start_is_one_line_and_no_half_folder(tmp_path):
    """No file may grow (RLIMIT_FSIZE 0 fails every write like a full disk does, before Ray)."""
    def no_room() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))

    cfg = tiny_config(tmp_path)
    proc = launch("simulate.py", "--config", str(cfg), cwd=tmp_path, preexec_fn=no_room)
    assert proc.returncode == 2, proc.stderr
    # the image cache is the first thing written (before the run folder, before Ray)
    assert "cannot write the image cache" in one_line(proc)
    assert not list((tmp_path / "runs").glob("*/*"))
    assert not [p for p in (tmp_path / "cache").glob("*") if p.is_dir()]  # no half-built cache
    # with the cache in place, the run folder is what cannot be written
    from chestfed.common.config import load_config
    from chestfed.sites.data import build_caches

    build_caches(load_config(str(cfg)))
    proc = launch("simulate.py", "--config", str(cfg), cwd=tmp_path, preexec_fn=no_room)
    assert proc.returncode == 2, proc.stderr
    assert "cannot write the run folder" in one_line(proc)
    assert not list((tmp_path / "runs").glob("*/*"))


def test_status_gets_out_on_a_full_disk(tmp_path, monkeypatch):
    """No room for the temporary copy of run.json: it is rewritten in place instead."""
    import errno

    from chestfed.common import atomic
    from chestfed.server.run.lifecycle import RunStatus

    status = RunStatus(tmp_path)
    status.set("running")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "write_json", full)
    line = status.fail(OSError(errno.ENOSPC, "No space left on device"))
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["status"] == "failed" and info["error"] == line
    assert line == "OSError: [Errno 28] No space left on device"


def test_failure_is_one_clean_line_with_traceback_in_error_log(tmp_path):
    from chestfed.common.errors import ChestFedError
    from chestfed.server.run.folder import RunFolder

    run = RunFolder(tmp_path)
    run.status.set("running")
    try:
        try:
            raise ChestFedError("\x1b[31msite a\x1b[0m: no images\n  (check root)")
        except ChestFedError as inner:
            raise RuntimeError("An error was encountered. Ending simulation.") from inner
    except RuntimeError as exc:
        line = run.status.fail(exc)
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["status"] == "failed" and info["error"] == line == "site a: no images (check root)"
    assert "Traceback" in (tmp_path / "error.log").read_text()


def test_report_and_explain_on_empty_or_truncated_results(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(tiny_config(tmp_path).read_text())
    (run / "results.json").write_text("")
    proc = launch("report.py", str(run), cwd=tmp_path)
    assert proc.returncode == 2 and "results.json is empty" in one_line(proc)
    (run / "results.json").write_text('{"models": {"a')
    proc = launch("explain.py", "--run", str(run), "--site", "site0", cwd=tmp_path)
    assert proc.returncode == 2 and "results.json is not valid JSON" in one_line(proc)


def test_server_without_certificates_leaves_no_folder(tmp_path):
    proc = launch("server.py", "--config", str(tiny_config(tmp_path)), "--certs",
                  str(tmp_path / "nocerts"), cwd=tmp_path)
    assert proc.returncode == 2 and "TLS files missing" in one_line(proc)
    assert not run_folders(tmp_path / "runs") if (tmp_path / "runs").exists() else True


def test_site_names_must_be_file_safe(tmp_path):
    proc = launch("site.py", "--name", "a b", "--kind", "phantom", "--superlink", "localhost:1",
                  "--insecure", cwd=tmp_path)
    assert proc.returncode == 2 and "--name 'a b'" in one_line(proc)
    proc = launch("certs.py", "node-key", "--name", "a/b", "--out", str(tmp_path / "keys"), cwd=tmp_path)
    assert proc.returncode == 2 and "--name 'a/b'" in one_line(proc)
    assert not (tmp_path / "keys").exists()


def test_compare_refuses_a_strategy_twice(tmp_path):
    proc = launch("compare.py", "--config", str(tiny_config(tmp_path)), "--strategies",
                  "fedavg,local,fedavg", cwd=tmp_path)
    assert proc.returncode == 2 and "fedavg more than once" in one_line(proc)
    assert not (tmp_path / "runs").exists()


# --- item 1: a launcher that died is noticed ----------------------------------------------

def test_dead_launcher_is_marked_and_its_ray_leftovers_end(tmp_path):
    """A SIGKILLed launcher's run says 'running' and its Ray agents linger: the next command
    that opens the run (report.py here; a new run in the experiment does the same) settles it."""
    session = tmp_path / "ray" / "session_2000-01-01_00-00-00_000000_1"
    (session / "logs").mkdir(parents=True)
    agent = subprocess.Popen(["sh", "-c", f"exec sleep 300 > {session / 'logs' / 'agent.out'}"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    run = tmp_path / "runs" / "tiny" / "fedavg-1"
    run.mkdir(parents=True)
    live = tmp_path / "runs" / "tiny" / "fedavg-2"  # another run whose launcher is alive (us)
    live.mkdir()
    (run / "run.json").write_text(json.dumps({"status": "running", "launcher_pid": dead.pid,
                                              "ray_session": str(session)}))
    (live / "run.json").write_text(json.dumps({"status": "running", "launcher_pid": os.getpid()}))
    try:
        proc = launch("report.py", str(run), cwd=tmp_path)
        assert "launcher died" in proc.stderr
        info = json.loads((run / "run.json").read_text())
        assert info["status"] == "interrupted" and info["interrupted_by"] == "launcher died"
        assert agent.wait(timeout=10) is not None and not session.exists()
        from chestfed.server.run.folder import RunFolder

        other = tmp_path / "runs" / "tiny" / "fedavg-3"  # died too; nobody opened it yet
        other.mkdir()
        (other / "run.json").write_text(json.dumps({"status": "running", "launcher_pid": dead.pid}))
        RunFolder.create(tmp_path / "runs", "tiny", "local")  # a new run settles the others
        assert json.loads((other / "run.json").read_text())["status"] == "interrupted"
        assert json.loads((live / "run.json").read_text())["status"] == "running"
    finally:
        if agent.poll() is None:
            agent.kill()


# --- items 1 and 2 with Ray: SIGTERM, double Ctrl-C, compare.py ------------------------------

def _ray_started(proc: subprocess.Popen, run_json: Path | None, root: Path, limit: float = 150) -> str:
    """Wait until the run's Ray session is up (run.json names it); returns the session folder.
    Signalling then, while the sites still load, is the earliest a signal meets Ray."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        for f in [run_json] if run_json else root.glob("*/*/run.json"):
            try:
                session = json.loads(f.read_text()).get("ray_session")
            except (OSError, ValueError):
                continue
            if session:
                time.sleep(1.0)  # let Flower start its actors on it
                return session
        time.sleep(0.2)
    raise AssertionError(f"no Ray session (exit {proc.poll()}): {proc.stdout.read() if proc.poll() is not None else ''}")


def _wait_for(proc: subprocess.Popen, needle: str, limit: float = 150) -> str:
    seen, deadline = "", time.monotonic() + limit
    for line in proc.stdout:
        seen += line
        if needle in line or time.monotonic() > deadline:
            break
    assert needle in seen, seen
    return seen


@pytest.mark.e2e
def test_sigterm_twice_ends_interrupted_143_without_ray_leftovers(tmp_path):
    cfg = tiny_config(tmp_path, n_sites=1, size=60, strategy={"rounds": 50, "min_sites": 1},
                      eval={"bootstrap": 0})
    proc = subprocess.Popen([sys.executable, str(REPO / "launch" / "simulate.py"), "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            env=ENV)
    seen = ""
    try:
        session = _ray_started(proc, None, tmp_path / "runs")
        run = next((tmp_path / "runs").glob("*/*"))
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)  # impatience changes nothing
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, seen + out
    # Bounded (stop_run gets 4 s, then the SuperLink is terminated): ~3 s on a quiet machine;
    # CI measured 10.04 s with three test workers on two cores; deploy/*.service allow 60 s.
    assert time.monotonic() - t0 < 20
    assert "Traceback" not in out
    assert "chestfed: warning: fedavg with one site" in out  # legal, but said
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "interrupted"
    assert not ray_leftovers(session) and not Path(session).exists()


@pytest.mark.e2e
def test_sigterm_after_the_output_reader_died_still_ends_interrupted(tmp_path):
    """A launcher started by a script that was killed first (bench/privacy.py, a CI step): its
    stdout and stderr have no reader, so its closing line cannot be printed. It must still end
    `interrupted` at once; it used to raise on that line and then wait forever at exit on
    Flower's thread blocked on replies."""
    cfg = tiny_config(tmp_path, n_sites=1, size=60, strategy={"rounds": 50, "min_sites": 1},
                      eval={"bootstrap": 0})
    proc = subprocess.Popen([sys.executable, str(REPO / "launch" / "simulate.py"), "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            env=ENV)
    try:
        session = _ray_started(proc, None, tmp_path / "runs")
        run = next((tmp_path / "runs").glob("*/*"))
        proc.stdout.close()  # the reader is gone
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    assert not ray_leftovers(session)


@pytest.mark.e2e
def test_compare_ctrl_c_keeps_finished_runs_and_the_child_truthful(tmp_path):
    cfg = tiny_config(tmp_path, size=60, strategy={"rounds": 50, "min_sites": 1}, eval={"bootstrap": 0})
    out_dir = tmp_path / "cmp"
    proc = subprocess.Popen([sys.executable, str(REPO / "launch" / "compare.py"), "--config", str(cfg),
                             "--strategies", "local,fedavg", "--out", str(out_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            env=ENV, start_new_session=True)
    seen = ""
    child = out_dir / "runs" / "local-seed0"
    try:
        session = _ray_started(proc, child / "run.json", out_dir)
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole group
        time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # twice
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, seen + out
    assert json.loads((child / "run.json").read_text())["status"] == "interrupted"
    runs = json.loads((out_dir / "runs.json").read_text())
    assert [(r["strategy"], r["status"]) for r in runs] == [("local", "interrupted")]
    assert (out_dir / "report.md").is_file()
    assert not (out_dir / "runs" / "fedavg-seed0").exists()
    assert not ray_leftovers(session)


def test_compare_stops_at_an_error_every_strategy_would_hit(tmp_path):
    """A config error found once the run started (more CPUs per site than the machine has) is
    the same for every strategy: the comparison stops after the first, which ends `failed` with
    one clean line in run.json and the traceback in error.log."""
    cfg = tiny_config(tmp_path, size=60, eval={"bootstrap": 0})
    out_dir = tmp_path / "cmp"
    proc = launch("compare.py", "--config", str(cfg), "--strategies", "fedavg,local", "--out",
                  str(out_dir), f"runtime.cpus_per_site={(os.cpu_count() or 1) + 1}", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "stopping the comparison" in proc.stderr and "runtime.cpus_per_site" in proc.stderr
    assert not (out_dir / "runs" / "local-seed0").exists()  # not tried: it would fail the same way
    first = out_dir / "runs" / "fedavg-seed0"
    info = json.loads((first / "run.json").read_text())
    assert info["status"] == "failed" and info["error_kind"] == "ConfigError"
    assert "\n" not in info["error"] and "runtime.cpus_per_site" in info["error"]
    assert "Traceback" in (first / "error.log").read_text()
    assert [r["strategy"] for r in json.loads((out_dir / "runs.json").read_text())] == ["fedavg"]


def test_a_sites_error_is_its_message():
    from chestfed.common.errors import site_error_line

    reason = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor"
              ".run()\x1b[39m (pid=1)\n  File \"x.py\", line 1\nflwr.clientapp.client_app."
              "ClientAppException: \nException ClientAppException occurred. Message: site 'b': "
              "phantom preset 'x' is not known'>")
    assert site_error_line(reason) == "site 'b': phantom preset 'x' is not known"


@pytest.mark.e2e
def test_server_sigterm_ends_interrupted_143(tmp_path):
    """launch/server.py (no Ray; a SuperLink and a submitted run waiting for its sites)."""
    from chestfed.common.deploy.supervision import free_port, tagged_pids

    state = tmp_path / "state"
    env = {k: v for k, v in ENV.items() if k != "CHESTFED_DEPLOY_TAG"}
    proc = subprocess.Popen([sys.executable, str(REPO / "launch" / "server.py"), "--insecure",
                             "--host", "127.0.0.1", "--port", str(free_port()), "--state-dir",
                             str(state), "--join-timeout", "120", "--config", str(tiny_config(tmp_path))],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            env={**env, "PYTHONUNBUFFERED": "1"})
    try:
        seen = _wait_for(proc, "waiting up to", limit=90)
        tag = json.loads((state / "launcher.json").read_text())["tag"]
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, seen + out
    # Bounded (stop_run gets 4 s, then the SuperLink is terminated): ~3 s on a quiet machine;
    # CI measured 10.04 s with three test workers on two cores; deploy/*.service allow 60 s.
    assert time.monotonic() - t0 < 20
    run = next((tmp_path / "runs").glob("*/*"))
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "interrupted" and info["launcher_pid"] == proc.pid
    assert not tagged_pids(tag)


def test_ray_starts_its_own_local_instance_unless_told_otherwise(monkeypatch):
    """A `ray start` cluster left on the machine (another user, another test) must not be
    joined by accident: ray.init then refuses num_cpus and every run fails."""
    import ray

    from chestfed.server.simulation import ray_session as raysession

    seen = {}

    def fake_init(**kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    with pytest.raises(RuntimeError, match="stop here"):
        raysession.start_ray({"num_cpus": 2})
    assert seen["address"] == "local" and seen["num_cpus"] == 2
    with pytest.raises(RuntimeError):
        raysession.start_ray({"address": "10.0.0.1:6379"})
    assert seen["address"] == "10.0.0.1:6379"
