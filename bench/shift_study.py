#!/usr/bin/env python
"""Which dataset shift hurts which strategy? One kind of shift switched on at a time, several seeds.

Three phantom hospitals start identical in kind (preset a's population, acquisition and
labeller; each its own seed, so its own patients). Each condition then gives sites 2 and 3 one
knob of presets b and c only:
  none         no shift (the reference)
  acquisition  b's / c's contrast curve, noise, blur, collimation, rotation, marker (covariate)
  prevalence   b's / c's finding prevalences (prior)
  labeller     b's / c's thresholds, label noise and unannotated findings (concept)
  shortcut     site 3 draws a chest drain with pneumothorax (a spurious device)
Site 1 is the same in every condition (same patients, same test images), so its column is the
one place where conditions are compared on identical test data.

For every condition it runs launch/compare.py over the strategies and seeds, then reports per
strategy x condition, as mean ± sd over seeds: all-domain, in-domain, out-of-domain AUROC, the
gap and the AUROC at site 1; whether validation loss / AUROC had flattened (from each run's
metrics.jsonl, criterion in `flattened`); and an effect only where a difference exceeds the seed
spread (`effect`). Writes bench/results/shift_study.json, shift_study.md and
shift_study_curves.png (the comparison folders go under runs/shift-study/).

    python bench/shift_study.py [--strategies local,pooled,sequential,fedavg,fedbn] [--seeds 3]
        [--size 300] [--rounds 20] [--budget fedavg=22,fedbn=22] [--local-epochs 2]
        [--lr-schedule plateau] [--plateau-patience 1] [--batch-size 16] [--lr 0.002]
        [--width 8] [--jobs 2] [--dry-run] [--from-json F]
The defaults are the settings of the README's run (commit 969ce3f, with --conditions
none,acquisition,labeller: validation curves flat in 14 of 15 cells).
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from chestfed.server.report.strategy_summary import final_models, run_summary  # noqa: E402
from chestfed.server.evaluation.matrix import cell_value  # noqa: E402
from chestfed.sites.phantom.spec import load_preset  # noqa: E402

DEFAULT_STRATEGIES = "local,pooled,sequential,fedavg,fedbn"
CONDITIONS = ("none", "acquisition", "prevalence", "labeller", "shortcut")
REFERENCE = "none"
STATS = ("all_domain", "in_domain", "out_domain", "gap", "site1", "gain")
# Personalised methods (one model per site, `<method>-<site>`): their in-domain AUROC is each
# site's own model at its own site, out-of-domain that model at the other sites, and the gain
# own - the method's global model at that site (results.json `personalisation`); a method
# without a global model (FedPer, FedRep, FENDA-FL, MR-MTL) is measured against FedAvg of the
# same seed and condition instead, where the study ran FedAvg.
PERSONAL = ("finetune", "ditto", "fedper", "fedrep", "apfl", "mrmtl", "fenda")
GAIN_REFERENCE = "fedavg"
GAIN_MARK = {"global": " (g)", GAIN_REFERENCE: " (f)"}  # the table's note of what a gain is against
# Flattened: over the last half of the evaluation points, a Theil-Sen line predicts a fall of
# validation loss smaller than LOSS_TOL (relative) or its round-to-round noise, and a rise of
# validation AUROC smaller than AUC_TOL (absolute) or its noise. Judged on the curve averaged over
# sites and seeds, and counted per run.
LOSS_TOL = 0.02
AUC_TOL = 0.01
# Effect: |difference of seed means| > EFFECT_K x the pooled seed sd (sqrt of the mean variance).
EFFECT_K = 2.0
# Strategy pairs compared within each condition (besides every strategy vs its own reference
# condition): every strategy vs pooled, and these.
PAIRS = (("fedbn", "fedavg"), ("sequential", "fedavg"), ("local", "fedavg"))


def site_options(condition: str, preset: str, size: int, seed: int) -> dict:
    """Preset a, with one section taken from `preset` according to the condition."""
    other = load_preset(preset)
    opts: dict[str, Any] = {"preset": "a", "seed": seed, "population": {"size": size}}
    if condition == "acquisition":
        opts["acquisition"] = other["acquisition"]
    elif condition == "prevalence":
        opts["population"]["prevalence"] = other["population"]["prevalence"]
    elif condition == "labeller":
        opts["labeller"] = other["labeller"]
    elif condition == "shortcut" and other.get("shortcut"):
        opts["shortcut"] = other["shortcut"]
    return opts


def config(condition: str, args: argparse.Namespace, out: Path) -> Path:
    size = args.size
    sites = [{"name": "site1", "kind": "phantom", "options": site_options("none", "a", size, 11)},
             {"name": "site2", "kind": "phantom", "options": site_options(condition, "b", size, 12)},
             {"name": "site3", "kind": "phantom", "options": site_options(condition, "c", size, 13)}]
    cfg = {"experiment": f"shift-{condition}", "output_dir": str(REPO / "runs" / "shift-study"),
           # training seeds vary (seed=K per comparison); the patients' split stays seed 0's
           "data": {"image_size": 64, "split": {"seed": 0}}, "sites": sites, "model": {"arch": "smallcnn", "width": args.width},
           "train": {"local_epochs": args.local_epochs, "batch_size": args.batch_size, "lr": args.lr,
                     "lr_schedule": args.lr_schedule, "pos_weight": args.pos_weight,
                     "plateau_patience": args.plateau_patience},
           "strategy": {"rounds": args.rounds},
           # per-round validation every round; the final scoring without bootstrap CIs, pairwise
           # tests or report (the study reads results.json and metrics.jsonl only)
           "eval": {"every": 1, "bootstrap": 0, "pairs": "none", "report": False,
                    # per-round curves on each site's own BatchNorm statistics of the round's
                    # weights: the running averages lag and made late rounds look like progress
                    "round_batchnorm": "site"},
           "wandb": {"enabled": False, "mode": "disabled"}}
    f = out / f"shift-{condition}.yaml"
    f.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return f


# Rounds where --budget is not given, for the strategies chosen: fedavg / fedbn average
# updates from sites that drift apart within a round, and needed a few more rounds to settle.
DEFAULT_BUDGET = {"fedavg": 22, "fedbn": 22}


def budgets(args: argparse.Namespace, strategies: Sequence[str]) -> dict[str, int]:
    """Rounds per strategy: --rounds, unless --budget (or DEFAULT_BUDGET) names the strategy."""
    out = {s: args.rounds for s in strategies}
    given = args.budget if args.budget is not None else ",".join(
        f"{k}={v}" for k, v in DEFAULT_BUDGET.items() if k in out)
    for item in filter(None, given.split(",")):
        name, _, rounds = item.partition("=")
        if name not in out or not rounds.isdigit():
            raise SystemExit(f"--budget: '{item}' is not STRATEGY=ROUNDS for a chosen strategy")
        out[name] = int(rounds)
    return out


# --- reading one run ---------------------------------------------------------------------------

def curve(run_dir: Path, strategy: str, local_epochs: int, n_sites: int) -> dict[str, list[float]]:
    """Per evaluation point: epochs over each site's data so far, and validation loss / AUROC
    averaged over the rows of that round (every site's score of the round's model(s)).
    Sequential records one step per site visit; only cycle ends (the model has seen every site
    once more) are kept, so its points line up with the other strategies' rounds."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    loss, auc = defaultdict(list), defaultdict(list)
    for r in rows:
        if r.get("val_loss") is None or r["val_loss"] != r["val_loss"]:
            continue
        loss[r["round"]].append(r["val_loss"])
        if r.get("val_auroc") is not None and r["val_auroc"] == r["val_auroc"]:
            auc[r["round"]].append(r["val_auroc"])
    points = sorted(loss)
    if strategy == "sequential":
        points = [p for p in points if p % n_sites == 0]
        epochs = [p // n_sites * local_epochs for p in points]
    else:
        epochs = [p * local_epochs for p in points]
    return {"epochs": epochs, "val_loss": [float(np.mean(loss[p])) for p in points],
            "val_auroc": [float(np.mean(auc[p])) if auc[p] else math.nan for p in points]}


def trend(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Change over the last half of the points predicted by a Theil-Sen line (NaN if < 3)."""
    n = len(ys)
    k = max(3, math.ceil(n / 2))
    if n < 3:
        return math.nan
    x = np.asarray(xs[-k:], dtype=float)
    y = np.asarray(ys[-k:], dtype=float)
    ok = ~np.isnan(y)
    if ok.sum() < 3:
        return math.nan
    from scipy.stats import theilslopes

    slope = theilslopes(y[ok], x[ok])[0]  # median of pairwise slopes: one BN spike does not tip it
    return float(slope * (x[-1] - x[0]))


def noise(ys: Sequence[float]) -> float:
    """Round-to-round noise of a curve: a robust sd of one point from the median absolute
    difference of consecutive points (1.4826 MAD / sqrt 2); a trend moves it little."""
    y = np.asarray([v for v in ys if v == v], dtype=float)
    if len(y) < 3:
        return math.nan
    return float(1.4826 * np.median(np.abs(np.diff(y))) / math.sqrt(2))


def flattened(c: dict[str, list[float]]) -> dict[str, Any]:
    """The convergence check. Over the last half of the evaluation points a Theil-Sen line must
    predict a fall in validation loss smaller than LOSS_TOL of its level or than the curve's
    round-to-round noise, whichever is larger, and a rise in validation AUROC smaller than
    AUC_TOL or its noise. So 'flat' means: no improvement left that stands out of the noise."""
    loss, auc, ep = c["val_loss"], c["val_auroc"], c["epochs"]
    if len(loss) < 3:
        return {"loss_trend": math.nan, "loss_noise": math.nan, "auroc_trend": math.nan,
                "auroc_noise": math.nan, "loss_flat": False,
                "auroc_flat": False, "flat": False, "loss_rising": False}
    level = float(np.nanmean(loss[-max(3, math.ceil(len(loss) / 2)):]))
    lt = trend(ep, loss) / level
    at = trend(ep, auc)
    ln, an = noise(loss) / level, noise(auc)
    loss_flat = not (lt < -max(LOSS_TOL, ln if ln == ln else 0.0))
    auroc_flat = not (at > max(AUC_TOL, an if an == an else 0.0))  # NaN AUROC: loss decides
    return {"loss_trend": lt, "loss_noise": ln, "auroc_trend": at, "auroc_noise": an,
            "loss_flat": bool(loss_flat), "auroc_flat": bool(auroc_flat),
            "flat": bool(loss_flat and auroc_flat), "loss_rising": bool(lt > max(0.05, ln)),
            "best_loss_epoch": ep[int(np.nanargmin(loss))],
            "final_over_best": float(np.nanmean(loss[-3:]) / np.nanmin(loss) - 1)}


def site_mean(results: dict, site: str) -> float:
    vals = [cell_value(results["matrix"][m].get(site)) for m in final_models(results)
            if results["matrix"][m].get(site)]
    vals = [v for v in vals if v == v]
    return float(np.mean(vals)) if vals else math.nan


def read_run(run: dict, local_epochs: int, n_sites: int) -> dict[str, Any] | None:
    d = Path(run["run"])
    if run.get("status") != "complete" or not (d / "results.json").is_file():
        return None
    res = json.loads((d / "results.json").read_text())
    s = run_summary(res)
    c = curve(d, run["strategy"], local_epochs, n_sites)
    own = (res.get("personalisation") or {}).get(run["strategy"]) or {}
    gain = own.get("mean_gain", math.nan) if own.get("global_model") else math.nan
    return {"seed": run["seed"], "seconds": run.get("seconds"), "run": str(d),
            "all_domain": s["all_domain"], "in_domain": s["in_domain"], "out_domain": s["out_domain"],
            "gap": s["gap"], "site1": site_mean(res, "site1"), "gain": gain,
            "gain_against": "global" if gain == gain else None, "curve": c, "check": flattened(c)}


def fill_gains(per: dict[str, list[dict]]) -> None:
    """A personalised method without a global model: its gain per seed is its in-domain AUROC
    minus FedAvg's (same seed and condition), i.e. the mean over sites of own model - FedAvg."""
    ref = {r["seed"]: r["in_domain"] for r in per.get(GAIN_REFERENCE, [])}
    for method in PERSONAL:
        for r in per.get(method, []):
            if r["gain_against"] is None and r["seed"] in ref:
                r["gain"], r["gain_against"] = r["in_domain"] - ref[r["seed"]], GAIN_REFERENCE


# --- statistics --------------------------------------------------------------------------------

def mean_sd(xs: Sequence[float]) -> tuple[float, float, int]:
    xs = [x for x in xs if x is not None and x == x]
    if not xs:
        return math.nan, math.nan, 0
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else math.nan, len(xs)


def effect(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """a - b over seeds: the difference, the pooled seed sd, Welch's p, and whether
    |difference| > EFFECT_K x pooled sd (the study's 'exceeds the seed spread')."""
    ma, sa, na = mean_sd(a)
    mb, sb, nb = mean_sd(b)
    diff = ma - mb
    if na < 2 or nb < 2 or diff != diff:
        return {"diff": diff, "sd": math.nan, "p": math.nan, "effect": False, "n": [na, nb]}
    sd = math.sqrt((sa ** 2 + sb ** 2) / 2)
    from scipy import stats

    p = float(stats.ttest_ind([x for x in a if x == x], [x for x in b if x == x],
                              equal_var=False).pvalue) if sd > 0 else (0.0 if diff else 1.0)
    return {"diff": diff, "sd": sd, "p": p, "effect": bool(abs(diff) > EFFECT_K * sd), "n": [na, nb]}


def mean_curve(curves: list[dict[str, list[float]]], key: str) -> dict[str, list[float]]:
    n = min(len(c["epochs"]) for c in curves)
    ys = np.array([c[key][:n] for c in curves], dtype=float)
    sd = ys.std(axis=0, ddof=1) if len(curves) > 1 else np.full(n, np.nan)
    return {"epochs": curves[0]["epochs"][:n], "mean": ys.mean(axis=0).tolist(), "sd": sd.tolist()}


def summarize(runs: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {"seeds": [r["seed"] for r in runs], "values": {}, "stats": {}}
    for k in STATS:
        vals = [r[k] for r in runs]
        out["values"][k] = vals
        m, s, n = mean_sd(vals)
        out["stats"][k] = {"mean": m, "sd": s, "n": n}
    curves = [r["curve"] for r in runs if r["curve"]["epochs"]]
    if curves:
        out["curve"] = {"val_loss": mean_curve(curves, "val_loss"),
                        "val_auroc": mean_curve(curves, "val_auroc")}
        mc = {"epochs": out["curve"]["val_loss"]["epochs"], "val_loss": out["curve"]["val_loss"]["mean"],
              "val_auroc": out["curve"]["val_auroc"]["mean"]}
        out["check"] = flattened(mc)
    out["gain_against"] = sorted({r["gain_against"] for r in runs if r.get("gain_against")})
    out["runs_flat"] = sum(r["check"]["flat"] for r in runs)
    out["runs_loss_flat"] = sum(r["check"]["loss_flat"] for r in runs)
    out["runs"] = [{k: v for k, v in r.items() if k != "curve"} for r in runs]
    return out


def effects(table: dict[str, dict[str, Any]], strategies: Sequence[str]) -> list[dict[str, Any]]:
    """Every strategy: each shifted condition vs the reference (all-domain and site-1 AUROC);
    within each condition: every strategy vs pooled and PAIRS (all-domain); local's gap vs 0."""
    found = []

    def add(kind: str, what: str, stat: str, a: Sequence[float], b: Sequence[float]) -> None:
        e = effect(a, b)
        found.append({"kind": kind, "what": what, "stat": stat, **e})

    def add_vs_zero(kind: str, what: str, values: Sequence[float] | None) -> None:
        """One mean against 0 over seeds (a gap, a gain): the stat is the kind."""
        xs = [x for x in values or [] if x == x]
        if len(xs) >= 2:
            m, sd, _ = mean_sd(xs)
            found.append({"kind": kind, "what": what, "stat": kind, "diff": m, "sd": sd,
                          "p": _one_sample_p(xs), "effect": bool(abs(m) > EFFECT_K * sd),
                          "n": [len(xs)]})

    for s in strategies:
        ref = table.get(REFERENCE, {}).get(s)
        for cond, row in table.items():
            if cond == REFERENCE or s not in row or ref is None:
                continue
            for stat in ("all_domain", "site1"):
                add("shift", f"{s}: {cond} - {REFERENCE}", stat, row[s]["values"][stat],
                    ref["values"][stat])
    for cond, row in table.items():
        pairs = [(s, "pooled") for s in strategies if s != "pooled"] + list(PAIRS)
        for a, b in pairs:
            if a in row and b in row:
                add("strategy", f"{cond}: {a} - {b}", "all_domain", row[a]["values"]["all_domain"],
                    row[b]["values"]["all_domain"])
        for a in PERSONAL:
            for b in ("fedavg", "local"):
                if a in row and b in row:
                    add("personal", f"{cond}: {a} - {b}", "in_domain", row[a]["values"]["in_domain"],
                        row[b]["values"]["in_domain"])
            if a in row:
                add_vs_zero("gain", f"{cond}: {a} personalisation gain", row[a]["values"].get("gain"))
        for s in row:
            add_vs_zero("gap", f"{cond}: {s} gap", row[s]["values"]["gap"])
    return found


def _one_sample_p(xs: Sequence[float]) -> float:
    from scipy import stats

    return float(stats.ttest_1samp(xs, 0.0).pvalue) if np.std(xs) > 0 else math.nan


# --- output ------------------------------------------------------------------------------------

def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = list(result["conditions"])
    strategies = result["strategies"]
    colors = dict(zip(strategies, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(2, len(conds), figsize=(3.1 * len(conds), 5.2), sharex=True,
                             sharey="row", squeeze=False)
    for j, cond in enumerate(conds):
        for i, key in enumerate(("val_loss", "val_auroc")):
            ax = axes[i][j]
            for s in strategies:
                row = result["conditions"][cond]["strategies"].get(s)
                if not row or "curve" not in row:
                    continue
                c = row["curve"][key]
                x, m, sd = np.array(c["epochs"]), np.array(c["mean"]), np.nan_to_num(np.array(c["sd"]))
                ax.plot(x, m, color=colors[s], label=s, linewidth=1.4)
                ax.fill_between(x, m - sd, m + sd, color=colors[s], alpha=0.15, linewidth=0)
            if i == 0:
                ax.set_title(cond, fontsize=10)
            else:
                ax.set_xlabel("epochs over each site's data", fontsize=8)
            if j == 0:
                ax.set_ylabel("validation loss" if key == "val_loss" else "validation AUROC", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"Validation loss and AUROC per round, mean over sites and seeds "
                 f"({result['seeds']}); band ± sd over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def _pm(st: dict[str, Any], signed: bool = False) -> str:
    m, s = st["mean"], st["sd"]
    if m != m:
        return "n/a"
    txt = f"{m:+.3f}" if signed else f"{m:.3f}"
    return txt + (f" ± {s:.3f}" if s == s else "")


def _table(result: dict[str, Any], cell: Any, missing: str = "failed") -> list[str]:
    """A condition x strategy Markdown table; `cell(entry)` formats one strategy's entry."""
    strategies = result["strategies"]
    lines = ["| shift switched on | " + " | ".join(strategies) + " |",
             "|---|" + "---|" * len(strategies)]
    for cond, data in result["conditions"].items():
        row = data["strategies"]
        lines.append(f"| {cond} | " + " | ".join(cell(row[s]) if s in row else missing
                                                for s in strategies) + " |")
    return lines


def _all_domain_cell(r: dict[str, Any]) -> str:
    txt = _pm(r["stats"]["all_domain"])
    if r["stats"]["gap"]["mean"] == r["stats"]["gap"]["mean"]:
        txt += f" ({_pm(r['stats']['gap'], signed=True)})"
    return txt


def _convergence_cell(r: dict[str, Any]) -> str:
    if "check" not in r:
        return "n/a"
    c = r["check"]
    mark = "flat" if c["flat"] else ("loss still falling" if not c["loss_flat"] else "AUROC still rising")
    if c.get("loss_rising"):
        mark += " ↑"
    return (f"{mark} (loss {c['loss_trend']:+.1%} ± {c['loss_noise']:.1%}, AUROC "
            f"{c['auroc_trend']:+.3f} ± {c['auroc_noise']:.3f}; {r['runs_flat']}/{len(r['runs'])})")


def markdown(result: dict[str, Any]) -> str:
    strategies, conds = result["strategies"], list(result["conditions"])
    cfg = result["settings"]
    lines = [
        "# Shift study (bench/shift_study.py)", "",
        f"Commit `{result['commit']}`{' (with uncommitted changes)' if result['dirty'] else ''}; "
        f"{len(result['seeds_used'])} seeds ({', '.join(map(str, result['seeds_used']))}); "
        f"{cfg['size']} images per site at 64 px, smallcnn (width {cfg['width']}), Adam lr {cfg['lr']} "
        f"({cfg.get('lr_schedule', 'constant')} schedule"
        f"{', x0.1 after %d evaluations without a lower validation loss' % cfg['plateau_patience'] if cfg.get('lr_schedule') == 'plateau' else ''}), BCE pos_weight {cfg.get('pos_weight', 'none')}, "
        f"batch {cfg['batch_size']}, {cfg['local_epochs']} local epoch(s) per round; rounds per "
        f"strategy: {', '.join(f'{s} {r}' for s, r in cfg['rounds'].items())} (each site's data "
        f"is seen rounds x local epochs times; see bench/README.md for how the budgets were "
        f"chosen). Wall time "
        f"{result['wall_seconds'] / 60:.0f} min for {result['n_runs']} runs.", "",
        f"Command: `{result['command']}`", "",
        "## AUROC, mean ± sd over seeds", "",
        "All-domain AUROC (every final model at every test site), and in brackets the gap "
        "(in-domain − out-of-domain) where a strategy has external cells (local).", ""]
    lines += _table(result, _all_domain_cell)
    lines += ["", "AUROC at site 1 only (the same unshifted site and test images in every "
              "condition, all final models):", ""]
    lines += _table(result, lambda r: _pm(r["stats"]["site1"]))
    lines += ["", "In-domain / out-of-domain for local (the only strategy here with external cells):", ""]
    for cond in conds:
        r = result["conditions"][cond]["strategies"].get("local")
        if r:
            lines.append(f"- {cond}: {_pm(r['stats']['in_domain'])} / {_pm(r['stats']['out_domain'])}")
    personal = [s for s in strategies if s in PERSONAL or s in ("fedavg", "local")]
    if any(s in PERSONAL for s in strategies):
        lines += ["", "## Personalised methods: internal / external / personalisation gain", "",
                  "Internal: each site's own final model at its own test site (FedAvg: the one "
                  "model at each site); external: a site's model at the other sites; gain: own "
                  "model minus the method's global model at that site (g), or minus FedAvg of the "
                  "same seed where the method has no global model (f). Mean ± sd over seeds.", "",
                  "| shift | method | internal | external | gain |", "|---|---|---|---|---|"]
        for cond, data in result["conditions"].items():
            for s in personal:
                r = data["strategies"].get(s)
                if r is None:
                    lines.append(f"| {cond} | {s} | failed | | |")
                    continue
                st = r["stats"]
                gain = _pm(st["gain"], signed=True) if st.get("gain") else "n/a"
                gain += "".join(GAIN_MARK.get(g, "") for g in r.get("gain_against", []))
                lines.append(f"| {cond} | {s} | {_pm(st['in_domain'])} | {_pm(st['out_domain'])} | "
                             f"{gain} |")
    lines += ["", "## Convergence", "",
              f"![validation curves]({result['figure']})", "",
              f"Criterion (`flattened` in the script): over the last half of the evaluation points a "
              f"Theil-Sen line (median of pairwise slopes, robust to single spikes) predicts a fall in "
              f"validation loss of less than {LOSS_TOL:.0%} of its level or than its round-to-round "
              f"noise (1.4826 × median |consecutive difference| / √2), whichever is larger, and a "
              f"rise in validation AUROC of less than {AUC_TOL} or its noise. So flat means no "
              "improvement left that stands out of the noise; with noisy curves that is a weak claim. "
              "Loss and AUROC are the mean over the sites' validation splits; judged on the mean "
              "curve over seeds, and counted per run (runs flat / runs). Sequential's points are "
              "its cycle ends. A rising loss (trend > +5 %) with flat AUROC counts as flattened "
              "(overconfidence, not undertraining) and is marked ↑. Per-round validation first "
              "re-estimates the round's model's BatchNorm statistics on the scoring site's own "
              "training split (`eval.round_batchnorm: site`, set by this script), so the curves "
              "score weights and statistics that belong together; the final scoring uses the "
              "PreciseBN statistics of the model's own training sites.", "",
              "Cells: verdict (last-half trend of loss ± its noise, of AUROC ± its noise; runs flat "
              "/ runs, each run judged alone).", ""]
    lines += _table(result, _convergence_cell, missing="n/a")
    late = [f"{s} ({cond})" for cond in conds for s in strategies
            if s in result["conditions"][cond]["strategies"]
            and not result["conditions"][cond]["strategies"][s].get("check", {}).get("flat", False)]
    lines += ["", "Not flattened within budget: " + (", ".join(late) if late else "none") + "."]
    lines += ["", "## Effects that exceed the seed spread", "",
              f"An effect is stated where |difference of seed means| > {EFFECT_K:g} × the pooled seed "
              "sd (√((sd₁² + sd₂²)/2)); Welch's p is shown for reference (3 seeds: low power, and "
              "no correction for the number of comparisons). Seeds vary training only (initialisation, "
              "batch order); the patients and test images are fixed, so test-set sampling error "
              "(43-48 test images per site, ~0.06 AUROC standard error each) is not in this spread.", ""]
    eff = [e for e in result["effects"] if e["effect"]]
    n_pairs = sum(1 for e in result["effects"] if e["kind"] != "gap")
    from scipy import stats

    # the rule as a t statistic for two groups of 3: |t| > k / sqrt(2/3), df 4
    alpha = float(2 * stats.t.sf(EFFECT_K / math.sqrt(2 / 3), 4))
    lines += [f"With no true difference the rule fires about {alpha:.0%} of the time (two groups "
              f"of 3: |t| > {EFFECT_K / math.sqrt(2 / 3):.2f}, df 4), so of these {n_pairs} "
              f"two-group comparisons about {alpha * n_pairs:.0f} would be flagged by chance alone: "
              "read a single flag as a lead, a pattern across strategies or conditions as evidence.", ""]
    for kind, title in (("shift", "Shift vs no shift, same strategy"),
                        ("strategy", "Strategy vs strategy, same condition (all-domain)"),
                        ("personal", "Personalised method vs FedAvg / local, same condition (in-domain)"),
                        ("gain", "Personalisation gain ≠ 0"),
                        ("gap", "Same-source gap ≠ 0")):
        rows = [e for e in eff if e["kind"] == kind]
        lines.append(f"**{title}** ({len(rows)} of {sum(e['kind'] == kind for e in result['effects'])} "
                     "comparisons):")
        lines.append("")
        for e in rows:
            stat = "" if kind == "gap" else f" [{e['stat']}]"
            lines.append(f"- {e['what']}{stat}: {e['diff']:+.3f} (seed sd {e['sd']:.3f}, p = {e['p']:.3f})")
        if not rows:
            lines.append("- none")
        lines.append("")
    return "\n".join(lines) + "\n"


def print_table(result: dict[str, Any]) -> None:
    strategies = result["strategies"]
    print("\nall-domain AUROC mean ± sd over seeds (local: gap in-out); * = val curve flattened")
    print(f"{'condition':<12}" + "".join(f"{s:>24}" for s in strategies))
    for condition, row in result["conditions"].items():
        cells = []
        for s in strategies:
            r = row["strategies"].get(s)
            if r is None:
                cells.append(f"{'failed':>24}")
                continue
            st = r["stats"]["all_domain"]
            txt = "n/a" if st["mean"] != st["mean"] else f"{st['mean']:.3f}±{st['sd']:.3f}"
            g = r["stats"]["gap"]["mean"]
            if g == g:
                txt += f" ({g:+.3f})"
            txt += "*" if r.get("check", {}).get("flat") else " "
            cells.append(txt.rjust(24))
        print(f"{condition:<12}" + "".join(cells))
    eff = [e for e in result["effects"] if e["effect"]]
    print(f"\neffects beyond {EFFECT_K:g} x pooled seed sd: {len(eff)}")
    for e in eff:
        print(f"  {e['what']} [{e['stat']}]: {e['diff']:+.3f} (sd {e['sd']:.3f}, p {e['p']:.3f})")


def _git() -> tuple[str, bool]:
    try:
        commit = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=REPO, text=True).strip()
        dirty = bool(subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"],
                                             cwd=REPO, text=True).strip())
        return commit, dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown", True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strategies", default=DEFAULT_STRATEGIES)
    p.add_argument("--conditions", default=",".join(CONDITIONS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--size", type=int, default=300, help="images per site")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--width", type=int, default=8, help="smallcnn filters in the first block")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    # plateau: lr x 0.1 whenever validation finds no lower loss, so each run settles where its
    # own curve does (a cosine decay settles where the budget ends: 5bd3350 left 7 of 15 cells
    # still falling); inverse-prevalence BCE keeps the prevalence-shifted sites from pulling
    # scores to one end
    p.add_argument("--lr-schedule", default="plateau", choices=("constant", "cosine", "plateau"))
    p.add_argument("--plateau-patience", type=int, default=1,
                   help="plateau: evaluations without a lower validation loss before lr x 0.1")
    p.add_argument("--pos-weight", default="inverse_prevalence", choices=("none", "inverse_prevalence"))
    p.add_argument("--budget", default=None,
                   help="per-strategy rounds over --rounds, e.g. pooled=6,fedavg=10 (default: "
                   + ",".join(f"{k}={v}" for k, v in DEFAULT_BUDGET.items()) + " where chosen)")
    p.add_argument("--out", default="shift_study", help="file stem under bench/results/")
    p.add_argument("--from-json", help="rebuild the tables, report and figure from this JSON "
                   "(its comparison folders must exist); runs nothing")
    p.add_argument("--jobs", type=int, default=2, help="comparisons (one per seed x condition) run "
                   "at once; 2 keeps this 2-core machine's cores busy through Ray's start-ups")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = p.parse_args()
    out = REPO / "bench" / "results"
    strategies = [s for s in args.strategies.split(",") if s]
    conds = [c for c in args.conditions.split(",") if c]
    rounds = budgets(args, strategies)
    groups: dict[int, list[str]] = defaultdict(list)
    for s in strategies:
        groups[rounds[s]].append(s)
    n_runs = len(conds) * len(strategies) * args.seeds
    print(f"shift study: {len(conds)} condition(s) x {len(strategies)} strategies x {args.seeds} "
          f"seed(s) = {n_runs} runs; rounds {rounds}, {args.local_epochs} local epoch(s) per round",
          flush=True)
    if args.dry_run:
        return 0
    cfg_dir = REPO / "runs" / "shift-study" / "configs"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    commit, dirty = _git()
    t0 = time.perf_counter()
    folders: dict[str, list[dict]] = {}
    if args.from_json:
        prev = json.loads(Path(args.from_json).read_text())
        folders = {c: v["folders"] for c, v in prev["conditions"].items()}
        commit, dirty, wall = prev["commit"], prev["dirty"], prev["wall_seconds"]
        command = prev["command"]
        st = prev["settings"]
        args.size, args.local_epochs, args.batch_size, args.lr = (st["size"], st["local_epochs"],
                                                                  st["batch_size"], st["lr"])
        args.width, args.seeds, rounds = st["width"], prev["seeds"], st["rounds"]
        # studies before these options ran with a constant rate and unweighted BCE
        args.lr_schedule = st.get("lr_schedule", "constant")
        args.pos_weight = st.get("pos_weight", "none")
        args.plateau_patience = st.get("plateau_patience", args.plateau_patience)
        strategies = prev["strategies"]
    else:
        command = "python " + " ".join([str(Path(sys.argv[0]).relative_to(REPO)
                                             if Path(sys.argv[0]).is_absolute() else sys.argv[0]),
                                        *sys.argv[1:]])
        # One comparison per (seed, condition, budget group), seed-major, so that two at a time
        # stay balanced and an interrupted study still holds whole seeds.
        tasks = []
        stamp = time.strftime("%Y%m%d-%H%M%S")
        files = {c: config(c, args, cfg_dir) for c in conds}
        folders = {c: [] for c in conds}
        for seed in range(args.seeds):
            for condition in conds:
                for r, group in groups.items():
                    folder = REPO / "runs" / "shift-study" / stamp / f"{condition}-r{r}-seed{seed}"
                    entry = {"folder": str(folder), "rounds": r, "strategies": group, "seed": seed,
                             "exit_code": None}
                    folders[condition].append(entry)
                    tasks.append((files[condition], entry))

        def launch(task: tuple[Path, dict]) -> None:
            f, entry = task
            folder = Path(entry["folder"])
            folder.parent.mkdir(parents=True, exist_ok=True)
            log = folder.parent / f"{folder.name}.log"
            t1 = time.perf_counter()
            with open(log, "w") as fh:
                entry["exit_code"] = subprocess.call(
                    [sys.executable, str(REPO / "launch" / "compare.py"), "--config", str(f),
                     "--strategies", ",".join(entry["strategies"]), "--seeds", "1",
                     "--out", str(folder), f"strategy.rounds={entry['rounds']}",
                     f"seed={entry['seed']}"],
                    stdout=fh, stderr=subprocess.STDOUT)
            entry["seconds"] = round(time.perf_counter() - t1, 1)
            print(f"  {folder.name}: exit {entry['exit_code']}, {entry['seconds'] / 60:.1f} min "
                  f"(log {log.name}), {time.perf_counter() - t0:.0f} s since start", flush=True)

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            list(pool.map(launch, tasks))
        wall = time.perf_counter() - t0
    table: dict[str, dict[str, Any]] = {}
    for condition, fs in folders.items():
        per: dict[str, list[dict]] = defaultdict(list)
        for f in fs:
            runs_file = Path(f["folder"]) / "runs.json"
            runs = json.loads(runs_file.read_text()) if runs_file.is_file() else []
            for run in runs:
                got = read_run(run, args.local_epochs, 3)
                if got is not None:
                    per[run["strategy"]].append(got)
        fill_gains(per)
        table[condition] = {s: summarize(per[s]) for s in strategies if per.get(s)}
    result = {
        "conditions": {c: {"folders": folders[c], "strategies": table[c]} for c in folders},
        "strategies": strategies, "seeds": args.seeds,
        "seeds_used": sorted({r["seed"] for c in table.values() for s in c.values() for r in s["runs"]}),
        "settings": {"size": args.size, "local_epochs": args.local_epochs, "batch_size": args.batch_size,
                     "lr": args.lr, "lr_schedule": args.lr_schedule, "pos_weight": args.pos_weight,
                     "plateau_patience": args.plateau_patience, "rounds": rounds, "image_size": 64, "arch": "smallcnn", "width": args.width},
        "criterion": {"loss_tol": LOSS_TOL, "auroc_tol": AUC_TOL, "effect_k": EFFECT_K},
        "effects": effects(table, strategies),
        "n_runs": sum(len(s["runs"]) for c in table.values() for s in c.values()),
        "commit": commit, "dirty": dirty, "command": command, "wall_seconds": round(wall, 1),
        "figure": f"{args.out}_curves.png",
    }
    plot(result, out / result["figure"])
    (out / f"{args.out}.json").write_text(json.dumps(result, indent=1, default=_json_default))
    (out / f"{args.out}.md").write_text(markdown(result))
    print_table(result)
    print(f"\nwrote {out / (args.out + '.json')}, {args.out}.md, {result['figure']} "
          f"({wall / 60:.1f} min)")
    return 0


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.bool_):
        return bool(o)
    raise TypeError(type(o))


if __name__ == "__main__":
    sys.exit(main())
