"""launch/tune.py: the space's checks, validation-only trials, the study, --resume (issue 24)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from e2e import REPO, tiny_config

from chestfed.common import protocol as P
from chestfed.common.config import load_config
from chestfed.common.errors import ChestFedError, ConfigError
from chestfed.server.tuning import space as S

TUNE = REPO / "launch" / "tune.py"


def tune(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, str(TUNE), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


# --- the space ------------------------------------------------------------------------------------

def test_space_checks_each_key_with_one_line():
    ok = S.parse_space({"train.lr": {"log_uniform": [1e-4, 1e-2]}, "train.local_epochs": {"choice": [1, 2]},
                        "model.dropout": {"uniform": [0.0, 0.5]}, "train.batch_size": {"int": [8, 32]}})
    assert [p.kind for p in ok] == ["log_uniform", "choice", "uniform", "int"]
    cases = {
        "train.lrr": ("did you mean 'train.lr'", {"log_uniform": [1e-4, 1e-2]}),
        "train.lr_schedule": ("does not take numbers", {"uniform": [0, 1]}),
        "seed": ("defines the comparison itself", {"int": [0, 3]}),
        "eval.every": ("defines the comparison itself", {"int": [0, 3]}),
        "train.local_epochs": ("low < high", {"int": [2, 1]}),
        "strategy.proximal_mu": ("low > 0", {"log_uniform": [0, 1]}),
        "model.width": ("must be one of", {"normal": [4, 8]}),
    }
    for key, (said, spec) in cases.items():
        with pytest.raises(ConfigError, match=said):
            S.parse_space({key: spec})
    with pytest.raises(ConfigError, match="empty"):
        S.parse_space({})


def test_space_bounds_are_checked_against_the_schema(tmp_path):
    cfg = tiny_config(tmp_path)
    with pytest.raises(ConfigError, match="train.lr' value 0 is refused"):
        S.parse_space({"train.lr": {"uniform": [0, 0.1]}},
                      lambda k, v: load_config(cfg, [f"{k}={v}"]))


def test_a_key_a_strategy_does_not_use_is_left_out_of_its_search():
    params = S.parse_space({"train.lr": {"log_uniform": [1e-4, 1e-2]},
                            "strategy.proximal_mu": {"log_uniform": [1e-3, 1.0]},
                            "strategy.server_lr": {"log_uniform": [1e-3, 1e-1]}})
    assert [p.key for p in S.for_strategy(params, "fedprox")] == ["train.lr", "strategy.proximal_mu"]
    assert [p.key for p in S.for_strategy(params, "fedyogi")] == ["train.lr", "strategy.server_lr"]
    assert [p.key for p in S.for_strategy(params, "local")] == ["train.lr"]
    assert S.unused_keys(params, ["fedavg"])["fedavg"] == ["strategy.proximal_mu", "strategy.server_lr"]


# --- no trial reads a test split ------------------------------------------------------------------

class _Grid:
    def send_and_receive(self, msgs, timeout=None):  # pragma: no cover - must never be reached
        raise AssertionError("a message went out")


def test_a_trial_coordinator_refuses_to_ask_for_a_test_split(tmp_path):
    from flwr.app import ConfigRecord

    from chestfed.server.evaluation.evaluator import send_eval_jobs
    from chestfed.server.federation.site_link import SiteLink

    cfg = load_config(tiny_config(tmp_path), ["eval.final_split=val", "wandb.enabled=false"])
    link = SiteLink(_Grid(), cfg, "run", echo=lambda s: None)
    link.node_of = {"site0": 1}
    with pytest.raises(ChestFedError, match="may not ask a site for its test split"):
        link.send("evaluate", {"site0": (None, ConfigRecord({P.SPLIT: "test"}))})
    with pytest.raises(ChestFedError, match="may not ask a site for its test split"):  # nor the evaluator
        send_eval_jobs(link, "score", "test", {"site0": []}, {}, {}, {})


def test_a_trial_site_never_reads_its_test_split(tmp_path):
    from chestfed.sites import app as site_app

    cfg = load_config(tiny_config(tmp_path), ["eval.final_split=val"])
    assert site_app._readable_split(cfg, "val") == "val"  # noqa: SLF001 (the guard itself)
    with pytest.raises(ChestFedError, match="test split is not read"):
        site_app._readable_split(cfg, "test")  # noqa: SLF001


# --- bad input: one line, exit 2, nothing started -------------------------------------------------

def test_bad_input_exits_2_before_anything_starts(tmp_path):
    cfg = tiny_config(tmp_path)
    r = tune("--strategies", "local", "--trials", "0", "--config", str(cfg), "--run-dir", str(tmp_path / "a"))
    assert r.returncode == 2 and "--trials must be at least 1" in r.stderr
    r = tune("--strategies", "local", "--trials", "2", "--config", str(cfg), "--run-dir", str(tmp_path / "b"),
             "tune.space={train.lrr: {log_uniform: [0.001, 0.01]}}")
    assert r.returncode == 2 and "did you mean 'train.lr'" in r.stderr, r.stderr
    r = tune("--strategies", "local", "--trials", "2", "--config", str(cfg), "--run-dir", str(tmp_path / "c"),
             "tune.storage=postgresql://nobody@127.0.0.1:1/none")
    assert r.returncode == 2 and "cannot open it as an Optuna study storage" in r.stderr, r.stderr
    assert not any((tmp_path / "c").glob("trials/*"))
    r = tune("--resume", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "not a study folder" in r.stderr
    for folder in ("a", "b"):
        assert not (tmp_path / folder).exists()


def test_a_storage_of_another_experiment_setup_is_refused(tmp_path):
    import optuna

    from chestfed.server.tuning import study as T

    url = f"sqlite:///{tmp_path / 'study.db'}"
    storage = T.open_storage(url)
    T.open_study(storage, "tiny", "local", "aaaa", "maximize", "median", 0)
    T.check_owner(storage, "tiny", "aaaa")  # its own: fine
    T.check_owner(storage, "other", "bbbb")  # another experiment's studies are not looked at
    with pytest.raises(ConfigError, match="another experiment setup"):
        T.check_owner(storage, "tiny", "bbbb")
    assert optuna.get_all_study_summaries(storage)[0].study_name == "tiny/local"


# --- a tiny study, end to end ---------------------------------------------------------------------

@pytest.mark.e2e
def test_tiny_study_writes_its_study_tuning_section_and_finals_then_resume_adds_nothing(tmp_path):
    import optuna

    cfg = tiny_config(tmp_path, n_sites=2, size=60)
    study = tmp_path / "study"
    r = tune("--strategies", "local,fedavg", "--trials", "4", "--config", str(cfg), "--run-dir", str(study),
             "strategy.rounds=1", "data.image_size=32", "eval.bootstrap=0", "eval.report=false")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("== tune: ") == 8 and "val_auroc" in r.stdout
    summaries = {s.study_name: s.n_trials for s in
                 optuna.get_all_study_summaries(f"sqlite:///{study / 'study.db'}")}
    assert summaries == {"tiny/local": 4, "tiny/fedavg": 4}
    # every trial scored on validation; the coordinator and the sites refuse a test split in a
    # trial (tests above), so a trial that asked would have failed: none did
    trials = sorted((study / "trials").iterdir())
    assert len(trials) == 8
    for t in trials:
        info = json.loads((t / "run.json").read_text())
        assert info["status"] in ("complete", "pruned"), info
        if info["status"] == "complete":
            assert json.loads((t / "results.json").read_text())["scored_on"] == "val"
        cfg_t = (t / "config.yaml").read_text()
        assert "final_split: val" in cfg_t and "job_type: trial" in cfg_t
    tuning = json.loads((study / "tuning.json").read_text())
    for s in ("local", "fedavg"):
        assert len(tuning["strategies"][s]["trials"]) == 4 and tuning["strategies"][s]["best"]
        final = study / "finals" / f"{s}-seed0"
        res = json.loads((final / "results.json").read_text())
        assert res["scored_on"] == "test" and "job_type: final" in (final / "config.yaml").read_text()
        chosen = tuning["strategies"][s]["best"]["params"]
        assert res["budget"]["values"]["train.lr"] == pytest.approx(chosen["train.lr"])
    md = (study / "report.md").read_text()
    assert "## Tuning" in md and "## Strategies at each site" in md
    assert (study / "figures" / "tuning_trials.png").is_file()

    again = tune("--resume", str(study))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "== tune: " not in again.stdout and "== final: " not in again.stdout
    summaries = {s.study_name: s.n_trials for s in
                 optuna.get_all_study_summaries(f"sqlite:///{study / 'study.db'}")}
    assert summaries == {"tiny/local": 4, "tiny/fedavg": 4}


def test_parallel_jobs_never_start_more_trials_than_asked(tmp_path):
    """Each job asks for its next trial under the study folder's lock, counting running trials
    too: two strategies x 2 trials give exactly 4 asks, whichever job asks."""
    from types import SimpleNamespace

    from chestfed.launch import tune as tune_mod
    from chestfed.server.tuning import study as T

    storage = T.open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    studies = {s: T.open_study(storage, "tiny", s, "m", "maximize", "median", 0) for s in ("local", "fedavg")}
    study = SimpleNamespace(folder=tmp_path, strategies=["local", "fedavg"], trials=2)
    got = []
    while (nxt := tune_mod._next(study, studies)) is not None:  # noqa: SLF001 (the lock itself)
        got.append((nxt[0], nxt[2]))
    assert got == [("local", 1), ("local", 2), ("fedavg", 1), ("fedavg", 2)]
    # a killed study's running trials are failed and queued again with their parameters
    assert T.abandon_running(studies["local"]) == []  # no parameters were suggested
    assert T.counts(studies["local"]) == {"FAIL": 2}
