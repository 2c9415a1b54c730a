"""Readable reports: `report.md` and a self-contained `report.html` in a run folder.

`write_report(run_folder)` reads the folder's results.json (and metrics.jsonl for the training
history) and writes report.md, report.html and the figures under figures/. The HTML inlines
every figure as a base64 PNG and carries its own CSS: it opens from a USB stick on a hospital
workstation with no network, and a Content-Security-Policy forbids it to fetch anything.
`write_comparison_report(folder, results_list)` does the same for several runs (seeds, folds,
strategies) through `server.matrix.aggregate_runs`; launch/compare.py calls it.

Every file is written atomically. Numbers that could not be computed (a test site with one
class, a threshold undefined on a validation split, a site that failed) are shown as n/a and
the reason is listed, never replaced by a made-up value.
"""
from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from common.metrics import THRESHOLD_METRICS
from common.stats import holm
from common import caveats as C
from server import figures
from server.matrix import (
    KEY,
    aggregate_runs,
    cell_ci,
    cell_reason,
    cell_value,
    label_key,
    num,
    run_id,
    summarize_row,
)
from server.runfolder import RunFolder, atomic_write_bytes, atomic_write_json, atomic_write_text

FIG_DIR = "figures"
NUMERIC = re.compile(r"^([-+<]?\d|n/a( |$))")
NAN_ = float("nan")
POINTS = {"at05": "threshold 0.5", "op": "deployable threshold (training sites' validation Youden)",
          "oracle": "oracle threshold (Youden on this test set: optimistic)"}
SHOWN_STATS = {"delong": "DeLong", "kappa_op": "kappa (deployable)",
               "kappa_oracle": "kappa (oracle)", "spearman": "Spearman"}
METRIC_NAMES = {"accuracy": "acc", "precision": "prec", "recall": "sens", "specificity": "spec",
                "f1": "F1"}


# --- formatting ------------------------------------------------------------------------------------


def fmt(v: Any, digits: int = 3) -> str:
    x = num(v)
    return "n/a" if math.isnan(x) else f"{x:.{digits}f}"


def fmt_p(v: Any) -> str:
    x = num(v)
    if math.isnan(x):
        return "n/a"
    return "<0.001" if x < 0.001 else f"{x:.3f}"


def fmt_int(v: Any) -> str:
    x = num(v)
    return "n/a" if math.isnan(x) else str(int(round(x)))


def pm(mean: Any, sd: Any, digits: int = 3) -> str:
    m, s = num(mean), num(sd)
    if math.isnan(m):
        return "n/a"
    return f"{m:.{digits}f}" if math.isnan(s) else f"{m:.{digits}f} ± {s:.{digits}f}"


def fmt_ci(v: float, lo: float, hi: float) -> str:
    if math.isnan(v):
        return "n/a"
    if math.isnan(lo) or math.isnan(hi):
        return f"{v:.3f}"
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def _min_per_class(res: Mapping[str, Any]) -> int:
    v = num((res.get("evaluation") or {}).get("min_per_class"))
    return C.DEFAULT_MIN_PER_CLASS if math.isnan(v) else int(v)


def _flag_suffix(flags: Sequence[str] | None) -> str:
    """' †so' after a flagged number (common/caveats.py marks), '' otherwise."""
    m = C.marks(flags or [])
    return f" †{m}" if m else ""


def _flag_marks(res: Mapping[str, Any], models: list[str], sites: list[str]) -> list[list[str]]:
    return [[C.marks((res["matrix"][m].get(s) or {}).get("flags") or []) for s in sites] for m in models]


def _used_flags(res: Mapping[str, Any]) -> list[str]:
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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


# --- a tiny document model rendered to Markdown and to HTML ---------------------------------------


@dataclass
class Cell:
    text: str
    cls: str = ""  # "int" (internal), "na" (missing), "best"


@dataclass
class Doc:
    title: str
    parts: list[tuple[str, Any]] = field(default_factory=list)
    figures: dict[str, bytes] = field(default_factory=dict)

    def h(self, level: int, text: str) -> None:
        self.parts.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.parts.append(("p", text))

    def ul(self, items: Sequence[str]) -> None:
        if items:
            self.parts.append(("ul", list(items)))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Cell | str]], note: str = "") -> None:
        rows = [[c if isinstance(c, Cell) else Cell(str(c)) for c in r] for r in rows]
        self.parts.append(("table", (list(header), rows, note)))

    def figure(self, name: str, png: bytes | None, caption: str) -> None:
        if png is None:
            return
        name = _slug(name)
        self.figures[name] = png
        self.parts.append(("fig", (name, caption)))

    # rendering
    def to_markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, body in self.parts:
            if kind == "h":
                out += [f"{'#' * (body[0] + 1)} {body[1]}", ""]
            elif kind == "p":
                out += [body, ""]
            elif kind == "ul":
                out += [f"- {x}" for x in body] + [""]
            elif kind == "table":
                header, rows, note = body
                esc = lambda s: s.replace("|", "\\|")  # noqa: E731
                out.append("| " + " | ".join(esc(h) for h in header) + " |")
                out.append("|" + "|".join("---" for _ in header) + "|")
                for r in rows:
                    out.append("| " + " | ".join(esc(c.text + ("*" if c.cls == "int" else ""))
                                                 for c in r) + " |")
                out.append("")
                if note:
                    out += [f"_{note}_", ""]
            elif kind == "fig":
                name, caption = body
                out += [f"![{caption}]({FIG_DIR}/{name}.png)", "", f"_{caption}_", ""]
        return "\n".join(out).rstrip() + "\n"

    def to_html(self) -> str:
        e = html.escape
        body: list[str] = [f"<h1>{e(self.title)}</h1>"]
        toc: list[str] = []
        for kind, part in self.parts:
            if kind == "h":
                level, text = part
                anchor = _slug(text).lower()
                if level == 1:
                    toc.append(f'<li><a href="#{anchor}">{e(text)}</a></li>')
                body.append(f'<h{level + 1} id="{anchor}">{e(text)}</h{level + 1}>')
            elif kind == "p":
                body.append(f"<p>{e(part)}</p>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in part) + "</ul>")
            elif kind == "table":
                header, rows, note = part
                t = ['<div class="tw"><table><thead><tr>' + "".join(f"<th>{e(h)}</th>" for h in header)
                     + "</tr></thead><tbody>"]
                for r in rows:
                    t.append("<tr>" + "".join(_td(c) for c in r) + "</tr>")
                t.append("</tbody></table></div>")
                if note:
                    t.append(f'<p class="note">{e(note)}</p>')
                body.append("".join(t))
            elif kind == "fig":
                name, caption = part
                data = base64.b64encode(self.figures[name]).decode("ascii")
                body.append(f'<figure><img alt="{e(caption)}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{e(caption)}</figcaption></figure>")
        nav = f'<nav><ol>{"".join(toc)}</ol></nav>' if toc else ""
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
            "img-src data:; style-src 'unsafe-inline'\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{e(self.title)}</title><style>{CSS}</style></head><body>"
            + body[0] + nav + "".join(body[1:]) + "</body></html>\n"
        )


def _td(c: Cell) -> str:
    classes = " ".join(x for x in (c.cls, "n" if NUMERIC.match(c.text) else "",
                                   "w" if len(c.text) > 60 else "") if x)
    return f'<td class="{classes}">{html.escape(c.text)}</td>' if classes else f"<td>{html.escape(c.text)}</td>"


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:2em auto;max-width:1200px;
padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em;border-bottom:2px solid #444}h2{font-size:1.3em;margin-top:2em;border-bottom:1px solid #bbb}
h3{font-size:1.1em}table{border-collapse:collapse;margin:0.6em 0;font-size:0.85em}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;white-space:nowrap}
th{background:#f0f0f0}td.n{text-align:right}td.w{white-space:normal;min-width:24em}.tw{overflow-x:auto}
td.int{background:#fde0dd;font-weight:600;outline:2px solid #d62728;outline-offset:-2px}
td.na{color:#888;font-style:italic}td.best{font-weight:700}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption,.note{font-size:0.85em;color:#555}nav ol{columns:2;font-size:0.9em}
"""


# --- one run ---------------------------------------------------------------------------------------


def _cells_text(v: float, cls: str = "") -> Cell:
    return Cell(fmt(v), "na" if math.isnan(v) else cls)


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
    mpc = _min_per_class(res)
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
                     f"{_roc_note(ev)}; took {fmt(ev.get('seconds'), 1)} s")
        facts.append(f"deployable threshold: {ev.get('threshold_rule', '')}")
    suppressed = _suppressed(res)
    if suppressed:
        shown = ", ".join(sorted({f"<{m}" for _, m in suppressed}))
        facts.append(f"disclosure control: {len(suppressed)} confusion count(s) were below "
                     f"privacy.min_cell at the sites and left them only as {shown} (results.json: "
                     "NaN with the reason); oracle thresholds are rounded to 0.01")
    return facts


def _suppressed(res: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(key, min_cell) of every count a site suppressed (common/disclosure.py)."""
    import re

    out = []
    for row in res["matrix"].values():
        for cell in row.values():
            for k, why in (cell.get("reasons") or {}).items():
                m = re.search(r"shown as <(\d+)", str(why)) if str(why).startswith("suppressed:") else None
                if m:
                    out.append((k, m.group(1)))
    return out


def _matrix_section(doc: Doc, res: Mapping[str, Any], sites: list[str], models: list[str]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    values = np.array([[cell_value(res["matrix"][m].get(s)) for s in sites] for m in models])
    internal = np.array([[bool((res["matrix"][m].get(s) or {}).get("internal")) for s in sites]
                         for m in models], dtype=object)
    labels = res.get("task", [])
    what = labels[0] if len(labels) == 1 else f"macro over {len(labels)} labels"
    used, mpc = _used_flags(res), _min_per_class(res)
    legend = ("a flag of any label; " if len(labels) > 1 and used else "") + C.legend(used, mpc)
    png = figures.heatmap(values, models, sites, internal,
                          title=f"AUROC ({what}) of each model (row) on each site's test split",
                          cbar_label="AUROC", flags=_flag_marks(res, models, sites), flag_note=legend)
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
            row.append(Cell(fmt_ci(v, lo, hi) + _flag_suffix((cell or {}).get("flags")),
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


def _threshold_section(doc: Doc, res: Mapping[str, Any], sites: list[str], models: list[str]) -> None:
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


def _label_section(doc: Doc, table: Mapping[str, Any], sites: list[str], models: list[str],
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
                row.append(Cell(pm(x, sd) + _flag_suffix(flags), "na" if math.isnan(x) else ""))
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
        sd_note += f" † flags: {C.legend(used, _min_per_class(res))}."
    doc.table(["label", "test site"] + (["n+/n−"] if counted else []) + models, rows, sd_note)
    labels = list(table)
    means = np.array([[num((table[l].get(m) or {}).get("mean")) for m in models] for l in labels])
    sds = np.array([[num((table[l].get(m) or {}).get("sd")) for m in models] for l in labels])
    doc.figure("label_bars", figures.label_bars(labels, models, means, sds,
                                                title="AUROC per label: mean ± sd over test sites"),
               "Per-label AUROC, mean ± sd over the test sites where the label is defined")



def _roc_note(ev: Mapping[str, Any]) -> str:
    """How the ROC curves left the sites (results.json of older runs: thinned corner points)."""
    if ev.get("roc_grid"):
        return (f"ROC curves as TPR on a fixed grid of {ev['roc_grid']} FPR values (each site "
                "sends the highest TPR reached at or below each FPR, never its curve's corners)")
    return f"ROC curves at most {ev.get('roc_points', 200)} points"


def _roc_section(doc: Doc, res: Mapping[str, Any], sites: list[str], models: list[str]) -> None:
    labels = res.get("task", [])
    doc.h(1, "ROC curves")
    doc.p("One panel per label at each test site; solid lines are internal models, dashed "
          f"external. {_roc_note(res.get('evaluation') or {}).capitalize()}.")
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


HOLM_NOTE = ("Holm = Holm's step-down adjustment (family-wise error rate); the family is every "
             "p-value shown in this table.")
DELONG_LEVELS = {1: "patient-clustered", 0: "image-level"}  # sites/scoring.py DELONG_LEVEL


def _delong_level(st: Mapping[str, Any]) -> str:
    """Which DeLong a site used; results written before the clustered test were image-level."""
    lv = num(st.get("delong_level"))
    return DELONG_LEVELS.get(int(lv), "?") if lv == lv else "image-level"


def _paired_over(c: Mapping[str, Any], n_labels: int) -> str:
    return str(c.get("paired_over") or ("test sites" if n_labels == 1 else "(label, test site) cells"))


def _comparison_rows(comps: Mapping[str, Mapping[str, Any]], n_labels: int) -> list[list[Cell]]:
    """One row per pair: what was paired, the t-test and Wilcoxon p-values with Holm's
    adjustment over the whole table (both tests, every pair)."""
    entries = list(comps.values())
    adj = holm([num(c.get(k)) for c in entries for k in ("t_p", "w_p")])
    rows = []
    for i, c in enumerate(entries):
        why = "; ".join(sorted(set((c.get("reasons") or {}).values())))
        rows.append([Cell(f"{c['a']} vs {c['b']}"), Cell(_paired_over(c, n_labels)),
                     Cell(str(c.get("n_pairs", 0))), Cell(fmt(c.get("mean_diff"), 4)),
                     Cell(fmt_p(c.get("t_p"))), Cell(fmt_p(adj[2 * i])),
                     Cell(fmt_p(c.get("w_p"))), Cell(fmt_p(adj[2 * i + 1])), Cell(why)])
    return rows


COMPARISON_HEADER = ["pair (a vs b)", "paired over", "pairs", "mean AUROC diff (a-b)", "t-test p",
                     "t-test p (Holm)", "Wilcoxon p", "Wilcoxon p (Holm)", "note"]


def _significance_section(doc: Doc, res: Mapping[str, Any], sites: list[str], models: list[str]) -> bytes | None:
    comps = res.get("comparisons") or {}
    pairs = res.get("pairs") or {}
    if not comps and not pairs:
        return None
    n_labels = len(res.get("task", []))
    doc.h(1, "Significance and agreement")
    doc.p("p-values are two-sided. Every table shows the raw p-value and, next to it, the "
          "Holm-adjusted one; " + HOLM_NOTE[HOLM_NOTE.index("the family"):])
    if comps:
        over = sorted({_paired_over(c, n_labels) for c in comps.values()})
        doc.h(2, f"Between models, over {' / '.join(over)}")
        if n_labels == 1:
            doc.p("A paired t-test and a Wilcoxon signed-rank test over the test sites at which "
                  "both models have an AUROC. The task has one label, so seed 002's pairing over "
                  "labels is impossible; each test site is one pair.")
        else:
            doc.p("Seed 002's test: a paired t-test and a Wilcoxon signed-rank test over every "
                  "(label, test site) AUROC that both models have.")
        doc.table(COMPARISON_HEADER, _comparison_rows(comps, n_labels), HOLM_NOTE)
    if pairs:
        doc.h(2, "At each test site, on the same images")
        doc.p("Computed at the site from both models' predictions: DeLong's test of the AUROC "
              "difference, patient-clustered where the site has patient ids (Obuchowski 1997: "
              "a patient's images are correlated, so the variance comes from the spread between "
              "patients) and image-level (every image independent) otherwise, as the DeLong "
              "column says; Cohen's kappa between the models' binarised predictions at each "
              "model's deployable threshold (and at the oracle thresholds); Spearman's rank "
              "correlation of their scores." + (" The over-labels rows are a paired t-test (t) "
                                                "and Wilcoxon test (W) over the per-label AUROCs "
                                                "at that site." if n_labels > 1 else ""))
        multi = n_labels > 1
        image_rows = []
        for s in sites:
            rows, ps = [], []
            for key, entry in (pairs.get(s) or {}).items():
                reasons = entry.get("reasons") or {}
                for label, st in (entry.get("labels") or {}).items():
                    why = "; ".join(f"{SHOWN_STATS[k.split('/', 1)[1]]}: {v}" if "/" in k else v
                                    for k, v in reasons.items()
                                    if k == label or (k.startswith(label + "/")
                                                      and k.split("/", 1)[1] in SHOWN_STATS))
                    level = _delong_level(st)
                    ps.append(num(st.get("delong_p")))
                    rows.append([Cell(f"{entry['a']} vs {entry['b']}"), Cell(label),
                                 Cell(fmt_int(st.get("n"))),
                                 Cell(fmt_int(st["delong_patients"]) if "delong_patients" in st else "-"),
                                 Cell(fmt(st.get("delong_diff"), 4)), Cell(level),
                                 Cell(fmt_p(st.get("delong_p"))), len(ps) - 1,
                                 Cell(fmt(st.get("kappa_op"))), Cell(fmt(st.get("kappa_oracle"))),
                                 Cell(fmt(st.get("spearman"))), Cell(why)])
                    if level == "patient-clustered":
                        image_rows.append((s, entry, label, st,
                                           reasons.get(f"{label}/delong_image", "")))
                if multi:
                    ol = entry.get("over_labels") or {}
                    ps += [num(ol.get("t_p")), num(ol.get("w_p"))]
                    rows.append([Cell(f"{entry['a']} vs {entry['b']}"), Cell("over labels"),
                                 Cell(fmt_int(ol.get("n_pairs"))), Cell(""),
                                 Cell(fmt(ol.get("mean_diff"), 4)), Cell("t / Wilcoxon over labels"),
                                 Cell(f"t {fmt_p(ol.get('t_p'))}, W {fmt_p(ol.get('w_p'))}"),
                                 (len(ps) - 2, len(ps) - 1),
                                 Cell(""), Cell(""), Cell(""),
                                 Cell("; ".join(sorted(set(v for k, v in reasons.items()
                                                           if k.startswith("over_labels/")))))])
            if rows:
                adj = holm(ps)
                for row in rows:  # the Holm column holds indices into the table's family
                    at = row[7]
                    row[7] = (Cell(fmt_p(adj[at])) if isinstance(at, int) else
                              Cell(f"t {fmt_p(adj[at[0]])}, W {fmt_p(adj[at[1]])}"))
                doc.h(3, f"Test site {s}")
                doc.table(["pair (a vs b)", "label", "n", "patients", "AUROC diff (a-b)", "DeLong",
                           "DeLong p", "DeLong p (Holm)", "kappa (deployable)", "kappa (oracle)",
                           "Spearman", "note"], rows,
                          "n = labelled images; patients = patients in the clustered test. " + HOLM_NOTE)
        if image_rows:
            doc.h(3, "Image-level DeLong, for reference")
            doc.p("The plain DeLong test treats every image as independent. With several images "
                  "per patient its p-values are too small; it is shown for comparison with the "
                  "patient-clustered test above, not for inference.")
            adj = holm([num(st.get("delong_image_p")) for _, _, _, st, _ in image_rows])
            doc.table(["test site", "pair (a vs b)", "label", "n", "AUROC diff (a-b)",
                       "image-level DeLong z", "image-level DeLong p", "image-level DeLong p (Holm)",
                       "note"],
                      [[Cell(s), Cell(f"{e['a']} vs {e['b']}"), Cell(label), Cell(fmt_int(st.get("n"))),
                        Cell(fmt(st.get("delong_diff"), 4)), Cell(fmt(st.get("delong_image_z"), 2)),
                        Cell(fmt_p(st.get("delong_image_p"))), Cell(fmt_p(a)), Cell(why)]
                       for (s, e, label, st, why), a in zip(image_rows, adj)], HOLM_NOTE)
        if len(models) > 1:
            kap = {}
            for s in sites:
                mat = np.full((len(models), len(models)), np.nan)
                for i in range(len(models)):
                    mat[i, i] = 1.0
                for entry in (pairs.get(s) or {}).values():
                    vals = [num(st.get("kappa_op")) for st in (entry.get("labels") or {}).values()]
                    vals = [v for v in vals if v == v]
                    if entry["a"] in models and entry["b"] in models and vals:
                        i, j = models.index(entry["a"]), models.index(entry["b"])
                        mat[i, j] = mat[j, i] = float(np.mean(vals))
                kap[s] = mat
            png = figures.agreement(sites, models, kap,
                                    title="Cohen's kappa at the deployable thresholds (mean over labels)")
            doc.figure("agreement", png, "Agreement between models at each test site (kappa; "
                       "1 on the diagonal by definition)")
            return png
    return None


def _batchnorm_text(info: Mapping[str, Any]) -> str:
    """Which BatchNorm statistics scored a model (server/batchnorm.py's record)."""
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
                  f"at this site); eval.min_per_class = {_min_per_class(res)}")
    doc.ul([f"warning: {w}" for w in res.get("data_warnings") or []])
    model_rows = []
    for m, info in (res.get("models") or {}).items():
        extra = {k: v for k, v in info.items()
                 if k not in ("trained_on", "checkpoint", "local_batchnorm", "batchnorm")}
        model_rows.append([m, ", ".join(info.get("trained_on", [])), _batchnorm_text(info),
                           str(info.get("checkpoint") or ""),
                           ", ".join(f"{k}={v}" for k, v in extra.items())])
    doc.table(["model", "trained on", "BatchNorm statistics", "checkpoint", "details"], model_rows,
              "BatchNorm statistics are re-estimated with the final weights on the model's own "
              "training sites' train splits before it is saved or scored (PreciseBN), unless "
              "said otherwise")
    keep = _matrix_section(doc, res, sites, models)
    # secondary heatmaps: deployable-threshold F1 and calibration
    f1 = np.array([[num(((res["matrix"][m].get(s) or {}).get("metrics") or {}).get("macro_op/f1"))
                    for s in sites] for m in models])
    if np.isfinite(f1).any():
        internal = np.array([[bool((res["matrix"][m].get(s) or {}).get("internal")) for s in sites]
                             for m in models], dtype=object)
        marks, legend = _flag_marks(res, models, sites), C.legend(_used_flags(res), _min_per_class(res))
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
    _threshold_section(doc, res, sites, models)
    table = res.get("label_table")
    if not table:
        from server.matrix import label_table

        table = label_table(res["matrix"], sites, labels)
    _label_section(doc, table, sites, models, "Per label (seed 002, Table 7)",
                   "AUROC per label, test site and model; Average = mean ± sd over the test sites "
                   "where the label is defined.", res)
    _roc_section(doc, res, sites, models)
    _significance_section(doc, res, sites, models)
    from server.agreement import agreement_section  # seed 001: calibrated kappa, Bland-Altman

    agreement_section(doc, res, sites)

    from server.report_privacy import privacy_section

    privacy_section(doc, res)  # epsilon per site, SecAgg+ (server/report_privacy.py)
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


def write_doc(folder: Path, doc: Doc, keep: Mapping[str, bytes]) -> dict[str, Path]:
    figdir = folder / FIG_DIR
    paths: dict[str, Path] = {}
    for name, png in doc.figures.items():
        atomic_write_bytes(figdir / f"{name}.png", png)
    if "matrix_auroc" in doc.figures:
        paths["heatmap"] = figdir / "matrix_auroc.png"
    md, page = folder / "report.md", folder / "report.html"
    atomic_write_text(md, doc.to_markdown())
    atomic_write_text(page, doc.to_html())
    paths.update(md=md, html=page, figures=figdir)
    return paths


def write_report(run_folder: str | Path) -> dict[str, Path]:
    """Write report.md, report.html and figures/ for the run folder (reads results.json and
    metrics.jsonl). Returns the paths: md, html, figures, heatmap."""
    folder = Path(run_folder)
    res_file = folder / "results.json"
    if not res_file.is_file():
        from common.errors import ChestFedError

        raise ChestFedError(f"{folder}: no results.json (did the run finish? see run.json)")
    from server.runfolder import read_json_file

    res = read_json_file(res_file)
    history = RunFolder(folder).read_metrics()
    doc, keep = render_run(res, history, folder.name)
    return write_doc(folder, doc, keep)


# --- several runs ----------------------------------------------------------------------------------


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
    _label_section(doc, agg["label_table"], sites, models, "Per label (seed 002, Table 7)",
                   "AUROC per label and test site: mean ± sd over runs; Average: mean ± sd over test "
                   "sites of the per-site means.")
    comps = agg.get("comparisons") or {}
    if comps:
        doc.h(1, "Significance")
        if len(labels) == 1:
            doc.p("Paired t-test and Wilcoxon signed-rank test of the AUROCs of two models, paired "
                  "over (test site, seed) cells: a's AUROC at a site in the run with seed s "
                  "against b's at the same site in the run with the same seed (and fold), both "
                  "scored on the same test images. The task has one label, so seed 002's pairing "
                  "over labels is impossible. The pairs at one test site share its test images, "
                  "so they are not independent: the p-values speak to the training seeds' "
                  "variability more than to the test sets'. Pairs of models without a seed in "
                  "common are paired over the test sites' means over runs (see 'paired over'). "
                  "Two-sided.")
        else:
            doc.p("Paired t-test and Wilcoxon signed-rank test over matched (label, test site) "
                  "AUROCs (run means), as in seed 002. Two-sided.")
        doc.table(COMPARISON_HEADER, _comparison_rows(comps, len(labels)), HOLM_NOTE)
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
    atomic_write_json(folder / "comparison.json", agg)
    doc = render_comparison(agg, agg["title"])
    paths = write_doc(folder, doc, {})
    paths["json"] = folder / "comparison.json"
    return paths


__all__ = ["write_report", "write_comparison_report", "render_run", "render_comparison", "write_doc",
           "run_id", "KEY"]
