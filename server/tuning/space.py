"""A tuning study's search space (`tune.space`): checked once, before anything runs, and turned
into Optuna suggestions and `key=value` overrides per trial.

Each entry is a dotted config key and one distribution: `{log_uniform: [lo, hi]}`,
`{uniform: [lo, hi]}`, `{int: [lo, hi]}` or `{choice: [a, b, ...]}`. A key that is not a config
field gets a did-you-mean; a range on a key that takes no numbers, a bound the schema refuses
(lr: 0) and a key that would change what is compared (the sites, the splits, the seed, how a
model is scored) are errors; a key a strategy does not use (FedProx's mu for fedavg) is left out
of that strategy's search, and named.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from chestfed.common.config.errors import fields_at
from chestfed.common.config.overrides import annotation_at
from chestfed.common.config.schema import ExperimentConfig, takes_numbers
from chestfed.common.errors import ConfigError

KINDS = ("log_uniform", "uniform", "int", "choice")

# Keys that define the comparison itself, not a method's setting: tuning them would compare
# different experiments (or let validation choose how it is scored).
FIXED = ("experiment", "seed", "output_dir", "sites", "task", "data.split", "data.cache_dir",
         "eval", "wandb", "runtime", "tune", "strategy.name", "strategy.min_sites",
         "strategy.round_timeout", "strategy.fraction_evaluate", "fallbacks")

# Keys only some strategies read (the rest of train.*, model.*, strategy.rounds, ... every
# strategy uses). loso reads its base strategy's keys.
USED_BY = {"strategy.proximal_mu": ("fedprox",),
           "strategy.server_lr": ("fedadam", "fedyogi"),
           "strategy.balance": ("pooled",),
           "strategy.sequential": ("sequential",),
           "strategy.loso_base": ("loso",),
           "strategy.fraction": ("fedavg", "fedprox", "fedadam", "fedyogi", "fedbn", "fedmedian",
                                 "fedtrimmedavg", "krum", "finetune", "ditto", "fedper", "fedrep",
                                 "mrmtl", "apfl", "fenda"),
           "strategy.trim_beta": ("fedtrimmedavg",),
           "strategy.krum_byzantine": ("krum",),
           "strategy.finetune_epochs": ("finetune",),
           "strategy.ditto_lambda": ("ditto",),
           "strategy.mrmtl_lambda": ("mrmtl",),
           "strategy.apfl_alpha": ("apfl",),
           "strategy.apfl_learn_alpha": ("apfl",),
           "strategy.fedrep_head_epochs": ("fedrep",)}


@dataclass(frozen=True)
class Param:
    key: str
    kind: str
    args: tuple[Any, ...]

    def suggest(self, trial: Any) -> Any:
        """This parameter's value for an Optuna trial (the key is the parameter's name)."""
        if self.kind == "log_uniform":
            return trial.suggest_float(self.key, self.args[0], self.args[1], log=True)
        if self.kind == "uniform":
            return trial.suggest_float(self.key, self.args[0], self.args[1])
        if self.kind == "int":
            return trial.suggest_int(self.key, self.args[0], self.args[1])
        return trial.suggest_categorical(self.key, list(self.args))

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.key} in {{{', '.join(map(str, self.args))}}}"
        return f"{self.key} {self.kind.replace('_', '-')} [{self.args[0]:g}, {self.args[1]:g}]"


def _prefix_in(key: str, prefixes: Sequence[str]) -> str | None:
    return next((p for p in prefixes if key == p or key.startswith(p + ".")), None)


def uses(strategy: str, key: str, loso_base: str = "fedavg") -> bool:
    """Does `strategy` read `key`?"""
    users = USED_BY.get(_prefix_in(key, list(USED_BY)) or "")
    if users is None:
        return True
    return strategy in users or (strategy == "loso" and loso_base in users)


def _check_key(key: str) -> Any:
    path = key.split(".")
    ann = annotation_at(path)
    if ann is None:
        parent = fields_at(ExperimentConfig, tuple(path[:-1]))
        close = difflib.get_close_matches(path[-1], parent, n=1)
        hint = f" (did you mean '{'.'.join([*path[:-1], close[0]])}'?)" if close else ""
        raise ConfigError(f"tune.space: '{key}' is not a config key{hint}")
    fixed = _prefix_in(key, FIXED)
    if fixed:
        raise ConfigError(f"tune.space: '{key}' defines the comparison itself ({fixed}), it is not "
                          "a setting to tune; set it in the config for every strategy")
    return ann


def parse_space(space: Mapping[str, Any],
                validate: Callable[[str, Any], object] | None = None) -> list[Param]:
    """Every entry checked; raises ConfigError with one line. `validate(key, value)` (the
    experiment's config with that override; raises ConfigError) checks each bound and choice."""
    if not space:
        raise ConfigError("tune.space is empty: name at least one key to search, e.g. "
                          "train.lr: {log_uniform: [1e-4, 1e-2]}")
    params = []
    for key, spec in space.items():
        ann = _check_key(str(key))
        if not isinstance(spec, Mapping) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise ConfigError(f"tune.space: '{key}' must be one of {{{': ..., '.join(KINDS)}: ...}}, "
                              f"e.g. {key}: {{log_uniform: [1e-4, 1e-2]}}; got {spec!r}")
        kind, args = next(iter(spec.items()))
        if kind == "choice":
            if not isinstance(args, list) or not args:
                raise ConfigError(f"tune.space: '{key}: choice' needs a non-empty list of values")
        else:
            if not takes_numbers(ann):
                raise ConfigError(f"tune.space: '{key}' does not take numbers; a range "
                                  f"({kind}) needs a numeric key (use choice: [...])")
            if (not isinstance(args, list) or len(args) != 2
                    or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
                    or not args[0] < args[1]):
                raise ConfigError(f"tune.space: '{key}: {kind}' needs [low, high] with low < high; "
                                  f"got {args!r}")
            if kind == "log_uniform" and args[0] <= 0:
                raise ConfigError(f"tune.space: '{key}: log_uniform' needs low > 0; got {args[0]}")
            if kind == "int" and not all(isinstance(a, int) for a in args):
                raise ConfigError(f"tune.space: '{key}: int' needs integer bounds; got {args!r}")
        param = Param(str(key), kind, tuple(args))
        if validate is not None:  # every bound / choice must be a value the schema accepts
            for value in args:
                try:
                    validate(str(key), value)
                except ConfigError as exc:
                    raise ConfigError(f"tune.space: '{key}' value {value!r} is refused: {exc}") from None
        params.append(param)
    return params


def for_strategy(params: Sequence[Param], strategy: str, loso_base: str = "fedavg") -> list[Param]:
    return [p for p in params if uses(strategy, p.key, loso_base)]


def unused_keys(params: Sequence[Param], strategies: Sequence[str], loso_base: str = "fedavg"
                ) -> dict[str, list[str]]:
    """strategy -> the space keys it does not use (reported, and left out of its search)."""
    return {s: [p.key for p in params if not uses(s, p.key, loso_base)] for s in strategies}


def overrides(values: Mapping[str, Any]) -> list[str]:
    """A trial's (or the best trial's) values as `key=value` overrides."""
    return [f"{k}={v}" for k, v in values.items()]

