"""The report as a document: a title and parts (headings, paragraphs, lists, tables, figures)
that the report builders append, rendered to Markdown here and to HTML by server/report/html.py.

server/report/files.py `write_doc` writes report.md, report.html and figures/*.png.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from chestfed.server.report.format import slug

FIG_DIR = "figures"


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
        name = slug(name)
        self.figures[name] = png
        self.parts.append(("fig", (name, caption)))

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
                out += _markdown_table(*body)
            elif kind == "fig":
                name, caption = body
                out += [f"![{caption}]({FIG_DIR}/{name}.png)", "", f"_{caption}_", ""]
        return "\n".join(out).rstrip() + "\n"


def _markdown_table(header: list[str], rows: list[list[Cell]], note: str) -> list[str]:
    """A pipe table; an internal cell's text gets a *, as the HTML outlines it."""
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    out = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(esc(c.text + ("*" if c.cls == "int" else "")) for c in r) + " |" for r in rows]
    out.append("")
    return out + ([f"_{note}_", ""] if note else [])
