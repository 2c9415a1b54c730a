"""Strategy-level view of a comparison: "what do I get from each strategy, at my site and elsewhere?"

A strategy may produce several models (local: one per site; loso: one per held-out site;
sequential: one per stage). For strategy S and test site X:
- internal(S, X): the mean AUROC at X of S's final models that trained on X;
- external(S, X): the same for S's final models that did not (a local model from another site,
  the loso model that left X out). Intermediate sequential stages are not final models.
Per run, in-domain / out-of-domain / all-domain are the means over sites (seed 001, Fig. 2);
tables show mean ± sd over seeds.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from server import figures
from server.matrix import cell_value, nan_mean, nan_sd


def final_models(results: Mapping[str, Any]) -> list[str]:
    return [m for m in results.get("matrix", {}) if not m.startswith("sequential-stage-")]


def run_summary(results: Mapping[str, Any]) -> dict[str, Any]:
    """One run: per test site internal / external AUROC, and the three domain means."""
    sites = list(results["sites"])
    per_site: dict[str, dict[str, float]] = {}
    all_int, all_ext = [], []
    for x in sites:
        ints, exts = [], []
        for m in final_models(results):
            cell = results["matrix"][m].get(x)
            if not cell:
                continue
            (ints if cell.get("internal") else exts).append(cell_value(cell))
        per_site[x] = {"internal": nan_mean(ints), "external": nan_mean(exts)}
        all_int += ints
        all_ext += exts
    return {"sites": per_site, "in_domain": nan_mean(all_int), "out_domain": nan_mean(all_ext),
            "all_domain": nan_mean(all_int + all_ext), "gap": nan_mean(all_int) - nan_mean(all_ext)}


def strategy_table(results_by_strategy: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """{strategy: {"runs": n, "sites": {site: {"internal": (mean, sd), "external": (mean, sd)}},
    "in_domain"|"out_domain"|"all_domain"|"gap": (mean, sd)}} over each strategy's runs."""
    out: dict[str, Any] = {}
    for strategy, runs in results_by_strategy.items():
        summaries = [run_summary(r) for r in runs]
        if not summaries:
            continue
        sites = list(summaries[0]["sites"])
        row: dict[str, Any] = {"runs": len(summaries), "sites": {}}
        for x in sites:
            row["sites"][x] = {k: (nan_mean([s["sites"][x][k] for s in summaries]),
                                   nan_sd([s["sites"][x][k] for s in summaries]))
                               for k in ("internal", "external")}
        for k in ("in_domain", "out_domain", "all_domain", "gap"):
            vals = [s[k] for s in summaries]
            row[k] = (nan_mean(vals), nan_sd(vals))
        out[strategy] = row
    return out


def _pm(pair: tuple[float, float]) -> str:
    m, s = pair
    if m != m:
        return "n/a"
    return f"{m:.3f}" + (f" ± {s:.3f}" if s == s else "")


def strategy_heatmap(runs: Sequence[Mapping[str, Any]], strategy: str) -> bytes:
    """The strategy's own matrix (its models x test sites), mean over seeds, internal outlined."""
    models = list(dict.fromkeys(m for r in runs for m in r.get("matrix", {})))
    sites = list(runs[0]["sites"])
    vals = np.full((len(models), len(sites)), np.nan)
    text = [["n/a"] * len(sites) for _ in models]
    internal = np.zeros((len(models), len(sites)), dtype=object)
    for i, m in enumerate(models):
        for j, s in enumerate(sites):
            xs = [cell_value(r["matrix"][m][s]) for r in runs if m in r.get("matrix", {})]
            flags = {bool(r["matrix"][m][s].get("internal")) for r in runs if m in r.get("matrix", {})}
            internal[i, j] = flags.pop() if len(flags) == 1 else None
            vals[i, j] = nan_mean(xs)
            if vals[i, j] == vals[i, j]:
                sd = nan_sd(xs)
                text[i][j] = f"{vals[i, j]:.3f}" + (f"\n± {sd:.3f}" if sd == sd else "")
    return figures.heatmap(vals, models, sites, internal, text=text,
                           title=f"{strategy}: AUROC by model and test site"
                                 f"{' (mean ± sd over seeds)' if len(runs) > 1 else ''}",
                           cbar_label="AUROC")


def domain_bars(table: Mapping[str, Any]) -> bytes:
    """In-domain / out-of-domain / all-domain AUROC per strategy, like seed 001's Fig. 2."""
    from matplotlib.figure import Figure

    strategies = list(table)
    kinds = [("in_domain", "in-domain (internal)"), ("out_domain", "out-of-domain (external)"),
             ("all_domain", "all domains")]
    fig = Figure(figsize=(max(5.5, 1.3 * len(strategies) + 2) + 2.2, 3.6), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(kinds)
    x = np.arange(len(strategies))
    for k, (key, label) in enumerate(kinds):
        means = [table[s][key][0] for s in strategies]
        sds = [table[s][key][1] if table[s][key][1] == table[s][key][1] else 0 for s in strategies]
        ax.bar(x + (k - 1) * width, np.nan_to_num(means, nan=0.0), width, yerr=sds, capsize=3,
               label=label)
    ax.set_xticks(x, labels=strategies)
    ax.set_ylabel("AUROC")
    lo = min([table[s][k][0] for s in strategies for k, _ in kinds if table[s][k][0] == table[s][k][0]] or [0.5])
    ax.set_ylim(max(0.0, min(0.5, lo - 0.05)), 1.0)
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("AUROC at the sites a strategy trained on vs the others (mean ± sd over seeds)",
                 fontsize=10)
    return figures._png(fig)


def write_comparison(folder: Path, runs: Sequence[Mapping[str, Any]],
                     strategies: Sequence[str]) -> dict[str, Path]:
    """Write the comparison folder's report.md / report.html / figures / comparison.json.

    `runs`: [{"strategy", "seed", "run" (folder), "status"}]; failed runs are listed, not used.
    """
    from server.matrix import aggregate_runs
    from server.report import Cell, Doc, render_comparison, write_doc
    from server.runfolder import atomic_write_json

    done = [r for r in runs if r["status"] == "complete" and (Path(r["run"]) / "results.json").is_file()]
    by_strategy: dict[str, list[dict[str, Any]]] = {s: [] for s in strategies}
    for r in done:
        by_strategy[r["strategy"]].append(json.loads((Path(r["run"]) / "results.json").read_text()))
    by_strategy = {s: v for s, v in by_strategy.items() if v}
    title = f"ChestFed comparison: {', '.join(strategies)}"
    doc = Doc(title)
    failed = [r for r in runs if r not in done]
    if failed:
        doc.h(1, "Failed runs")
        doc.ul([f"{r['strategy']} seed {r['seed']}: {r['status']} (see {r['run']})" for r in failed])
    if not by_strategy:
        doc.p("No run completed; nothing to compare.")
        return write_doc(Path(folder), doc, {})

    table = strategy_table(by_strategy)
    sites = list(next(iter(by_strategy.values()))[0]["sites"])
    doc.h(1, "Strategies at each site")
    doc.p("For each strategy and test site: internal = AUROC at the site of the strategy's final "
          "models that trained on it; external = of those that did not (another site's local model, "
          "the leave-one-out model). Mean ± sd over seeds; gap = in-domain − out-of-domain.")
    rows = []
    for s, row in table.items():
        rows.append([Cell(s)] + [Cell(f"{_pm(row['sites'][x]['internal'])} / {_pm(row['sites'][x]['external'])}")
                                 for x in sites] +
                    [Cell(_pm(row[k])) for k in ("in_domain", "out_domain", "all_domain", "gap")] +
                    [Cell(str(row["runs"]))])
    doc.table(["strategy"] + [f"{x} (int / ext)" for x in sites] +
              ["in-domain", "out-of-domain", "all", "gap", "seeds"], rows)
    doc.figure("domains", domain_bars(table),
               "In-domain, out-of-domain and all-domain AUROC per strategy (seed 001, Fig. 2)")
    for s, results_list in by_strategy.items():
        doc.figure(f"heatmap_{s}", strategy_heatmap(results_list, s),
                   f"{s}: AUROC by model and test site; internal cells outlined")
    all_results = [r for v in by_strategy.values() for r in v]
    agg = aggregate_runs(all_results)
    models = render_comparison(agg, title)
    doc.h(1, "Models under comparison")
    doc.parts += models.parts
    doc.figures.update(models.figures)
    folder = Path(folder)
    atomic_write_json(folder / "comparison.json",
                      {"strategies": {s: {k: v for k, v in row.items()} for s, row in table.items()},
                       "runs": list(runs), "models": agg})
    paths = write_doc(folder, doc, {})
    paths["json"] = folder / "comparison.json"
    return paths
