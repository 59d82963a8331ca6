"""One self-contained HTML page: inline CSS, figures as ``data:image/png;base64`` images, no
script and no external resource, so it reads the same offline, from an attachment or in a
browser with JavaScript off. Every number the page prints that a test or a script may want to
read back also carries its full-precision value in a ``data-value`` attribute.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Section", "figure", "num", "page", "paragraph", "table"]

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1150px; margin: 2em auto; color: #222;
       line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
code { background: #f3f3f3; padding: 0 3px; } .note { color: #555; font-size: 0.92em; }
.rec { background: #eef5ee; border-left: 4px solid #5a5; padding: 0.6em 1em; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
"""


@dataclass(frozen=True)
class Section:
    """A heading and its already-rendered HTML body."""

    title: str
    body: str
    anchor: str = ""


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def num(value: float | int | None, fmt: str = ".4f", cls: str = "") -> str:
    """A table cell with the shown number and its full value in ``data-value``."""
    c = f' class="{esc(cls)}"' if cls else ""
    if value is None or (isinstance(value, float) and value != value):
        return f"<td{c}>-</td>"
    return f'<td{c} data-value="{value!r}">{format(value, fmt)}</td>'


def table(
    header: Sequence[str],
    rows: Iterable[Sequence[str]],
    ident: str = "",
    left: int = 1,
    keys: Sequence[str] | None = None,
) -> str:
    """``rows`` are sequences of ready ``<td>`` cells (or plain text, escaped into one); the
    first ``left`` columns are left-aligned; ``keys`` name the rows (``<tr data-row=...>``)."""
    i = f' id="{esc(ident)}"' if ident else ""
    head = "".join(
        f'<th class="l">{esc(h)}</th>' if j < left else f"<th>{esc(h)}</th>"
        for j, h in enumerate(header)
    )
    body = []
    for r, row in enumerate(rows):
        cells = []
        for j, cell in enumerate(row):
            if cell.startswith("<td"):
                cells.append(cell)
            else:
                cells.append(
                    f'<td class="l">{esc(cell)}</td>' if j < left else f"<td>{esc(cell)}</td>"
                )
        key = f' data-row="{esc(keys[r])}"' if keys is not None else ""
        body.append(f"<tr{key}>" + "".join(cells) + "</tr>")
    return f"<table{i}><tr>{head}</tr>{''.join(body)}</table>"


def paragraph(text: str, cls: str = "", ident: str = "") -> str:
    c = f' class="{esc(cls)}"' if cls else ""
    i = f' id="{esc(ident)}"' if ident else ""
    return f"<p{c}{i}>{esc(text)}</p>"


def figure(name: str, png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img id="fig-{esc(name)}" alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def page(title: str, intro: str, sections: Sequence[Section]) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        intro,
    ]
    for s in sections:
        a = f' id="{esc(s.anchor)}"' if s.anchor else ""
        parts.append(f"<h2{a}>{esc(s.title)}</h2>")
        parts.append(s.body)
    parts.append(
        '<p class="note">Written by <code>logitcache report</code>. Self-contained: no script, '
        "no network; the same figures are saved as PNG files next to this page.</p>"
    )
    parts.append("</body></html>\n")
    return "\n".join(parts)
