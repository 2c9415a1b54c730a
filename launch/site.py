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

Exit codes: 0 stopped, 2 bad arguments or this site's data, 3 refused by the coordinator (key
not registered, or wrong CA), 1 the SuperNode failed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import time
from pathlib import Path

import _common  # noqa: F401  (repo on sys.path)
from _common import EXIT_FAILED, EXIT_USAGE, fail

from common.errors import ChestFedError
from server.deployment import (Managed, ProcessSet, child_env, claim_folder, flower_bin,
                               free_port, split_address, warn_insecure)

EXIT_REFUSED = 3
REFUSED = re.compile(r"Failed to activate SuperNode|Failed to initialize the connection|"
                     r"CERTIFICATE_VERIFY_FAILED|Exit Code: 30[0-9]")
SHOWN = re.compile(r"SuperNode ID|Receiving: |Sent successfully|ERROR|Exit Code|Failed|"
                   r"terminated gracefully")


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


def node_config(args: argparse.Namespace, workdir: Path) -> str:
    # The site's own folders (sites/app.py `_local`): the coordinator sends none of its own.
    parts = [_toml_literal("site", args.name), _toml_literal("splits-dir", str(workdir / "splits")),
             _toml_literal("workdir", str(workdir)), _toml_literal("cache-dir", str(workdir / "cache"))]
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
    from common.config import SiteConfig, load_config

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
    from sites.preflight import check_sites

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


def _follow(node: Managed, log_path: Path, offset: int, args: argparse.Namespace) -> bool:
    """Echo the SuperNode's notable log lines until it exits; True if it was refused."""
    refused = False
    while True:
        alive = node.alive()
        with open(log_path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
        cut = chunk.rfind(b"\n") + 1
        offset += cut
        for line in chunk[:cut].decode(errors="replace").splitlines():
            line = re.sub(r"\x1b\[[0-9;]*m", "", line).strip()
            refused = refused or bool(REFUSED.search(line))
            if SHOWN.search(line) and (not args.quiet or "ERROR" in line):
                print(f"[{args.name}] {line}", flush=True)
        if not alive:
            return refused
        time.sleep(0.5)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="site.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="this site's name in the experiment config")
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
    p.add_argument("--superlink", required=True, metavar="HOST:PORT",
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
    p.add_argument("--quiet", "-q", action="store_true", help="print only errors")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        why = _certs_module().bad_site_name(args.name)
        if why:
            raise ChestFedError(why)
        split_address(args.superlink)
        # This site's data, before anything is made or started: one line and exit 2 if wrong.
        if not check_own_data(args):
            return EXIT_USAGE
        workdir = Path(args.workdir or Path.home() / ".chestfed" / f"site-{args.name}").expanduser().resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        argv_sn = [flower_bin("flower-supernode"), "--superlink", args.superlink,
                   "--node-config", node_config(args, workdir),
                   "--host", "127.0.0.1", "--port", str(args.runtime_port or free_port())]
        if args.max_wait is not None:
            argv_sn += ["--max-wait-time", str(args.max_wait)]
        if args.insecure:
            warn_insecure()
            argv_sn.append("--insecure")
        else:
            ca = Path(args.ca).expanduser()
            if not ca.is_file():
                raise ChestFedError(f"CA certificate '{ca}' not found: get ca.pem from the "
                                    "coordinator's operator (or pass --insecure on a test network)")
            key = Path(args.key or Path("keys") / args.name).expanduser()
            if not key.is_file():
                priv, pub = _certs_module().make_node_key(key.parent, key.name)
                print(f"chestfed: made this site's key {priv}; send {pub} to the coordinator, "
                      "who registers it before you can join", flush=True)
            argv_sn += ["--root-certificates", str(ca.resolve()),
                        "--auth-supernode-private-key", str(key.resolve())]
    except ChestFedError as exc:
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
          f"({'INSECURE' if args.insecure else 'TLS + key authentication'}); log: {log_path}",
          flush=True)
    code, t_start, attempt = 0, time.monotonic(), 0
    try:
        while True:
            attempt += 1
            offset = log_path.stat().st_size if log_path.exists() else 0
            node = procs.start(Managed("flower-supernode", argv_sn,
                                       child_env(procs.tag, workdir / "flwr-home"), log_path,
                                       cwd=workdir))
            refused = _follow(node, log_path, offset, args)
            rc = node.proc.returncode if node.proc else 1
            waited = time.monotonic() - t_start
            if refused and (args.max_wait is None or waited + args.retry_every < args.max_wait):
                if attempt == 1:
                    print(f"chestfed: the coordinator does not accept site '{args.name}' yet (its "
                          "public key is not registered there, or the coordinator is not up); "
                          f"retrying every {args.retry_every:.0f} s", flush=True)
                time.sleep(args.retry_every)
                continue
            if refused:
                fail(f"the coordinator refused site '{args.name}': is its public key registered "
                     f"there, and is --ca the coordinator's CA? (see {log_path})")
                code = EXIT_REFUSED
            else:
                fail(f"the SuperNode exited with code {rc}; see {log_path}")
                code = EXIT_FAILED if rc else 0
            break
    except KeyboardInterrupt:
        print(f"chestfed: stopping site {args.name}", flush=True)
    finally:
        procs.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
