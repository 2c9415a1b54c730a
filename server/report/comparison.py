"""Comparison reports of several runs.

- `write_comparison_report(folder, results_list)`: the models of several runs (seeds, folds,
  strategies) pooled by name through `server.matrix.aggregate_runs`; launch/report.py calls it.
- `write_comparison(folder, runs, strategies)`: launch/compare.py's strategy-level report
  (server/report/strategy_summary.py's numbers: internal / external AUROC per strategy and site), followed by
  the models' comparison.
Both write comparison.json next to report.md, report.html and figures/.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from chestfed.server.report import figures
from chestfed.server.report.strategy_summary import strategy_table
from chestfed.server.evaluation.matrix import aggregate_runs, cell_value, nan_mean, nan_sd, num
from chestfed.server.report.document import Cell, Doc
from chestfed.server.report.files import write_doc
from chestfed.server.report.format import pm
from chestfed.server.report.sections import label_section
from chestfed.server.report.significance import COMPARISON_HEADER, HOLM_NOTE, comparison_rows
from chestfed.common.atomic import write_json
from matplotlib.figure import Figure


# --- the models of several runs, pooled by name ---


def render_comparison(agg: Mapping[str, Any], title: str) -> Doc:
    sites, models, labels = agg["sites"], list(agg["cells"]), agg["labels"]
    doc = Doc(title)
    doc.ul([f"{len(agg['runs'])} run(s); rows are model names, pooled over the runs that have them",
            f"metric: AUROC ({labels[0] if len(labels) == 1 else f'macro over {len(labels)} labels'}) "
            "on each site's test split",
            "mean ± sd over runs (seeds / folds) per cell; internal cells outlined / marked *"])
    doc.h(1, "Runs")
    doc.table(["run", "strategy", "seed", "fold", "models"],
              [[r["id"], str(r["strategy"]), str(r["seed"]), "-" if r["fold"] is None else str(r["fold"]),
                ", ".join(r["models"])]
               for r in agg["runs"]])
    doc.h(1, "The matrix")
    values = np.array([[num((agg["cells"][m].get(s) or {}).get("mean")) for s in sites] for m in models])
    internal = np.array([[(agg["cells"][m].get(s) or {}).get("internal", False) for s in sites]
                         for m in models], dtype=object)
    text = [[("n/a" if not (agg["cells"][m].get(s) or {}).get("n") else
              pm((agg["cells"][m][s]).get("mean"), (agg["cells"][m][s]).get("sd")).replace(" ± ", "\n± "))
             for s in sites] for m in models]
    doc.figure("matrix_auroc", figures.heatmap(values, models, sites, internal, text=text,
                                               title="AUROC, mean ± sd over runs",
                                               outline_note="outlined: internal; dashed: internal in some runs only",
                                               cbar_label="AUROC"),
               "AUROC per model and test site, mean ± sd over runs; outlined = internal")
    rows = []
    for m in models:
        row = [Cell(m)]
        for s in sites:
            c = agg["cells"][m].get(s) or {}
            x = num(c.get("mean"))
            row.append(Cell(pm(x, c.get("sd")) + (f" (n={c.get('n')})" if c.get("n", 0) > 1 else ""),
                            "na" if math.isnan(x) else ("int" if c.get("internal") else "")))
        sm = agg["summary"][m]
        row += [Cell(pm(sm[k]["mean"], sm[k]["sd"])) for k in ("internal_mean", "external_mean", "gap", "all_mean")]
        row.append(Cell(str(sm["n_runs"])))
        rows.append(row)
    doc.table(["model"] + sites + ["internal", "external", "gap", "all sites", "runs"], rows,
              "cells: mean ± sd over runs; summary columns: mean ± sd over runs of each run's value")
    label_section(doc, agg["label_table"], sites, models, "Per label (Bajwa et al. 2020, Table 7)",
                   "AUROC per label and test site: mean ± sd over runs; Average: mean ± sd over test "
                   "sites of the per-site means.")
    comps = agg.get("comparisons") or {}
    if comps:
        doc.h(1, "Significance")
        if len(labels) == 1:
            doc.p("Paired t-test and Wilcoxon signed-rank test of the AUROCs of two models, paired "
                  "over (test site, seed) cells: a's AUROC at a site in the run with seed s "
                  "against b's at the same site in the run with the same seed (and fold), both "
                  "scored on the same test images. The task has one label, so Bajwa et al.'s pairing "
                  "over labels is impossible. The pairs at one test site share its test images, "
                  "so they are not independent: the p-values speak to the training seeds' "
                  "variability more than to the test sets'. Pairs of models without a seed in "
                  "common are paired over the test sites' means over runs (see 'paired over'). "
                  "Two-sided.")
        else:
            doc.p("Paired t-test and Wilcoxon signed-rank test over matched (label, test site) "
                  "AUROCs (run means), as in Bajwa et al. Two-sided.")
        doc.table(COMPARISON_HEADER, comparison_rows(comps, len(labels)), HOLM_NOTE)
    missing = [f"{m} at {s}: {'; '.join(c['reasons'])}" for m in models
               for s, c in agg["cells"][m].items() if c.get("reasons")]
    if missing:
        doc.h(1, "Notes")
        doc.ul([f"missing in some runs: {x}" for x in missing])
    return doc


def write_comparison_report(folder: str | Path, results_list: Sequence[Mapping[str, Any]],
                            title: str | None = None) -> dict[str, Path]:
    """Aggregate several results.json dicts (server.matrix.aggregate_runs) and write
    comparison.json, report.md, report.html and figures/ into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    agg = aggregate_runs(results_list)
    strategies = ", ".join(dict.fromkeys(str(r.get("strategy")) for r in results_list))
    agg["title"] = title or f"ChestFed comparison: {strategies}"
    write_json(folder / "comparison.json", agg)
    doc = render_comparison(agg, agg["title"])
    paths = write_doc(folder, doc, {})
    paths["json"] = folder / "comparison.json"
    return paths


# --- launch/compare.py: strategies, then their models ---


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
    """In-domain / out-of-domain / all-domain AUROC per strategy, like Cohen et al.'s Fig. 2."""

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
    return figures.png_bytes(fig)


def write_comparison(folder: Path, runs: Sequence[Mapping[str, Any]],
                     strategies: Sequence[str], preface: Doc | None = None) -> dict[str, Path]:
    """Write the comparison folder's report.md / report.html / figures / comparison.json.

    `runs`: [{"strategy", "seed", "run" (folder), "status"}]; failed runs are listed, not used.
    `preface`: sections that come first (launch/tune.py: how each strategy was tuned).
    """

    done = [r for r in runs if r["status"] == "complete" and (Path(r["run"]) / "results.json").is_file()]
    by_strategy: dict[str, list[dict[str, Any]]] = {s: [] for s in strategies}
    for r in done:
        by_strategy[r["strategy"]].append(json.loads((Path(r["run"]) / "results.json").read_text()))
    by_strategy = {s: v for s, v in by_strategy.items() if v}
    title = f"ChestFed comparison: {', '.join(strategies)}"
    doc = Doc(title)
    if preface is not None:
        doc.parts += preface.parts
        doc.figures.update(preface.figures)
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
        rows.append([Cell(s)] + [Cell(f"{pm(*row['sites'][x]['internal'])} / {pm(*row['sites'][x]['external'])}")
                                 for x in sites] +
                    [Cell(pm(*row[k])) for k in ("in_domain", "out_domain", "all_domain", "gap")] +
                    [Cell(str(row["runs"]))])
    doc.table(["strategy"] + [f"{x} (int / ext)" for x in sites] +
              ["in-domain", "out-of-domain", "all", "gap", "seeds"], rows)
    doc.figure("domains", domain_bars(table),
               "In-domain, out-of-domain and all-domain AUROC per strategy (Cohen et al. 2020, Fig. 2)")
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
    write_json(folder / "comparison.json",
                      {"strategies": {s: {k: v for k, v in row.items()} for s, row in table.items()},
                       "runs": list(runs), "models": agg})
    paths = write_doc(folder, doc, {})
    paths["json"] = folder / "comparison.json"
    return paths
