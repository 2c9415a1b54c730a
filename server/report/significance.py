"""The significance section: between-model tests over labels / sites (Bajwa et al. 2020), and at each
test site DeLong (patient-clustered where it can be), kappa and Spearman, every table with raw and
Holm-adjusted p-values side by side. The comparison report reuses its between-model table."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from chestfed.common.stats import holm
from chestfed.server.report import figures
from chestfed.server.evaluation.matrix import num
from chestfed.server.report.document import Cell, Doc
from chestfed.server.report.format import fmt, fmt_int, fmt_p

SHOWN_STATS = {"delong": "DeLong", "kappa_op": "kappa (deployable)",
               "kappa_oracle": "kappa (oracle)", "spearman": "Spearman"}

HOLM_NOTE = ("Holm = Holm's step-down adjustment (family-wise error rate); the family is every "
             "p-value shown in this table.")
DELONG_LEVELS = {1: "patient-clustered", 0: "image-level"}  # sites/scoring.py DELONG_LEVEL


def _delong_level(st: Mapping[str, Any]) -> str:
    """Which DeLong a site used; results written before the clustered test were image-level."""
    lv = num(st.get("delong_level"))
    return DELONG_LEVELS.get(int(lv), "?") if lv == lv else "image-level"


def _paired_over(c: Mapping[str, Any], n_labels: int) -> str:
    return str(c.get("paired_over") or ("test sites" if n_labels == 1 else "(label, test site) cells"))


def comparison_rows(comps: Mapping[str, Mapping[str, Any]], n_labels: int) -> list[list[Cell]]:
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


def significance_section(doc: Doc, res: Mapping[str, Any], sites: list[str], models: list[str]) -> bytes | None:
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
                  "both models have an AUROC. The task has one label, so Bajwa et al.'s pairing over "
                  "labels is impossible; each test site is one pair.")
        else:
            doc.p("Seed 002's test: a paired t-test and a Wilcoxon signed-rank test over every "
                  "(label, test site) AUROC that both models have.")
        doc.table(COMPARISON_HEADER, comparison_rows(comps, n_labels), HOLM_NOTE)
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


