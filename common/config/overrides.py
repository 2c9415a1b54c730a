"""Command-line `a.b=c` overrides: parsed with the type of the field they name (text fields
stay text) and written into the raw config tree, with one line for a path that does not fit."""
from __future__ import annotations

import types
import typing
from typing import Any

import yaml
from pydantic import BaseModel

from chestfed.common.config.schema import ExperimentConfig
from chestfed.common.errors import ConfigError


def annotation_at(path: list[str]) -> Any:
    """The type of the config field a dotted override path names (None: not a known field)."""
    cur: Any = ExperimentConfig
    ann: Any = None
    for part in path:
        if part.isdigit() and ann is not None:  # an index into a list field: its item type
            ann = next(iter(getattr(ann, "__args__", ())), None)
            cur = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
            continue
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)) or part not in cur.model_fields:
            return None
        ann = cur.model_fields[part].annotation
        args = getattr(ann, "__args__", ())
        cur = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return ann


def _takes_text(ann: Any) -> bool:
    """A `str` or `str | None` field (not list[str], not a Literal)."""

    if ann is str:
        return True
    return typing.get_origin(ann) in (typing.Union, types.UnionType) and str in typing.get_args(ann)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value, e.g. strategy.rounds=5")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if _takes_text(annotation_at(path)) and raw not in ("null", "~"):
        return path, raw  # experiment=007 names the folder '007', not 7
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    cur: Any = tree
    for i, part in enumerate(path[:-1]):
        if isinstance(cur, list):
            if not part.isdigit() or int(part) >= len(cur):
                raise ConfigError(f"override '{'.'.join(path)}': '{part}' is not an index of "
                                  f"'{'.'.join(path[:i])}' (0..{len(cur) - 1})")
            cur = cur[int(part)]
        elif isinstance(cur, dict):
            cur = cur.setdefault(part, {})
        else:
            break
        if not isinstance(cur, (dict, list)):
            raise ConfigError(f"command line '{'.'.join(path)}': '{'.'.join(path[:i + 1])}' "
                              f"is a value ({cur!r}), not a section with keys")
    last = path[-1]
    if isinstance(cur, list):
        if not last.isdigit() or int(last) >= len(cur):
            raise ConfigError(f"override '{'.'.join(path)}': '{last}' is not a valid index")
        cur[int(last)] = value
    else:
        cur[last] = value
