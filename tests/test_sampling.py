"""Large federations: a phantom federation of any size from one option (`population.sites`),
client sampling per round (`strategy.fraction`, `strategy.fraction_evaluate`) with the budget
counted per sampled site, and site workers whose memory does not grow with the federation."""
from __future__ import annotations

import json

import pytest
import yaml

from chestfed.common.config import config_from_yaml, load_config
from chestfed.common.errors import ConfigError
from chestfed.sites import data as site_data
from e2e import only_run, results, simulate, tiny_config


def test_population_makes_n_distinct_phantom_hospitals():
    cfg = load_config(None, ["population.sites=12", "population.size=40"])
    assert [s.name for s in cfg.sites][:3] == ["site000", "site001", "site002"] and len(cfg.sites) == 12
    assert {s.kind for s in cfg.sites} == {"phantom"}
    assert [s.options["preset"] for s in cfg.sites[:4]] == ["a", "b", "c", "a"]
    assert len({s.options["seed"] for s in cfg.sites}) == 12  # each its own draw
    assert {s.options["population"]["size"] for s in cfg.sites} == {40}
    # the YAML a run folder keeps (and a site is sent) names the sites, and reloads as is
    tree = yaml.safe_load(cfg.to_yaml())
    assert "population" not in tree and len(tree["sites"]) == 12
    assert config_from_yaml(cfg.to_yaml()).sites == cfg.sites


@pytest.mark.parametrize("override, said", [
    ("population.sites=0", "population.sites: Input should be greater than or equal to 1"),
    ("population.size=5", "population.sites: missing"),
    ("population.presets=[]", "population.sites: missing"),
])
def test_a_wrong_population_is_one_line_naming_its_key(override, said):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert said in str(err.value) and "\n" not in str(err.value)


def test_a_worker_keeps_only_the_newest_sites_it_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr(site_data, "MAX_LOADED_SITES", 3)
    site_data._LOADED.clear()
    cfg = load_config(None, ["population.sites=5", "population.size=20", "data.image_size=16",
                             f"data.cache_dir={tmp_path / 'cache'}"])
    for site in cfg.sites:
        site_data.load_site(cfg, site, progress=False)
    site_data.load_site(cfg, cfg.sites[2], progress=False)  # used again: kept
    names = [d.name for d in site_data._LOADED.values()]
    assert names == ["site003", "site004", "site002"]
    site_data._LOADED.clear()


@pytest.mark.e2e
def test_a_sampled_round_trains_and_validates_only_its_sample_and_the_budget_says_so(tmp_path):
    config = tiny_config(tmp_path, n_sites=0, size=40,
                         population={"sites": 6, "size": 40},
                         strategy={"rounds": 3, "min_sites": 2, "fraction": 0.34,
                                   "fraction_evaluate": 0.34},
                         eval={"every": 1, "bootstrap": 0, "report": False})
    simulate(config, "--strategy", "fedavg")
    run = only_run(tmp_path)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    trained = {k: {r["site"] for r in rows if r["round"] == k and "train_loss" in r} for k in (1, 2, 3)}
    validated = {k: {r["site"] for r in rows if r["round"] == k and "val_loss" in r} for k in (1, 2, 3)}
    assert all(len(v) == 2 for v in trained.values()), trained  # 34 % of 6, per round
    assert all(len(v) == 2 for v in validated.values()), validated
    assert len(set().union(*trained.values())) > 2  # a new sample each round
    res = results(run)
    assert res["budget"]["site_trainings"] == 6 and res["budget"]["sites_per_round"] == 2
    assert res["budget"]["images_processed"] == sum(r["images"] for r in rows if "images" in r)
    # the final evaluation still scores the model at every one of the six hospitals
    assert sorted(res["matrix"]["fedavg"]) == [f"site{i:03d}" for i in range(6)]
