"""Strategy-level view of a comparison: "what do I get from each strategy, at my site and elsewhere?"

A strategy may produce several models (local: one per site; loso: one per held-out site;
sequential: one per stage). For strategy S and test site X:
- internal(S, X): the mean AUROC at X of S's final models that trained on X;
- external(S, X): the same for S's final models that did not (a local model from another site,
  the loso model that left X out). Intermediate sequential stages are not final models.
Per run, in-domain / out-of-domain / all-domain are the means over sites (Cohen et al. 2020, Fig. 2);
tables show mean ± sd over seeds. The report that shows them is server/report/comparison.py.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from chestfed.server.evaluation.matrix import cell_value, nan_mean, nan_sd


def final_models(results: Mapping[str, Any]) -> list[str]:
    """The rows that stand for the strategy: not sequential's intermediate stages, and for a
    personalised method its personal models, not its global one (what a site would deploy;
    the global model's comparison is results.json `personalisation`)."""
    side = {f"{method}-global" for method in results.get("personalisation") or {}}
    return [m for m in results.get("matrix", {})
            if not m.startswith("sequential-stage-") and m not in side]


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
