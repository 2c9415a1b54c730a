"""The experiment config: one validated tree, loaded from YAML plus `key=value` overrides.

Unknown keys and bad values fail at once with one line that names the key and the file (and a
did-you-mean), before anything is written to disk. This module loads; the sections are in
common/config/schema.py, overrides in common/config/overrides.py, the error lines in
common/config/errors.py. Callers import all of it from here (`common.config`), the config's one
public face.
"""
from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from chestfed.common.config.errors import config_error_line
from chestfed.common.config.overrides import apply_override, parse_override
from chestfed.common.config.schema import (
    STRATEGIES,
    ExperimentConfig,
    ModelConfig,
    SiteConfig,
    SplitConfig,
    TrainConfig,
)
from chestfed.common.errors import ConfigError
from chestfed.common.labels import FINDINGS

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}")


def _expand_env(node: Any, where: str) -> Any:
    """`${VAR}` becomes the environment variable's value (unset is an error); `${VAR:-x}` falls
    back to x (possibly empty) like the shell."""
    if isinstance(node, dict):
        return {k: _expand_env(v, where) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_env(v, where) for v in node]
    if isinstance(node, str):
        def sub(m: re.Match[str]) -> str:
            value = os.environ.get(m.group(1))
            if value is None or (value == "" and m.group(2)):
                if m.group(2) is not None:
                    return m.group(3)
                raise ConfigError(f"{where}: environment variable ${{{m.group(1)}}} is not set")
            return value
        return _ENV.sub(sub, node)
    return node


def _apply_fallbacks(tree: dict[str, Any], where: str) -> bool:
    """A site with `fallback: {kind, options}` and no data root becomes that site (recipes run
    on phantom hospitals until the user points them at real data); `when_fallback` (a partial
    config, e.g. a CPU-sized model) is then merged over the whole config."""
    extra = tree.pop("when_fallback", None)
    used = []
    for site in tree.get("sites") or []:
        if not isinstance(site, dict) or "fallback" not in site:
            continue
        fb = site.pop("fallback")
        if not site.get("root"):
            if not isinstance(fb, dict) or "kind" not in fb:
                raise ConfigError(f"{where}: site '{site.get('name')}': fallback needs a kind")
            used.append(f"{site.get('name')}: {site.get('kind')} -> {fb['kind']} (no root given)")
            site.update({"kind": fb["kind"], "root": fb.get("root"), "options": fb.get("options", {})})
    if used:
        tree["fallbacks"] = used
        if isinstance(extra, dict):
            _merge(tree, extra)
    return bool(used)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] = (),
                strategy: str | None = None) -> ExperimentConfig:
    """Load, expand `${ENV}`, apply `a.b=c` overrides and validate. Raises ConfigError."""
    file = Path(path) if path else DEFAULT_CONFIG
    if not file.is_file():
        raise ConfigError(f"config file '{file}' not found")
    try:
        tree = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file}: not UTF-8 text (byte {exc.start}); save the config as "
                          "UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"config file '{file}': {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{file}{at}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{file}: the top level must be a mapping of keys")
    return config_from_tree(tree, str(file), overrides, strategy)


def config_from_tree(tree: dict[str, Any], where: str, overrides: list[str] = (),
                     strategy: str | None = None) -> ExperimentConfig:
    tree = copy.deepcopy(tree)
    for text in overrides:
        apply_override(tree, *parse_override(text))
    if strategy is not None:
        if strategy not in STRATEGIES:
            close = difflib.get_close_matches(strategy, STRATEGIES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown strategy '{strategy}'{hint}; choose from "
                              f"{', '.join(STRATEGIES)}")
        tree.setdefault("strategy", {})["name"] = strategy
    tree = _expand_env(tree, where)
    if _apply_fallbacks(tree, where):
        for text in overrides:  # the user's overrides win over a recipe's when_fallback
            apply_override(tree, *parse_override(text))
        tree = _expand_env(tree, where)
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(config_error_line(err, where, list(overrides))) from None
    except ConfigError:
        raise
    except ValueError as err:  # label-space errors raised inside validators
        raise ConfigError(f"{where}: {err}") from None


def config_from_yaml(text: str) -> ExperimentConfig:
    """The resolved config as the server sends it to sites (already validated once)."""
    return ExperimentConfig.model_validate(yaml.safe_load(text))


# The sections callers use, from config_schema.py: `from common.config import TrainConfig` keeps
# working wherever the config is used.
__all__ = ["DEFAULT_CONFIG", "FINDINGS", "STRATEGIES", "ExperimentConfig", "ModelConfig", "SiteConfig",
           "SplitConfig", "TrainConfig", "config_from_tree", "config_from_yaml", "load_config"]
