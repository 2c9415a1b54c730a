"""The `flwr` CLI as the coordinator drives it (register SuperNode keys, submit and follow a run),
with its connection in `$FLWR_HOME/config.toml`, and the sites' public key files."""
from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any, Iterable

from chestfed.common.errors import ChestFedError
from chestfed.common.deploy.supervision import flower_bin
from chestfed.server.deploy.tls import Tls

log = logging.getLogger(__name__)

CONNECTION = "chestfed"  # the connection name written to $FLWR_HOME/config.toml


class FlwrCli:
    """The `flwr` CLI with its own FLWR_HOME (nothing is written to ~/.flwr)."""

    def __init__(self, home: Path, address: str, tls: Tls | None, env: dict[str, str]):
        self.home, self.address, self.tls = home, address, tls
        self.env = dict(env, FLWR_HOME=str(home))
        home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "{address}"']
        if tls is None:
            lines.append("insecure = true")
        else:
            lines.append(f'root-certificates = "{tls.ca}"')
        (home / "config.toml").write_text("\n".join(lines) + "\n")

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> dict[str, Any]:
        argv = [flower_bin("flwr"), *args]
        if "--format" not in args:
            argv += ["--format", "json"]
        try:
            p = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout,
                               stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise ChestFedError(f"`flwr {' '.join(args)}` did not answer within {timeout:.0f} s") from None
        text = p.stdout.strip()
        start = text.find("{")
        try:
            out = json.loads(text[start:]) if start >= 0 else {}
        except json.JSONDecodeError:
            out = {}
        if check and (p.returncode != 0 or not out.get("success", False)):
            detail = out.get("error-message") or (p.stderr.strip() or text)[-800:]
            raise ChestFedError(f"`flwr {' '.join(args)}` failed: {detail}")
        return out

    def nodes(self) -> list[dict[str, Any]]:
        return list(self("supernode", "list", CONNECTION).get("nodes", []))

    def register(self, public_key: Path, name: str) -> int:
        out = self("supernode", "register", str(public_key), CONNECTION, "--name", name)
        return int(out["node-id"])

    def submit(self, app_dir: Path, run_config: dict[str, str]) -> int:
        args = ["run", str(app_dir), CONNECTION]
        for k, v in run_config.items():
            if "'" in v:
                raise ChestFedError(f"run config value for '{k}' must not contain a quote: {v!r}")
            args += ["--run-config", f"{k}='{v}'"]  # a TOML literal string: no escapes
        return int(self(*args)["run-id"])

    def run_status(self, run_id: int) -> str:
        """'pending' | 'starting' | 'running' | 'finished:completed' | 'finished:failed' | ..."""
        runs = self("ls", CONNECTION, "--run-id", str(run_id), timeout=60).get("runs", [])
        return str(runs[0]["status"]) if runs else "unknown"

    def stop_run(self, run_id: int, timeout: float = 60) -> None:
        self("stop", str(run_id), CONNECTION, timeout=timeout, check=False)


def collect_site_keys(keys: Iterable[str], keys_dir: str | None, sites: list[str]) -> dict[str, Path]:
    """Site name -> public key file, from `--site-key NAME=FILE` and/or `--keys-dir DIR`
    (DIR/<site>.pub). Every configured site needs one."""
    found: dict[str, Path] = {}
    if keys_dir:
        for s in sites:
            p = Path(keys_dir).expanduser() / f"{s}.pub"
            if p.is_file():
                found[s] = p.resolve()
    for item in keys:
        name, sep, file = item.partition("=")
        if not sep:
            raise ChestFedError(f"--site-key '{item}' must look like NAME=path/to/NAME.pub")
        if name not in sites:
            raise ChestFedError(f"--site-key names '{name}', which is not a site of this "
                                f"experiment ({', '.join(sites)})")
        p = Path(file).expanduser()
        if not p.is_file():
            raise ChestFedError(f"--site-key {name}: '{p}' not found")
        found[name] = p.resolve()
    missing = [s for s in sites if s not in found]
    if missing:
        raise ChestFedError(
            f"no public key for site(s) {', '.join(missing)}: every hospital makes one with "
            "`python launch/certs.py node-key --name <site>` and sends <site>.pub; pass them "
            "with --keys-dir DIR (DIR/<site>.pub) or --site-key NAME=FILE")
    return found
