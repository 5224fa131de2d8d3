"""Accuracy against size: the Pareto front of a set of points, and its report (a table with
the front marked, a plot of accuracy vs size with the front drawn) in the gate report's
family: ``<stem>.md`` and a self-contained ``<stem>.html``.

Library code: it knows nothing of runs, sweeps or trials. Rows are plain mappings and the
caller names the keys of the two axes, so the sweep's variants and the search stage's trials
are reported by the same function.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from optimizer.report_pages import (
    FAIL_COLOR,
    PASS_COLOR,
    REFERENCE_COLOR,
    html_document,
    html_meta_table,
    html_table,
    img_tag,
    md_table,
    png_bytes,
    pyplot,
)

Point = tuple[float, float]


def as_number(value: Any) -> float | None:
    """``value`` as a finite float, or None (missing, not a number, a bool, NaN, infinite)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond any float
        return None
    return number if math.isfinite(number) else None


def dominates(a: Point, b: Point, *, minimize_x: bool = True) -> bool:
    """Whether ``a`` is at least as good as ``b`` on both axes and better on one (y: higher
    is better; x: lower is better, or higher when not ``minimize_x``)."""
    ax, bx = (a[0], b[0]) if minimize_x else (-a[0], -b[0])
    return ax <= bx and a[1] >= b[1] and (ax < bx or a[1] > b[1])


def pareto_front(points: Sequence[Point | None], *, minimize_x: bool = True) -> list[int]:
    """Indices (ascending) of the points no other point dominates: the variants worth
    choosing between, the smallest for each accuracy. Equal points do not dominate each
    other, so ties are all on the front; a None or non-finite point is never on it and
    dominates nothing."""
    valid = {
        i: (x, y)
        for i, p in enumerate(points)
        if p is not None
        and (x := as_number(p[0])) is not None
        and (y := as_number(p[1])) is not None
    }
    return [
        i
        for i, p in valid.items()
        if not any(dominates(q, p, minimize_x=minimize_x) for j, q in valid.items() if j != i)
    ]


@dataclass(frozen=True)
class Column:
    """A table column: the row key it shows, its header, and a ``str.format`` template for
    the value (a missing or None value shows as "–")."""

    key: str
    header: str
    fmt: str = "{}"

    def cell(self, row: Mapping[str, Any]) -> str:
        value = row.get(self.key)
        if value is None:
            return "–"
        try:
            return self.fmt.format(value)
        except (ValueError, TypeError):  # a value of another type than the template's
            return str(value)


class TradeoffReport(NamedTuple):
    markdown: Path
    html: Path
    #: Indices of the rows on the Pareto front.
    front: list[int]


#: The table's last column: whether the row is on the front.
FRONT_HEADER = "Pareto front"
FRONT_MARK = "front"


def _points(rows: Sequence[Mapping[str, Any]], x_key: str, y_key: str) -> list[Point | None]:
    out: list[Point | None] = []
    for row in rows:
        x, y = as_number(row.get(x_key)), as_number(row.get(y_key))
        out.append(None if x is None or y is None else (x, y))
    return out


def tradeoff_png(
    rows: Sequence[Mapping[str, Any]],
    x_key: str,
    y_key: str,
    front: Sequence[int],
    *,
    x_label: str,
    y_label: str,
    label_key: str | None = None,
    pass_key: str | None = None,
    reference_y: float | None = None,
    reference_label: str = "baseline",
    minimize_x: bool = True,
) -> bytes:
    """Every row with both values as a point (coloured by ``pass_key``: pass, fail, or grey
    where unknown), the front as a staircase through its points (each size buys the best
    accuracy to its left), and ``reference_y`` as a dashed line."""
    plt = pyplot()
    points = _points(rows, x_key, y_key)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    placed = [p for p in points if p is not None]
    span_x = (max(p[0] for p in placed) - min(p[0] for p in placed)) if placed else 0.0
    span_y = (max(p[1] for p in placed) - min(p[1] for p in placed)) if placed else 0.0
    labelled: list[Point] = []
    for i, (row, p) in enumerate(zip(rows, points, strict=True)):
        if p is None:
            continue
        passed = row.get(pass_key) if pass_key else None
        color = {True: PASS_COLOR, False: FAIL_COLOR}.get(passed, "#bbbbbb")
        on_front = i in front
        ax.scatter(
            [p[0]],
            [p[1]],
            s=60 if on_front else 30,
            color=color,
            edgecolors="#1f2328" if on_front else "none",
            zorder=3,
        )
        if label_key and row.get(label_key) is not None:
            # Labels of points close together are stacked, not printed over each other (a
            # label is about a sixth of the plot wide, a thirtieth high).
            near = sum(
                abs(q[0] - p[0]) <= 0.16 * span_x and abs(q[1] - p[1]) <= 0.03 * span_y
                for q in labelled
            )
            labelled.append(p)
            ax.annotate(
                str(row[label_key]),
                p,
                textcoords="offset points",
                xytext=(5, 4 + 9 * near),
                fontsize=7,
            )
    ordered = sorted((points[i] for i in front if points[i] is not None), reverse=not minimize_x)
    if ordered:
        ax.step(
            [p[0] for p in ordered],
            [p[1] for p in ordered],
            where="post",
            color="#1f2328",
            lw=1,
            label="Pareto front",
            zorder=2,
        )
    if reference_y is not None:
        ax.axhline(reference_y, color=REFERENCE_COLOR, ls="--", lw=1, label=reference_label)
    if pass_key:
        for color, what in ((PASS_COLOR, "gate passed"), (FAIL_COLOR, "gate failed")):
            ax.scatter([], [], color=color, s=30, label=what)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.legend(loc="best", fontsize=8)
    better = "up and to the left" if minimize_x else "up and to the right"
    ax.set_title(f"accuracy vs size; better: {better}", fontsize=9)
    ax.grid(alpha=0.3)
    return png_bytes(fig)


def write_tradeoff_report(
    out_dir: Path,
    title: str,
    rows: Sequence[Mapping[str, Any]],
    x_key: str,
    y_key: str,
    *,
    columns: Sequence[Column],
    x_label: str | None = None,
    y_label: str | None = None,
    label_key: str | None = None,
    pass_key: str | None = None,
    reference_y: float | None = None,
    reference_label: str = "baseline",
    notes: Sequence[str] = (),
    meta: Mapping[str, Any] | None = None,
    stem: str = "tradeoff",
    minimize_x: bool = True,
) -> TradeoffReport:
    """Write ``out_dir/<stem>.md`` and ``out_dir/<stem>.html`` (atomically, never through a
    symbolic link): ``title``, the ``notes`` (paragraphs), a table of ``rows`` in
    ``columns`` with the Pareto front of (``x_key``, ``y_key``) marked in a last column,
    and in the HTML page the plot (:func:`tradeoff_png`); ``meta`` lists facts below.
    Rows without both values are listed but neither plotted nor on the front."""
    from optimizer.rundir import write_atomic

    x_label = x_label or x_key
    y_label = y_label or y_key
    front = pareto_front(_points(rows, x_key, y_key), minimize_x=minimize_x)
    header = [c.header for c in columns] + [FRONT_HEADER]
    table = [
        [c.cell(row) for c in columns] + [FRONT_MARK if i in front else ""]
        for i, row in enumerate(rows)
    ]
    direction = "smaller" if minimize_x else "larger"
    rule = (
        f"Pareto front: the rows that no other row beats on both axes, {y_label} (higher is "
        f"better) and {x_label} ({direction} is better); equal rows are all on it."
    )
    meta = dict(meta or {})

    lines = [f"# {title}", ""]
    for note in notes:
        lines += [note, ""]
    lines += md_table(header, table)
    lines += ["", rule]
    if meta:
        lines += ["", "## Run", ""] + [f"- {k}: {v}" for k, v in meta.items()]
    md_path = out_dir / f"{stem}.md"
    write_atomic(md_path, "\n".join(lines) + "\n")

    png = tradeoff_png(
        rows,
        x_key,
        y_key,
        front,
        x_label=x_label,
        y_label=y_label,
        label_key=label_key,
        pass_key=pass_key,
        reference_y=reference_y,
        reference_label=reference_label,
        minimize_x=minimize_x,
    )
    body = "\n".join(
        [
            f"<h1>{html.escape(title)}</h1>",
            *(f"<p>{html.escape(note)}</p>" for note in notes),
            html_table(
                header,
                table,
                table_id="tradeoff",
                row_classes=["front" if i in front else None for i in range(len(rows))],
            ),
            img_tag(png, f"{y_label} vs {x_label}, Pareto front drawn", img_id="plot"),
            f"<p>{html.escape(rule)}</p>",
            f"<h2>Run</h2>{html_meta_table(meta)}" if meta else "",
        ]
    )
    html_path = out_dir / f"{stem}.html"
    write_atomic(html_path, html_document(title, body, "tr.front td { font-weight: bold; }\n"))
    return TradeoffReport(md_path, html_path, front)
