"""The report's "Personalisation" section: per personalised method, what each site's personal
model gains over the global model at its own site, and what it loses at the others
(results.json `personalisation`, server/evaluation/personalisation.py)."""
from __future__ import annotations

import math
from typing import Any, Mapping


def _f(v: Any, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{float(v):+.3f}" if signed else f"{float(v):.3f}"


def _p(ps: Mapping[str, float] | None) -> str:
    if not ps:
        return "n/a"
    return ", ".join(f"{p:.3g}" for p in ps.values()) if len(ps) > 1 else f"{next(iter(ps.values())):.3g}"


def personalisation_section(doc: Any, res: Mapping[str, Any]) -> None:
    """Adds the section to `doc` (server.report.Doc); nothing when no method was personalised."""
    per = res.get("personalisation") or {}
    if not per:
        return
    doc.h(1, "Personalisation")
    doc.p("Each site's personal model (`<method>-<site>`) at its own site against the method's "
          "global model there (gain), and at the other sites (external; penalty = own - "
          "external). AUROC; DeLong p of personal vs global at that site (per label).")
    for method, m in per.items():
        rows = [[site, _f(e["own"]), _f(e["global"]), _f(e["gain"], True), _f(e["external"]),
                 _f(e["penalty"], True), _p(e.get("delong_p"))] for site, e in m["sites"].items()]
        rows.append(["mean", "", "", _f(m["mean_gain"], True), "", _f(m["mean_penalty"], True), ""])
        note = (f"global model: {m['global_model']}" if m.get("global_model") else
                "no global model (the head is not shared): gain n/a; compare with FedAvg's run")
        doc.table(["site", "own site", "global", "gain", "external", "penalty", "DeLong p"],
                  rows, f"{method}: {note}")
