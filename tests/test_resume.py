"""Resume (issue 17, item 3) and a failed site in local / sequential (item 4).

In process, through the real ClientApp handlers (no Ray): every strategy is run once
uninterrupted, once "killed" right after round k's checkpoint (the test hook raises where a
crash would SIGKILL), and then resumed in the same folder with fresh site contexts (as new
processes have: FedBN's BatchNorm must come from the site's disk); the models must be the same
bits (torch.equal on every tensor). End to end, `simulate.py` is SIGKILLed after round k's
checkpoint (CHESTFED_KILL_AFTER_CHECKPOINT) and `simulate.py --resume` finishes it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from flwr.app import Context, Error, Message, RecordDict

from chestfed.common.config import config_from_tree
from e2e import REPO, TINY_TRAIN, one_epoch, tiny_config

ENV = {**os.environ, "WANDB_MODE": "offline"}


@pytest.fixture(autouse=True)
def _task_identity():
    # Flower stamps messages with the running task's identity; outside a run, lend one.
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = None


class Grid:
    """Delivers each message straight to the ClientApp's handlers. A new Grid is a restart of
    every node: new contexts, so nothing of the last run's memory survives."""

    def __init__(self, n_nodes: int, run: Path, cfg, broken: str | None = None,
                 broken_in: tuple[str, ...] = ("train",)):
        from chestfed.sites import app as site_app

        self.handlers = {"query": site_app.query, "train": site_app.train,
                         "evaluate": site_app.evaluate}
        local = {"cache-dir": str(cfg.data.cache_dir), "splits-dir": str(run / "splits"),
                 "state-dir": str(run / "site-state")}  # as server/simulation/engine.py sets them
        self.contexts = {i + 1: Context(run_id=1, node_id=i + 1, state=RecordDict(), run_config={},
                                        node_config={"partition-id": i, "num-partitions": n_nodes, **local})
                         for i in range(n_nodes)}
        self.broken, self.broken_in = broken, broken_in  # a site that fails (item 4)

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            kind = m.metadata.message_type.split(".")[0]
            try:
                site = str(m.content["config"].get("chestfed.site", ""))
                if kind in self.broken_in and self.broken and site == self.broken:
                    raise OSError(f"cannot read {site}'s images (disk gone)")
                out.append(self.handlers[kind](m, self.contexts[m.metadata.dst_node_id]))
            except Exception as exc:  # what Flower does with a failing ClientApp
                out.append(Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=m))
        return out


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after the checkpoint runs."""


def _cfg(tmp: Path, strategy: str, n_sites: int = 2, rounds: int = 2, train=None, checkpoints=None,
         **strat):
    return config_from_tree({
        "experiment": "resume", "seed": 0, "output_dir": str(tmp / "runs"),
        "data": {"image_size": 16, "cache_dir": str(tmp.parent / "cache"), "workers": 1},
        "sites": [{"name": f"site{i}", "kind": "phantom",
                   "options": {"preset": "abc"[i % 3], "population": {"size": 50}}}
                  for i in range(n_sites)],
        "model": {"width": 4}, "train": {**TINY_TRAIN, **(train or {})},
        "strategy": {"name": strategy, "rounds": rounds, "min_sites": 1, **strat},
        "eval": {"every": 1, "bootstrap": 0, "report": False,
                 **({"checkpoints": checkpoints} if checkpoints else {})},
        "wandb": {"enabled": False}}, "test")


def _train(cfg, run_path: Path | None = None, kill_after: int | None = None, monkeypatch=None,
           broken: str | None = None, broken_in: tuple[str, ...] = ("train",), audit: bool = False):
    """Discovery and the strategy's training (what resume changes); returns (models, the run's
    parts: a Federation, with the console lines and the run folder added). `audit`: the
    coordinator's wire.jsonl (server/deploy/run_files.WireAudit) and every site's
    egress/<site>.jsonl are written, as in a deployment."""
    from chestfed.server.run import resume as checkpoint
    from chestfed.server.federation.federation import Federation
    from chestfed.server.run.folder import RunFolder
    from chestfed.server.strategies.registry import RUNNERS, needs_pooled_node
    from chestfed.server.tracking import Tracker

    if run_path is None:
        run = RunFolder.create(cfg.output_dir, cfg.experiment, cfg.strategy.name)
        run.write_config(cfg.to_yaml())
    else:
        run = RunFolder(run_path)
    if kill_after is not None:
        def die(count):
            if count == kill_after:
                raise Killed()
        monkeypatch.setattr(checkpoint, "_after_save", die)
    pooled = needs_pooled_node(cfg.strategy.name, cfg.strategy.loso_base)
    grid = Grid(len(cfg.sites) + int(pooled), run.path, cfg, broken, broken_in)
    if audit:
        from chestfed.server.deploy.run_files import WIRE_FILE, WireAudit

        for c in grid.contexts.values():
            c.node_config["egress-dir"] = str(run.path / "egress")
        grid = WireAudit(grid, run.path / WIRE_FILE)
    lines: list[str] = []
    fed = Federation.open(grid, cfg, run, Tracker(cfg, run.path, "t"), echo=lines.append)
    fed.lines, fed.run = lines, run
    fed.discover(timeout=30, pooled=pooled)
    try:
        return RUNNERS[cfg.strategy.name](fed), fed
    finally:
        if kill_after is not None:
            monkeypatch.undo()


def _same(a, b):
    sa, sb = a.arrays.to_torch_state_dict(), b.arrays.to_torch_state_dict()
    assert sa.keys() == sb.keys(), a.name
    for k in sa:
        assert torch.equal(sa[k], sb[k]), (a.name, k)


def _rows(run: Path):
    drop = ("round_seconds", "train_seconds")
    return [{k: v for k, v in json.loads(x).items() if k not in drop}
            for x in (run / "metrics.jsonl").read_text().splitlines()]


CASES = [  # strategy, sites, rounds, kill after this many completed rounds (stages), extra
    ("fedavg", 2, 3, 1, {}),
    ("fedprox", 2, 2, 1, {}),
    ("fedadam", 2, 3, 2, {}),
    ("fedyogi", 2, 3, 1, {}),
    ("fedbn", 2, 3, 1, {}),
    ("local", 2, 3, 2, {}),
    ("pooled", 2, 2, 1, {}),
    ("sequential", 2, 2, 3, {}),  # 4 stages: killed after stage 3 (cycle 2, site0)
    ("loso", 3, 2, 3, {}),  # 3 x 2 rounds: killed in the second held-out site's model
    ("loso", 3, 3, 4, {"loso_base": "fedyogi", "fraction": 0.5}),  # node sampling: python RNG
    # personalised: each site's own part (Ditto's model, FedPer's / FedRep's head) from its disk
    ("ditto", 2, 3, 1, {}),
    ("fedper", 2, 3, 2, {}),
    ("fedrep", 2, 2, 1, {}),
    ("finetune", 2, 2, 1, {}),
    ("mrmtl", 2, 3, 1, {}),
    ("apfl", 2, 3, 1, {}),
    ("fenda", 2, 3, 1, {}),
    ("fedmedian", 2, 2, 1, {}),
    # the plateau schedule's counters and the best round's weights come back too
    # (a large rate, so the validation loss bounces: the schedule steps down and the best
    # round is not the last, which the test checks)
    ("fedavg", 2, 4, 2, {"train": {"lr_schedule": "plateau", "plateau_patience": 0,
                                   "plateau_factor": 0.5, "lr": 0.3},
                         "checkpoints": ["final", "best_val"]}),
    # a constant rate: each round's validation rides in the next training reply
    # (eval.round_validation), so round k's end waits for round k+1's replies
    ("fedavg", 2, 4, 2, {"train": {"lr": 0.3}, "checkpoints": ["final", "best_val"]}),
]


@pytest.mark.parametrize("name, n_sites, rounds, k, extra", CASES,
                         ids=[c[0] + ("-" + c[4].get("loso_base", c[4].get("train", {}).get(
                             "lr_schedule", "carried") + "-best") if c[4] else "") for c in CASES])
def test_killed_after_round_k_then_resumed_equals_uninterrupted(tmp_path, monkeypatch, name,
                                                                n_sites, rounds, k, extra):
    from chestfed.server.run.resume import prepare_resume

    want, ref = _train(_cfg(tmp_path / "a", name, n_sites, rounds, **extra))
    cfg = _cfg(tmp_path / "b", name, n_sites, rounds, **extra)
    with pytest.raises(Killed):
        _train(cfg, kill_after=k, monkeypatch=monkeypatch)
    (run,) = [p for p in (tmp_path / "b" / "runs" / "resume").iterdir()]
    cfg2, _, info = prepare_resume(run)
    assert info["rounds_done"] == k
    got, fed = _train(cfg2, run)
    assert any(line.startswith("resuming after ") for line in fed.lines)
    assert [m.name for m in got] == [m.name for m in want]
    for a, b in zip(got, want):
        _same(a, b)
        assert a.trained_on == b.trained_on and a.meta == b.meta
    # the record reads as one run: every round once, the same budget and dropouts
    assert _rows(run) == _rows(ref.run.path)
    assert (fed.record.images_processed, fed.record.optimizer_steps) == (ref.record.images_processed, ref.record.optimizer_steps)
    if name != "loso" and not extra:  # every strategy spends rounds x one pass over each site
        n_train = [int(ref.sites.site_info[s]["n_train"]) for s in ref.sites.training_sites()]
        passes = [one_epoch(n) for n in ([sum(n_train)] if name == "pooled" else n_train)]
        # ... plus what a personalised method trains besides (its budget says so): Ditto's
        # personal model, FedRep's head epochs, finetune's one epoch at each site after the rounds
        per_site = {"ditto": 2 * rounds, "fedrep": 2 * rounds, "apfl": 2 * rounds,
                    "finetune": rounds + 1}.get(name, rounds)
        assert (ref.record.images_processed, ref.record.optimizer_steps) == (
            per_site * sum(i for i, _ in passes), per_site * sum(st for _, st in passes)), name
    if extra.get("train", {}).get("lr_schedule") == "plateau":  # the case exercises both
        rates = {r["lr"] for r in _rows(ref.run.path) if "lr" in r}
        assert len(rates) > 1, rates
        assert {m: p.state()["lr"] for m, p in fed.validation.plateaus.items()} == \
            {m: p.state()["lr"] for m, p in ref.validation.plateaus.items()}
    if "best_val" in extra.get("checkpoints", []):
        assert any(b.round is not None and b.round < rounds for b in ref.validation.best.values())
        assert fed.validation.best.keys() == ref.validation.best.keys()
        for m, b in ref.validation.best.items():  # the best_val model: same round, same weights
            assert fed.validation.best[m].round == b.round and fed.validation.best[m].loss == b.loss
            got_w, want_w = fed.validation.best[m].arrays.to_torch_state_dict(), b.arrays.to_torch_state_dict()
            assert all(torch.equal(got_w[k], want_w[k]) for k in want_w)
    if name == "fedbn":  # each site kept its BatchNorm on its own disk
        assert list((run / "site-state" / "site0").glob("bn-*.pt"))
    part = {"ditto": "personal", "mrmtl": "personal", "apfl": "personal", "fedper": "head",
            "fedrep": "head", "fenda": "head"}.get(name)
    if part:  # ... and a personalised method its own part
        assert list((run / "site-state" / "site0").glob(f"{part}-*.pt"))


def test_a_resume_of_a_complete_or_changed_run_is_refused(tmp_path, monkeypatch):
    from chestfed.common.errors import ChestFedError
    from chestfed.server.run.resume import prepare_resume

    cfg = _cfg(tmp_path, "fedavg", rounds=2)
    with pytest.raises(Killed):
        _train(cfg, kill_after=1, monkeypatch=monkeypatch)
    (run,) = list((tmp_path / "runs" / "resume").iterdir())
    changed = _cfg(tmp_path, "fedavg", rounds=3)
    with pytest.raises(ChestFedError, match=r"different config \(strategy.rounds differ\)"):
        prepare_resume(run, changed)
    edited = run / "config.yaml"
    tree = yaml.safe_load(edited.read_text())
    edited.write_text(yaml.safe_dump({**tree, "seed": 1}, sort_keys=False))
    with pytest.raises(ChestFedError, match="changed after the run started"):
        prepare_resume(run)
    edited.write_text(cfg.to_yaml())
    (run / "run.json").write_text(json.dumps({"status": "complete"}))
    with pytest.raises(ChestFedError, match="already complete"):
        prepare_resume(run)


# --- item 4: a failed site in local / sequential -----------------------------------------------

def test_local_marks_the_failed_site_and_finishes_the_others(tmp_path):
    cfg = _cfg(tmp_path, "local", n_sites=3, rounds=2, min_sites=2)
    models, fed = _train(cfg, broken="site1")
    assert [m.name for m in models] == ["local-site0", "local-site2"]
    (failed,) = fed.record.failed_models
    assert failed["model"] == "local-site1" and failed["round"] == 1
    assert "cannot read site1's images" in failed["reason"]
    assert any("finished without site1" in line for line in fed.lines)


def test_sequential_skips_the_failed_stage_and_goes_on(tmp_path):
    # site1's data cannot be loaded at all: discovery goes on without it, its stage fails
    cfg = _cfg(tmp_path, "sequential", n_sites=3, rounds=1, min_sites=2)
    models, fed = _train(cfg, broken="site1", broken_in=("query", "train"))
    assert "cannot read site1's images" in fed.sites.unavailable["site1"]
    assert [f["model"] for f in fed.record.failed_models] == ["sequential-stage-2"]
    names = {m.name: m for m in models}
    assert set(names) == {"sequential", "sequential-stage-1"}
    assert names["sequential"].meta["site"] == "site2" and names["sequential"].trained_on == ["site0", "site2"]


def test_sequential_steps_the_plateau_schedule_once_per_cycle(tmp_path, monkeypatch):
    # every visit is validated (curves, best_val), but the schedule's patience counts cycles,
    # as the other strategies' counts rounds: each site's data seen once more
    from chestfed.common.schedules import Plateau

    seen = []
    step = Plateau.step
    monkeypatch.setattr(Plateau, "step", lambda self, loss: seen.append(loss) or step(self, loss))
    cfg = _cfg(tmp_path, "sequential", n_sites=3, rounds=2,
               train={"lr_schedule": "plateau", "plateau_patience": 0})
    models, fed = _train(cfg)
    rows = _rows(fed.run.path)
    assert sorted({r["round"] for r in rows if r.get("val_loss") is not None}) == [1, 2, 3, 4, 5, 6]
    cycle_ends = [sum(r["val_loss"] for r in rows if r["round"] == k and r.get("val_loss") is not None)
                  / 3 for k in (3, 6)]
    assert seen == pytest.approx(cycle_ends)


def test_too_few_sites_left_fails_the_run(tmp_path):
    from chestfed.server.federation.trained import SiteFailure

    cfg = _cfg(tmp_path, "local", n_sites=2, rounds=1, min_sites=2)
    with pytest.raises(SiteFailure, match="only 1 site.*strategy.min_sites is 2.*site1"):
        _train(cfg, broken="site1")


# --- end to end: the real launcher, a real SIGKILL --------------------------------------------

def _simulate(cfg: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "launch" / "simulate.py"), *args],
                          capture_output=True, text=True, timeout=300, cwd=cfg.parent,
                          env={**ENV, **(env or {})})


@pytest.mark.e2e
def test_simulate_sigkilled_after_round_1_resumes_to_the_same_model(tmp_path):
    """fedbn: the server's weights come from resume/state.pt, each site's BatchNorm from the
    site's own disk; Ray's leftovers of the killed launcher end when the resume settles it."""
    from chestfed.server.simulation.ray_session import session_pids

    ref_dir, run_dir = tmp_path / "ref", tmp_path / "kill"
    models = {}
    for where, env in ((ref_dir, None), (run_dir, {"CHESTFED_KILL_AFTER_CHECKPOINT": "1"})):
        where.mkdir()
        cfg = tiny_config(where, size=60, strategy={"rounds": 2, "min_sites": 1},
                          eval={"bootstrap": 0, "report": False})
        proc = _simulate(cfg, "--config", str(cfg), "--strategy", "fedbn", env=env)
        run = next((where / "runs" / "tiny").iterdir())
        models[where] = run
        if env is None:
            assert proc.returncode == 0, proc.stderr[-3000:]
        else:
            assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-2000:]
            assert "round 1/2" in proc.stdout and "round 2/2" not in proc.stdout  # killed at once
    run = models[run_dir]
    session = json.loads((run / "run.json").read_text())["ray_session"]
    cfg = run_dir / "tiny.yaml"
    changed = _simulate(cfg, "--resume", str(run), "strategy.rounds=3")
    assert changed.returncode == 2 and "different config" in changed.stderr, changed.stderr
    proc = _simulate(cfg, "--resume", str(run))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"resuming {run} after round 1/2 of fedbn" in proc.stdout
    trained = [ln.split()[1] for ln in proc.stdout.splitlines() if ln.startswith("round ")]
    assert trained == ["2/2"], proc.stdout  # round 1 is not trained again
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "complete" and status["resumed_from"] == "round 1/2 of fedbn"
    assert status["resumes"] == 1 and not session_pids(session)
    assert json.loads((run / "resume.json").read_text())["from_round"] == 1
    got = torch.load(run / "checkpoints" / "fedbn.pt", weights_only=True)["model"]
    want = torch.load(models[ref_dir] / "checkpoints" / "fedbn.pt", weights_only=True)["model"]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    again = _simulate(cfg, "--resume", str(run))
    assert again.returncode == 2 and "already complete" in again.stderr
    assert len([ln for ln in again.stderr.splitlines() if ln.startswith("chestfed: ")]) == 1


@pytest.mark.e2e
def test_local_with_a_site_whose_data_fails_finishes_the_others(tmp_path):
    """A site whose data fails once the run has started (the check before the start would
    catch this one: skipped here as compare.py skips it): its row says failed and why, the
    other sites are trained and scored, exit 0 with a warning (strategy.min_sites 2 of 3)."""
    cfg = tiny_config(tmp_path, n_sites=3, size=60, strategy={"rounds": 1, "min_sites": 2},
                      eval={"bootstrap": 0})
    doc = yaml.safe_load(cfg.read_text())
    doc["sites"][1] = {"name": "broken", "kind": "csv", "root": str(tmp_path / "no-such-folder"),
                       "options": {"csv": "labels.csv", "path_column": "path", "findings_column": "f"}}
    cfg.write_text(yaml.safe_dump(doc))
    proc = _simulate(cfg, "--config", str(cfg), "--strategy", "local", "--no-preflight")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "warning: local finished without broken" in proc.stdout
    run = next((tmp_path / "runs" / "tiny").iterdir())
    res = json.loads((run / "results.json").read_text())
    assert set(res["matrix"]) == {"local-site0", "local-site2"}
    (failed,) = res["failed"]
    assert failed["model"] == "local-broken" and "no-such-folder" in failed["reason"]
    assert any(ln.startswith("local-broken") and "failed at broken" in ln for ln in proc.stdout.splitlines())
    assert "failed at broken" in (run / "report.md").read_text()
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
