"""Markdown and self-contained HTML from one list of format-neutral blocks.

The report is assembled once as headings, paragraphs, bullet lists, tables and images, and
rendered twice: markdown that links the PNGs by relative file name, and HTML that embeds them
as base64 data URIs with inline CSS, so the .html file can be mailed or archived on its own.
Text may mark code or formulas with backticks; nothing else is interpreted.
"""

from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

Cell = str | float | None


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Para:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclass(frozen=True)
class Image:
    file: str  # relative to the output directory
    alt: str


@dataclass(frozen=True)
class Table:
    """Floats are shown with 3 decimals, None as a dash; in `lower_is_better` columns the
    minimum is bold when at least two rows have a value (one value is not a "best")."""

    header: list[str]
    rows: list[list[Cell]]
    lower_is_better: frozenset[int] = field(default_factory=frozenset)


Block = Heading | Para | Bullets | Image | Table

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1,h2,h3{line-height:1.2}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;font-size:.92em;margin:1em 0}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}th{background:#f3f3f3}
th.t,td.t{text-align:left}
code{background:#f4f4f4;padding:0 .2em;border-radius:3px}
img{max-width:100%;display:block;margin:1em 0}
"""


def _cells(table: Table) -> list[list[tuple[str, bool]]]:
    """Each cell as (text, bold)."""
    best: dict[int, float] = {}
    for c in table.lower_is_better:
        vals = [r[c] for r in table.rows if isinstance(r[c], float) and not math.isnan(r[c])]
        if len(vals) >= 2:
            best[c] = min(vals)
    return [
        [
            (
                "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}" if isinstance(v, float) else str(v),
                isinstance(v, float) and best.get(c) == v,
            )
            for c, v in enumerate(row)
        ]
        for row in table.rows
    ]


_WORD = re.compile(r"[^\W\d_]{2,}")  # two letters in a row: a word, not a unit (600k, 1e-05) or a sign


def text_columns(table: Table, cells: list[list[tuple[str, bool]]]) -> set[int]:
    """The columns read as text (left-aligned): the first, and any whose every filled cell holds a word; the rest
    are numbers (right-aligned, header included, so a column's header sits over its values)."""
    out = {0}
    for c in range(1, len(table.header)):
        filled = [row[c][0] for row in cells if row[c][0] != "—"]
        if filled and all(_WORD.search(t) for t in filled):
            out.add(c)
    return out


def to_markdown(title: str, blocks: list[Block]) -> str:
    out = [f"# {title}", ""]
    for b in blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Para):
            out += [b.text, ""]
        elif isinstance(b, Bullets):
            out += [f"- {item}" for item in b.items] + [""]
        elif isinstance(b, Image):
            out += [f"![{b.alt}]({b.file})", ""]
        elif isinstance(b, Table):

            def line(cells: list[str]) -> str:
                return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

            cells = _cells(b)
            text = text_columns(b, cells)
            out.append(line(b.header))
            out.append("|" + "|".join(":---" if i in text else "---:" for i in range(len(b.header))) + "|")
            out += [line([f"**{t}**" if bold else t for t, bold in row]) for row in cells]
            out.append("")
    return "\n".join(out)


def _inline(text: str) -> str:
    """Markdown's inline `code` and *emphasis* as HTML (the Markdown report shows them as written)."""
    parts = re.split(r"`([^`]+)`", html.escape(text))  # even: prose, odd: code spans (never emphasised)
    return "".join(
        f"<code>{p}</code>" if i % 2 else re.sub(r"(?<![\w*])\*(?=\S)([^*<>]+?)(?<=\S)\*(?![\w*])", r"<em>\1</em>", p)
        for i, p in enumerate(parts)
    )


def to_html(title: str, blocks: list[Block], image_dir: Path) -> str:
    """HTML with every image read from `image_dir` and inlined, so no file or URL is referenced."""
    out = [
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            out.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Bullets):
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Image):
            data = base64.b64encode((image_dir / b.file).read_bytes()).decode("ascii")
            out.append(f'<img alt="{html.escape(b.alt)}" src="data:image/png;base64,{data}">')
        elif isinstance(b, Table):
            cells = _cells(b)
            text = text_columns(b, cells)

            def cls(c: int, text: set[int] = text) -> str:
                return ' class="t"' if c in text else ""

            head = "".join(f"<th{cls(c)}>{html.escape(h)}</th>" for c, h in enumerate(b.header))
            rows = "".join(
                "<tr>"
                + "".join(
                    f"<td{cls(c)}><strong>{html.escape(t)}</strong></td>" if bold else f"<td{cls(c)}>{html.escape(t)}</td>"
                    for c, (t, bold) in enumerate(row)
                )
                + "</tr>"
                for row in cells
            )
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    out.append("</body></html>\n")
    return "\n".join(out)
