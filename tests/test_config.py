import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from chestfed.common.config import DEFAULT_CONFIG, load_config
from chestfed.common.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    return f


def test_default_config_loads():
    cfg = load_config()
    assert cfg.strategy.name == "fedavg" and len(cfg.sites) == 3
    assert cfg.data.image_size == 64


def test_unknown_key_suggests(tmp_path):
    f = write(tmp_path, "sites: [{name: a, kind: phantom}]\ntrain: {lr: 0.1, batch_sise: 3}\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert str(f) in msg and "train.batch_sise" in msg and "did you mean 'train.batch_size'" in msg


def test_wrong_type_names_key(tmp_path):
    f = write(tmp_path, "sites: [{name: a, kind: phantom}]\nstrategy: {rounds: many}\n")
    with pytest.raises(ConfigError, match=r"strategy\.rounds"):
        load_config(f)


def test_missing_file_and_bad_strategy(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="did you mean 'fedavg'"):
        load_config(DEFAULT_CONFIG, strategy="fedavgg")


def test_overrides_and_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MYROOT", "/data/x")
    f = write(tmp_path, "sites: [{name: a, kind: csv, root: '${MYROOT}/y'}]\n")
    cfg = load_config(f, ["strategy.rounds=7", "sites.0.name=b"])
    assert cfg.strategy.rounds == 7 and cfg.sites[0].name == "b" and cfg.sites[0].root == "/data/x/y"
    monkeypatch.delenv("MYROOT")
    with pytest.raises(ConfigError, match=r"\$\{MYROOT\} is not set"):
        load_config(f)


def test_unknown_finding_in_task(tmp_path):
    f = write(tmp_path, "sites: [{name: a, kind: phantom}]\ntask: {type: multilabel, labels: [Efusion]}\n")
    with pytest.raises(ConfigError, match="did you mean 'Effusion'"):
        load_config(f)


@pytest.mark.parametrize("args, needle", [
    (["--strategy", "fedsgd"], "unknown strategy 'fedsgd'"),
    (["--config", "missing.yaml"], "not found"),
    (["train.lr=abc"], "train.lr"),
    (["trian.lr=0.1"], "did you mean 'train'"),
])
def test_launcher_bad_input_exits_2_and_writes_nothing(tmp_path, args, needle):
    out = tmp_path / "runs"
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "simulate.py"), *args,
                           f"output_dir={out}"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_recipes_fall_back_to_phantom_without_roots(monkeypatch):
    for var in ("NIH_ROOT", "CHEXPERT_ROOT", "PADCHEST_ROOT", "SHIFA_ROOT"):
        monkeypatch.delenv(var, raising=False)
    # the seed papers' recipes (tune_*.yaml are phantom studies with no real-data roots)
    recipes = sorted((REPO / "configs" / "recipes").glob("seed*.yaml"))
    assert len(recipes) >= 4
    for f in recipes:
        cfg = load_config(f)
        assert all(s.kind == "phantom" for s in cfg.sites), f
        # CPU-sized; Baltruschat et al.'s recipe is about its architecture and keeps
        # resnet50_large on a small phantom (about 4 minutes on 2 cores, README recipe table)
        keeps_arch = f.stem == "seed004_kfold_meta"
        assert cfg.fallbacks and cfg.data.image_size <= 64, f
        assert cfg.model.arch == ("resnet50_large" if keeps_arch else "smallcnn"), f


def test_recipe_uses_real_site_when_root_given_and_user_overrides_win(monkeypatch, tmp_path):
    monkeypatch.setenv("NIH_ROOT", str(tmp_path))
    monkeypatch.delenv("CHEXPERT_ROOT", raising=False)
    monkeypatch.delenv("SHIFA_ROOT", raising=False)
    f = REPO / "configs" / "recipes" / "seed002_sequential_stages.yaml"
    cfg = load_config(f, ["model.arch=resnet18"])
    kinds = {s.name: s.kind for s in cfg.sites}
    assert kinds == {"nih": "nih", "chexpert": "phantom", "shifa": "phantom"}
    assert cfg.sites[0].root == str(tmp_path)
    assert cfg.model.arch == "resnet18"  # not the recipe's CPU fallback
    assert cfg.strategy.sequential.order == ["nih", "chexpert", "shifa"]


def test_env_default_syntax(tmp_path, monkeypatch):
    monkeypatch.delenv("NOPE", raising=False)
    f = write(tmp_path, "sites: [{name: a, kind: csv, root: '${NOPE:-/x}'}]\n")
    assert load_config(f).sites[0].root == "/x"


def test_own_config_gets_the_demo_budget(tmp_path):
    """One source of defaults (issue 24): a config of one's own that leaves the budget out trains
    exactly as the demo does, and the budget line says where each value came from."""
    demo = load_config(None)
    own = tmp_path / "own.yaml"
    own.write_text("sites:\n  - {name: a, kind: phantom, options: {preset: a}}\n")
    mine = load_config(own)
    assert mine.budget()["values"] == demo.budget()["values"]
    assert demo.budget_line().startswith("budget: 6 rounds x 2 local epochs, lr 0.002 (cosine), "
                                         "pos_weight inverse_prevalence")
    cfg = load_config(own, ["train.lr=0.01"])
    b = cfg.budget()
    assert b["values"]["train.lr"] == 0.01 and "train.lr" not in b["schema_defaults"]
    assert {"strategy.rounds", "train.local_epochs", "train.lr_schedule",
            "train.pos_weight"} <= set(b["schema_defaults"])
    assert "from the schema's defaults (the demo's): strategy.rounds" in cfg.budget_line()
    # the demo file holds no second copy of the budget
    tree = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    assert "train" not in tree and "rounds" not in tree["strategy"]
