"""Readable reports: `report.md` and a self-contained `report.html` in a run folder.

`write_report(run_folder)` reads the folder's results.json (and metrics.jsonl for the training
history) and writes report.md, report.html and the figures under figures/. The HTML inlines
every figure as a base64 PNG and carries its own CSS: it opens from a USB stick on a hospital
workstation with no network, and a Content-Security-Policy forbids it to fetch anything.
`write_comparison_report(folder, results_list)` does the same for several runs (seeds, folds,
strategies) through `server.matrix.aggregate_runs`; launch/report.py calls it, and
launch/compare.py calls `write_comparison` (strategies first, then their models).

Every file is written atomically. Numbers that could not be computed (a test site with one
class, a threshold undefined on a validation split, a site that failed) are shown as n/a and
the reason is listed, never replaced by a made-up value.

One job per module:
- format.py: how numbers are written (fmt, fmt_p, pm, fmt_ci, the † marks);
- document.py: the document model (Doc, Cell) and its Markdown; files.py: write_doc;
- html.py: the HTML page, a Jinja2 template with its CSS;
- run.py: one run's report (facts, sites and models, notes) and write_report;
- sections.py: the run report's matrix, operating points, Table 7 per label and ROC sections;
- significance.py: the between-model and per-site tests (raw and Holm-adjusted p-values);
- comparison.py: the reports of several runs (render_comparison, write_comparison).
server/report/agreement.py and server/report/privacy.py add the agreement and privacy sections.
"""
from chestfed.server.evaluation.matrix import KEY, run_id
from chestfed.server.report.comparison import render_comparison, write_comparison, write_comparison_report
from chestfed.server.report.document import Cell, Doc
from chestfed.server.report.files import write_doc
from chestfed.server.report.format import fmt, fmt_ci, fmt_int, fmt_p, pm
from chestfed.server.report.run import render_run, write_report

__all__ = ["write_report", "write_comparison_report", "write_comparison", "render_run",
           "render_comparison", "write_doc", "Doc", "Cell", "fmt", "fmt_p", "fmt_int", "fmt_ci", "pm",
           "run_id", "KEY"]
