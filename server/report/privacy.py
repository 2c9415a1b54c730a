"""The report's "Privacy" section: what DP and SecAgg+ guaranteed in this run, per site, and
what they did not (results.json `privacy`, server/privacy/ledger.py)."""
from __future__ import annotations

from typing import Any, Mapping

LIMITS = [
    "Evaluation aggregates (AUROC, CIs, ROC points on the fixed grid, counts under "
    "privacy.min_cell) still leave each site in the clear; no epsilon covers them.",
    "The trained model is released to every site and to the coordinator: that is what the "
    "epsilon above bounds.",
]


def _eps(v: Any) -> str:
    if isinstance(v, str):
        return v  # 'inf' (no noise)
    return "n/a" if v is None else f"{float(v):.2f}"


def privacy_section(doc: Any, res: Mapping[str, Any]) -> None:
    """Adds the section to `doc` (server.report.Doc); nothing when the run used neither."""
    pv = res.get("privacy") or {}
    dp = pv.get("dp") or {}
    level = dp.get("level", "none")
    if level == "none" and not pv.get("secagg"):
        return
    doc.h(1, "Privacy")
    facts: list[str] = []
    if level == "record":
        facts.append(f"Record-level DP-SGD at every site (Opacus): noise multiplier "
                     f"{dp.get('noise_multiplier')}, per-image clipping norm {dp.get('max_grad_norm')}, "
                     f"{dp.get('sampling')}; epsilon by Opacus' {dp.get('accountant', '').upper()} "
                     f"accountant ({dp.get('accounting')}).")
        facts.append(f"Model: {dp.get('model_norm')}.")
        facts.append(f"Unit: {dp.get('unit')}. Patients: {dp.get('group_privacy')}.")
        rows = []
        for site, s in (dp.get("sites") or {}).items():
            rows.append([site, _eps(s.get("epsilon")), f"{s.get('delta'):.2g}", str(s.get("steps")),
                         f"{s.get('sample_rate'):.3f}", str(s.get("max_images_per_patient")),
                         _eps(s.get("patient_epsilon")),
                         "vacuous (≥ 1)" if s.get("patient_bound_vacuous") else f"{s.get('patient_delta'):.2g}"])
        doc.table(["site", "ε per image", "δ", "steps", "sampling rate", "k (max images / patient)",
                   "ε per patient (k ε)", "δ per patient"], rows,
                  "final (ε, δ) per site over every model the site trained; δ = 1/N for the site's "
                  "N training images unless privacy.dp.delta is set")
        facts.append("DP-SGD changes the model (clipping and noise cost accuracy): compare with a "
                     "run without privacy.dp before relying on these scores.")
    elif level == "site":
        facts.append(f"Site-level DP at the coordinator with {dp.get('wrapper')} "
                     f"(clipping by the {dp.get('mode')}, {dp.get('clipping')} norm "
                     f"{dp.get('clipping_norm')}), noise multiplier {dp.get('noise_multiplier')}; "
                     f"{dp.get('weighting')}.")
        facts.append(f"Model: {dp.get('model_norm')}.")
        facts.append(f"ε = {_eps(dp.get('epsilon'))} at δ = {dp.get('delta'):.2g} per site (unit: "
                     f"{dp.get('unit')}), {dp.get('rounds')} noised rounds at sampling rate "
                     f"{dp.get('sampling_rate')}, Opacus' {dp.get('accountant', '').upper()} accountant. "
                     "With a handful of sites this ε is large: site-level DP is meant for many sites.")
        if dp.get("mode") == "server":
            facts.append("Mode server: the coordinator sees every site's raw update before clipping.")
    if pv.get("secagg"):
        sa = pv.get("secagg_detail") or {}
        facts.append(f"{sa.get('protocol')}: masked: {sa.get('masked')}; sent in the clear: "
                     f"{', '.join(sa.get('sent_in_clear', []))}; not sent: "
                     f"{', '.join(sa.get('not_sent', []))}.")
        facts.append("SecAgg+ hides each site's update from the coordinator, not the aggregate: "
                     "the averaged model (and with two sites, the other site's update, by "
                     "subtraction) is visible to all.")
    doc.ul(facts + LIMITS)
