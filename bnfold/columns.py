"""Rows of text cells as aligned columns: the one layout every report table uses. Given a width
(a terminal's), no line is wider: the last column, the one with sentences in it, wraps under
itself, or below the row when the columns before it leave it too little room."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

GAP = "  "
NARROWEST = 24  # a last column narrower than this goes below its row, indented
INDENT = "    "


def align(rows: Sequence[Sequence[str]], width: int | None = None) -> list[str]:
    """The lines of `rows` (the first is the header), each column as wide as its widest cell."""
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lead = sum(widths) + len(GAP) * len(widths)
    lines = []
    for row in rows:
        head = GAP.join(cell.ljust(w) for cell, w in zip(row, widths)) + GAP if widths else ""
        last = row[-1]
        if width is None or lead + len(last) <= width:
            lines.append((head + last).rstrip())
        elif width - lead >= NARROWEST:
            wrapped = textwrap.wrap(last, width - lead, break_on_hyphens=False) or [""]
            lines.append((head + wrapped[0]).rstrip())
            lines.extend(" " * lead + more for more in wrapped[1:])
        else:
            lines.append(head.rstrip())
            room = max(width - len(INDENT), NARROWEST)
            lines.extend(textwrap.wrap(last, room, initial_indent=INDENT, subsequent_indent=INDENT))
    return lines


def fit(text: str, width: int | None) -> str:
    """A line of prose (a note, a summary) wrapped to `width`, continued lines indented."""
    if width is None or len(text) <= width:
        return text
    return "\n".join(textwrap.wrap(text, width, subsequent_indent=INDENT, break_on_hyphens=False))
