"""The train-on-X / test-on-Y matrix: models as rows, test sites as columns.

Each cell keeps the site's aggregate metrics and whether the cell is internal (the site was in
the model's training set) or external. Per model: mean internal, mean external, and the
generalization gap (internal minus external).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from common.config import ExperimentConfig

KEY = "macro_auroc"


def _cell_value(cell: dict[str, Any], key: str = KEY) -> float:
    v = cell.get("metrics", {}).get(key, math.nan)
    return float(v) if v is not None else math.nan


def _mean(values: list[float]) -> float:
    vals = [v for v in values if v == v]
    return float(np.mean(vals)) if vals else math.nan


def summarize_row(row: dict[str, dict[str, Any]], key: str = KEY) -> dict[str, float]:
    internal = [_cell_value(c, key) for c in row.values() if c["internal"]]
    external = [_cell_value(c, key) for c in row.values() if not c["internal"]]
    every = internal + external
    vals = [v for v in every if v == v]
    out = {"internal_mean": _mean(internal), "external_mean": _mean(external),
           "all_mean": _mean(every), "all_sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan}
    out["gap"] = out["internal_mean"] - out["external_mean"]
    return out


def build_results(cfg: ExperimentConfig, models: list[Any], matrix: dict[str, dict[str, Any]],
                  checkpoints: dict[str, str], coord: Any, eval_seconds: float) -> dict[str, Any]:
    sites = [s.name for s in cfg.sites]
    summary = {m: summarize_row(row) for m, row in matrix.items()}
    columns = ["model"] + [f"{s}" for s in sites] + ["internal", "external", "gap"]
    rows = []
    for m, row in matrix.items():
        rows.append([m] + [_cell_value(row[s]) for s in sites] +
                    [summary[m]["internal_mean"], summary[m]["external_mean"], summary[m]["gap"]])
    return {
        "experiment": cfg.experiment,
        "strategy": cfg.strategy.name,
        "seed": cfg.seed,
        "task": cfg.task.task().names,
        "sites": {s: coord.site_info.get(s, {}) for s in sites},
        "models": {m.name: {"trained_on": m.trained_on, "checkpoint": checkpoints.get(m.name),
                            "local_batchnorm": m.local_bn, **m.meta} for m in models},
        "metric": KEY,
        "matrix": matrix,
        "summary": summary,
        "table": {"columns": columns, "rows": rows},
        "budget": {"images_processed": coord.images_processed,
                   "optimizer_steps": coord.optimizer_steps,
                   "local_epochs": cfg.train.local_epochs, "rounds": cfg.strategy.rounds},
        "dropouts": coord.dropouts,
        "eval_seconds": eval_seconds,
    }


def format_table(results: dict[str, Any]) -> list[str]:
    """Console table: AUROC per test site, '*' marks internal cells."""
    sites = list(results["sites"])
    width = max(8, *(len(s) + 1 for s in sites))
    mw = max(10, *(len(m) for m in results["matrix"]))
    head = f"{'model':<{mw}}  " + "".join(f"{s:>{width}}" for s in sites) + f"{'int':>8}{'ext':>8}{'gap':>8}"
    lines = [f"AUROC ({results['task'][0] if len(results['task']) == 1 else 'macro'}) on each site's "
             "test split; * = internal (site trained this model)", head]
    for m, row in results["matrix"].items():
        cells = []
        for s in sites:
            v = _cell_value(row[s])
            mark = "*" if row[s]["internal"] else " "
            cells.append(f"{(f'{v:.3f}' if v == v else 'n/a') + mark:>{width}}")
        sm = results["summary"][m]
        fmt = lambda x: f"{x:8.3f}" if x == x else f"{'n/a':>8}"  # noqa: E731
        lines.append(f"{m:<{mw}}  " + "".join(cells) + fmt(sm["internal_mean"]) +
                     fmt(sm["external_mean"]) + fmt(sm["gap"]))
    return lines
