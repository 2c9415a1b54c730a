"""The run report's sections on the matrix: the AUROC matrix with its CIs and flags, the
operating points (deployable, 0.5, oracle thresholds), Table 7 per label (also in the comparison
report), and the ROC curves. Each appends to a Doc and reads only results.json's aggregates."""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from chestfed.common import caveats as C
from chestfed.common.metrics import THRESHOLD_METRICS
from chestfed.server.report import figures
from chestfed.server.evaluation.matrix import cell_ci, cell_value, label_key, num, summarize_row
from chestfed.server.report.document import Cell, Doc
from chestfed.server.report.format import flag_suffix, fmt, fmt_ci, fmt_int, pm

NAN_ = float("nan")
POINTS = {"at05": "threshold 0.5", "op": "deployable threshold (training sites' validation Youden)",
          "oracle": "oracle threshold (Youden on this test set: optimistic)"}
METRIC_NAMES = {"accuracy": "acc", "precision": "prec", "recall": "sens", "specificity": "spec",
                "f1": "F1"}


def min_per_class(res: Mapping[str, Any]) -> int:
    v = num((res.get("evaluation") or {}).get("min_per_class"))
    return C.DEFAULT_MIN_PER_CLASS if math.isnan(v) else int(v)


def flag_marks(res: Mapping[str, Any], models: list[str], sites: list[str]) -> list[list[str]]:
    return [[C.marks((res["matrix"][m].get(s) or {}).get("flags") or []) for s in sites] for m in models]


def used_flags(res: Mapping[str, Any]) -> list[str]:
    return C.ordered(f for row in res["matrix"].values() for c in row.values() for f in c.get("flags") or [])


def _counts_text(cell: Mapping[str, Any] | None, label: str | None = None) -> str:
    """'15/43' (positives / negatives of the test split) or '' when the cell has no counts."""
    c = (((cell or {}).get("labels") or {}).get(label) or {}) if label else (cell or {})
    return f"{c['n_pos']}/{c['n_neg']}" if "n_pos" in c and "n_neg" in c else ""


def _site_counts_text(res: Mapping[str, Any], models: list[str], site: str, label: str | None = None) -> str:
    for m in models:
        t = _counts_text(res["matrix"][m].get(site), label)
        if t:
            return t
    return ""


def _cells_text(v: float, cls: str = "") -> Cell:
    return Cell(fmt(v), "na" if math.isnan(v) else cls)


def matrix_section(doc: Doc, res: Mapping[str, Any], sites: list[str], models: list[str]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    values = np.array([[cell_value(res["matrix"][m].get(s)) for s in sites] for m in models])
    internal = np.array([[bool((res["matrix"][m].get(s) or {}).get("internal")) for s in sites]
                         for m in models], dtype=object)
    labels = res.get("task", [])
    what = labels[0] if len(labels) == 1 else f"macro over {len(labels)} labels"
    used, mpc = used_flags(res), min_per_class(res)
    legend = ("a flag of any label; " if len(labels) > 1 and used else "") + C.legend(used, mpc)
    png = figures.heatmap(values, models, sites, internal,
                          title=f"AUROC ({what}) of each model (row) on each site's test split",
                          cbar_label="AUROC", flags=flag_marks(res, models, sites), flag_note=legend)
    out["heatmap"] = png
    doc.h(1, "The matrix")
    doc.p("Rows are models, columns are test sites. Internal cells (the site was in the model's "
          "training set) are outlined in the figure and marked * in the tables. Every number was "
          "computed at the test site on its own test split; only aggregates left it. A number "
          "with a caveat is hatched in the figures and followed by † and a letter per flag in "
          f"the tables ({C.legend(C.FLAGS, mpc)}).")
    doc.figure("matrix_auroc", png, f"AUROC ({what}); outlined = internal" +
               (f"; hatched †: {legend}" if used else ""))
    header = ["model"] + sites + ["internal", "external", "gap", "all sites"]
    rows = []
    counts = [_site_counts_text(res, models, s) for s in sites]
    if any(counts):
        rows.append([Cell("test n+/n−")] + [Cell(c) for c in counts] + [Cell("")] * 4)
    for m in models:
        row = [Cell(m)]
        for s in sites:
            cell = res["matrix"][m].get(s)
            v = cell_value(cell)
            lo, hi = cell_ci(cell)
            row.append(Cell(fmt_ci(v, lo, hi) + flag_suffix((cell or {}).get("flags")),
                            "na" if math.isnan(v) else ("int" if (cell or {}).get("internal") else "")))
        sm = res.get("summary", {}).get(m) or summarize_row(res["matrix"][m])
        row += [_cells_text(num(sm["internal_mean"])), _cells_text(num(sm["external_mean"])),
                _cells_text(num(sm["gap"])), Cell(pm(sm["all_mean"], sm["all_sd"]))]
        rows.append(row)
    for f in res.get("failed") or []:  # local / sequential: a row whose site failed
        rows.append([Cell(f["model"]), Cell(f"failed at {f['site']} (round {f['round']}): "
                                            f"{f['reason']}", "na")] + [Cell("")] * (len(header) - 2))
    doc.table(header, rows, "AUROC [95% patient-bootstrap CI]; * internal. gap = internal mean - "
              "external mean (positive: the model does worse away from home); all sites = mean ± sd "
              "across test sites." + (" test n+/n− = labelled positives / negatives in the test "
                                      "split" + (" (fewest over labels)" if len(labels) > 1 else "") + "."
                                      if any(counts) else "") +
              (f" † flags{' (any label)' if len(labels) > 1 else ''}: {C.legend(used, mpc)}."
               if used else ""))
    return out


def threshold_section(doc: Doc, res: Mapping[str, Any], sites: list[str], models: list[str]) -> None:
    doc.h(1, "Operating points")
    thr = res.get("thresholds") or {}
    labels = res.get("task", [])
    if thr:
        doc.p("Each model's deployable threshold per label was chosen on validation data of its "
              "training site(s), never on a test set: " +
              str((res.get("evaluation") or {}).get("threshold_rule", "")) + ".")
        rows = []
        for m in models:
            for label in labels:
                d = (thr.get(m) or {}).get(label) or {}
                src = "; ".join(f"{s}: {fmt(v.get('youden'))} ({fmt_int(v.get('n_pos'))}+/"
                                f"{fmt_int(v.get('n_neg'))}-)"
                                for s, v in (d.get("sources") or {}).items())
                t = num(d.get("threshold"))
                rows.append([Cell(m), Cell(label), Cell(fmt(t), "na" if math.isnan(t) else ""),
                             Cell(src or "-"), Cell(d.get("reason") or "")])
        doc.table(["model", "label", "pooled threshold", "validation Youden per training site (pos+/neg-)",
                   "note"], rows)
    for point, title in POINTS.items():
        rows = []
        for m in models:
            for s in sites:
                cell = res["matrix"][m].get(s) or {}
                met = cell.get("metrics") or {}
                if not met:
                    continue
                vals = [num(met.get(f"macro_{point}/{k}")) for k in THRESHOLD_METRICS]
                if all(math.isnan(v) for v in vals) and point == "op" and not thr:
                    continue
                cls = "int" if cell.get("internal") else ""
                row = [Cell(m), Cell(s, cls)]
                if len(labels) == 1:
                    row.append(_cells_text(num(met.get(f"labels/{labels[0]}/{point}/threshold"))))
                    if point == "op":
                        row.append(Cell((cell.get("threshold_from") or {}).get(labels[0], "pooled")))
                row += [_cells_text(v) for v in vals]
                if point == "at05":
                    row.append(_cells_text(num(met.get("macro_ece"))))
                rows.append(row)
        if not rows:
            continue
        header = ["model", "test site"] + (["threshold"] if len(labels) == 1 else []) + \
                 (["from"] if len(labels) == 1 and point == "op" else []) + \
                 [METRIC_NAMES[k] for k in THRESHOLD_METRICS] + (["ECE"] if point == "at05" else [])
        doc.h(2, f"At the {title}")
        doc.table(header, rows, ("macro over labels; " if len(labels) > 1 else "") +
                  "sens = recall (sensitivity), spec = specificity; ECE = expected calibration "
                  "error (15 bins)" if point == "at05" else
                  ("macro over labels" if len(labels) > 1 else ""))


def label_section(doc: Doc, table: Mapping[str, Any], sites: list[str], models: list[str],
                   title: str, sd_note: str, res: Mapping[str, Any] | None = None) -> None:
    """Table 7 and its bars. With one run's results `res`, each (label, test site) row also shows
    the test split's positives / negatives, and a flagged number its † marks (common/caveats.py)."""
    doc.h(1, title)
    rows = []
    counted = res is not None and any(_site_counts_text(res, models, s, label)
                                      for label in table for s in sites)
    used: list[str] = []
    for label, per_model in table.items():
        for s in sites:
            row = [Cell(label), Cell(s)]
            if counted:
                row.append(Cell(_site_counts_text(res, models, s, label)))
            for m in models:
                v = (per_model.get(m) or {}).get("sites", {}).get(s)
                x = num(v["mean"] if isinstance(v, Mapping) else v)
                sd = num(v.get("sd")) if isinstance(v, Mapping) else NAN_
                flags = ((((res["matrix"].get(m) or {}).get(s) or {}).get("labels") or {}).get(label)
                         or {}).get("flags") if res is not None else None
                used += flags or []
                row.append(Cell(pm(x, sd) + flag_suffix(flags), "na" if math.isnan(x) else ""))
            rows.append(row)
        avg = [Cell(label), Cell("Average")] + ([Cell("")] if counted else [])
        means = [num((per_model.get(m) or {}).get("mean")) for m in models]
        best = max((x for x in means if x == x), default=NAN_)
        for m, x in zip(models, means):
            avg.append(Cell(pm(x, (per_model.get(m) or {}).get("sd")),
                            "na" if math.isnan(x) else ("best" if x == best and len(models) > 1 else "")))
        rows.append(avg)
    if counted:
        sd_note += " n+/n− = labelled positives / negatives in the test split."
    if used:
        sd_note += f" † flags: {C.legend(used, min_per_class(res))}."
    doc.table(["label", "test site"] + (["n+/n−"] if counted else []) + models, rows, sd_note)
    labels = list(table)
    means = np.array([[num((table[l].get(m) or {}).get("mean")) for m in models] for l in labels])
    sds = np.array([[num((table[l].get(m) or {}).get("sd")) for m in models] for l in labels])
    doc.figure("label_bars", figures.label_bars(labels, models, means, sds,
                                                title="AUROC per label: mean ± sd over test sites"),
               "Per-label AUROC, mean ± sd over the test sites where the label is defined")



def roc_note(ev: Mapping[str, Any]) -> str:
    """How the ROC curves left the sites (results.json of older runs: thinned corner points)."""
    if ev.get("roc_grid"):
        return (f"ROC curves as TPR on a fixed grid of {ev['roc_grid']} FPR values (each site "
                "sends the highest TPR reached at or below each FPR, never its curve's corners)")
    return f"ROC curves at most {ev.get('roc_points', 200)} points"


def roc_section(doc: Doc, res: Mapping[str, Any], sites: list[str], models: list[str]) -> None:
    labels = res.get("task", [])
    doc.h(1, "ROC curves")
    doc.p("One panel per label at each test site; solid lines are internal models, dashed "
          f"external. {roc_note(res.get('evaluation') or {}).capitalize()}.")
    for s in sites:
        curves: dict[str, list] = {}
        for label in labels:
            for m in models:
                cell = res["matrix"][m].get(s) or {}
                roc = (cell.get("roc") or {}).get(label) or {}
                curves.setdefault(label, []).append(
                    (m, roc.get("fpr") or [], roc.get("tpr") or [],
                     cell_value(cell, label_key(label)), bool(cell.get("internal"))))
        why = {}
        for m in models:
            for k, v in ((res["matrix"][m].get(s) or {}).get("reasons") or {}).items():
                if k.endswith("/auroc"):
                    why.setdefault(k.rsplit("/", 1)[0], v)
            if (res["matrix"][m].get(s) or {}).get("error"):
                for label in labels:
                    why.setdefault(label, f"site failed: {res['matrix'][m][s]['error']}")
        doc.figure(f"roc_{s}", figures.roc_site(s, labels, curves, why), f"ROC curves at {s}")


