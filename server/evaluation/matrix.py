"""The train-on-X / test-on-Y matrix: models as rows, test sites as columns.

Each cell keeps the site's aggregate metrics (computed at the site, see sites/scoring.py) and
whether it is internal (the site was in the model's training set) or external. Per model: mean
internal, mean external, the generalization gap (internal minus external) and mean +- sd across
test sites; per label: Bajwa et al.'s Table 7 (label x test site x model, average +- sd over sites);
between models: Bajwa et al.'s paired t-test and Wilcoxon over matched (label, test site) AUROCs
(for a binary task: over test sites), with Holm-adjusted p-values; `paired_over` says what.

`aggregate_runs(list of results.json dicts)` does the same across seeds / folds / strategies for
launch/compare.py. One run's results.json and console table are built in server/evaluation/results.py. Everything here reads plain dicts, so it works on results written to disk
(where NaN became null) as well as on fresh ones.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from chestfed.common.stats import holm, paired_tests

KEY = "macro_auroc"
NAN = float("nan")


# --- reading cells ---------------------------------------------------------------------------------


def num(v: Any) -> float:
    """A number from results (None = NaN written as null)."""
    if v is None:
        return NAN
    try:
        return float(v)
    except (TypeError, ValueError):
        return NAN


def cell_value(cell: Mapping[str, Any] | None, key: str = KEY) -> float:
    if not cell:
        return NAN
    return num((cell.get("metrics") or {}).get(key))


_cell_value = cell_value  # the name earlier code used


def cell_ci(cell: Mapping[str, Any] | None, key: str = KEY) -> tuple[float, float]:
    m = (cell or {}).get("metrics") or {}
    return num(m.get(f"{key}_lo")), num(m.get(f"{key}_hi"))


def label_key(label: str, metric: str = "auroc") -> str:
    return f"labels/{label}/{metric}"


def cell_reason(cell: Mapping[str, Any] | None, key: str = KEY) -> str | None:
    """Why a cell's value is missing (error, or the site's NaN reason), or None."""
    if not cell:
        return "not evaluated"
    if cell.get("error"):
        return f"site failed: {cell['error']}"
    reasons = cell.get("reasons") or {}
    if key == KEY:
        per_label = {k.rsplit("/", 1)[0]: v for k, v in reasons.items() if k.endswith("/auroc")}
        if len(per_label) == 1 and math.isnan(cell_value(cell, key)):
            return next(iter(per_label.values()))  # one label: its own reason says it best
        if "macro" in reasons:
            detail = "; ".join(f"{label}: {v}" for label, v in per_label.items())
            return reasons["macro"] + (f" ({detail})" if detail else "")
        return None
    if key.startswith("labels/"):
        label = key.split("/")[1]
        return reasons.get(f"{label}/auroc")
    return reasons.get(key)


def nan_mean(values: Iterable[float]) -> float:
    """Mean of the defined (non-NaN) values; NaN when there are none."""
    vals = [v for v in values if v == v]
    return float(np.mean(vals)) if vals else NAN


def nan_sd(values: Iterable[float]) -> float:
    """Sample sd (ddof 1) of the defined values; NaN with fewer than two."""
    vals = [v for v in values if v == v]
    return float(np.std(vals, ddof=1)) if len(vals) > 1 else NAN


def _stats(values: Iterable[float]) -> dict[str, Any]:
    vals = [v for v in values if v == v]
    return {"mean": nan_mean(vals), "sd": nan_sd(vals), "n": len(vals)}


# --- one run ---------------------------------------------------------------------------------------


def summarize_row(row: Mapping[str, Mapping[str, Any]], key: str = KEY) -> dict[str, float]:
    """Per model: internal / external / all means, sd across test sites, and the gap."""
    internal = [cell_value(c, key) for c in row.values() if c.get("internal")]
    external = [cell_value(c, key) for c in row.values() if not c.get("internal")]
    every = internal + external
    out = {"internal_mean": nan_mean(internal), "external_mean": nan_mean(external),
           "all_mean": nan_mean(every), "all_sd": nan_sd(every),
           "n_internal": sum(1 for v in internal if v == v),
           "n_external": sum(1 for v in external if v == v)}
    out["gap"] = out["internal_mean"] - out["external_mean"]
    return out


def label_table(matrix: Mapping[str, Mapping[str, Mapping[str, Any]]], sites: Sequence[str],
                labels: Sequence[str], metric: str = "auroc") -> dict[str, dict[str, dict[str, Any]]]:
    """Bajwa et al. Table 7: label -> model -> {"sites": {site: value}, "mean", "sd", "n"} where
    mean +- sd run over the test sites at which the label is defined."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for label in labels:
        per_model = {}
        for model, row in matrix.items():
            vals = {s: cell_value(row.get(s), label_key(label, metric)) for s in sites}
            per_model[model] = {"sites": vals, **_stats(vals.values())}
        out[label] = per_model
    return out


PAIRED_OVER_CELLS = "(label, test site) cells"
PAIRED_OVER_SITES = "test sites"
PAIRED_OVER_SITE_RUNS = "(test site, seed) cells"


def add_holm(comparisons: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Holm-adjust, in place, every t-test and Wilcoxon p-value of `comparisons` as one family
    (all pairs, both tests: what the report's table shows): keys `t_p_holm`, `w_p_holm`."""
    entries = list(comparisons.values())
    adj = holm([num(c.get(k)) for c in entries for k in ("t_p", "w_p")])
    for i, c in enumerate(entries):
        c["t_p_holm"], c["w_p_holm"] = float(adj[2 * i]), float(adj[2 * i + 1])
    return comparisons


def paired_cell_tests(table: Mapping[str, Mapping[str, Mapping[str, Any]]],
                      models: Sequence[str], paired_over: str | None = None) -> dict[str, dict[str, Any]]:
    """Bajwa et al.'s significance test: for each pair of models, the paired t-test and Wilcoxon
    over every (label, test site) cell where both have an AUROC. `table` is `label_table`.

    With one label (a binary task) the cells are the test sites. Each entry says what was
    paired (`paired_over`; default: "test sites" for one label, else "(label, test site)
    cells") and carries Holm-adjusted p-values over all pairs and both tests (`add_holm`)."""
    if paired_over is None:
        paired_over = PAIRED_OVER_SITES if len(table) == 1 else PAIRED_OVER_CELLS
    out: dict[str, dict[str, Any]] = {}
    for i, a in enumerate(models):
        for b in models[i + 1:]:
            xa, xb = [], []
            for label, per_model in table.items():
                if a not in per_model or b not in per_model:
                    continue
                for site, va in per_model[a]["sites"].items():
                    vb = per_model[b]["sites"].get(site, NAN)
                    xa.append(num(va))
                    xb.append(num(vb))
            res = paired_tests(xa, xb) if xa else {
                "n_pairs": 0, "mean_diff": NAN, "median_diff": NAN, "t": NAN, "t_p": NAN,
                "w": NAN, "w_p": NAN, "reasons": {"t": "no shared cells", "w": "no shared cells"}}
            out[f"{a}|{b}"] = {"a": a, "b": b, "paired_over": paired_over, **res}
    return add_holm(out)


def paired_site_run_tests(results_list: Sequence[Mapping[str, Any]], models: Sequence[str],
                          label: str, fallback: Mapping[str, Mapping[str, Mapping[str, Any]]],
                          ) -> dict[str, dict[str, Any]]:
    """A binary task over several runs: for each pair of models, the paired t-test and Wilcoxon
    over (test site, seed) cells, pairing a's AUROC at a site in the run(s) with seed s (and
    fold f) with b's AUROC at that site in the run(s) with the same seed and fold (mean if
    several runs share them). Both were then scored on the same test images (compare.py keeps
    the splits fixed across seeds and strategies), so the pairing is like-for-like; the test
    counts every (site, seed) difference as independent although the differences at one test
    site share its test images, so its p-values reflect the training seeds' variability more
    than the test sets' (the report says so). A pair of models with no seed in common (runs
    compared by hand) falls back to the test sites' means over runs (`fallback`, flat
    label_table), and `paired_over` says which was done.
    """
    vals: dict[str, dict[tuple[str, Any, Any], list[float]]] = {m: {} for m in models}
    for r in results_list:
        split = r.get("split") or {}
        for m in models:
            for site, cell in ((r.get("matrix") or {}).get(m) or {}).items():
                v = cell_value(cell, label_key(label))
                if v == v:
                    vals[m].setdefault((site, r.get("seed"), split.get("fold")), []).append(v)
    out: dict[str, dict[str, Any]] = {}
    for i, a in enumerate(models):
        for b in models[i + 1:]:
            common = [k for k in vals[a] if k in vals[b]]
            if not common:
                one = paired_cell_tests(fallback, [a, b], PAIRED_OVER_SITES + " (means over runs: "
                                        "no seed in common)")
                out[f"{a}|{b}"] = one[f"{a}|{b}"]
                continue
            res = paired_tests([nan_mean(vals[a][k]) for k in common], [nan_mean(vals[b][k]) for k in common])
            out[f"{a}|{b}"] = {"a": a, "b": b, "paired_over": PAIRED_OVER_SITE_RUNS, **res}
    return add_holm(out)


# --- several runs (seeds, folds, strategies): for launch/compare.py -------------------------------


def _ordered_union(lists: Iterable[Iterable[str]]) -> list[str]:
    out: list[str] = []
    for xs in lists:
        for x in xs:
            if x not in out:
                out.append(x)
    return out


def run_id(results: Mapping[str, Any]) -> str:
    split = results.get("split") or {}
    fold = split.get("fold")
    folds = split.get("folds")
    tail = f" fold {fold}" if folds else ""
    return f"{results.get('experiment', '?')}/{results.get('strategy', '?')} seed {results.get('seed', '?')}{tail}"


LOCAL_OWN = "local (own site)"  # own_site_row("local")


def own_site_row(method: str) -> str:
    """The comparison row of `method`'s per-site models, each at its own site."""
    return f"{method} (own site)"


def with_local_own(results: Mapping[str, Any]) -> Mapping[str, Any]:
    """Add the rows federated papers compare against: each site's own local model at that site
    (the diagonal of the `local` strategy's matrix), as model `local (own site)`; likewise each
    personalised method's personal models at home (`ditto (own site)`, ...: results.json
    `personalisation` names the methods), so a comparison puts them next to local and FedAvg."""
    matrix = results.get("matrix") or {}
    methods = ["local"] + list(results.get("personalisation") or {})
    out = dict(results)
    for method in methods:
        row = own_site_row(method)
        own = {s: matrix[f"{method}-{s}"][s] for s in results.get("sites", {})
               if f"{method}-{s}" in matrix and s in matrix[f"{method}-{s}"]}
        if len(own) < 2 or row in matrix:
            continue
        out["matrix"] = {**out.get("matrix", matrix), row: own}
        out["models"] = {**(out.get("models") or {}),
                         row: {"trained_on": sorted(own), "derived": f"{method}-<site> at <site>"}}
    return out


def aggregate_runs(results_list: Sequence[Mapping[str, Any]], key: str = KEY) -> dict[str, Any]:
    """Combine several runs' results (seeds, folds, strategies) into one comparison.

    Rows are model names (a model name seen in several runs, e.g. `fedavg` over three seeds, is
    one row whose cells hold one value per run), plus `local (own site)` for `local` runs (each
    site's own model at home; see `with_local_own`); columns are the union of test sites.
    Returns::

        {"runs": [{"id", "experiment", "strategy", "seed", "fold", "models"}],
         "sites", "labels", "models", "metric",
         "cells": {model: {site: {"values", "runs", "mean", "sd", "n", "internal", "reasons"}}},
         "summary": {model: {stat: {"values", "mean", "sd", "n"}}}   # stat: internal_mean,
                                                                      # external_mean, gap, all_mean
         "label_table": {label: {model: {"sites": {site: {"mean", "sd", "n"}}, "mean", "sd", "n"}}},
         "comparisons": {"a|b": paired t-test / Wilcoxon (see `paired_over`), Holm-adjusted}}

    `internal` is True / False, or None when runs disagree (a model name reused for different
    training sets). Table 7's average +- sd runs over test sites of the per-site run-means.
    Comparisons pair (label, site) run-means; for a binary task, whose run-means would give one
    pair per test site (too few), they pair (test site, seed) cells (`paired_site_run_tests`).
    """
    results_list = [with_local_own(r) for r in results_list]
    if not results_list:
        raise ValueError("aggregate_runs needs at least one results dict")
    sites = _ordered_union(r.get("sites", {}) for r in results_list)
    labels = _ordered_union(r.get("task", []) for r in results_list)
    models = _ordered_union(r.get("matrix", {}) for r in results_list)
    runs = []
    for r in results_list:
        split = r.get("split") or {}
        runs.append({"id": run_id(r), "experiment": r.get("experiment"), "strategy": r.get("strategy"),
                     "seed": r.get("seed"), "fold": split.get("fold"),
                     "models": list(r.get("matrix", {}))})
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    summary: dict[str, dict[str, Any]] = {}
    info: dict[str, dict[str, Any]] = {}
    for model in models:
        row_out: dict[str, dict[str, Any]] = {}
        for site in sites:
            vals, ids, flags, reasons = [], [], set(), set()
            for r, run in zip(results_list, runs):
                cell = (r.get("matrix", {}).get(model) or {}).get(site)
                if cell is None:
                    continue
                flags.add(bool(cell.get("internal")))
                v = cell_value(cell, key)
                if v == v:
                    vals.append(v)
                    ids.append(run["id"])
                else:
                    why = cell_reason(cell, key)
                    if why:
                        reasons.add(why)
            if not flags:
                continue
            row_out[site] = {"values": vals, "runs": ids, **_stats(vals),
                             "internal": flags.pop() if len(flags) == 1 else None,
                             "reasons": sorted(reasons)}
        cells[model] = row_out
        stats: dict[str, Any] = {}
        for stat in ("internal_mean", "external_mean", "gap", "all_mean"):
            per_run = []
            for r in results_list:
                row = r.get("matrix", {}).get(model)
                if row:
                    per_run.append(num(summarize_row(row, key)[stat]))
            stats[stat] = {"values": [v for v in per_run if v == v], **_stats(per_run)}
        stats["n_runs"] = sum(1 for r in results_list if model in r.get("matrix", {}))
        summary[model] = stats
        meta = [r.get("models", {}).get(model, {}) for r in results_list if model in r.get("models", {})]
        info[model] = {"strategies": _ordered_union([[r.get("strategy")] for r in results_list
                                                     if model in r.get("matrix", {})]),
                       "trained_on": _ordered_union(m.get("trained_on", []) for m in meta)}

    table: dict[str, dict[str, dict[str, Any]]] = {}
    for label in labels:
        per_model = {}
        for model in models:
            per_site = {}
            for site in sites:
                vals = [cell_value((r.get("matrix", {}).get(model) or {}).get(site), label_key(label))
                        for r in results_list]
                per_site[site] = _stats(vals)
            means = [per_site[s]["mean"] for s in sites]
            per_model[model] = {"sites": per_site, **_stats(means)}
        table[label] = per_model
    flat_table = {label: {m: {"sites": {s: v["mean"] for s, v in d["sites"].items()}}
                          for m, d in per.items()} for label, per in table.items()}
    if len(labels) == 1:
        comparisons = paired_site_run_tests(results_list, models, labels[0], flat_table)
    else:
        comparisons = paired_cell_tests(flat_table, models, PAIRED_OVER_CELLS + " (means over runs)")
    return {"runs": runs, "sites": sites, "labels": labels, "models": info, "metric": key,
            "cells": cells, "summary": summary, "label_table": table,
            "comparisons": comparisons}
