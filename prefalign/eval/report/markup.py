"""Markdown and HTML rendering of the report's blocks and tables: escaping, cells, the page around them."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass


class Code(str):
    """A table-cell part rendered as inline code (a formula)."""


class Bold(str):
    """A table-cell part rendered bold (a row label)."""


@dataclass
class Table:
    """Rendered to both markdown and HTML. A cell is a str, a `Code`, a `Bold`, or a list of them
    concatenated; a "\n" inside a str part is a line break."""

    header: list[str]
    rows: list[list]
    cls: str = ""
    """HTML class of the table."""


_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|])")


def _md_text(text: str) -> str:
    """Literal text in a markdown table cell: specials backslash-escaped, line breaks as <br>."""
    text = _MD_SPECIAL.sub(r"\\\1", text.replace("\r\n", "\n").replace("\r", "\n"))
    return text.replace("\n", "<br>")


def _parts(cell) -> list:
    return cell if isinstance(cell, list) else [cell]


def _md_cell(cell) -> str:
    rendered = []
    for part in _parts(cell):
        if isinstance(part, Code):
            rendered.append("`" + part.replace("|", "\\|") + "`")  # GFM splits cells on a pipe even inside code
        elif isinstance(part, Bold):
            rendered.append(f"**{_md_text(part)}**")
        else:
            rendered.append(_md_text(part))
    return "".join(rendered) or " "


def _html_cell(cell) -> str:
    rendered = []
    for part in _parts(cell):
        text = html.escape(part, quote=True).replace("\r\n", "\n").replace("\n", "<br>")
        rendered.append(
            f"<code>{text}</code>" if isinstance(part, Code) else f"<b>{text}</b>" if isinstance(part, Bold) else text
        )
    return "".join(rendered)


def md_table(table: Table) -> str:
    lines = ["| " + " | ".join(_md_cell(head) for head in table.header) + " |", "|" + "---|" * len(table.header)]
    lines += ["| " + " | ".join(_md_cell(cell) for cell in row) + " |" for row in table.rows]
    return "\n".join(lines)


def html_table(table: Table) -> str:
    head = "".join(f"<th>{_html_cell(cell)}</th>" for cell in table.header)
    body = "".join("<tr>" + "".join(f"<td>{_html_cell(cell)}</td>" for cell in row) + "</tr>\n" for row in table.rows)
    cls = f' class="{table.cls}"' if table.cls else ""
    return f"<table{cls}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; margin: 1em 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
th { background: #f3f3f3; }
td { font-variant-numeric: tabular-nums; }
table.samples td { max-width: 28em; overflow-wrap: anywhere; }
code { background: #f5f5f5; padding: 0 3px; font-size: 13px; }
img { max-width: 100%; border: 1px solid #eee; margin: .5em 0; }
p.note { color: #555; font-size: 14px; }
"""


def render_markdown(blocks: list[tuple]) -> str:
    """``report.md`` from the document's blocks (see `prefalign.eval.report.document`); images by file name."""
    rendered = []
    for kind, *content in blocks:
        if kind in ("h1", "h2"):
            rendered.append("#" * int(kind[1]) + " " + _md_text(content[0]))
        elif kind in ("p", "note"):
            rendered.append(_md_text(content[0]) if kind == "p" else f"*{_md_text(content[0])}*")
        elif kind == "table":
            rendered.append(md_table(content[0]))
        elif kind == "img":
            rendered.append(f"![{content[1]}]({content[0].name})")
    return "\n\n".join(rendered) + "\n"


def render_html(blocks: list[tuple], title: str) -> str:
    """A self-contained ``report.html``: the plots are embedded, nothing is fetched."""
    rendered = []
    for kind, *content in blocks:
        if kind in ("h1", "h2"):
            rendered.append(f"<{kind}>{html.escape(content[0])}</{kind}>")
        elif kind in ("p", "note"):
            rendered.append(f'<p class="{kind}">{html.escape(content[0])}</p>')
        elif kind == "table":
            rendered.append(html_table(content[0]))
        elif kind == "img":
            data = base64.b64encode(content[0].read_bytes()).decode("ascii")
            rendered.append(f'<img src="data:image/png;base64,{data}" alt="{html.escape(content[1], quote=True)}">')
    body = "\n".join(rendered)
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
        f"<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )
