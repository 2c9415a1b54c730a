#!/usr/bin/env python
"""Run one experiment for real: a Flower SuperLink here, one SuperNode at each hospital.

    python launch/server.py --config configs/real/x.yaml --certs certs/ --keys-dir keys/ \\
        [--host 0.0.0.0] [--port 9093] [--join-timeout 600] [key=value ...]
    python launch/server.py --resume runs/<experiment>/<strategy>-<time>   # after a crash

It starts a `flower-superlink` (TLS with certs/server.pem, SuperNode authentication on), registers
each site's public key (keys/<site>.pub), bundles the app and submits the run with `flwr run`,
then prints the ServerApp's progress until the run ends. The ServerApp is the one simulation uses:
same strategies, evaluator and run folder (plus deployment.json, progress.log and wire.jsonl, the
shapes and types of everything that crossed the wire). Hospitals join with launch/site.py.

--superlink HOST:PORT submits to a SuperLink that is already running (on this machine: the
ServerApp writes the run folder where that SuperLink runs) instead of starting one.
--resume continues a run of any strategy after its last completed round (resume/state.pt,
server/run/resume.py); the result equals an uninterrupted run with the same seed. A complete run,
or a config that differs from the run's own, is refused (exit 2). It reuses the run's own --host,
--port, --certs and --keys-dir (deployment.json) unless given; progress.log and deployment.json
are appended to (earlier launches under "previous"), never overwritten.

Each site's name is bound to its registered key: a node whose key was registered for one site
and that says it is another is refused at join, with one line naming both (server/deploy/site_nodes.py).
The app bundle's SHA-256 is printed (and kept in deployment.json) for hospitals that pin it
(`launch/site.py --trust`).

Before the SuperLink starts, the sites whose data is on this machine are checked as
`launch/describe.py` does (the others' kinds only; each hospital's site.py checks its own
data), and so are the files the ServerApp starts from (model.weights, strategy.sequential.init:
server/run/start_files.py): a problem is one line and exit 2, with no run folder.

Every process this starts is stopped when the run ends, fails or is interrupted.
Exit codes: 0 complete, 1 the run failed (its folder says why), 2 bad arguments or config
(nothing started), 130 interrupted (Ctrl-C), 143 (SIGTERM).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from chestfed.launch.before_run import start_files
from chestfed.launch.cli import (EXIT_FAILED, EXIT_USAGE, fail, interrupt_exit_code, preflight,
                                 setup_logging, sigterm_as_interrupt)

from chestfed.common.config import STRATEGIES, ExperimentConfig, load_config
from chestfed.common.errors import ChestFedError
from chestfed.common.deploy.bundle import bundle_sha256, stage_app
from chestfed.server.deploy.flwr_cli import FlwrCli, collect_site_keys
from chestfed.server.deploy.run_files import DEPLOYMENT_FILE, PROGRESS_FILE, refuse_pooling
from chestfed.server.deploy.site_nodes import register_sites
from chestfed.server.deploy.superlink import SuperLink
from chestfed.common.deploy.supervision import ProcessSet, child_env, claim_folder, split_address
from chestfed.common.deploy.insecure import warn_insecure
from chestfed.server.deploy.tls import Tls
from chestfed.common.atomic import write_json
from chestfed.server.run.folder import RunFolder
from chestfed.server.run.lifecycle import TERMINAL
from chestfed.server.run.resume import prepare_resume



def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="server.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="experiment YAML (default: configs/default.yaml)")
    p.add_argument("--strategy", help=f"one of: {', '.join(STRATEGIES)} (default: the config's)")
    p.add_argument("--resume", metavar="RUN_FOLDER",
                   help="continue an interrupted run from its last completed round")
    p.add_argument("--certs", default=None,
                   help="folder with ca.pem, server.pem, server.key (launch/certs.py server; "
                        "default certs/, or with --resume the run's own)")
    p.add_argument("--keys-dir", default=None,
                   help="folder with <site>.pub for every site (default keys/, or with --resume "
                        "the run's own)")
    p.add_argument("--site-key", action="append", default=[], metavar="NAME=FILE",
                   help="a site's public key file (repeatable; overrides --keys-dir)")
    p.add_argument("--insecure", action="store_true",
                   help="NO TLS and NO SuperNode authentication: closed test networks only")
    p.add_argument("--host", default=None, help="address the SuperLink listens on (default "
                                                "0.0.0.0, or with --resume the run's own)")
    p.add_argument("--port", type=int, default=None,
                   help="the one port hospitals dial (TCP; default 9093, or with --resume the "
                        "run's own)")
    p.add_argument("--superlink", metavar="HOST:PORT",
                   help="use this running SuperLink instead of starting one")
    p.add_argument("--state-dir", help="the SuperLink's database, logs and Flower home "
                                       "(default: <output_dir>/.coordinator)")
    p.add_argument("--join-timeout", type=float, default=600.0,
                   help="seconds to wait for every configured site to join (default 600)")
    p.add_argument("--verbose", "-v", action="store_true", help="more logging")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override config values, e.g. strategy.rounds=5")
    return p.parse_args(argv)


DEFAULTS = {"host": "0.0.0.0", "port": 9093, "certs": "certs", "keys_dir": "keys"}


def fill_connection_args(args: argparse.Namespace) -> dict:
    """--host, --port, --certs, --keys-dir not given: with --resume the run's own (its
    deployment.json), else the defaults. Returns the run's previous deployment.json ({} if none)."""
    before: dict = {}
    if args.resume:
        spec = Path(args.resume).expanduser() / DEPLOYMENT_FILE
        try:
            before = json.loads(spec.read_text()) if spec.is_file() else {}
        except (OSError, json.JSONDecodeError):
            before = {}
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, before.get("connection", {}).get(key, default))
    return before


class _Refused(Exception):
    """The preflight printed why (one line per problem); exit 2."""


def _prepare_new(args: argparse.Namespace) -> tuple[ExperimentConfig, RunFolder]:
    cfg = load_config(args.config, args.overrides, args.strategy)
    refuse_pooling(cfg.strategy.name, cfg.strategy.loso_base)
    # The files the ServerApp starts from, and the sites whose data is on this machine, fully;
    # the others' kinds (each hospital's site.py checks its own data): before the SuperLink
    # starts and the run folder exists. Both, so one try shows every mistake.
    files_ok = start_files([cfg])
    if not preflight(cfg, reachable_only=True, verbose=args.verbose) or not files_ok:
        raise _Refused()
    return cfg, RunFolder.new(cfg)


def _prepare_resume(args: argparse.Namespace) -> tuple[ExperimentConfig, RunFolder, int, str]:
    """Every strategy resumes from its last completed round (server/run/resume.py); refused with
    one line: a folder that is no run, a complete or live run, a different config."""

    given = load_config(args.config, args.overrides, args.strategy) \
        if (args.config or args.overrides or args.strategy) else None
    cfg, run, info = prepare_resume(args.resume, given)
    refuse_pooling(cfg.strategy.name, cfg.strategy.loso_base)
    if not start_files([cfg]):  # a resumed run reads them again; the folder is left as it was
        raise _Refused()
    with open(run.path / PROGRESS_FILE, "a") as f:  # appended to, never overwritten
        f.write(f"--- resumed after {info['position']} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    return cfg, run, int(info["rounds_done"]), str(info["position"])


def _tail(path: Path, offset: int) -> int:
    """Print new whole lines of `path` from `offset`; return the new offset."""
    if not path.is_file():
        return offset
    with open(path, "rb") as f:
        f.seek(offset)
        chunk = f.read()
    cut = chunk.rfind(b"\n") + 1
    if cut:
        sys.stdout.write(chunk[:cut].decode(errors="replace"))
        sys.stdout.flush()
    return offset + cut


def monitor(cli: FlwrCli, run_id: int, run: RunFolder, link: SuperLink | None,
            offset: int = 0) -> str:
    """Follow the run until it ends (progress.log from `offset`); returns the run folder's
    final status."""
    progress, last_poll = run.path / PROGRESS_FILE, 0.0
    flower = "pending"
    while True:
        offset = _tail(progress, offset)
        status = run.status.read().get("status")
        now = time.monotonic()
        if now - last_poll > 10:
            last_poll = now
            try:
                flower = cli.run_status(run_id)
            except ChestFedError:
                pass
        if flower.startswith("finished"):
            time.sleep(0.5)
            _tail(progress, offset)
            status = run.status.read().get("status")
            if status not in TERMINAL:
                run.status.set("failed", error=f"the ServerApp ended ({flower}) before writing a "
                                               f"status; see the SuperLink log")
                status = "failed"
            return str(status)
        if status in TERMINAL and status != "running":
            # The ServerApp wrote its verdict; give Flower a moment to mark the run finished.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not flower.startswith("finished"):
                time.sleep(2)
                try:
                    flower = cli.run_status(run_id)
                except ChestFedError:
                    break
            _tail(progress, offset)
            return str(status)
        if link is not None and not link.alive():
            run.status.set("failed", error="the SuperLink process died")
            return "failed"
        time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    run: RunFolder | None = None
    before = fill_connection_args(args)
    try:
        try:
            if args.resume:
                cfg, run, done, position = _prepare_resume(args)
            else:
                (cfg, run), done = _prepare_new(args), 0
        except _Refused:
            return EXIT_USAGE
        sites = [s.name for s in cfg.sites]
        if args.insecure:
            tls, keys = None, {}
        else:
            if args.superlink:  # someone else's SuperLink: we only need to verify it
                tls = Tls(Path(args.certs).expanduser().resolve() / "ca.pem")
                if not tls.ca.is_file():
                    raise ChestFedError(f"{tls.ca} not found: the CA that signed that SuperLink's "
                                        "certificate (--certs DIR/ca.pem)")
            else:
                tls = Tls.from_dir(args.certs)
            keys = collect_site_keys(args.site_key, args.keys_dir, sites)
        if args.superlink:
            host, port = split_address(args.superlink)
        else:
            host, port = args.host, args.port
    except ChestFedError as exc:
        if run is not None and not args.resume:
            run.discard()  # bad input leaves no run folder behind
        fail(str(exc))
        return EXIT_USAGE

    if args.insecure:
        warn_insecure()
    state = Path(args.state_dir or Path(cfg.output_dir) / ".coordinator").expanduser().resolve()
    procs = ProcessSet()
    procs.install_signal_handlers()
    sigterm_as_interrupt()  # the same, remembering which signal: SIGTERM exits 143, Ctrl-C 130
    try:
        claim_folder(state, procs.tag, "launch/server.py")
    except ChestFedError as exc:
        if not args.resume:
            run.discard()
        fail(str(exc))
        return EXIT_USAGE
    launch_record = {
        # The ServerApp runs under a SuperLink this launcher owns: it stops if we die.
        "coordinator_pid": None if args.superlink else os.getpid(), "tag": procs.tag,
        "join_timeout": args.join_timeout, "tls": tls is not None, "supernode_auth": bool(keys),
        "superlink": args.superlink or f"{host}:{port}", "state_dir": str(state),
        "sites": sites, "resumed_from_round": done,
        "connection": {"host": args.host, "port": args.port,  # what --resume reuses
                       **{k: str(Path(getattr(args, k)).expanduser().resolve())
                          for k in ("certs", "keys_dir")}},
        "command": " ".join(["launch/server.py", *(argv if argv is not None else sys.argv[1:])])}
    # Appended to, never overwritten: a resumed run keeps every earlier launch's record.
    previous = [*before.get("previous", []), {k: v for k, v in before.items() if k != "previous"}] \
        if before else []
    launch_record["previous"] = previous

    def write_deployment(**extra: object) -> None:
        launch_record.update(extra)
        write_json(run.path / DEPLOYMENT_FILE, launch_record)

    write_deployment()
    run.status.start("starting", strategy=cfg.strategy.name, experiment=cfg.experiment,
                     resumed_from=position if args.resume else None)
    what = f"resuming {run.path} after {position}" if args.resume else \
        f"{cfg.strategy.name} on {len(sites)} sites -> {run.path}"
    print(f"chestfed: {what}", flush=True)
    print(f"chestfed: {cfg.budget_line()}", flush=True)
    link: SuperLink | None = None
    run_id: int | None = None
    cli: FlwrCli | None = None
    t0 = time.perf_counter()
    try:
        if args.superlink:
            address = args.superlink
        else:
            link = SuperLink(state, host, port, tls, procs, auth=bool(keys)).start()
            address = link.address
            print(f"chestfed: SuperLink listening on {host}:{port} "
                  f"({'TLS, SuperNode authentication' if tls else 'INSECURE'}); "
                  f"hospitals dial <this host>:{port}", flush=True)
        cli = FlwrCli(state / "flwr-home", address, tls, child_env(procs.tag))
        if keys:  # each site's name bound to its key's node id (server/deploy/site_nodes.py)
            write_deployment(site_nodes=register_sites(cli, keys, state))
        app_dir = stage_app(state / "app")
        app_sha = bundle_sha256(app_dir)
        write_deployment(app_sha256=app_sha)
        print(f"chestfed: app bundle sha256 {app_sha} (a hospital pins it with launch/site.py "
              "--trust; `launch/site.py --bundle-hash` prints it from its own checkout)", flush=True)
        progress_at = (run.path / PROGRESS_FILE).stat().st_size \
            if (run.path / PROGRESS_FILE).is_file() else 0
        run_id = cli.submit(app_dir, {"config": str(run.path.resolve())})
        run.status.note(flower_run_id=run_id)
        print(f"chestfed: submitted run {run_id}; waiting up to {args.join_timeout:.0f} s for "
              f"{', '.join(sites)} to join", flush=True)
        status = monitor(cli, run_id, run, link, progress_at)
    except KeyboardInterrupt as exc:
        if run_id is not None and cli is not None and (link is None or link.alive()):
            try:  # bounded: a SIGTERM (systemd, a CI time-out) expects us gone within seconds
                cli.stop_run(run_id, timeout=4)
            except Exception:  # leaving anyway
                pass
        if run.status.read().get("status") not in TERMINAL or \
                run.status.read().get("status") == "running":
            run.status.set("interrupted")
        fail(f"interrupted; resume with: python launch/server.py --resume {run.path}")
        procs.stop()
        return interrupt_exit_code(exc)
    except ChestFedError as exc:
        run.status.set("failed", error=str(exc))
        fail(f"{exc}\nrun folder (failed): {run.path}")
        procs.stop()
        return EXIT_FAILED
    except Exception as exc:
        run.status.set("failed", error=f"{type(exc).__name__}: {exc}")
        procs.stop()
        raise
    procs.stop()
    if status == "complete":
        print(f"done in {time.perf_counter() - t0:.1f} s; run folder: {run.path}", flush=True)
        return 0
    err = run.status.read().get("error", "")
    fail(f"run {status}: {err}\nrun folder: {run.path}"
         + (f"\nresume with: python launch/server.py --resume {run.path}"
            if status != "complete" else ""))
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
