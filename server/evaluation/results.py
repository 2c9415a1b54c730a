"""One run's results: everything results.json holds (the matrix with its per-model summary,
Table 7, the paired tests, the budget, dropouts and failures, the evaluation's settings) and
the console table printed at the end of a run. The matrix arithmetic is in server/evaluation/matrix.py."""
from __future__ import annotations

from typing import Any, Mapping

from chestfed.common import caveats as C
from chestfed.common.caveats import site_entry
from chestfed.common.config import ExperimentConfig
from chestfed.server.evaluation.personalisation import personalisation
from chestfed.server.evaluation.matrix import KEY, cell_reason, cell_value, label_table, num, paired_cell_tests, summarize_row


def build_results(cfg: ExperimentConfig, models: list[Any], matrix: dict[str, dict[str, Any]],
                  checkpoints: dict[str, str], *, record: Any, sites: Any, eval_seconds: float,
                  evaluation: Any | None = None) -> dict[str, Any]:
    """Everything results.json holds; `record`: the run's RoundRecord (counters, dropouts,
    failed rows), `sites`: its SiteLink (split sizes, data warnings); `evaluation` is
    server.evaluation.evaluator.Evaluation (thresholds, pairwise statistics, settings) when the
    shared evaluator ran."""
    names = [s.name for s in cfg.sites]
    labels = cfg.task.task().names
    summary = {m: summarize_row(row) for m, row in matrix.items()}
    columns = ["model"] + [f"{s}" for s in names] + ["internal", "external", "gap"]
    rows = []
    for m, row in matrix.items():
        rows.append([m] + [cell_value(row.get(s)) for s in names] +
                    [summary[m]["internal_mean"], summary[m]["external_mean"], summary[m]["gap"]])
    table = label_table(matrix, names, labels)
    out = {
        "experiment": cfg.experiment,
        "strategy": cfg.strategy.name,
        "seed": cfg.seed,
        "split": {"fold": cfg.data.split.fold, "folds": cfg.data.split.folds,
                  "seed": cfg.data.split.seed if cfg.data.split.seed is not None else cfg.seed},
        "task": labels,
        "sites": {s: site_entry(sites.site_info.get(s, {})) for s in names},
        "data_warnings": list(sites.data_warnings),
        "models": {m.name: {"trained_on": m.trained_on, "checkpoint": checkpoints.get(m.name),
                            "local_batchnorm": m.local_bn, **m.meta} for m in models},
        "metric": KEY,
        "matrix": matrix,
        "summary": summary,
        "table": {"columns": columns, "rows": rows},
        "label_table": table,
        "comparisons": paired_cell_tests(table, list(matrix)),
        "budget": {"images_processed": record.images_processed,
                   "optimizer_steps": record.optimizer_steps,
                   # training jobs, one per site and round it trained (strategy.fraction < 1:
                   # the sampled sites only), and their mean per round
                   "site_trainings": record.site_trainings,
                   "sites_per_round": record.site_trainings / max(cfg.strategy.rounds, 1),
                   "local_epochs": cfg.train.local_epochs, "rounds": cfg.strategy.rounds,
                   **cfg.budget()},  # the effective values, and which were schema defaults
        "dropouts": record.dropouts,
        # local / sequential: rows (models, stages) whose site failed, with the reason
        "failed": list(record.failed_models),
        "eval_seconds": eval_seconds,
    }
    if evaluation is not None:
        out["evaluation"] = {"split": evaluation.split, "seconds": evaluation.seconds,
                             **evaluation.settings}
        out["thresholds"] = evaluation.thresholds
        out["pairs"] = evaluation.pairs
    # personalised methods: each site's personal model against the global one, and elsewhere
    out["personalisation"] = personalisation(out["models"], matrix, out.get("pairs") or {}, names)
    return out


def _site_counts(results: Mapping[str, Any], site: str) -> tuple[int, int] | None:
    """A test site's (n_pos, n_neg) from the first of its cells that carries them."""
    for row in results["matrix"].values():
        cell = row.get(site) or {}
        if "n_pos" in cell and "n_neg" in cell:
            return int(cell["n_pos"]), int(cell["n_neg"])
    return None


def format_table(results: dict[str, Any]) -> list[str]:
    """Console table: AUROC per test site, '*' marks internal cells, a letter per flag
    (common/caveats.py) after it; a row of each test split's positives / negatives; a legend
    line; one line per n/a saying why."""
    sites = list(results["sites"])
    task = results["task"]
    min_per_class = int(num((results.get("evaluation") or {}).get("min_per_class",
                                                                  C.DEFAULT_MIN_PER_CLASS)))
    texts: dict[str, list[tuple[str, str]]] = {}
    used: list[str] = []
    notes: list[str] = []
    for m, row in results["matrix"].items():
        texts[m] = []
        for s in sites:
            cell = row.get(s) or {}
            v = cell_value(cell)
            flags = cell.get("flags") or []
            used += flags
            texts[m].append(((f"{v:.3f}" if v == v else "n/a") + ("*" if cell.get("internal") else " "),
                             C.marks(flags)))
            if v != v:
                notes.append(f"n/a: {m} at {s}: {cell_reason(cell) or 'undefined'}")
        sm = results["summary"][m]
        missing = [k for k, stat in (("int", "internal_mean"), ("ext", "external_mean"))
                   if num(sm[stat]) != num(sm[stat])]
        if missing:
            notes.append(f"n/a: {m} {', '.join(missing + ['gap'])}: no "
                         f"{' and no '.join({'int': 'internal', 'ext': 'external'}[k] for k in missing)} "
                         "test site with an AUROC")
    counts = {s: _site_counts(results, s) for s in sites}
    count_text = {s: (f"{c[0]}/{c[1]}" if c else "?") for s, c in counts.items()}
    fw = max([len(f) for row in texts.values() for _, f in row] + [0])
    vw = max([len(t) for row in texts.values() for t, _ in row] + [6])
    width = max([vw + (fw + 1 if fw else 0) + 2] + [len(s) + 2 for s in sites] +
                [len(t) + 2 for t in count_text.values()])
    first = "test n+/n-"
    mw = max(10, len(first), *(len(m) for m in results["matrix"]))
    pad = " " * (fw + 1) if fw else ""  # names and counts line up with the numbers, not the marks
    head = f"{'model':<{mw}}  " + "".join(f"{f'{s:>{vw}}' + pad:>{width}}" for s in sites) + \
        f"{'int':>8}{'ext':>8}{'gap':>8}"
    fewest = " (fewest over labels)" if len(task) > 1 else ""
    lines = [f"AUROC ({task[0] if len(task) == 1 else 'macro'}) on each site's test split; "
             "* = internal (site trained this model)", head]
    if any(counts.values()):
        lines.append(f"{first:<{mw}}  " + "".join(f"{f'{count_text[s]:>{vw}}' + pad:>{width}}"
                                                  for s in sites).rstrip())
    for m, row in results["matrix"].items():
        cells = [f"{t:>{vw}}" + (f" {f:<{fw}}" if fw else "") for t, f in texts[m]]
        sm = results["summary"][m]
        fmt = lambda x: f"{num(x):8.3f}" if num(x) == num(x) else f"{'n/a':>8}"  # noqa: E731
        lines.append(f"{m:<{mw}}  " + "".join(f"{c:>{width}}" for c in cells) + fmt(sm["internal_mean"]) +
                     fmt(sm["external_mean"]) + fmt(sm["gap"]))
    for f in results.get("failed") or []:  # a site that failed in local / sequential
        lines.append(f"{f['model']:<{mw}}  failed at {f['site']} (round {f['round']}): {f['reason']}")
    if any(counts.values()):
        lines.append(f"{first}: labelled positives / negatives in each site's test split{fewest}")
    if used:
        lines.append(f"flags{' (any label)' if len(task) > 1 else ''}: {C.legend(used, min_per_class)}")
    elif any(counts.values()):
        lines.append(f"flags: none (every test split has at least {min_per_class} positives and "
                     "negatives per label; no one-class training data; no constant predictor)")
    return lines + notes
