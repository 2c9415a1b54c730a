"""Read what W&B wrote to an offline run file (`run-<id>.wandb`), without W&B's servers.

The file is W&B's LevelDB-style log of protobuf `Record`s (wandb 0.31 no longer ships a reader).
Used by tests to check what was really logged, not what a mock was asked to log.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

_BLOCK = 32 * 1024
_HDR = 7  # checksum u32, length u16, type u8
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path) -> list[pb.Record]:
    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a W&B log file"
    pos, out, parts = 7, [], b""
    while pos + _HDR <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HDR:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HDR])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + _HDR:pos + _HDR + length]
        pos += _HDR + length
        if kind == _FULL:
            parts = chunk
        elif kind == _FIRST:
            parts = chunk
            continue
        elif kind == _MIDDLE:
            parts += chunk
            continue
        elif kind == _LAST:
            parts += chunk
        rec = pb.Record()
        rec.ParseFromString(parts)
        out.append(rec)
    return out


def history(path: Path) -> list[dict[str, Any]]:
    rows = []
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in rec.history.item})
    return rows


def run_config(path: Path) -> dict[str, Any]:
    cfg: dict[str, Any] = {}
    for rec in records(path):
        if rec.WhichOneof("record_type") == "config":
            for item in rec.config.update:
                cfg[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        if rec.WhichOneof("record_type") == "run":
            for item in rec.run.config.update:
                cfg[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return cfg


def run_info(path: Path) -> dict[str, Any]:
    for rec in records(path):
        if rec.WhichOneof("record_type") == "run":
            return {"project": rec.run.project, "group": rec.run.run_group,
                    "name": rec.run.display_name, "job_type": rec.run.job_type}
    return {}
