"""launch/describe.py: its numbers against counts computed straight from the source tables."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "describe.py"
CONFIG = "configs/real/nih_vs_pneumoniamnist.yaml"
NIH14 = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema",
         "Fibrosis", "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening",
         "Pneumonia", "Pneumothorax")


@pytest.fixture(scope="module")
def described(test_data) -> dict:
    """`describe --json` on the real config, in this process (the script itself is run as a
    subprocess in test_script_exits_2_on_a_config_error)."""
    import contextlib
    import io

    old = os.environ.get("CHESTFED_TEST_DATA")
    os.environ["CHESTFED_TEST_DATA"] = str(test_data)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            assert load_launcher().main(["--config", str(REPO / CONFIG), "--json"]) == 0
    finally:
        if old is None:
            os.environ.pop("CHESTFED_TEST_DATA", None)
        else:
            os.environ["CHESTFED_TEST_DATA"] = old
    return {s["site"]: s for s in json.loads(out.getvalue())["sites"]}


def test_nih_numbers_match_the_table(described, test_data):
    d = described["nih"]
    t = pd.read_csv(test_data / "nih-chestxray14-sample64" / "Data_Entry_2017_v2020.csv")
    assert d["images"] == len(t) == 1000
    assert d["patients"] == t["Patient ID"].nunique() == 264
    tokens = t["Finding Labels"].str.split("|")
    for name in (*NIH14, "No Finding"):
        pos = int(tokens.map(lambda x, name=name: name in x).sum())
        assert d["findings"][name] == {"pos": pos, "neg": len(t) - pos, "unknown": 0}, name
    assert set(d["masked"]) == {"Lung Lesion", "Fracture", "Lung Opacity",
                                "Enlarged Cardiomediastinum"}
    assert d["views"] == t["View Position"].value_counts().to_dict()
    assert d["sex"] == t["Patient Gender"].value_counts().to_dict()
    age = t["Patient Age"]
    assert d["age"]["mean"] == pytest.approx(age.mean())
    assert d["age"]["sd"] == pytest.approx(age.std())
    assert (d["age"]["min"], d["age"]["max"]) == (age.min(), age.max())
    normal = int((t["Finding Labels"] == "No Finding").sum())
    assert d["task"]["Abnormal"] == {"pos": len(t) - normal, "neg": normal, "unknown": 0}
    assert d["official_split"] is None


def test_pneumoniamnist_numbers_match_the_file(described, test_data):
    d = described["pneumoniamnist"]
    z = np.load(test_data / "pneumoniamnist" / "pneumoniamnist.npz")
    y = np.concatenate([z[f"{s}_labels"][:, 0] for s in ("train", "val", "test")])
    assert d["images"] == d["patients"] == len(y) == 5030
    assert d["findings"]["Pneumonia"] == {"pos": int(y.sum()), "neg": int((y == 0).sum()),
                                          "unknown": 0}
    assert d["findings"]["No Finding"]["pos"] == int((y == 0).sum())
    assert d["official_split"] == {"train": 3882, "val": 524, "test": 624}
    assert d["views"] == {"unknown": 5030} and d["sex"] == {"unknown": 5030}
    assert d["age"]["known"] == 0


def test_text_output_and_errors(test_data, monkeypatch, capsys):
    monkeypatch.setenv("CHESTFED_TEST_DATA", str(test_data))
    mod = load_launcher()
    assert mod.main(["--config", str(REPO / CONFIG), "--site", "nih"]) == 0
    out = capsys.readouterr().out
    assert "images 1000, patients 264" in out and "views: PA 637, AP 363" in out
    assert "sex: F 509, M 491" in out and "age: mean 61.9, sd 12.3, min 24, max 94" in out
    assert "masked (not annotated): Lung Lesion, Fracture" in out
    assert "task target Abnormal: pos 501, neg 499, unknown 0" in out

    assert mod.main(["--config", str(REPO / CONFIG), "sites.0.root=/no/such/nih"]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.strip().count("\n") == 0
    assert "site 'nih' (nih): root '/no/such/nih' does not exist" in cap.err

    assert mod.main(["--config", str(REPO / CONFIG), "--site", "nope"]) == 2
    assert "no site named 'nope'" in capsys.readouterr().err


def test_script_exits_2_on_a_config_error():
    env = {k: v for k, v in os.environ.items() if k != "CHESTFED_TEST_DATA"}
    unset = subprocess.run([sys.executable, str(SCRIPT), "describe", "--config", CONFIG],
                           cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert unset.returncode == 2 and unset.stdout == ""
    assert "CHESTFED_TEST_DATA" in unset.stderr and unset.stderr.count("\n") == 1


def load_launcher():
    """launch/describe.py as a module (chestfed.launch.describe)."""
    import chestfed.launch.describe as mod

    return mod


def test_describe_shows_report_rule_hits(tmp_path):
    from PIL import Image

    from chestfed.common.labels import Task
    from chestfed.sites.adapters.radiology_reports import ReportsAdapter

    rows = [{"f": f"{i}.png", "r": r} for i, r in enumerate(
        ["Cardiomegaly.", "Normal study.", "No pleural effusion."])]
    for row in rows:
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / row["f"])
    pd.DataFrame(rows).to_csv(tmp_path / "r.csv", index=False)
    rec = ReportsAdapter("s", str(tmp_path), {"csv": "r.csv", "path_column": "f",
                                              "report_column": "r", "negation": True}).records()
    mod = load_launcher()
    d = mod.describe_records(rec, Task("binary"))
    assert d["rule_hits"]["Cardiomegaly"] == 1 and d["rule_negated"]["Effusion"] == 1
    assert d["task"]["Abnormal"] == {"pos": 1, "neg": 2, "unknown": 0}
    text = mod.format_site({"site": "s", "kind": "reports", "root": str(tmp_path), **d})
    assert "report rule hits: Atelectasis 0, Effusion 0, Pneumonia 0, Cardiomegaly 1" in text
    assert "negated hits:" in text


def test_describe_counts_the_runs_splits_and_warns(tmp_path, capsys):
    """Per split and target: the same counts a run's site reports, and the same warnings."""
    from chestfed.common.caveats import counts_from_info, split_warnings
    from chestfed.common.config import config_from_tree
    from chestfed.sites.data import load_site

    zero = {f: 0.0 for f in ("Cardiomegaly", "Effusion", "Consolidation", "Pneumonia", "Nodule", "Mass",
                             "Atelectasis", "Pneumothorax", "Edema")}
    cfg = config_from_tree({
        "experiment": "d", "data": {"image_size": 32, "cache_dir": str(tmp_path / "cache"), "workers": 1},
        "sites": [{"name": "s0", "kind": "phantom", "options": {"preset": "a", "population": {"size": 90}}},
                  {"name": "healthy", "kind": "phantom", "options": {
                      "preset": "a", "population": {"size": 60, "prevalence": zero},
                      "labeller": {"noise": 0.0}}}]}, "test")
    mod = load_launcher()
    task = cfg.task.task()
    for site in cfg.sites:
        d = mod.describe_site(site, task, cfg)
        run = counts_from_info(load_site(cfg, site, progress=False).summary())
        got = {k: {label: (c["pos"], c["neg"]) for label, c in v["labels"].items()}
               for k, v in d["splits"].items()}
        assert got == run
        assert d["warnings"] == split_warnings(site.name, run, 10)
    healthy = mod.describe_site(cfg.site("healthy"), task, cfg)
    assert healthy["warnings"][0].startswith("site healthy, train split: one class only for Abnormal (0+/")
    text = mod.format_site(healthy)
    assert "  splits (as a run makes them): train " in text
    assert "  Abnormal pos/neg per split: train 0/" in text
    assert "  warning: site healthy, test split: one class only for Abnormal" in text
    # the launcher, with eval.min_per_class raised: small splits at s0 too
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(cfg.to_yaml())
    assert mod.main(["--config", str(cfg_file), "--site", "s0", "eval.min_per_class=1000"]) == 0
    out = capsys.readouterr().out
    assert "warning: site s0, test split: fewer than 1000 (eval.min_per_class) positives or negatives " \
           "for Abnormal (" in out
    assert mod.main(["--config", str(cfg_file), "--json", "eval.min_per_class=0"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [s["warnings"][:1] for s in d["sites"]] == [[], [healthy["warnings"][0]]]
