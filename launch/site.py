#!/usr/bin/env python
"""Run one hospital's client: a Flower SuperNode holding only this hospital's data.

    python launch/site.py --name chexpert --kind chexpert --root /data/CheXpert-v1.0-small \\
        --superlink coordinator.example.org:9093 --ca certs/ca.pem --key keys/chexpert

The site is known to the coordinator by --name (it must match a site in the experiment config);
--kind, --root and --option describe the data here and override what the coordinator's config
says. Images never leave this machine: the coordinator receives model weights and aggregate
numbers only. Split tables (image and patient ids), the image cache and `egress.jsonl` (one line
per reply this site sent: keys, dtypes and shapes, never values) are under --workdir, and so is
FedBN's own BatchNorm per run and round (state/<run>/, so a resumed coordinator's run finds it).

Security (default): TLS, verified against the coordinator's CA (--ca), and SuperNode
authentication with this hospital's private key (--key; made on first use if missing: send
<key>.pub to the coordinator, who registers it). --insecure turns both off: test networks only.

The SuperNode keeps retrying while the coordinator is down (it restarts between experiments or
resumes after a crash) and stays up until Ctrl-C / SIGTERM, which stops it and every process it
started.

Before anything starts, the site checks its own data as every launcher does (sites/preflight.py:
kind, options, root, label table, that each listed image exists): from --kind/--root/--option,
or, with --config (the experiment YAML), from this site's entry under them. A problem is one
line and exit 2; the site does not join. With neither --kind nor --config there is nothing to
check here (the coordinator's config describes the data).

Before the SuperNode starts, the site probes the coordinator's port (sites/deploy/connect.py) and
names the real cause of a failure, each in its own line: the coordinator unreachable (retrying,
a line every minute), the TLS handshake failed (wrong CA or host name), TLS on one side only,
and, once the SuperNode runs, its key not registered (or the coordinator still holding this
site's previous connection after a restart: it retries and rejoins).

--trust SHA256 pins the app bundle this site runs (sites/deploy/fab_pin.py): any other bundle is
refused before it is stored or run, with one line here and an error reply to the coordinator.
`--bundle-hash` prints the SHA-256 of the bundle this checkout's coordinator would ship.

Exit codes: 0 stopped, 1 the SuperNode failed, 2 bad arguments or this site's data, 3 refused
(key not registered, TLS handshake failed, TLS on one side only), 4 the coordinator unreachable
for longer than --max-wait.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path

from chestfed.launch.cli import EXIT_FAILED, EXIT_USAGE, fail

from chestfed.common.errors import ChestFedError
from chestfed.common.deploy.supervision import (Managed, ProcessSet, child_env, claim_folder,
                                       free_port, split_address)
from chestfed.common.deploy.insecure import warn_insecure
from chestfed.sites.deploy import connect, worker_channel
from chestfed.sites.deploy.warm_worker import EXIT_NEW_BUNDLE
from chestfed.sites.deploy.fab_pin import TRUST_ENV, parse_trust
from chestfed.common.config import SiteConfig, load_config
from chestfed.common.deploy.bundle import checkout_bundle_sha256

EXIT_REFUSED = 3  # key not registered, TLS handshake failed, TLS on one side only
EXIT_UNREACHABLE = 4  # the coordinator unreachable for longer than --max-wait
SHOWN = re.compile(r"SuperNode ID|Receiving: |Sent successfully|ERROR|Exit Code|Failed|"
                   r"terminated gracefully")
JOINED_FILE = "joined.json"  # this workdir's SuperNode was accepted: by which coordinator, key
EVERY_MINUTE = 60.0


def _certs_module():
    spec = importlib.util.spec_from_file_location("chestfed_certs", Path(__file__).with_name("certs.py"))
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def _toml_literal(key: str, value: str) -> str:
    if "'" in value or "\n" in value:
        raise ChestFedError(f"--{key}: quotes and newlines are not supported in values ({value!r})")
    return f"{key}='{value}'"


def node_config(args: argparse.Namespace, workdir: Path, worker_socket: Path | None = None) -> str:
    # The site's own folders (sites/node.py `node_settings`): the coordinator sends none of its own.
    parts = [_toml_literal("site", args.name), _toml_literal("splits-dir", str(workdir / "splits")),
             _toml_literal("workdir", str(workdir)), _toml_literal("cache-dir", str(workdir / "cache"))]
    if worker_socket is not None:  # sites/deploy/forwarder.py hands each message to the worker
        parts.append(_toml_literal(worker_channel.NODE_CONFIG_KEY, str(worker_socket)))
    if args.min_cell is not None:  # the coordinator's privacy.min_cell can only be raised here
        parts.append(f"min-cell={int(args.min_cell)}")
    if args.kind:
        parts.append(_toml_literal("kind", args.kind))
    if args.root:
        root = Path(args.root).expanduser().resolve()
        if not root.exists():
            raise ChestFedError(f"--root '{args.root}' does not exist on this machine")
        parts.append(_toml_literal("root", str(root)))
    if args.option:
        parts.append(_toml_literal("options", json.dumps(_options(args.option))))
    return " ".join(parts)


def own_site(args: argparse.Namespace) -> tuple[object, object] | None:
    """(site config, experiment config or None) as sites/app.py will make it here, or None when
    this machine does not know the site's kind (no --kind and no --config)."""

    cfg = load_config(args.config) if args.config else None
    if cfg is not None:
        site = cfg.site(args.name)
    elif args.kind:
        site = SiteConfig(name=args.name, kind=args.kind)
    else:
        return None
    update: dict[str, object] = {}
    if args.kind:
        update["kind"] = args.kind
    if args.root:
        update["root"] = str(Path(args.root).expanduser().resolve())
    opts = _options(args.option)
    if opts:
        update["options"] = {**site.options, **opts}
    return site.model_copy(update=update), cfg


def check_own_data(args: argparse.Namespace) -> bool:
    """The start-up check (sites/preflight.py, as the coordinator's launcher runs it): one line
    per problem; False if this site must not join."""
    known = own_site(args)
    if known is None:
        return True
    from chestfed.sites.preflight import check_sites  # lazy: brings in pandas

    site, cfg = known
    problems = check_sites(cfg, sites=[site])
    errors = [p for p in problems if p.error]
    for p in errors or problems:
        fail(p.message if p.error else f"warning: {p.message}")
    return not errors


def _options(items: list[str]) -> dict[str, object]:
    opts: dict[str, object] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep:
            raise ChestFedError(f"--option '{item}' must look like key=value")
        try:
            opts[k] = json.loads(v)
        except json.JSONDecodeError:
            opts[k] = v
    return opts


CLIENTAPP_ENTRY = Path(__file__).resolve().parents[1] / "sites" / "deploy" / "clientapp_entry.py"


def clientapp_wrapper(workdir: Path) -> Path:
    """`<workdir>/bin/flwr-clientapp`, which the SuperExec finds first on PATH: Flower's
    flwr-clientapp with shorter object-pull waits (sites/deploy/clientapp_entry.py). Returns
    the folder to put first on PATH."""
    folder = workdir / "bin"
    folder.mkdir(exist_ok=True)
    script = folder / "flwr-clientapp"
    script.write_text(f"#!{sys.executable}\nimport runpy\n"
                      f"runpy.run_path({str(CLIENTAPP_ENTRY)!r}, run_name='__main__')\n")
    script.chmod(0o700)
    return folder


class SiteWorker:
    """The site's warm worker (sites/deploy/warm_worker.py): started before the SuperNode,
    restarted whenever it exits, stopped with the launcher (ProcessSet)."""

    def __init__(self, procs: ProcessSet, env: dict[str, str], workdir: Path, socket: Path):
        self.procs, self.env, self.workdir, self.socket = procs, env, workdir, socket
        self.log_path = workdir / "worker.log"
        self.managed: Managed | None = None
        self.restarts = 0

    def start(self) -> None:
        argv = [sys.executable, "-m", "chestfed.sites.deploy.warm_worker", "--socket", str(self.socket)]
        self.managed = self.procs.start(Managed("site-worker", argv, self.env, self.log_path,
                                                cwd=self.workdir))

    def check(self) -> None:
        """Restart the worker if it exited (a message it was handling has already failed)."""
        if self.managed is None or self.managed.alive():
            return
        rc = self.managed.proc.returncode if self.managed.proc else None
        self.procs.items.remove(self.managed)
        if rc != EXIT_NEW_BUNDLE:  # a new app bundle is a planned restart
            self.restarts += 1
            print(f"chestfed: the site's worker exited (code {rc}); restarting it "
                  f"(see {self.log_path})", flush=True)
        self.start()


class Follow:
    """What the SuperNode's log says, echoed (notable lines) and classified (sites/deploy/connect.py)."""

    def __init__(self, args: argparse.Namespace, on_join, on_tick=None):  # type: ignore[no-untyped-def]
        self.args, self.on_join, self.on_tick = args, on_join, on_tick
        self.refused = self.lost = False
        self.joined_at = 0.0  # when the SuperNode was last accepted (monotonic)
        self.said_lost = -EVERY_MINUTE
        self.fab_lines: set[str] = set()

    def __call__(self, node: Managed, log_path: Path, offset: int) -> None:
        """Until the SuperNode exits."""
        while True:
            alive = node.alive()
            with open(log_path, "rb") as f:
                if os.fstat(f.fileno()).st_size < offset:  # rotated (logrotate copytruncate)
                    offset = 0
                f.seek(offset)
                chunk = f.read()
            cut = chunk.rfind(b"\n") + 1
            offset += cut
            for line in chunk[:cut].decode(errors="replace").splitlines():
                self.line(re.sub(r"\x1b\[[0-9;]*m", "", line).strip())
            if not alive:
                return
            if self.on_tick is not None:
                self.on_tick()
            time.sleep(0.5)

    def line(self, line: str) -> None:
        kind = connect.classify(line)
        name = self.args.name
        if kind == connect.JOINED:
            self.lost, self.joined_at = False, time.monotonic()
            self.on_join()
        elif kind == connect.REFUSED:
            self.refused = True
        elif kind == connect.LOST:
            self.lost = True
            if time.monotonic() - self.said_lost >= EVERY_MINUTE:
                self.said_lost = time.monotonic()
                print(f"chestfed: lost the coordinator {self.args.superlink}; the SuperNode keeps "
                      "reconnecting (a line every minute)", flush=True)
            return
        elif kind == connect.FAB_REFUSED:
            text = line[line.index("chestfed: refused"):]
            if text not in self.fab_lines:  # once per bundle
                self.fab_lines.add(text)
                fail(text[len("chestfed: "):])
            return
        if SHOWN.search(line) and (not self.args.quiet or "ERROR" in line):
            print(f"[{name}] {line}", flush=True)


def _key_id(key: Path | None) -> str:
    """Which key this site signs in with (a hash: nothing of the key itself is written)."""
    return hashlib.sha256(key.read_bytes()).hexdigest()[:16] if key else "insecure"


def _joined_before(workdir: Path, superlink: str, key: Path | None) -> bool:
    try:
        rec = json.loads((workdir / JOINED_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return rec.get("superlink") == superlink and rec.get("key") == _key_id(key)


def wait_reachable(args: argparse.Namespace, ca: Path | None, t_start: float) -> int | None:
    """Probe the coordinator until it answers; None when it does, else the exit code."""
    host, port = split_address(args.superlink)
    said = -EVERY_MINUTE
    while True:
        pr = connect.probe(host, port, ca)
        if pr.kind == connect.OK:
            if said > -EVERY_MINUTE:
                print(f"chestfed: the coordinator {args.superlink} answers", flush=True)
            return None
        if pr.kind in (connect.TLS_FAILED, connect.ONE_SIDED):
            fail(pr.line)
            return EXIT_REFUSED
        waited = time.monotonic() - t_start
        if args.max_wait is not None and waited >= args.max_wait:
            fail(f"gave up after {waited:.0f} s (--max-wait): {pr.line}")
            return EXIT_UNREACHABLE
        if time.monotonic() - said >= EVERY_MINUTE:
            said = time.monotonic()
            print(f"chestfed: {pr.line}; retrying (a line every minute)", flush=True)
        pause = 5.0 if args.max_wait is None else min(5.0, max(0.2, args.max_wait - waited))
        time.sleep(pause)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="site.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", help="this site's name in the experiment config")
    p.add_argument("--kind", help="data adapter: phantom, nih, chexpert, padchest, medmnist, csv, reports "
                                  "(default: the coordinator config's)")
    p.add_argument("--root", help="the dataset folder on this machine")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="adapter option (JSON value), over the config's; repeatable")
    p.add_argument("--config", help="the experiment YAML (as the coordinator's): this site's "
                                    "entry, under --kind/--root/--option, is what the start-up "
                                    "check reads (default: --kind/--root/--option alone)")
    p.add_argument("--min-cell", type=int, metavar="N",
                   help="suppress confusion counts below N in what this site sends (at least "
                        "the experiment's privacy.min_cell, 5 when unset)")
    p.add_argument("--superlink", metavar="HOST:PORT",
                   help="the coordinator's address, as given by its operator")
    p.add_argument("--ca", default="certs/ca.pem",
                   help="the coordinator's CA certificate (default: certs/ca.pem)")
    p.add_argument("--key", help="this site's private key (default: keys/<name>; made if missing)")
    p.add_argument("--insecure", action="store_true",
                   help="no TLS, no authentication (closed test networks only)")
    p.add_argument("--workdir", help="this site's own folder: logs, Flower's app cache, split "
                                     "tables (default: ~/.chestfed/site-<name>)")
    p.add_argument("--runtime-port", type=int, default=0,
                   help="local port for the SuperNode's ClientApp API on 127.0.0.1 "
                        "(default: a free one)")
    p.add_argument("--max-wait", type=float, default=None,
                   help="give up after this many seconds of the coordinator being "
                        "unreachable or refusing this site (default: keep trying)")
    p.add_argument("--retry-every", type=float, default=10.0,
                   help="seconds between attempts while the coordinator refuses this site "
                        "(key not registered yet); see --max-wait")
    p.add_argument("--trust", action="append", default=[], metavar="SHA256",
                   help="run only the app bundle with this SHA-256 (repeatable); the "
                        "coordinator prints it, --bundle-hash computes it from this checkout")
    p.add_argument("--bundle-hash", action="store_true",
                   help="print the SHA-256 of the app bundle this checkout would ship, and exit")
    p.add_argument("--no-warm-worker", action="store_true",
                   help="no long-lived worker: every message starts the site's code afresh "
                        "(Flower's default; ~7 s of imports per message on 2 cores)")
    p.add_argument("--quiet", "-q", action="store_true", help="print only errors")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.bundle_hash:
        print(checkout_bundle_sha256())
        return 0
    ca: Path | None = None
    key: Path | None = None
    try:
        missing = [f"--{k}" for k in ("name", "superlink") if not getattr(args, k)]
        if missing:
            raise ChestFedError(f"{' and '.join(missing)} required")
        why = _certs_module().bad_site_name(args.name)
        if why:
            raise ChestFedError(why)
        split_address(args.superlink)
        trusted = parse_trust(args.trust)
        # This site's data, before anything is made or started: one line and exit 2 if wrong.
        if not check_own_data(args):
            return EXIT_USAGE
        workdir = Path(args.workdir or Path.home() / ".chestfed" / f"site-{args.name}").expanduser().resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        worker_socket = None if args.no_warm_worker else worker_channel.socket_path(workdir)
        # Flower's SuperNode, pinned to the trusted bundles and with short idle waits
        # (sites/deploy/supernode.py)
        supernode = [sys.executable, "-c", "from chestfed.sites.deploy.supernode import main; main()"]
        argv_sn = [*supernode, "--superlink", args.superlink,
                   "--node-config", node_config(args, workdir, worker_socket),
                   "--host", "127.0.0.1", "--port", str(args.runtime_port or free_port())]
        if args.max_wait is not None:
            argv_sn += ["--max-wait-time", str(args.max_wait)]
        if args.insecure:
            warn_insecure()
            argv_sn.append("--insecure")
        else:
            ca = Path(args.ca).expanduser().resolve()
            if not ca.is_file():
                raise ChestFedError(f"CA certificate '{ca}' not found: get ca.pem from the "
                                    "coordinator's operator (or pass --insecure on a test network)")
            key = Path(args.key or Path("keys") / args.name).expanduser()
            if not key.is_file():
                priv, pub = _certs_module().make_node_key(key.parent, key.name)
                print(f"chestfed: made this site's key {priv}; send {pub} to the coordinator, "
                      "who registers it before you can join", flush=True)
            key = key.resolve()
            argv_sn += ["--root-certificates", str(ca), "--auth-supernode-private-key", str(key)]
    except (ChestFedError, ValueError) as exc:
        fail(str(exc))
        return EXIT_USAGE

    procs = ProcessSet()
    procs.install_signal_handlers()
    try:
        claim_folder(workdir, procs.tag, f"launch/site.py for {args.name}")
    except ChestFedError as exc:
        fail(str(exc))
        return EXIT_USAGE
    log_path = workdir / "supernode.log"
    print(f"chestfed: site {args.name} -> {args.superlink} "
          f"({'INSECURE' if args.insecure else 'TLS + key authentication'}"
          f"{', app bundle pinned' if trusted else ''}); log: {log_path}", flush=True)
    env = child_env(procs.tag, workdir / "flwr-home",
                    **({TRUST_ENV: ",".join(trusted)} if trusted else {}))
    env["PATH"] = os.pathsep.join([str(clientapp_wrapper(workdir)), env["PATH"]])
    worker = None
    if worker_socket is not None:
        worker = SiteWorker(procs, env, workdir, worker_socket)
        worker.start()

    def joined() -> None:  # remembered, so a restart's refusal is told apart from a bad key
        (workdir / JOINED_FILE).write_text(json.dumps(
            {"superlink": args.superlink, "key": _key_id(key), "at": time.time()}))

    follow = Follow(args, joined, worker.check if worker is not None else None)
    code, t_start, said_refused = 0, time.monotonic(), ""
    try:
        while True:
            code_now = wait_reachable(args, ca, t_start)
            if code_now is not None:
                code = code_now
                break
            offset = log_path.stat().st_size if log_path.exists() else 0
            node = procs.start(Managed("flower-supernode", argv_sn, env, log_path, cwd=workdir))
            follow.refused = follow.lost = False
            follow(node, log_path, offset)
            node.stop(grace=1)  # whatever it left in its process group
            rc = node.proc.returncode if node.proc else 1
            t_start = max(t_start, follow.joined_at)  # --max-wait counts from the last join
            if not follow.refused:
                if rc and follow.lost:
                    fail(f"the coordinator {args.superlink} was unreachable for longer than "
                         f"--max-wait ({args.max_wait:.0f} s); see {log_path}")
                    code = EXIT_UNREACHABLE
                elif rc:
                    fail(f"the SuperNode exited with code {rc}; see {log_path}")
                    code = EXIT_FAILED
                break
            if _joined_before(workdir, args.superlink, key):
                why = (f"the coordinator still holds site '{args.name}''s previous connection "
                       "(Flower releases it about a minute after its last heartbeat)")
            else:
                why = (f"the coordinator refused site '{args.name}': its public key is not "
                       "registered there (send the .pub of --key to the coordinator's operator)")
            waited = time.monotonic() - t_start
            if args.max_wait is not None and waited + args.retry_every >= args.max_wait:
                fail(f"{why}; gave up after {waited:.0f} s (--max-wait); see {log_path}")
                code = EXIT_REFUSED
                break
            if why != said_refused:
                said_refused = why
                print(f"chestfed: {why}; retrying every {args.retry_every:.0f} s", flush=True)
            time.sleep(args.retry_every)
    except KeyboardInterrupt:
        print(f"chestfed: stopping site {args.name}", flush=True)
    finally:
        procs.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
