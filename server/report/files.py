"""A report's files in a folder: figures/*.png, report.md and report.html, each atomically."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from chestfed.common.atomic import write_bytes, write_text
from chestfed.server.report.document import FIG_DIR, Doc
from chestfed.server.report.html import render


def write_doc(folder: Path, doc: Doc, keep: Mapping[str, bytes]) -> dict[str, Path]:
    """Write figures/, report.md and report.html; returns their paths (+ heatmap when drawn)."""
    figdir = folder / FIG_DIR
    paths: dict[str, Path] = {}
    for name, png in doc.figures.items():
        write_bytes(figdir / f"{name}.png", png)
    if "matrix_auroc" in doc.figures:
        paths["heatmap"] = figdir / "matrix_auroc.png"
    md, page = folder / "report.md", folder / "report.html"
    write_text(md, doc.to_markdown())
    write_text(page, render(doc))
    paths.update(md=md, html=page, figures=figdir)
    return paths
