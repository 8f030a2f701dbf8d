"""The report's building blocks (sections of paragraphs, notes, tables and figures, and the numbers each adds to
report.json) and their two renderings: one self-contained HTML page and its Markdown twin."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    highlight: set[int] = field(default_factory=set)  # row indices to emphasise (best cells, clear wins)
    caption: str = ""
    worse: set[int] = field(default_factory=set)  # row indices marked as clear losses (HTML: red)


@dataclass
class Figure:
    name: str  # file name of the PNG
    png: bytes
    caption: str


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)  # plain text (escaped in HTML); **bold** allowed
    notes: list[str] = field(default_factory=list)  # what is missing or approximate
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)  # its numbers for report.json, at full precision


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1250px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em;border-bottom:2px solid #0072B2;padding-bottom:.2em}h2{font-size:1.25em;margin-top:2em;
border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;
text-align:left}th{background:#f0f3f7}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.best td{background:#e6f2e6;font-weight:600}tr.worse td{background:#fbeaea}
caption{caption-side:bottom;text-align:left;color:#555;font-size:.9em;
padding-top:.3em}
.note{background:#fff8e1;border-left:4px solid #e6a700;padding:.35em .8em;margin:.4em 0;font-size:.92em}
.verdict p{background:#eef5fb;border-left:4px solid #0072B2;padding:.5em .9em}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:.9em}
.meta{color:#666;font-size:.88em}
"""


def _inline_html(text: str) -> str:
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))


def _is_num(cell: str) -> bool:
    return bool(re.fullmatch(r"[+\-−]?[\d.]+|\[.*\]", cell))


def render_html(title: str, sections: Sequence[Section], meta: str) -> str:
    """One self-contained HTML page: inline CSS, figures as base64 PNG data URIs, no external resource."""
    out = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
           f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
           f"<p class='meta'>{html.escape(meta)}</p>"]
    for sec in sections:
        cls = " class='verdict'" if sec.title == "Verdict" else ""
        out.append(f"<section{cls}><h2>{html.escape(sec.title)}</h2>")
        out += [f"<p>{_inline_html(p)}</p>" for p in sec.paragraphs]
        out += [f"<div class='note'>{_inline_html(n)}</div>" for n in sec.notes]
        for t in sec.tables:
            out.append("<table>")
            if t.caption:
                out.append(f"<caption>{html.escape(t.caption)}</caption>")
            out.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in t.header) + "</tr>")
            for i, row in enumerate(t.rows):
                cells = "".join(f"<td class='num'>{html.escape(c)}</td>" if _is_num(c) else f"<td>{html.escape(c)}</td>"
                                for c in row)
                cls = " class='best'" if i in t.highlight else " class='worse'" if i in t.worse else ""
                out.append(f"<tr{cls}>{cells}</tr>")
            out.append("</table>")
        for f in sec.figures:
            data = base64.b64encode(f.png).decode("ascii")
            out.append(f"<figure><img alt='{html.escape(f.name)}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{html.escape(f.caption)}</figcaption></figure>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, sections: Sequence[Section], meta: str) -> str:
    """The Markdown twin of :func:`render_html`; figures are the PNG files next to it."""
    out = [f"# {title}", "", f"_{meta}_", ""]
    for sec in sections:
        out += [f"## {sec.title}", ""]
        for p in sec.paragraphs:
            out += [p, ""]
        for n in sec.notes:
            out += [f"> **Note:** {n}", ""]
        for t in sec.tables:
            out.append("| " + " | ".join(_md_cell(h) for h in t.header) + " |")
            out.append("|" + "|".join("---" for _ in t.header) + "|")
            for i, row in enumerate(t.rows):
                cells = [f"**{_md_cell(c)}**" if i in t.highlight and c else _md_cell(c) for c in row]
                out.append("| " + " | ".join(cells) + " |")
            if t.caption:
                out += ["", f"_{t.caption}_"]
            out.append("")
        for f in sec.figures:
            out += [f"![{f.name}]({f.name})", "", f"_{f.caption}_", ""]
    return "\n".join(out)
