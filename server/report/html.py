"""report.html from a Doc (server/report/document.py) through a Jinja2 template.

The page is self-contained: its own CSS, every figure inlined as a base64 PNG, and a
Content-Security-Policy that forbids fetching anything, so it opens from a USB stick on a
hospital workstation with no network. The template and the CSS are Python string constants,
not .html files: the app bundle that `flwr run` ships to the ServerApp (common/deploy/bundle.py,
and Flower's own FAB filter) carries Python files only, and the ServerApp writes the report.
Autoescaping is on: every text from results.json is escaped; only the CSS is trusted markup.
"""
from __future__ import annotations

import base64
import functools
import re
from typing import Any

import jinja2
from markupsafe import Markup

from chestfed.server.report.document import Cell, Doc
from chestfed.server.report.format import slug


NUMERIC = re.compile(r"^([-+<]?\d|n/a( |$))")  # a cell that holds a number: right-aligned
WIDE = 60  # a cell longer than this wraps instead of widening its table

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

# One page: title, a table of contents of the top-level sections, then the parts in order.
# Whitespace between tags is layout-neutral here (block elements, cells without inline mixes).
PAGE = """\
<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title><style>{{ css }}</style></head><body>
<h1>{{ title }}</h1>
{% if toc %}
<nav><ol>{% for anchor, text in toc %}<li><a href="#{{ anchor }}">{{ text }}</a></li>{% endfor %}</ol></nav>
{% endif %}
{% for part in parts %}
{% if part.kind == "h" %}
<h{{ part.level }} id="{{ part.anchor }}">{{ part.text }}</h{{ part.level }}>
{% elif part.kind == "p" %}
<p>{{ part.text }}</p>
{% elif part.kind == "ul" %}
<ul>{% for item in part.entries %}<li>{{ item }}</li>{% endfor %}</ul>
{% elif part.kind == "table" %}
<div class="tw"><table><thead><tr>{% for h in part.header %}<th>{{ h }}</th>{% endfor %}</tr></thead><tbody>
{% for row in part.rows %}
<tr>{% for classes, text in row %}<td{% if classes %} class="{{ classes }}"{% endif %}>{{ text }}</td>{% endfor %}</tr>
{% endfor %}
</tbody></table></div>
{% if part.note %}
<p class="note">{{ part.note }}</p>
{% endif %}
{% elif part.kind == "fig" %}
<figure><img alt="{{ part.caption }}" src="data:image/png;base64,{{ part.png }}"><figcaption>{{ part.caption }}</figcaption></figure>
{% endif %}
{% endfor %}
</body></html>
"""


@functools.lru_cache(maxsize=1)
def _template() -> jinja2.Template:
    env = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True,
                             undefined=jinja2.StrictUndefined)
    return env.from_string(PAGE)


def cell_classes(c: "Cell") -> str:
    """The td's classes: the cell's own (int / na / best), n for a number, w for long text."""
    return " ".join(x for x in (c.cls, "n" if NUMERIC.match(c.text) else "",
                                "w" if len(c.text) > WIDE else "") if x)


def _anchor(text: str, used: set[str]) -> str:
    """A heading's id; a repeated heading (a comparison nests a second report) gets -2, -3..."""
    base = slug(text).lower()
    anchor, k = base, 1
    while anchor in used:
        k += 1
        anchor = f"{base}-{k}"
    used.add(anchor)
    return anchor


def render(doc: "Doc") -> str:
    parts: list[dict[str, Any]] = []
    toc: list[tuple[str, str]] = []
    used: set[str] = set()
    for kind, body in doc.parts:
        if kind == "h":
            level, text = body
            anchor = _anchor(text, used)
            if level == 1:
                toc.append((anchor, text))
            parts.append(dict(kind="h", level=level + 1, anchor=anchor, text=text))
        elif kind == "p":
            parts.append(dict(kind="p", text=body))
        elif kind == "ul":
            parts.append(dict(kind="ul", entries=body))
        elif kind == "table":
            header, rows, note = body
            parts.append(dict(kind="table", header=header, note=note,
                              rows=[[(cell_classes(c), c.text) for c in r] for r in rows]))
        elif kind == "fig":
            name, caption = body
            parts.append(dict(kind="fig", caption=caption,
                              png=base64.b64encode(doc.figures[name]).decode("ascii")))
    return _template().render(title=doc.title, toc=toc, parts=parts, css=Markup(CSS))
