"""What personalisation buys, from the matrix (results.json `personalisation`).

For each personalised method of the run (models whose meta says `personal`: `<method>-<site>`)
and each site s:
  own       the AUROC of s's personal model at s (internal)
  global    the AUROC of the method's global model at s (`<method>-global`), where one exists
  gain      own - global: the personalisation gain (Tavakoli et al. 2024 compare personal and
            global models per site the same way)
  external  the mean AUROC of s's personal model at the other sites
  penalty   own - external: how much worse s's personal model does elsewhere
  delong_p  the DeLong p-value of own vs global at s (the evaluator's paired statistics, per
            label; one number for a single-label task, else per label)
Means over the sites with both numbers. FedPer and FedRep have no global model (no shared
head): their gain is measured against another run's global model in a comparison (FedAvg's),
which server/report/comparison.py does not do for them; the table says "n/a".
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from chestfed.common import protocol as P
from chestfed.server.evaluation.matrix import cell_value


def _pair_p(pairs: Mapping[str, Any], site: str, a: str, b: str) -> dict[str, float]:
    here = pairs.get(site) or {}
    entry = here.get(f"{a}{P.EVAL_PAIR_SEP}{b}") or here.get(f"{b}{P.EVAL_PAIR_SEP}{a}") or {}
    return {label: float(s["delong_p"]) for label, s in (entry.get("labels") or {}).items()
            if s.get("delong_p") is not None}


def _mean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


def personalisation(models: Mapping[str, Mapping[str, Any]], matrix: Mapping[str, Mapping[str, Any]],
                    pairs: Mapping[str, Any], sites: list[str]) -> dict[str, Any]:
    """`models`: results.json `models` (name -> meta with `personal`); {} when none is personal."""
    methods = sorted({str(m["personal"]) for m in models.values() if m.get("personal")})
    out: dict[str, Any] = {}
    for method in methods:
        global_ = f"{method}-global" if f"{method}-global" in matrix else None
        per_site: dict[str, dict[str, Any]] = {}
        for site in sites:
            mine = matrix.get(f"{method}-{site}")
            if mine is None:
                continue
            own = cell_value(mine.get(site))
            ref = cell_value(matrix[global_].get(site)) if global_ else math.nan
            ext = _mean([cell_value(mine.get(o)) for o in sites if o != site])
            entry = {"own": own, "global": ref, "gain": own - ref, "external": ext,
                     "penalty": own - ext}
            if global_:
                entry["delong_p"] = _pair_p(pairs, site, f"{method}-{site}", global_)
            per_site[site] = entry
        out[method] = {"global_model": global_, "sites": per_site,
                       "mean_gain": _mean([e["gain"] for e in per_site.values()]),
                       "mean_penalty": _mean([e["penalty"] for e in per_site.values()])}
    return out
