"""The report's seed-001 agreement section: kappa at the calibrated operating points and
Bland-Altman plots, drawn from the aggregates the test sites sent (sites/scoring.py,
common/calibration.py). No per-image point exists here: the plot is the site's 2-D histogram of
(mean, difference) of the two models' calibrated outputs, with the bias and 95 % limits."""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from chestfed.common.calibration import DIFF_BINS, MEAN_BINS, limits_of_agreement
from chestfed.server.report.figures import png_bytes
from chestfed.server.evaluation.matrix import num
from chestfed.server.report import Cell, fmt

MAX_PANELS = 12  # a report with many models shows the first pairs only (the table has them all)


def _panels(pairs: Mapping[str, Mapping[str, Any]], sites: list[str]) -> list[tuple[str, str, str, Mapping[str, Any]]]:
    out = []
    for s in sites:
        for entry in (pairs.get(s) or {}).values():
            for label, st in (entry.get("labels") or {}).items():
                if "ba_hist" in st:
                    out.append((s, f"{entry['a']} vs {entry['b']}", label, st))
    return out


def bland_altman_figure(panels: list[tuple[str, str, str, Mapping[str, Any]]]) -> bytes | None:
    shown = panels[:MAX_PANELS]
    if not shown:
        return None
    ncols = min(3, len(shown))
    nrows = math.ceil(len(shown) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows), layout="constrained")
    cm = colormaps["Blues"]
    for i, (site, pair, label, st) in enumerate(shown):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        h = np.array([num(v) for v in st["ba_hist"]], dtype=float).reshape(MEAN_BINS, DIFF_BINS)
        # empty cells blank; suppressed ones (NaN) drawn as orange patches below
        img = ax.imshow(np.ma.masked_invalid(np.where(h == 0, np.nan, h).T), origin="lower", extent=(0, 1, -1, 1),
                        aspect="auto", cmap=cm, vmin=0)
        sup = np.isnan(h)
        for mi, di in zip(*np.nonzero(sup)):
            ax.add_patch(Rectangle(
                (mi / MEAN_BINS, -1 + 2 * di / DIFF_BINS), 1 / MEAN_BINS, 2 / DIFF_BINS,
                facecolor="#f4a582", edgecolor="none"))
        bias, sd = num(st.get("ba_bias")), num(st.get("ba_sd"))
        if math.isfinite(bias):
            ax.axhline(bias, color="black", lw=1)
        if math.isfinite(bias) and math.isfinite(sd):
            for lim in limits_of_agreement(bias, sd):
                ax.axhline(lim, color="black", lw=0.8, ls="--")
        ax.axhline(0.0, color="red", lw=0.8)  # perfect agreement
        ax.set_xlabel("mean of calibrated outputs", fontsize=8)
        ax.set_ylabel("difference (a - b)", fontsize=8)
        ax.set_title(f"{pair}, {label}\nat {site} (n={int(num(st.get('ba_n')) or 0)})", fontsize=8)
        fig.colorbar(img, ax=ax, shrink=0.8, label="images")
    return png_bytes(fig)


def agreement_section(doc: Any, res: Mapping[str, Any], sites: list[str]) -> bytes | None:
    """Table and figure of Cohen et al.'s agreement; nothing when no pair has the aggregates."""

    panels = _panels(res.get("pairs") or {}, sites)
    if not panels:
        return None
    doc.h(2, "Agreement on calibrated outputs (Cohen et al. 2020)")
    doc.p("Each model's outputs are calibrated at the test site with Cohen et al.'s Eq. 1, the "
          "piecewise-linear map that sends its optimal operating point on that test split "
          "(max TPR - FPR) to 0.5. Kappa at 0.5 on the calibrated outputs is the kappa at both "
          "models' optimal points; it is shown next to the kappa at the deployable thresholds. "
          "Bland-Altman: bias = mean difference of the calibrated outputs, limits = bias ± 1.96 sd; "
          "the plot is the site's histogram of (mean, difference), never per-image points; at a "
          "deployed site, cells with fewer than privacy.min_cell images are suppressed (orange).")
    rows = []
    for site, pair, label, st in panels:
        bias, sd = num(st.get("ba_bias")), num(st.get("ba_sd"))
        lo, hi = limits_of_agreement(bias, sd)
        rows.append([Cell(site), Cell(pair), Cell(label), Cell(fmt(st.get("ba_n"), 0)),
                     Cell(fmt(st.get("kappa_op"))), Cell(fmt(st.get("kappa_calibrated"))),
                     Cell(fmt(bias)), Cell(f"{fmt(lo)} to {fmt(hi)}")])
    doc.table(["test site", "pair (a vs b)", "label", "n", "kappa (deployable)",
               "kappa (calibrated, Cohen et al.)", "Bland-Altman bias", "95 % limits"], rows)
    png = bland_altman_figure(panels)
    more = f" (first {MAX_PANELS} of {len(panels)})" if len(panels) > MAX_PANELS else ""
    doc.figure("bland_altman", png, "Bland-Altman agreement of calibrated outputs per test site"
               + more + "; solid: bias, dashed: 95 % limits, red: perfect agreement")
    return png
