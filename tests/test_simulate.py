"""End to end through Flower's Simulation Engine: the real launcher on tiny phantom hospitals."""
import json
import signal
import subprocess
import sys
import time

import pytest
import yaml

from e2e import REPO, only_run, results, simulate, tiny_config

pytestmark = pytest.mark.e2e


def test_failed_run_is_marked_and_exit_code_is_1(tmp_path):
    # A site that cannot load its data once the run has started (the check before the start,
    # tests/test_preflight.py, would catch this one: it is skipped here as compare.py skips it
    # for its runs): the run fails and says so.
    cfg = tiny_config(tmp_path)
    doc = yaml.safe_load(cfg.read_text())
    doc["sites"][1] = {"name": "broken", "kind": "csv", "root": str(tmp_path / "no-such-folder"),
                       "options": {"csv": "labels.csv", "path_column": "path", "findings_column": "f"}}
    cfg.write_text(yaml.safe_dump(doc))
    proc = simulate(cfg, "--strategy", "fedavg", "--no-preflight", "strategy.round_timeout=60")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    run = only_run(tmp_path)
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "failed" and "broken" in status["error"]
    assert not (run / "results.json").exists()


def test_interrupt_marks_the_run_interrupted(tmp_path):
    cfg = tiny_config(tmp_path, size=300, strategy={"rounds": 50, "min_sites": 1})
    proc = subprocess.Popen([sys.executable, str(REPO / "launch" / "simulate.py"), "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    deadline = time.monotonic() + 120
    seen = ""
    for line in proc.stdout:
        seen += line
        if line.startswith("round 1/") or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 130, seen + out
    run = only_run(tmp_path)
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    leftovers = [p.name for p in run.rglob(".*") if p.is_file() and p.parent.name != "wandb"]
    assert not [n for n in leftovers if n.startswith((".results", ".run", ".latest"))]


@pytest.mark.parametrize("strategy", ["local", "fedavg"])
def test_real_sites_nih_vs_pneumoniamnist(test_data, tmp_path, strategy):
    """Two real datasets through the real adapters, cache, splits and Flower, end to end."""
    cfg = REPO / "configs" / "real" / "nih_vs_pneumoniamnist.yaml"
    proc = simulate(cfg, "--strategy", strategy, f"output_dir={tmp_path / 'runs'}",
                    f"data.cache_dir={tmp_path / 'cache'}", "strategy.rounds=2",
                    "eval.bootstrap=50")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run = only_run(tmp_path)
    res = results(run)
    assert set(res["sites"]) == {"nih", "pneumoniamnist"}
    assert res["sites"]["pneumoniamnist"]["n_test"] == 624  # MedMNIST's official test split
    rows = list(res["matrix"])
    assert rows == (["local-nih", "local-pneumoniamnist"] if strategy == "local" else ["fedavg"])
    for row in res["matrix"].values():
        for cell in row.values():
            assert 0.0 <= cell["metrics"]["macro_auroc"] <= 1.0
    split = (run / "splits" / "nih.csv").read_text().splitlines()[1:]
    by_patient = {}
    for line in split:
        _, patient, which = line.rsplit(",", 2)
        by_patient.setdefault(patient, set()).add(which)
    assert all(len(s) == 1 for s in by_patient.values())  # patient-wise
