"""launch/explain.py: Grad-CAM panels (pytorch-grad-cam) of a run's model on a site's images."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from chestfed.common.config import config_from_tree
from chestfed.common.models import build_model, is_batchnorm_key

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def explain():
    pytest.importorskip("pytorch_grad_cam", reason="grad-cam is not installed (pip install grad-cam)")
    import chestfed.launch.explain as mod

    return mod


def make_run(tmp_path: Path, fedbn: bool = False) -> Path:
    tree = {"experiment": "x", "seed": 0, "task": {"type": "multilabel", "labels": ["Cardiomegaly", "Effusion"]},
            "data": {"image_size": 32, "cache_dir": str(tmp_path / "cache"), "workers": 1},
            "sites": [{"name": "clinic", "kind": "phantom",
                       "options": {"preset": "a", "population": {"size": 80}}}],
            "model": {"width": 4}}
    cfg = config_from_tree(tree, "test")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    torch.manual_seed(0)
    net = build_model(cfg.model, 2)
    state = net.state_dict()
    if fedbn:
        state = {k: v for k, v in state.items() if not is_batchnorm_key(k, net)}
    torch.save({"model": state, "meta": {}}, run / "checkpoints" / "m.pt")
    (run / "results.json").write_text(json.dumps({
        "models": {"m": {"trained_on": ["clinic"], "checkpoint": "checkpoints/m.pt", "local_batchnorm": fedbn}},
        "thresholds": {"m": {"Cardiomegaly": {"threshold": 0.0}, "Effusion": {"threshold": None}}}}))
    return run


def test_explain_writes_panels_for_the_top_images(tmp_path, explain, capsys):
    run = make_run(tmp_path)
    assert explain.main(["--run", str(run), "--site", "clinic", "--n", "3"]) == 0
    out = run / "explain" / "clinic" / "m"
    panels = sorted(out.glob("*.png"))
    assert [p.name[:3] for p in panels] == ["01_", "02_", "03_"]
    from PIL import Image

    img = np.asarray(Image.open(panels[0]).convert("RGB"))
    assert img.shape[1] > img.shape[0] > 100  # image + one heatmap per predicted finding
    assert img.std() > 5
    index = (out / "index.md").read_text()
    # Cardiomegaly's deployable threshold is 0 here, so it is always a predicted finding
    assert index.count("Cardiomegaly") >= 3 and "stay there" in index
    assert "checkpoint's BatchNorm" in index
    assert "3 panel(s)" in capsys.readouterr().out


def test_explain_fedbn_checkpoint_reestimates_batchnorm(tmp_path, explain):
    run = make_run(tmp_path, fedbn=True)
    assert explain.main(["--run", str(run), "--site", "clinic", "--n", "1"]) == 0
    index = (run / "explain" / "clinic" / "m" / "index.md").read_text()
    assert "re-estimated" in index


def test_explain_names_what_is_wrong(tmp_path, explain, capsys):
    run = make_run(tmp_path)
    assert explain.main(["--run", str(run), "--site", "nowhere"]) == 2
    assert "no site named 'nowhere'" in capsys.readouterr().err
    assert explain.main(["--run", str(run), "--site", "clinic", "--model", "zzz"]) == 2
    assert "no model 'zzz'" in capsys.readouterr().err
    assert explain.main(["--run", str(tmp_path / "missing"), "--site", "clinic"]) == 2
