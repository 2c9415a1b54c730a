"""The report of one run: `write_report(run_folder)` reads results.json (and metrics.jsonl for
the training history) and writes report.md, report.html and figures/ (server/report/document.py).

The sections come from server/report/sections.py, significance.py, server/report/agreement.py (seed
001's agreement) and server/report/privacy.py; this module adds the run's facts, the sites and
models, the training history and the notes that list every n/a with its reason.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from chestfed.common import caveats as C
from chestfed.server.report import figures
from chestfed.server.evaluation.matrix import cell_reason, cell_value, num
from chestfed.server.report.document import Doc
from chestfed.server.report.files import write_doc
from chestfed.server.report.format import fmt, fmt_int
from chestfed.server.report.sections import (
    flag_marks,
    label_section,
    matrix_section,
    min_per_class,
    roc_note,
    roc_section,
    threshold_section,
    used_flags,
)
from chestfed.server.report.significance import significance_section
from chestfed.server.run.folder import RunFolder
from chestfed.common.errors import ChestFedError
from chestfed.server.evaluation.matrix import label_table
from chestfed.server.report.personalisation import personalisation_section
from chestfed.server.report.privacy import privacy_section
from chestfed.server.run.folder import read_json_file

def _missing(res: Mapping[str, Any]) -> list[str]:
    """Every n/a in the matrix, with the site's reason."""
    out = []
    for model, row in res["matrix"].items():
        for site, cell in row.items():
            if cell.get("error"):
                out.append(f"{model} at {site}: site failed ({cell['error']})")
                continue
            if math.isnan(cell_value(cell)):
                out.append(f"{model} at {site}: {cell_reason(cell) or 'undefined'}")
            for k, why in sorted((cell.get("reasons") or {}).items()):
                if k.endswith("/op") or k.endswith("auroc_ci") or k == "bootstrap":
                    out.append(f"{model} at {site} ({k}): {why}")
    return out


def _flagged(res: Mapping[str, Any]) -> list[str]:
    """Every flagged cell, per label, in words with its test split's class counts."""
    mpc = min_per_class(res)
    out = []
    for model, row in res["matrix"].items():
        for site, cell in row.items():
            for label, d in (cell.get("labels") or {}).items():
                if d.get("flags"):
                    out.append(f"{model} at {site}, {label} ({d.get('n_pos')}+/{d.get('n_neg')}-): "
                               f"{C.describe(d['flags'], mpc)}")
    return out


def _run_facts(res: Mapping[str, Any], name: str) -> list[str]:
    ev = res.get("evaluation") or {}
    split = res.get("split") or {}
    budget = res.get("budget") or {}
    facts = [
        f"run: {name}; status: {res.get('status', '?')}",
        f"strategy: {res.get('strategy')}; experiment: {res.get('experiment')}; seed: {res.get('seed')}",
        f"task: {', '.join(res.get('task', []))}",
        f"splits: seed {split.get('seed', '?')}" + (f", fold {split.get('fold')} of {split.get('folds')}"
                                                    if split.get("folds") else ""),
        f"training budget: {budget.get('rounds', '?')} round(s) x {budget.get('local_epochs', '?')} "
        f"local epoch(s); {budget.get('images_processed', '?')} images processed, "
        f"{budget.get('optimizer_steps', '?')} optimizer steps",
    ]
    if ev:
        facts.append(f"evaluation on the {ev.get('split', 'test')} split: "
                     f"{ev.get('bootstrap', 0)} patient-bootstrap resamples "
                     f"(seed {ev.get('seed')}) for {int(round(100 * num(ev.get('ci', 0.95))))}% CIs; "
                     f"{roc_note(ev)}; took {fmt(ev.get('seconds'), 1)} s")
        facts.append(f"deployable threshold: {ev.get('threshold_rule', '')}")
    suppressed = _suppressed(res)
    if suppressed:
        shown = ", ".join(sorted({f"<{m}" for _, m in suppressed}))
        facts.append(f"disclosure control: {len(suppressed)} confusion count(s) were below "
                     f"privacy.min_cell at the sites and left them only as {shown} (results.json: "
                     "NaN with the reason); oracle thresholds are rounded to 0.01")
    return facts


def _suppressed(res: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(key, min_cell) of every count a site suppressed (common/privacy/disclosure.py)."""
    out = []
    for row in res["matrix"].values():
        for cell in row.values():
            for k, why in (cell.get("reasons") or {}).items():
                m = re.search(r"shown as <(\d+)", str(why)) if str(why).startswith("suppressed:") else None
                if m:
                    out.append((k, m.group(1)))
    return out



def batchnorm_text(info: Mapping[str, Any]) -> str:
    """Which BatchNorm statistics scored a model (server/evaluation/batchnorm.py's record)."""
    bn = info.get("batchnorm") or {}
    if info.get("local_batchnorm"):
        return "each site's own (FedBN), re-estimated at the site"
    if bn.get("mode") == "precise":
        text = f"re-estimated on {', '.join(bn.get('sites', []))} ({fmt_int(bn.get('images'))} train images)"
        return text + (f"; skipped {'; '.join(bn['skipped'])}" if bn.get("skipped") else "")
    if bn.get("mode") == "running":
        return "training-time running averages" + (f" ({bn['note']})" if bn.get("note") else "")
    return "training-time running averages (eval.batchnorm: running)"


def render_run(res: Mapping[str, Any], history: Sequence[Mapping[str, Any]], name: str) -> tuple[Doc, dict[str, bytes]]:
    """The report of one run as a Doc (+ the figures worth keeping by name)."""
    sites = list(res["sites"])
    models = list(res["matrix"])
    labels = list(res.get("task", []))
    doc = Doc(f"ChestFed report: {res.get('experiment')} / {res.get('strategy')}")
    doc.ul(_run_facts(res, name))
    doc.h(1, "Sites and models")
    site_rows = []
    for s, info in res["sites"].items():
        site_rows.append([s] + [fmt(info.get(k), 0) for k in ("n_train", "n_val", "n_test", "n_bad")])
    doc.table(["site", "train", "val", "test", "unreadable"], site_rows, "images per split")
    count_rows = []
    for s, info in res["sites"].items():
        cc = info.get("class_counts") or {}
        for label in labels:
            per = [(cc.get(split) or {}).get(label) for split in ("train", "val", "test")]
            if any(per):
                count_rows.append([s, label] + [f"{c['n_pos']}/{c['n_neg']}" if c else "masked"
                                                for c in per])
    if count_rows:
        doc.table(["site", "label", "train n+/n−", "val n+/n−", "test n+/n−"], count_rows,
                  "labelled positives / negatives per split and task label (masked: not annotated "
                  f"at this site); eval.min_per_class = {min_per_class(res)}")
    doc.ul([f"warning: {w}" for w in res.get("data_warnings") or []])
    model_rows = []
    for m, info in (res.get("models") or {}).items():
        extra = {k: v for k, v in info.items()
                 if k not in ("trained_on", "checkpoint", "local_batchnorm", "batchnorm")}
        model_rows.append([m, ", ".join(info.get("trained_on", [])), batchnorm_text(info),
                           str(info.get("checkpoint") or ""),
                           ", ".join(f"{k}={v}" for k, v in extra.items())])
    doc.table(["model", "trained on", "BatchNorm statistics", "checkpoint", "details"], model_rows,
              "BatchNorm statistics are re-estimated with the final weights on the model's own "
              "training sites' train splits before it is saved or scored (PreciseBN), unless "
              "said otherwise")
    keep = matrix_section(doc, res, sites, models)
    # secondary heatmaps: deployable-threshold F1 and calibration
    f1 = np.array([[num(((res["matrix"][m].get(s) or {}).get("metrics") or {}).get("macro_op/f1"))
                    for s in sites] for m in models])
    if np.isfinite(f1).any():
        internal = np.array([[bool((res["matrix"][m].get(s) or {}).get("internal")) for s in sites]
                             for m in models], dtype=object)
        marks, legend = flag_marks(res, models, sites), C.legend(used_flags(res), min_per_class(res))
        doc.figure("matrix_f1_deployable", figures.heatmap(
            f1, models, sites, internal, title="F1 at the deployable threshold", vmin=0.0, vmax=1.0,
            cbar_label="F1", flags=marks, flag_note=legend),
            "F1 at each model's deployable threshold (macro over labels)")
        ece = np.array([[num(((res["matrix"][m].get(s) or {}).get("metrics") or {}).get("macro_ece"))
                         for s in sites] for m in models])
        doc.figure("matrix_ece", figures.heatmap(
            ece, models, sites, internal, title="Expected calibration error (lower is better)",
            vmin=0.0, vmax=max(0.2, float(np.nanmax(ece)) if np.isfinite(ece).any() else 0.2),
            cmap="magma_r", cbar_label="ECE", flags=marks, flag_note=legend),
            "Expected calibration error (macro over labels)")
    threshold_section(doc, res, sites, models)
    table = res.get("label_table")
    if not table:
        table = label_table(res["matrix"], sites, labels)
    label_section(doc, table, sites, models, "Per label (Bajwa et al. 2020, Table 7)",
                   "AUROC per label, test site and model; Average = mean ± sd over the test sites "
                   "where the label is defined.", res)
    roc_section(doc, res, sites, models)
    significance_section(doc, res, sites, models)
    from chestfed.server.report.agreement import agreement_section  # Cohen et al. 2020: calibrated kappa, Bland-Altman

    agreement_section(doc, res, sites)

    personalisation_section(doc, res)  # personal vs global models (server/report/personalisation.py)
    privacy_section(doc, res)  # epsilon per site, SecAgg+ (server/report/privacy.py)
    curves = figures.training_curves(list(history))
    if curves is not None:
        doc.h(1, "Training history")
        doc.figure("training", curves, "Per-round training loss and validation AUROC (metrics.jsonl)")
    doc.h(1, "Notes")
    notes = []
    bn = [f"{m} at {s}: {c['batchnorm']}" for m, row in res["matrix"].items() for s, c in row.items()
          if c.get("batchnorm")]
    notes += [f"BatchNorm: {x}" for x in bn]
    notes += [f"dropout: round {d.get('round')}, site {d.get('site')}: {d.get('reason')}"
              for d in res.get("dropouts") or []]
    notes += [f"failed: {f['model']} at site {f['site']} (round {f['round']}): {f['reason']}; "
              "the other sites finished" for f in res.get("failed") or []]
    notes += [f"missing: {x}" for x in _missing(res)]
    notes += [f"flagged: {x}" for x in _flagged(res)]
    notes.append("Privacy: every metric, CI, ROC point and paired statistic above was computed at the "
                 "test site; the coordinator received aggregates only (no image, no per-image score).")
    doc.ul(notes)
    return doc, keep


def write_report(run_folder: str | Path) -> dict[str, Path]:
    """Write report.md, report.html and figures/ for the run folder (reads results.json and
    metrics.jsonl). Returns the paths: md, html, figures, heatmap."""
    folder = Path(run_folder)
    res_file = folder / "results.json"
    if not res_file.is_file():
        raise ChestFedError(f"{folder}: no results.json (did the run finish? see run.json)")

    res = read_json_file(res_file)
    history = RunFolder(folder).read_metrics()
    doc, keep = render_run(res, history, folder.name)
    return write_doc(folder, doc, keep)


