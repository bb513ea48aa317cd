"""One report renderer, as plain text for terminals and HTML for Jupyter.

The resource plan, :class:`~kompot_dask.RunInfo`, run comparisons and the cleanup summary
each describe themselves as a :class:`Report` (a title, titled sections and an optional
status line); this module alone decides how that looks.

A section holds either lines (each optionally with indented sub-lines, such as an error
and its fixes) or a table (a header and rows; key/value sections are two-column tables).
"""

from __future__ import annotations

import html
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Report", "Section", "Reportable", "format_cell"]

_INDENT = "  "
_TONE_COLORS = {"ok": "#2e7d32", "warn": "#ef6c00", "error": "#c62828"}

Line = str | tuple[str, Sequence[str]]
"""A line of text, or a line with sub-lines shown indented beneath it."""


def format_cell(value: Any) -> str:
    """A table cell as text: ``None`` as ``"None"``, long lists shortened."""
    if value is None:
        return "None"
    if isinstance(value, list | tuple) and len(value) > 6:
        head = ", ".join(str(v) for v in value[:3])
        return f"[{head}, … ({len(value)} items)]"
    return str(value)


@dataclass(frozen=True)
class Section:
    """A titled part of a report: lines, or a table when ``header`` is given.

    Parameters
    ----------
    title
        Section heading.
    lines
        Lines of text (for a section without ``header``); an item may be
        ``(line, sub_lines)``.
    header
        Column names; makes the section a table of ``rows``.
    rows
        Table rows, one value per column.
    mark
        Prefix of every line, e.g. ``"⚠"``.
    optional
        Leave the section out when it is empty (otherwise it shows ``(none)``).
    """

    title: str
    lines: Sequence[Line] = ()
    header: tuple[str, ...] = ()
    rows: Sequence[Sequence[Any]] = ()
    mark: str = ""
    optional: bool = False

    @classmethod
    def table(cls, title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Section:
        """A table section."""
        return cls(title, header=tuple(header), rows=[tuple(r) for r in rows])

    @classmethod
    def key_values(cls, title: str, values: Mapping[str, Any],
                   header: Sequence[str] = ("Parameter", "Value")) -> Section:
        """A two-column table of ``values``' items."""
        return cls.table(title, header, list(values.items()))

    @property
    def is_table(self) -> bool:
        return bool(self.header)

    @property
    def empty(self) -> bool:
        return not (self.rows if self.is_table else self.lines)

    def marked(self, text: str) -> str:
        return f"{self.mark} {text}" if self.mark else text


@dataclass
class Report:
    """A title, sections and an optional status line, rendered by :meth:`text` and :meth:`html`.

    Parameters
    ----------
    title
        First line of the text (underlined), heading of the HTML.
    sections
        The report's parts, in order.
    status
        A verdict shown last in text and first (coloured by ``tone``) in HTML.
    tone
        ``"ok"``, ``"warn"`` or ``"error"``: the colour of ``status`` in HTML.
    """

    title: str
    sections: list[Section] = field(default_factory=list)
    status: str | None = None
    tone: str = "ok"

    def shown(self) -> list[Section]:
        """The sections to render (optional empty ones left out)."""
        return [s for s in self.sections if not (s.optional and s.empty)]

    def text(self) -> str:
        """Plain text: the underlined title, then each section as ``Title:`` and indented body."""
        out = [self.title, "=" * len(self.title)]
        for section in self.shown():
            out += ["", f"{section.title}:"]
            out += [_INDENT + line if line else "" for line in _text_body(section)]
        if self.status:
            out += ["", self.status]
        return "\n".join(out) + "\n"

    def html(self) -> str:
        """HTML for notebooks: each section a collapsible table."""
        parts = ["<div class='kompot-dask-report'>", f"<h4>{html.escape(self.title)}</h4>"]
        if self.status:
            color = _TONE_COLORS.get(self.tone, _TONE_COLORS["ok"])
            parts.append(f"<p style='font-weight:bold;color:{color}'>{html.escape(self.status)}</p>")
        for section in self.shown():
            parts.append(f"<details open><summary><b>{html.escape(section.title)}</b></summary>")
            parts.append(_html_table(section))
            parts.append("</details>")
        parts.append("</div>")
        return "".join(parts)


def _text_body(section: Section) -> list[str]:
    if section.empty:
        return ["(none)"]
    if not section.is_table:
        out = []
        for item in section.lines:
            text, subs = (item, ()) if isinstance(item, str) else item
            out.append(section.marked(text))
            out += [_INDENT * 2 + s for s in subs]
        return out
    cells = [tuple(format_cell(c) for c in row) for row in section.rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(section.header)]

    def joined(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    return [joined(section.header), joined(["-" * w for w in widths])] + [joined(r) for r in cells]


def _cell(value: Any) -> str:
    return f"<td style='text-align:left'>{html.escape(format_cell(value))}</td>"


def _html_table(section: Section) -> str:
    head = ""
    if section.is_table:
        head = "<thead><tr>" + "".join(
            f"<th style='text-align:left'>{html.escape(h)}</th>" for h in section.header) + "</tr></thead>"
    if section.empty:
        rows = ["<tr><td style='text-align:left'>(none)</td></tr>"]
    elif section.is_table:
        rows = ["<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in section.rows]
    else:
        rows = []
        for item in section.lines:
            text, subs = (item, ()) if isinstance(item, str) else item
            sub = "<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in subs) + "</ul>" if subs else ""
            rows.append(f"<tr><td style='text-align:left'>{html.escape(section.marked(text))}{sub}</td></tr>")
    return f"<table>{head}<tbody>{''.join(rows)}</tbody></table>"


class Reportable(ABC):
    """Text for terminals, HTML for Jupyter, from the subclass's :meth:`report`."""

    @abstractmethod
    def report(self) -> Report:
        """The object as titled sections."""

    def to_text(self) -> str:
        """The report as plain text."""
        return self.report().text()

    def __str__(self) -> str:
        return self.to_text()

    def __repr__(self) -> str:
        return self.to_text()

    def _repr_html_(self) -> str:
        return self.report().html()
