"""What a site keeps of a model between rounds, on its own disk, so that a resumed run finds it
again: FedBN's BatchNorm (part `bn`), FedPer's / FedRep's classifier head (`head`), Ditto's whole
personal model (`personal`). Nothing here ever leaves the site in a training reply.

Flower's `context.state` lives only as long as one Flower run (a coordinator restarted with
`--resume` submits a new one; a restarted simulation starts new nodes), so each round's part is
also written to the site's own disk, keyed by run, part, model (the model's opaque alias, which
a resumed coordinator keeps) and round:

  deployment: <workdir>/state/<run name>/<part>-<model>-r<round>.pt  (launch/site.py --workdir)
  simulation: <state-dir>/<site>/<part>-<model>-r<round>.pt         (the run folder's site-state/)

Training round r starts from the newest part of a round before r (what an uninterrupted run
would hold: a coordinator that died during round r may have let a site write round r's
already); evaluation uses the newest. Older rounds are pruned once a newer one is written,
except the one that round started from.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context

from chestfed.common import atomic

PARTS = ("bn", "head", "personal")
_FILE = re.compile(r"^(?P<part>[a-z]+)-(?P<model>[A-Za-z0-9_.-]+)-r(?P<round>\d+)\.pt$")


def _key(model: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in model) or "model"


def folder(local: dict[str, Any], deployed: bool, run_name: str, site: str) -> Path | None:
    """Where this site keeps its parts for this run (None: in memory only)."""
    if deployed:
        work = str(local.get("workdir", ""))
        return Path(work) / "state" / _key(run_name) if work else None
    own = str(local.get("state-dir", ""))
    return Path(own) / _key(site) if own else None


def _rounds(where: Path, part: str, model: str) -> dict[int, Path]:
    out = {}
    if where.is_dir():
        for p in where.iterdir():
            m = _FILE.match(p.name)
            if m and m.group("part") == part and m.group("model") == _key(model):
                out[int(m.group("round"))] = p
    return out


def _memory_prefix(part: str, model: str) -> str:
    return f"local-{part}:{model}:r"


def load(context: Context, where: Path | None, part: str, model: str,
         before: int | None) -> ArrayRecord | None:
    """This site's `part` of `model`: the newest from a round before `before` (None: the
    newest), from memory or from disk."""
    prefix = _memory_prefix(part, model)
    mem = {int(k[len(prefix):]): k for k in context.state.array_records if k.startswith(prefix)}
    disk = _rounds(where, part, model) if where is not None else {}
    ok = [r for r in set(mem) | set(disk) if before is None or r < before]
    if not ok:
        return None
    r = max(ok)
    if r in mem:
        return context.state.array_records[mem[r]]
    blob = torch.load(disk[r], map_location="cpu", weights_only=True)
    return ArrayRecord(blob)


def save(context: Context, where: Path | None, part: str, model: str, round_: int,
         arrays: ArrayRecord) -> None:
    """Keep round `round_`'s `part` (atomically on disk), and drop rounds before the one this
    round started from."""
    assert part in PARTS, part
    started = [r for r in _rounds(where, part, model) if r < round_] if where is not None else []
    keep_from = max(started) if started else round_
    prefix = _memory_prefix(part, model)
    for k in [k for k in context.state.array_records if k.startswith(prefix)]:
        if int(k[len(prefix):]) < round_:
            del context.state[k]  # memory holds one round: older ones are on disk if needed
    context.state[f"{prefix}{round_}"] = arrays
    if where is None:
        return
    where.mkdir(parents=True, exist_ok=True)
    atomic.torch_save(where / f"{part}-{_key(model)}-r{round_}.pt", arrays.to_torch_state_dict())
    for r, p in _rounds(where, part, model).items():
        if r < keep_from:
            p.unlink(missing_ok=True)
