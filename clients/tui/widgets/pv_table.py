"""The PV table: one row per PV, cells updated in place.

The table is rebuilt only when the set of rows changes (a new filter or folder); live
values change single cells with ``update_cell`` and never re-measure the columns, whose
widths are fixed when the rows are laid out. So an update repaints the visible rows of
the table and nothing moves: no flicker, and thousands of rows cost what the screen
shows. Severity is spelled out in the ALARM column and coloured with the theme's
semantic colours (``$warning`` for MINOR, ``$error`` for MAJOR, magenta for INVALID as in
EPICS displays), so it reads in a 16-colour terminal and without colour at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from labctl.clients.tui.model import alarm_text, time_text, value_text
from labctl.clients.values import Metadata
from labctl.ioc.types import Reading, Severity
from textual.content import Content
from textual.widgets import DataTable
from textual.widgets.data_table import CellDoesNotExist, ColumnKey

#: Content style of each severity (theme variables, so the theme decides the colour).
SEVERITY_STYLES = {
    Severity.NO_ALARM: "",
    Severity.MINOR: "$warning",
    Severity.MAJOR: "bold $error",
    Severity.INVALID: "bold magenta",
}


def severity_style(severity: Severity | None) -> str:
    """The Content style for text in a given severity."""
    return SEVERITY_STYLES.get(severity, "") if severity is not None else ""


def styled(text: str, severity: Severity | None) -> Content:
    """Plain text in a severity's style (never parsed as markup: values are data)."""
    style = severity_style(severity)
    return Content.styled(text, style) if style else Content(text)


COLUMNS = (("NAME", "name"), ("VALUE", "value"), ("UNIT", "unit"), ("ALARM", "alarm"), ("TIME", "time"), ("DESCRIPTION", "description"))
VALUE_WIDTH = 16
UNIT_WIDTH = 6
ALARM_WIDTH = 13
TIME_WIDTH = 12


class PVTable(DataTable):
    """PVs with value, unit, alarm and time; the row key is the PV name."""

    def __init__(self, **kw: object) -> None:
        super().__init__(cursor_type="row", zebra_stripes=False, **kw)  # type: ignore[arg-type]
        self.metas: Mapping[str, Metadata] = {}
        self.names: list[str] = []
        self._readings: Mapping[str, Reading] = {}
        self.layouts = 0
        """How many times the rows were laid out (live updates never do)."""

    def show(self, names: Iterable[str], metas: Mapping[str, Metadata], readings: Mapping[str, Reading]) -> None:
        """Lay out these rows (keeping the cursor on the same PV when it is still shown)."""
        names = list(names)
        self.metas = metas
        self._readings = readings
        keep = self.current_name
        self.names = names
        self.layouts += 1
        self.clear(columns=True)
        widths = self._widths(names, metas)
        for label, key in COLUMNS:
            if widths.get(key):
                self.add_column(label, width=widths[key], key=key)
        for name in names:
            self.add_row(*self._cells(name, readings.get(name)), key=name)
        if keep in names:
            self.move_cursor(row=names.index(keep), animate=False)

    def _widths(self, names: list[str], metas: Mapping[str, Metadata]) -> dict[str, int]:
        """Fixed column widths; the description gets what is left of the table's width (if enough)."""
        widths = {
            "name": min(max([len(n) for n in names] + [12]), 40),
            "value": VALUE_WIDTH,
            "unit": UNIT_WIDTH,
            "alarm": ALARM_WIDTH,
            "time": TIME_WIDTH,
        }
        used = sum(w + 2 * self.cell_padding for w in widths.values()) + 2  # the vertical scrollbar
        left = self.size.width - used - 2 * self.cell_padding
        wanted = max([len(metas[n].description) for n in names if n in metas] + [11])
        widths["description"] = min(wanted, left) if left >= 11 else 0
        return widths

    def on_resize(self) -> None:
        if self.names and self._widths(self.names, self.metas).get("description", 0) != self._description_width():
            self.show(self.names, self.metas, self._readings)

    def _description_width(self) -> int:
        column = self.columns.get(ColumnKey("description"))  # type: ignore[call-overload]
        return column.width if column is not None else 0

    def _cells(self, name: str, reading: Reading | None) -> tuple[object, ...]:
        meta = self.metas.get(name)
        sev = reading.severity if reading is not None else None
        cells: tuple[object, ...] = (
            name,
            styled(value_text(meta, reading), sev),
            meta.unit if meta else "",
            styled(alarm_text(reading), sev),
            time_text(reading.timestamp) if reading is not None else "",
        )
        if self._description_width():
            cells += (meta.description if meta else "",)
        return cells

    def apply(self, changed: Mapping[str, Reading]) -> int:
        """Update the cells of the shown PVs among ``changed``; returns how many rows changed."""
        rows = self.rows
        n = 0
        for name, reading in changed.items():
            if name not in rows:
                continue
            meta = self.metas.get(name)
            sev = reading.severity
            self.update_cell(name, "value", styled(value_text(meta, reading), sev))
            self.update_cell(name, "alarm", styled(alarm_text(reading), sev))
            self.update_cell(name, "time", time_text(reading.timestamp))
            n += 1
        return n

    @property
    def current_name(self) -> str | None:
        """The PV under the cursor."""
        if not self.row_count:
            return None
        try:
            return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        except CellDoesNotExist:  # the cursor is outside the rows while the table is rebuilt
            return None

    def cell_text(self, name: str, column: str) -> str:
        """What a cell shows, as plain text (for tests and the status line)."""
        value = self.get_cell(name, column)
        return value.plain if isinstance(value, Content) else str(value)
