"""Inside the ServerApp of a deployment: the run folder launch/server.py prepared
(deployment.json), the refusal of pooling outside simulation, the one-line-per-round progress
log, and the wire audit (shapes and types of what crossed the wire, never values). Imported in
the ServerApp process: no heavy imports at the top."""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any, Iterable

from chestfed.common.errors import ChestFedError
from chestfed.common.config import load_config
from chestfed.common.privacy.disclosure import describe
from chestfed.server.run.folder import RunFolder

log = logging.getLogger(__name__)

DEPLOYMENT_FILE = "deployment.json"  # launch/server.py -> the ServerApp: how to run this folder
PROGRESS_FILE = "progress.log"  # the ServerApp's one-line-per-round progress
WIRE_FILE = "wire.jsonl"  # what crossed the wire at the server (shapes and types only)
POOLING_REFUSED = (
    "{what} pools the sites' training images on one machine: in a real deployment that would "
    "move patient data between hospitals, so it exists only in simulation "
    "(python launch/simulate.py). Choose a strategy that keeps images at home: fedavg, fedprox, "
    "fedadam, fedyogi, fedbn, local, sequential, or loso with strategy.loso_base other than pooled.")


def prepared_run(path: Path) -> tuple[Any, Any, dict[str, Any]]:
    """A run folder launch/server.py prepared: (config, RunFolder, deployment options)."""

    spec_file = path / DEPLOYMENT_FILE
    if not spec_file.is_file():
        raise ChestFedError(f"'{path}' is not a run folder prepared by launch/server.py "
                            f"(no {DEPLOYMENT_FILE})")
    spec = json.loads(spec_file.read_text())
    return load_config(path / "config.yaml"), RunFolder(path), spec


def refuse_pooling(strategy: str, loso_base: str) -> None:
    """Pooling moves data between hospitals: refused outside simulation."""
    if strategy == "pooled":
        raise ChestFedError(POOLING_REFUSED.format(what="strategy 'pooled'"))
    if strategy == "loso" and loso_base == "pooled":
        raise ChestFedError(POOLING_REFUSED.format(what="strategy 'loso' with strategy.loso_base=pooled"))


class ProgressEcho:
    """The ServerApp's echo: stdout (-> `flwr log`) and <run>/progress.log (-> launch/server.py)."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line.rstrip("\n") + "\n")


class WireAudit:
    """A Grid wrapper that writes, for every message leaving or reaching the server, the shape
    and dtype of each array, the type (and length) of each metric and config value: never the
    values themselves. Lets an auditor (and a test) check that only weights, settings and
    aggregate numbers cross."""

    def __init__(self, grid: Any, path: Path):
        self._grid, self._path = grid, path
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    @staticmethod
    def describe(msg: Any, direction: str) -> dict[str, Any]:
        """One row of wire.jsonl (`common.disclosure.describe`, which sites use for egress.jsonl)."""

        return describe(msg, direction)

    def _write(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        text = "".join(json.dumps(r) + "\n" for r in rows)
        with self._lock, open(self._path, "a") as f:
            f.write(text)

    def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
        messages = list(messages)
        self._write([self.describe(m, "out") for m in messages])
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Any]:
        replies = list(self._grid.pull_messages(message_ids))
        self._write([self.describe(m, "in") for m in replies])
        return replies

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None
                         ) -> Iterable[Any]:
        messages = list(messages)
        self._write([self.describe(m, "out") for m in messages])
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self._write([self.describe(m, "in") for m in replies])
        return replies
