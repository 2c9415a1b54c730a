"""The Optuna studies of one tuning run: one per strategy, in one storage (an SQLite file in the
study folder unless `tune.storage` names a database URL), each marked with the experiment it
belongs to, so a second experiment can never continue another's search.

Optuna rather than a loop of our own: its TPE sampler, its median / successive-halving pruners
on the per-round validation curve, and a storage several processes (or machines) share.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

from chestfed.common.errors import ConfigError

log = logging.getLogger(__name__)

FINISHED = ("COMPLETE", "PRUNED")  # what counts towards a strategy's trials


def storage_url(setting: str | None, folder: Path) -> str:
    return setting or f"sqlite:///{(folder / 'study.db').resolve()}"


def open_storage(url: str) -> Any:
    """Optuna's RDB storage, or one line saying why it cannot be opened or written."""
    import optuna  # lazy: brings in sqlalchemy

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        if path.exists() and not path.is_file():
            raise ConfigError(f"study storage '{path}' is not a file")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab"):
                pass
        except OSError as exc:
            raise ConfigError(f"study storage '{path}': cannot be written ({exc.strerror or exc})") from None
    try:
        return optuna.storages.RDBStorage(url, heartbeat_interval=None)
    except Exception as exc:  # noqa: BLE001 (a bad URL, a missing driver, a refused connection)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"tune.storage '{url}': cannot open it as an Optuna study storage ({first})") from None


def fingerprint(base_yaml: str, space: dict[str, Any], objective: str) -> str:
    """What a study's trials are comparable under: the experiment's config (its sites, splits,
    budget, seed), the space and the objective."""
    text = json.dumps({"config": base_yaml, "space": space, "objective": objective}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def study_name(experiment: str, strategy: str) -> str:
    return f"{experiment}/{strategy}"


def check_owner(storage: Any, experiment: str, mark: str) -> None:
    """Refuse a storage whose studies of this experiment were made under another config,
    space or objective (their trials would not be comparable)."""
    import optuna  # lazy: brings in sqlalchemy

    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        if not summary.study_name.startswith(f"{experiment}/"):
            continue
        theirs = summary.user_attrs.get("fingerprint")
        if theirs != mark:
            raise ConfigError(f"the study storage already holds '{summary.study_name}' from another "
                              f"experiment setup (config, space or objective differ: {theirs} vs "
                              f"{mark}); use a new --run-dir, or --resume the study it belongs to")


def open_study(storage: Any, experiment: str, strategy: str, mark: str, direction: str,
               pruner: str, seed: int) -> Any:
    import optuna  # lazy: brings in sqlalchemy

    pruners = {"median": optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
               "successive_halving": optuna.pruners.SuccessiveHalvingPruner(),
               "none": optuna.pruners.NopPruner()}
    study = optuna.create_study(storage=storage, study_name=study_name(experiment, strategy),
                                load_if_exists=True, direction=direction,
                                sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=3),
                                pruner=pruners[pruner])
    study.set_user_attr("fingerprint", mark)
    return study


def counts(study: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def finished(study: Any, limit: int) -> list[Any]:
    """The first `limit` finished trials (by number): every strategy is judged on the same count
    even when parallel jobs started one trial more."""
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name in FINISHED]
    return sorted(done, key=lambda t: t.number)[:limit]


def best(study: Any, limit: int) -> Any | None:
    """The best complete trial among the counted ones (None: none completed)."""
    complete = [t for t in finished(study, limit) if t.state.name == "COMPLETE"
                and t.value is not None and not math.isnan(t.value)]
    if not complete:
        return None
    sign = 1 if study.direction.name == "MAXIMIZE" else -1
    return max(complete, key=lambda t: (sign * t.value, -t.number))


def abandon_running(study: Any) -> list[dict[str, Any]]:
    """Trials left RUNNING by a killed study: marked failed, their parameters queued again so the
    search goes on where it was. Returns the queued parameter sets."""
    import optuna  # lazy: brings in sqlalchemy

    again = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        if t.params:
            study.enqueue_trial(t.params, skip_if_exists=True)
            again.append(dict(t.params))
    return again


def importance(study: Any, limit: int) -> dict[str, float]:
    """Optuna's parameter importance (fANOVA) over the counted complete trials; {} when there are
    too few or nothing varied."""
    import optuna  # lazy: brings in sqlalchemy

    complete = [t for t in finished(study, limit) if t.state.name == "COMPLETE"]
    if len(complete) < 3 or not complete[0].params:
        return {}
    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(
            study, params=list(complete[0].params)).items()}
    except Exception as exc:  # noqa: BLE001 (constant parameters, a single distinct value, ...)
        log.info("no parameter importance: %s", exc)
        return {}


def trial_rows(trials: Sequence[Any]) -> list[dict[str, Any]]:
    return [{"number": t.number, "state": t.state.name, "value": t.value, "params": dict(t.params),
             "seconds": t.user_attrs.get("seconds"), "images": t.user_attrs.get("images"),
             "pruned_after": t.user_attrs.get("pruned_after"), "run": t.user_attrs.get("run")}
            for t in trials]
