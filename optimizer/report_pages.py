"""The look of the project's reports (the gate's, the sweep's and the search's trade-off
pages): one stylesheet, HTML and Markdown tables, PNG plots embedded in the page, so every
report is one self-contained file and all of them look alike.

Knows nothing of runs or verdicts; matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

#: The report family's colours: a pass, a fail, the reference (the baseline).
PASS_COLOR = "#66c2a5"
FAIL_COLOR = "#fc8d62"
REFERENCE_COLOR = "#8da0cb"

CSS = """\
body { font-family: system-ui, sans-serif; margin: 2rem; color: #1f2328; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { border: 1px solid #d0d7de; padding: .35rem .6rem; text-align: left; }
"""


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig) -> bytes:
    """A finished matplotlib figure as PNG bytes (the figure is closed)."""
    plt = pyplot()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def img_tag(png: bytes, alt: str, *, img_id: str | None = None, img_class: str | None = None):
    """An ``<img>`` holding ``png`` itself (a data URI): the page needs no other file."""
    attrs = "".join(
        f' {name}="{html.escape(value)}"'
        for name, value in (("id", img_id), ("class", img_class), ("alt", alt))
        if value is not None
    )
    return f'<img{attrs} src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def html_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    table_id: str | None = None,
    row_classes: Sequence[str | None] | None = None,
) -> str:
    """A table of text cells (escaped); ``row_classes`` gives each body row a CSS class."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    classes = row_classes if row_classes is not None else [None] * len(rows)
    body = "".join(
        (f"<tr class='{html.escape(cls)}'>" if cls else "<tr>")
        + "".join(f"<td>{html.escape(c)}</td>" for c in row)
        + "</tr>\n"
        for row, cls in zip(rows, classes, strict=True)
    )
    ident = f' id="{html.escape(table_id)}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>"


def html_meta_table(meta: dict[str, Any], table_id: str = "meta") -> str:
    """A key/value table (a report's "Run" section)."""
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in meta.items()
    )
    return f'<table id="{html.escape(table_id)}">{rows}</table>'


def html_document(title: str, body: str, css: str = "") -> str:
    """A whole page: ``title``, the shared stylesheet plus ``css``, and ``body`` (HTML)."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
{CSS}{css}</style></head>
<body>
{body}
</body></html>
"""


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table's lines (``|`` inside a cell is escaped)."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(r) for r in rows)]
