"""The "Tuning" section of a tuned comparison (launch/tune.py): the space, the trials each
strategy had, what validation chose, the best validation score, the score of every trial and,
where Optuna could compute it, each parameter's importance. It reads tuning.json's plain data,
not the Optuna study."""
from __future__ import annotations

import math
from typing import Any, Mapping

from matplotlib.figure import Figure

from chestfed.server.report import figures
from chestfed.server.report.document import Cell, Doc


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def trial_plot(summary: Mapping[str, Any]) -> bytes:
    """Validation score per trial for each strategy (pruned trials hollow), running best as a line."""
    fig = Figure(figsize=(7.5, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    maximise = summary["direction"] == "maximize"
    for i, (strategy, s) in enumerate(summary["strategies"].items()):
        colour = f"C{i % 10}"
        xs, ys, hollow = [], [], []
        for k, t in enumerate(s["trials"], start=1):
            if t["value"] is None or (isinstance(t["value"], float) and math.isnan(t["value"])):
                continue
            xs.append(k)
            ys.append(t["value"])
            hollow.append(t["state"] == "PRUNED")
        ax.scatter([x for x, h in zip(xs, hollow) if not h], [y for y, h in zip(ys, hollow) if not h],
                   color=colour, s=22, label=strategy)
        ax.scatter([x for x, h in zip(xs, hollow) if h], [y for y, h in zip(ys, hollow) if h],
                   facecolors="none", edgecolors=colour, s=22)
        run, best = [], None
        for x, y, h in zip(xs, ys, hollow):
            if not h:
                best = y if best is None else (max(best, y) if maximise else min(best, y))
            run.append(best)
        ax.plot(xs, [b if b is not None else math.nan for b in run], color=colour, linewidth=1)
    ax.set_xlabel("trial")
    ax.set_ylabel(summary["objective"].replace("_", " "))
    ax.set_title("Validation score per trial (hollow: pruned; line: best so far)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return figures.png_bytes(fig)


def tuning_section(summary: Mapping[str, Any]) -> Doc:
    doc = Doc("")
    doc.h(1, "Tuning")
    doc.p(f"Each strategy was tuned separately with the same budget: {summary['trials']} trials "
          f"of Optuna's TPE sampler (pruner: {summary['pruner']}) over the space below, every "
          f"trial trained on the train splits and scored on the validation splits only "
          f"({summary['objective'].replace('_', ' ')}, {summary['direction']}d; no trial reads a "
          f"test split). Each strategy's best trial was then retrained for {summary['seeds']} "
          f"seed(s) and scored once on the test splits: the sections below. "
          f"Study: {summary['storage']}.")
    doc.ul([p for p in summary["space"]])
    rows = []
    for strategy, s in summary["strategies"].items():
        states = [t["state"] for t in s["trials"]]
        chosen = ", ".join(f"{k}={_fmt(v)}" for k, v in (s["best"] or {}).get("params", {}).items())
        images = sum(int(t.get("images") or 0) for t in s["trials"])
        rows.append([Cell(strategy), Cell(", ".join(s["searched"]) or "(nothing to search)"),
                     Cell(f"{len(states)} ({states.count('COMPLETE')} complete, "
                          f"{states.count('PRUNED')} pruned, {states.count('FAIL')} failed)"),
                     Cell(_fmt(s["best"]["value"]) if s["best"] else "n/a"),
                     Cell(chosen or ("defaults" if s["best"] else "n/a")),
                     Cell(f"{images:,}")])
    doc.table(["strategy", "searched", "trials", f"best {summary['objective']}", "chosen values",
               "images trained (completed trials)"], rows)
    unused = {s: v["unused"] for s, v in summary["strategies"].items() if v["unused"]}
    if unused:
        doc.p("Not searched, because the strategy does not use the key: " + "; ".join(
            f"{s}: {', '.join(keys)}" for s, keys in unused.items()) + ".")
    doc.figure("tuning_trials", trial_plot(summary), "Validation score of every trial per strategy")
    imp = {s: v["importance"] for s, v in summary["strategies"].items() if v.get("importance")}
    if imp:
        doc.table(["strategy", "parameter importance (Optuna fANOVA)"],
                  [[Cell(s), Cell(", ".join(f"{k} {v:.2f}" for k, v in d.items()))] for s, d in imp.items()])
    return doc
