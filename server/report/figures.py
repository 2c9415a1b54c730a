"""The report's figures, as PNG bytes: matplotlib's Agg canvas, no pyplot state, no display.

Each function takes plain numbers (already read from results.json) and returns the PNG; the
report inlines it as base64 (report.html) and writes it under figures/ (report.md).
PNG metadata is stripped of matplotlib's 'Software' URL so nothing in a report points outside.
"""
from __future__ import annotations

import io
import math
import textwrap
from typing import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

NAN = float("nan")
DPI = 100


def png_bytes(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _text_colour(rgba: tuple[float, float, float, float]) -> str:
    r, g, b, _ = rgba
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def heatmap(values: np.ndarray, rows: Sequence[str], cols: Sequence[str],
            internal: np.ndarray | None = None, text: Sequence[Sequence[str]] | None = None,
            title: str = "", vmin: float = 0.5, vmax: float = 1.0, cmap: str = "viridis",
            cbar_label: str = "", outline_note: str = "outlined: internal (site in the training set)",
            flags: Sequence[Sequence[str]] | None = None, flag_note: str = "",
            ) -> bytes:
    """Annotated heatmap; NaN cells grey with 'n/a'; cells where `internal` is True outlined
    solid, where it is NaN-like (None, mixed across runs) dashed. `flags`: per cell the marks of
    its caveats (common/caveats.py, e.g. 'so'; '' for none): a flagged cell is hatched and its
    number followed by '†' and the marks; `flag_note` (the legend) goes under the title."""
    values = np.asarray(values, dtype=np.float64)
    m, s = values.shape
    fig = Figure(figsize=(max(4.5, 1.25 * s + 3.2), max(2.2, 0.55 * m + 1.6)))
    ax = fig.add_subplot(1, 1, 1)
    cm = colormaps[cmap].with_extremes(bad="#d9d9d9")
    img = ax.imshow(np.ma.masked_invalid(values), cmap=cm, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(s), labels=list(cols), rotation=30 if max((len(c) for c in cols), default=0) > 8 else 0,
                  ha="right" if max((len(c) for c in cols), default=0) > 8 else "center")
    ax.set_yticks(range(m), labels=list(rows))
    ax.set_xlabel("test site")
    for i in range(m):
        for j in range(s):
            v = values[i, j]
            label = text[i][j] if text is not None else ("n/a" if math.isnan(v) else f"{v:.3f}")
            colour = "black" if math.isnan(v) else _text_colour(cm(img.norm(v)))
            mark = flags[i][j] if flags is not None else ""
            if mark:
                label += f" †{mark}"
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1.0, 1.0, fill=False, hatch="//",
                                       edgecolor="#00000055", linewidth=0))
            ax.text(j, i, label, ha="center", va="center", fontsize=9, color=colour)
            flag = None if internal is None else internal[i, j]
            if flag is True or flag == 1:
                ax.add_patch(Rectangle((j - 0.47, i - 0.45), 0.94, 0.9, fill=False,
                                       edgecolor="#d62728", linewidth=2.5))
            elif internal is not None and flag is None:
                ax.add_patch(Rectangle((j - 0.47, i - 0.45), 0.94, 0.9, fill=False,
                                       edgecolor="#d62728", linewidth=1.5, linestyle="--"))
    cb = fig.colorbar(img, ax=ax, fraction=0.046, pad=0.04)
    if cbar_label:
        cb.set_label(cbar_label)
    flagged = flags is not None and any(x for row in flags for x in row)
    ax.set_title(title + (f"\n({outline_note})" if internal is not None else "")
                 + ("\n" + textwrap.fill(f"(hatched †: {flag_note})", 90) if flagged and flag_note
                    else ""), fontsize=10)
    return png_bytes(fig)


def roc_site(site: str, labels: Sequence[str],
             curves: dict[str, list[tuple[str, list[float], list[float], float, bool]]],
             why: dict[str, str] | None = None) -> bytes:
    """ROC curves at one test site: one panel per label, one curve per model
    (solid: internal, dashed: external). curves[label] = [(model, fpr, tpr, auroc, internal)]."""
    n = len(labels)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.2 * ncols, 4.2 * nrows), layout="constrained")
    colours = colormaps["tab10"]
    for k, label in enumerate(labels):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        ax.plot([0, 1], [0, 1], color="#999999", linewidth=0.8, linestyle=":")
        drawn = 0
        for i, (model, fpr, tpr, auc, internal) in enumerate(curves.get(label, [])):
            if not fpr:
                continue
            ax.plot(fpr, tpr, color=colours(i % 10), linestyle="-" if internal else "--",
                    linewidth=1.6, label=f"{model} ({auc:.3f}{', int' if internal else ''})")
            drawn += 1
        if not drawn:
            reason = (why or {}).get(label) or "one class only or not annotated"
            ax.text(0.5, 0.5, "undefined here:\n" + reason, ha="center", va="center", fontsize=9,
                    color="#555555", wrap=True)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_aspect("equal")
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.set_title(f"{label} at {site}", fontsize=10)
        if drawn:
            ax.legend(fontsize=7, loc="lower right")
    return png_bytes(fig)


def label_bars(labels: Sequence[str], models: Sequence[str], means: np.ndarray, sds: np.ndarray,
               title: str = "", ylabel: str = "AUROC (mean over test sites)") -> bytes:
    """Grouped bars: per label, one bar per model (mean +- sd error bar; NaN bars left out)."""
    means = np.asarray(means, dtype=np.float64)
    sds = np.nan_to_num(np.asarray(sds, dtype=np.float64), nan=0.0)
    n_l, n_m = means.shape
    fig = Figure(figsize=(max(5.0, 0.35 * n_l * n_m + 2.5), 3.8))
    ax = fig.add_subplot(1, 1, 1)
    colours = colormaps["tab10"]
    width = 0.8 / max(n_m, 1)
    x = np.arange(n_l)
    for j, model in enumerate(models):
        ok = ~np.isnan(means[:, j])
        ax.bar(x[ok] + (j - (n_m - 1) / 2) * width, means[ok, j], width, yerr=sds[ok, j],
               capsize=2, color=colours(j % 10), label=model)
    finite = means[np.isfinite(means)]
    lo = min(0.5, float(finite.min()) - 0.05) if finite.size else 0.0
    ax.set_ylim(max(0.0, lo), 1.0)
    ax.axhline(0.5, color="#999999", linewidth=0.8, linestyle=":")
    ax.set_xticks(x, labels=list(labels), rotation=30 if n_l > 3 else 0, ha="right" if n_l > 3 else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return png_bytes(fig)


def training_curves(history: Sequence[dict]) -> bytes | None:
    """Training loss and validation AUROC per round, one line per (model, site)."""
    series: dict[str, dict[str, list[tuple[float, float]]]] = {"train_loss": {}, "val_auroc": {}}
    models = {str(r.get("model", "")) for r in history}
    for r in history:
        name = str(r.get("site")) if len(models) == 1 else f"{r.get('model')} @ {r.get('site')}"
        for key in series:
            v = r.get(key)
            if v is not None and isinstance(v, (int, float)) and math.isfinite(v):
                series[key].setdefault(name, []).append((float(r.get("round", 0)), float(v)))
    if not any(series.values()):
        return None
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    colours = colormaps["tab10"]
    for k, (key, title) in enumerate((("train_loss", "training loss"),
                                      ("val_auroc", "validation AUROC (macro)"))):
        ax = fig.add_subplot(1, 2, k + 1)
        for i, (name, pts) in enumerate(sorted(series[key].items())):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3,
                    color=colours(i % 10), label=name, linewidth=1.3)
        ax.set_xlabel("round")
        ax.set_title(title, fontsize=10)
        if series[key]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
    return png_bytes(fig)


def agreement(sites: Sequence[str], models: Sequence[str], kappas: dict[str, np.ndarray],
              title: str = "") -> bytes:
    """Cohen et al. Fig. 3 in spirit: per test site, the model x model matrix of Cohen's kappa
    (mean over labels) at each model's deployable operating point."""
    n = len(sites)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    k = len(models)
    side = max(3.0, 0.55 * k + 1.2)
    fig = Figure(figsize=(side * ncols + 2.5, side * nrows + 1.0), layout="constrained")
    cm = colormaps["RdYlGn"].with_extremes(bad="#d9d9d9")
    img = None
    for idx, site in enumerate(sites):
        ax = fig.add_subplot(nrows, ncols, idx + 1)
        mat = np.asarray(kappas[site], dtype=np.float64)
        img = ax.imshow(np.ma.masked_invalid(mat), cmap=cm, vmin=-1.0, vmax=1.0)
        ax.set_xticks(range(k), labels=list(models), rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(k), labels=list(models) if idx % ncols == 0 else [], fontsize=7)
        for i in range(k):
            for j in range(k):
                v = mat[i, j]
                ax.text(j, i, "n/a" if math.isnan(v) else f"{v:.2f}", ha="center", va="center",
                        fontsize=7, color="black" if math.isnan(v) else _text_colour(cm(img.norm(v))))
        ax.set_title(f"at {site}", fontsize=9)
    if img is not None:
        fig.colorbar(img, ax=fig.axes, shrink=0.8, label="Cohen's kappa")
    fig.suptitle(title, fontsize=10)
    return png_bytes(fig)


__all__ = ["heatmap", "roc_site", "label_bars", "training_curves", "agreement"]
