"""Each site's name bound to its registered key: which Flower node id belongs to which site.

With SuperNode authentication a node's id is fixed by the public key it was registered with
(`flwr supernode register`), so the node id a HELLO reply comes from says which key signed in.
The coordinator registers `keys/<site>.pub` for each site and keeps the node id it got in
`<state-dir>/site_nodes.json` (with the key's fingerprint); launch/server.py hands the mapping to
the ServerApp in deployment.json (`site_nodes`), and discovery refuses a node whose HELLO names
another site than the one its key was registered for (server/federation/discovery.py).

`flwr supernode list` in Flower 1.41 shows neither the name nor the key of a node, so for a key
registered before this file existed the id is read from the SuperLink's own database (read-only).
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Callable

from chestfed.common.errors import ChestFedError

REGISTRY_FILE = "site_nodes.json"


def key_pem(pub: Path) -> bytes:
    """The key as Flower stores it (PEM SubjectPublicKeyInfo)."""
    from cryptography.hazmat.primitives import serialization  # lazy: cryptography loads only when this runs

    key = serialization.load_ssh_public_key(Path(pub).read_bytes())
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def fingerprint(pub: Path) -> str:
    return hashlib.sha256(key_pem(pub)).hexdigest()


def _node_in_database(db: Path, pub: Path) -> int | None:
    """The node id Flower's SuperLink database holds for this key (stored as a signed 64-bit
    integer), or None."""
    if not db.is_file():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            row = con.execute("SELECT node_id FROM node WHERE public_key = ? AND status != "
                              "'unregistered'", (key_pem(pub),)).fetchone()
    except sqlite3.Error:
        return None
    return None if row is None else int(row[0]) & 0xFFFFFFFFFFFFFFFF


def register_sites(cli: object, keys: dict[str, Path], state_dir: Path,
                   echo: Callable[[str], None] = print) -> dict[str, int]:
    """Register each site's public key once; return site -> node id (every site)."""
    path = state_dir / REGISTRY_FILE
    known = json.loads(path.read_text()) if path.is_file() else {}
    out: dict[str, int] = {}
    already = []
    for site, pub in keys.items():
        fp = fingerprint(pub)
        try:
            out[site] = cli.register(pub, site)  # type: ignore[attr-defined]
            echo(f"registered {site}'s key ({pub.name}) as node {out[site]}")
        except ChestFedError as exc:
            if "already" not in str(exc).lower() and "in use" not in str(exc).lower():
                raise
            rec = known.get(site, {})
            node = rec.get("node_id") if rec.get("key_sha256") == fp else None
            node = node or _node_in_database(state_dir / "superlink.db", pub)
            if not node:
                raise ChestFedError(f"{site}'s key ({pub}) is already registered with this "
                                    "SuperLink, but its node id is unknown here; use a fresh "
                                    "--state-dir") from None
            out[site] = int(node)
            already.append(site)
        known[site] = {"node_id": out[site], "key_sha256": fp}
    taken: dict[int, str] = {}
    for site, node in out.items():
        if node in taken:
            raise ChestFedError(f"sites '{taken[node]}' and '{site}' have the same public key; "
                                "each hospital needs its own (launch/certs.py node-key)")
        taken[node] = site
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(known, indent=1))
    tmp.replace(path)
    if already:
        echo(f"already registered: {', '.join(sorted(already))}")
    return out
