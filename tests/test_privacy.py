"""Privacy: DP-SGD at the sites (Opacus), epsilon accounting, site-level DP through Flower's
wrappers, SecAgg+, and the settings refused at config time."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chestfed.common.privacy import dp_sgd
from chestfed.common import privacy as dp
from chestfed.common.config import load_config
from chestfed.common.errors import ConfigError
from chestfed.common.models import build_model
from e2e import REPO, only_run, results, simulate, tiny_config

CPU = torch.device("cpu")


def _data(n: int = 48, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, size, size), dtype=torch.uint8, generator=g),
            torch.randint(0, 2, (n, 1), generator=g).float())


def _record_cfg(*extra: str):
    return load_config(None, ["privacy.dp.level=record", "model.width=4", "train.batch_size=16",
                              *extra], strategy="fedavg")


def _train(cfg, noise: float, clip: float, seed: int = 1) -> tuple[dict, dp_sgd.DPStats]:
    torch.manual_seed(0)
    model = build_model(cfg.model, 1)
    images, y = _data()
    stats = dp_sgd.train_epochs_dp(model, images, y, cfg.train, 1, seed, CPU, noise, clip)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, stats


def _change(after: dict, before: dict) -> float:
    return max(float((after[k] - before[k]).abs().max()) for k in after)


def test_record_dp_model_has_groupnorm_not_batchnorm() -> None:
    cfg = _record_cfg()
    assert cfg.model.norm == "group"
    model = build_model(cfg.model, 1)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())


def test_dp_sgd_clips_each_image_gradient() -> None:
    """Per-image gradients are far above a tiny clipping norm; clipped to it (no noise), the
    steps shrink to Adam's epsilon floor, while a norm of 10 lets them through."""
    cfg = _record_cfg()
    torch.manual_seed(0)
    before = build_model(cfg.model, 1).state_dict()
    images, y = _data()
    norms = dp_sgd.per_sample_grad_norms(build_model(cfg.model, 1), images[:8], y[:8])
    assert norms.min() > 1e-3  # what clipping to 1e-12 has to cut
    tiny, _ = _train(cfg, noise=0.0, clip=1e-12)
    loose, stats = _train(cfg, noise=0.0, clip=10.0)
    assert stats.steps >= 2 and 0 < stats.sample_rate < 1
    assert _change(tiny, before) < 1e-2 * _change(loose, before)


def test_dp_sgd_noise_changes_the_update_and_is_seeded() -> None:
    cfg = _record_cfg()
    a, _ = _train(cfg, noise=0.0, clip=1.0)
    b, _ = _train(cfg, noise=0.0, clip=1.0)
    c, _ = _train(cfg, noise=1.0, clip=1.0)
    assert _change(a, b) == 0.0  # same seed, same batches, no noise: identical
    assert _change(a, c) > 1e-4


def test_epsilon_finite_and_decreasing_with_noise() -> None:
    eps = [dp.epsilon([(z, 0.25, 40)], 1e-3) for z in (0.6, 1.0, 2.0, 4.0)]
    assert all(math.isfinite(e) and e > 0 for e in eps)
    assert eps == sorted(eps, reverse=True)
    assert dp.epsilon([(0.0, 0.25, 40)], 1e-3) == math.inf
    assert dp.epsilon([], 1e-3) == 0.0


def test_ledger_epsilon_matches_opacus_accountant_stepped_by_hand() -> None:
    """The coordinator's ledger (a history of each round's noise, rate and steps) gives what an
    Opacus RDP accountant stepped through every optimiser step gives."""
    from opacus.accountants import RDPAccountant

    from chestfed.server.privacy.ledger import PrivacyLedger

    cfg = _record_cfg("privacy.dp.noise_multiplier=1.3")
    ledger = PrivacyLedger(cfg)
    acc = RDPAccountant()
    rounds = [(0.25, 8), (0.25, 8), (0.25, 7)]
    row: dict = {}
    for q, steps in rounds:
        ledger.on_train("h", {dp.DP_NOISE: 1.3, dp.DP_SAMPLE_RATE: q, dp.DP_STEPS: steps,
                              dp.DP_N: 64, dp.DP_MAX_PER_PATIENT: 3}, row)
        for _ in range(steps):
            acc.step(noise_multiplier=1.3, sample_rate=q)
    expected = acc.get_epsilon(delta=1 / 64)
    assert row["dp_epsilon"] == pytest.approx(expected, rel=1e-9)
    assert row["dp_delta"] == pytest.approx(1 / 64)
    site = ledger.summary()["dp"]["sites"]["h"]
    assert site["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert site["steps"] == 23 and site["max_images_per_patient"] == 3
    geps, gdelta = dp.group_bound(expected, 1 / 64, 3)
    assert site["patient_epsilon"] == pytest.approx(3 * expected)
    assert gdelta == pytest.approx(min(1.0, 3 * math.exp(2 * expected) / 64))


def test_noise_for_epsilon_reaches_the_target() -> None:
    z = dp.noise_for_epsilon(3.0, 1e-3, 0.1, 100)
    assert dp.epsilon([(z, 0.1, 100)], 1e-3) == pytest.approx(3.0, abs=0.05)
    assert dp.noise_for_epsilon(math.inf, 1e-3, 0.1, 100) == 0.0


@pytest.mark.parametrize("overrides,strategy,words", [
    (["privacy.dp.level=site"], "pooled", "pooled"),
    (["privacy.dp.level=site"], "local", "aggregates"),
    (["privacy.dp.level=record"], "fedbn", "fedbn"),
    (["privacy.secagg=true"], "sequential", "secagg"),
    (["privacy.secagg=true", "privacy.dp.level=site"], "fedavg", "in the clear"),
    (["privacy.dp.level=record", "model.norm=batch"], "fedavg", "model.norm: group"),
])
def test_refusals_are_config_errors(overrides: list[str], strategy: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_config(None, overrides, strategy=strategy)


def test_refusal_from_the_launcher_is_one_line_exit_2(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "simulate.py"), "--config", str(cfg),
                           "--strategy", "pooled", "privacy.dp.level=site"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    lines = [x for x in (proc.stdout + proc.stderr).splitlines() if x.strip()]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1 and "pooled" in lines[0]
    assert not (tmp_path / "runs").exists()


# --- end to end (Flower's Simulation Engine) ----------------------------------------------------


@pytest.mark.e2e
def test_record_dp_fedavg_end_to_end(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, n_sites=2, size=60)
    proc = simulate(cfg, "--strategy", "fedavg", "privacy.dp.level=record",
                    "privacy.dp.noise_multiplier=1.0", "strategy.rounds=2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = only_run(tmp_path)
    pv = results(run)["privacy"]["dp"]
    assert pv["level"] == "record" and "GroupNorm" in pv["model_norm"]
    for site in ("site0", "site1"):
        s = pv["sites"][site]
        assert math.isfinite(s["epsilon"]) and s["epsilon"] > 0
        assert s["delta"] == pytest.approx(1 / s["n_train"])
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    eps = {(r["round"], r["site"]): r["dp_epsilon"] for r in rows if "dp_epsilon" in r}
    assert eps[(2, "site0")] > eps[(1, "site0")]  # the spend accumulates over rounds
    assert eps[(2, "site0")] == pytest.approx(pv["sites"]["site0"]["epsilon"])
    assert "## Privacy" in (run / "report.md").read_text()


@pytest.mark.e2e
def test_site_dp_end_to_end_with_flower_wrapper(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, n_sites=3, size=60)
    proc = simulate(cfg, "--strategy", "fedavg", "privacy.dp.level=site", "privacy.dp.mode=client",
                    "privacy.dp.noise_multiplier=0.8", "strategy.rounds=2", "eval.report=false")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pv = results(only_run(tmp_path))["privacy"]["dp"]
    assert pv["wrapper"].endswith("DifferentialPrivacyClientSideFixedClipping")
    assert pv["rounds"] == 2 and pv["sampling_rate"] == 1.0
    assert pv["epsilon"] == pytest.approx(dp.epsilon([(0.8, 1.0, 2)], 1 / 3))


def _wire_train_replies(run: Path) -> list[dict]:
    """The coordinator's audit of every training reply it received (wire.jsonl)."""
    wire = [json.loads(x) for x in (run / "wire.jsonl").read_text().splitlines()]
    return [r for r in wire if r["dir"] == "in" and r["type"] == "train"]


def _only_masked(run: Path) -> int:
    """Asserts that no training reply carried an array or a loss; returns how many carried a
    masked vector (a failed site's reply is an error and carries no records)."""
    masked = 0
    for r in _wire_train_replies(run):
        if "records" not in r:
            assert "error" in r, r
            continue
        for rec in r["records"].values():
            if rec["kind"] == "ArrayRecord":
                assert rec["items"] == {}, r
            assert "train-loss" not in rec["items"]
        masked += "masked_params" in r["records"].get("secaggplus_configs", {}).get("items", {})
    return masked


def _fedbn_config(folder: Path, rounds: int) -> Path:
    return tiny_config(folder, n_sites=3, size=60, strategy={"rounds": rounds, "min_sites": 1},
                       eval={"bootstrap": 0, "report": False, "every": 1})


def _fedbn_runs(tmp_path: Path, modes: tuple[str, ...], rounds: int) -> dict[str, Path]:
    runs = {}
    for mode in modes:
        folder = tmp_path / mode
        folder.mkdir()
        proc = simulate(_fedbn_config(folder, rounds), "--strategy", "fedbn",
                        f"privacy.secagg={str(mode == 'secagg').lower()}")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        runs[mode] = only_run(folder)
    return runs


@pytest.mark.e2e
def test_secagg_fedbn_equals_plain_fedbn_and_only_masked_shared_layers_cross(tmp_path: Path) -> None:
    """FedBN under SecAgg+: only the shared (non-BatchNorm) layers are masked and summed; each
    site keeps and is scored with its own BatchNorm, as in plain FedBN. (FedAvg's equality with
    plain FedAvg is the dropout test's: its survivors' model is plain FedAvg's over them.)
    One round: the tolerance is the quantisation's per round (later rounds amplify it)."""
    runs = _fedbn_runs(tmp_path, ("plain", "secagg"), rounds=1)
    a, b = _model(runs["plain"]), _model(runs["secagg"])
    assert a.keys() == b.keys() and not [k for k in a if "running_mean" in k]  # no BatchNorm held
    _same_within_quantisation(a, b)
    res = {m: results(runs[m]) for m in runs}
    assert res["secagg"]["privacy"]["secagg"] is True
    assert res["secagg"]["models"]["fedbn"]["local_batchnorm"] is True
    for site, cell in res["plain"]["matrix"]["fedbn"].items():  # scored with each site's own BN
        got = res["secagg"]["matrix"]["fedbn"][site]["metrics"]["macro_auroc"]
        assert got == pytest.approx(cell["metrics"]["macro_auroc"], abs=2e-3), site
    assert _only_masked(runs["secagg"]) == 3  # one masked update per site (one round)
    rows = [json.loads(x) for x in (runs["secagg"] / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["site"] for r in rows if r.get("secagg")) == ["site0", "site1", "site2"]
    assert not [r for r in rows if r.get("secagg") and "train_loss" in r]


# --- SecAgg+ with sites dropping out (tests/failing_sites.py fails a named site) ---------------


def _model(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "latest.pt", weights_only=True)["model"]


def _same_within_quantisation(a: dict, b: dict) -> None:
    for k in a:
        if a[k].dtype.is_floating_point:  # SecAgg+ quantises to 16 / 2^22 per entry and site
            assert float((a[k] - b[k]).abs().max()) < 2e-5, k
        else:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.e2e
def test_secagg_tolerates_a_site_dropping_in_training_or_before_its_key_exchange(tmp_path: Path) -> None:
    """Three sites, SecAgg+'s threshold 2: site1's training fails (after the key exchange), or
    site1 is gone at the setup stage (which Flower 1.41 alone cannot survive: secagg.py's
    Workflow). Either way the round completes without it, the dropout is recorded and said once,
    and the model is plain FedAvg's over the two surviving sites (site1 failing there too)."""
    runs = {}
    for mode, failing in (("plain", "site1"), ("training", "site1"), ("setup", "site1:setup")):
        folder = tmp_path / mode
        folder.mkdir()
        cfg = tiny_config(folder, n_sites=3, size=60)
        proc = simulate(cfg, "--strategy", "fedavg", f"privacy.secagg={str(mode != 'plain').lower()}",
                        "eval.report=false", "eval.every=0", failing=failing)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        runs[mode] = only_run(folder)
        said = [ln for ln in proc.stdout.splitlines() if "dropped out" in ln]
        assert len(said) == 1 and said[0].startswith("site site1 dropped out (site 'site1': "), said
    for mode in ("training", "setup"):
        res = results(runs[mode])
        assert res["privacy"]["secagg"] is True
        assert {(d["round"], d["site"]) for d in res["dropouts"]} == {(1, "site1")}, res["dropouts"]
        rows = [json.loads(x) for x in (runs[mode] / "metrics.jsonl").read_text().splitlines()]
        assert sorted(r["site"] for r in rows if r.get("secagg")) == ["site0", "site2"]
        _same_within_quantisation(_model(runs["plain"]), _model(runs[mode]))
    # The coordinator's audit: every training reply holds a masked vector and no array or loss.
    assert _only_masked(runs["training"]) == 2  # site0 and site2; site1 failed before masking


@pytest.mark.e2e
def test_secagg_below_its_threshold_fails_on_one_line(tmp_path: Path) -> None:
    """Two of three sites fail their training: one survivor is below SecAgg+'s threshold (2), so
    nothing can be unmasked; the run fails, saying so on one line that names both sites."""
    cfg = tiny_config(tmp_path, n_sites=3, size=60)
    proc = simulate(cfg, "--strategy", "fedavg", "privacy.secagg=true", "eval.report=false",
                    "eval.every=0", failing="site0,site2")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("chestfed: ")]
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert "round 1: SecAgg+ could not unmask the sum: 1 of 3 sites" in line, line
    assert "reconstruction threshold is 2" in line, line
    assert "site0: site 'site0': train images unreadable" in line, line
    assert "site2: site 'site2': train images unreadable" in line, line
    run = only_run(tmp_path)
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    assert not (run / "checkpoints" / "latest.pt").exists()


@pytest.mark.e2e
def test_secagg_run_killed_after_round_1_resumes_from_round_2(tmp_path: Path) -> None:
    """`--resume` continues a SecAgg+ run (FedBN's, whose sites keep their BatchNorm on their own
    disk) after its last completed round (each round's keys and masks are fresh, so only the
    global weights need keeping). The sites quantise with stochastic rounding, so the resumed
    model equals an uninterrupted SecAgg+ run's within what two rounds of that rounding move,
    far below one round of training (checked)."""
    import os

    want = _model(_fedbn_runs(tmp_path, ("secagg",), rounds=2)["secagg"])
    tmp_path = tmp_path / "killed"
    tmp_path.mkdir()

    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "simulate.py"), "--config",
                           str(_fedbn_config(tmp_path, 2)), "--strategy", "fedbn", "privacy.secagg=true"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**env, "CHESTFED_KILL_AFTER_CHECKPOINT": "1"})
    run = only_run(tmp_path)
    assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "round 1/2" in proc.stdout and "round 2/2" not in proc.stdout
    after_1 = _model_in(run / "checkpoints" / "latest.pt")
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "simulate.py"), "--resume",
                           str(run)], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"resuming {run} after round 1/2 of fedbn" in proc.stdout, proc.stdout
    trained = [ln.split()[1] for ln in proc.stdout.splitlines() if ln.startswith("round ")]
    assert trained == ["2/2"], proc.stdout  # round 1 is not trained again
    got = _model(run)
    moved = max(float((want[k] - after_1[k]).abs().max()) for k in want if want[k].is_floating_point())
    gap = max(float((want[k] - got[k]).abs().max()) for k in want if want[k].is_floating_point())
    assert gap < 1e-3 < moved, (gap, moved)  # round 2 moved the weights; the resume followed it
    assert results(run)["models"]["fedbn"]["local_batchnorm"] is True


def _model_in(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]
