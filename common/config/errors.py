"""One line per config mistake: which key, in which file or command-line override, and a
did-you-mean for a misspelt key (pydantic's ValidationError in, a sentence out)."""
from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError

from chestfed.common.config.schema import ExperimentConfig


def fields_at(model: type[BaseModel], path: tuple[Any, ...]) -> list[str]:
    """Field names of the (nested) pydantic model a validation error location points into
    (for did-you-mean hints; also used by sites/phantom/spec.py)."""
    cur: Any = model
    for part in path:
        if isinstance(part, int):
            continue
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)) or part not in cur.model_fields:
            return []
        ann = cur.model_fields[part].annotation
        args = getattr(ann, "__args__", ())
        cur = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return list(cur.model_fields)
    return []


def _blame(loc: tuple[Any, ...], where: str, overrides: list[str]) -> str:
    """The command-line override that set the offending key, else the config file."""
    key = [str(p) for p in loc]
    best, best_len = where, 0
    for text in overrides:
        path = text.split("=", 1)[0].strip().split(".")
        n = min(len(path), len(key))
        if path[:n] == key[:n] and n > best_len:
            best, best_len = f"command line '{text}'", n
    return best


def config_error_line(err: ValidationError, where: str, overrides: list[str] = ()) -> str:
    """The first validation error as one line naming the key and where it was set."""
    e = err.errors()[0]
    loc = tuple(e["loc"])
    where = _blame(loc, where, list(overrides)) if loc else where
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    if e["type"] == "extra_forbidden":
        known = fields_at(ExperimentConfig, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f" (did you mean '{'.'.join(str(p) for p in loc[:-1] + (close[0],))}'?)" if close else ""
        return f"{where}: unknown key '{dotted}'{hint}"
    if e["type"] == "missing":
        return f"{where}: missing key '{dotted}'"
    msg = e["msg"].removeprefix("Value error, ")
    got = e.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    extra = f" and {len(err.errors()) - 1} more problem(s)" if len(err.errors()) > 1 else ""
    if not loc:  # a rule across keys (e.g. strategy.min_sites against sites): the message names them
        where = _blame(tuple(msg.split(" ", 1)[0].rstrip(":").split(".")), where, list(overrides))
        return f"{where}: {msg}{extra}"
    return f"{where}: '{dotted}': {msg}{shown}{extra}"
