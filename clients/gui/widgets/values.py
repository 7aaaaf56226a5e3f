"""Value panels: big numbers with units, coloured by alarm severity.

Each PV is a tile: its label, the value in a large font with the unit beside it (to the
PV's precision, its EPICS PREC, unless the layout gives a ``format``), and a status line (alarm status and severity, or why there is no value). The tile's colours
are the severity's (see :mod:`labctl.clients.gui.style`); while the display has no connection
the last value stays visible but grey, so nobody mistakes it for a current one. A tile
restyles only when its colour state changes: setting a style sheet is not free, values
change far more often than severities.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from labctl.clients.gui.layout import PVEntry, ValuesPanel
from labctl.clients.gui.style import BORDER, Theme, severity_colors
from labctl.clients.values import Metadata, format_number, format_value
from labctl.ioc.types import PVType, Reading, Severity, Status
from PySide6 import QtCore, QtGui, QtWidgets


def format_reading(reading: Reading | None, meta: Metadata | None, fmt: str | None = None) -> str:
    """A reading's value as the tile shows it: the layout's ``fmt``, else the PV's precision (five significant digits without one)."""
    if reading is None:
        return "—"
    v = reading.value
    if v is None:
        return "INVALID"
    if isinstance(v, float) and meta is not None and meta.type is PVType.FLOAT64:
        if not math.isfinite(v):
            return str(v)
        if fmt:
            return format(v, fmt)
        return format_number(v, meta.precision) if meta.precision is not None else f"{v:.5g}"
    if fmt and isinstance(v, (int, float)) and not isinstance(v, bool) and (meta is None or meta.type is not PVType.ENUM):
        return format(v, fmt)
    if meta is None:
        return str(v)
    return format_value(meta, v)


def status_text(reading: Reading | None, connected: bool) -> str:
    """The tile's status line."""
    if not connected:
        return "no connection"
    if reading is None:
        return "waiting for a value"
    if reading.severity is Severity.NO_ALARM:
        return ""
    status = reading.status.name if reading.status is not Status.NO_ALARM else ""
    return f"{reading.severity.name} {status}".strip()


class Tile(QtWidgets.QFrame):
    """One PV's value, unit and alarm state."""

    def __init__(self, entry: PVEntry, theme: Theme) -> None:
        super().__init__()
        self.setObjectName("tile")
        self.entry = entry
        self.name = entry.pv
        self.theme = theme
        self.meta: Metadata | None = None
        self._colors: tuple[str, str] | None = None
        box = QtWidgets.QVBoxLayout(self)
        box.setContentsMargins(8, 4, 8, 4)
        box.setSpacing(0)
        self.label = QtWidgets.QLabel(entry.label or entry.pv)
        self.value = QtWidgets.QLabel("—")
        self.unit = QtWidgets.QLabel("")
        self.status = QtWidgets.QLabel("")
        self.label.setStyleSheet(f"font-size: {theme.pt(9)}pt;")
        self._value_pt = theme.pt(24)
        self._shown_pt = 0
        self._fitted: tuple[int, int, str] | None = None
        self._set_value_pt(self._value_pt)
        self.unit.setStyleSheet(f"font-size: {theme.pt(12)}pt;")
        self.status.setStyleSheet(f"font-size: {theme.pt(8)}pt;")
        row = QtWidgets.QHBoxLayout()
        row.setSpacing(6)
        row.addWidget(self.value)
        row.addWidget(self.unit, 0, QtCore.Qt.AlignmentFlag.AlignBottom)
        row.addStretch(1)
        box.addWidget(self.label)
        box.addLayout(row)
        box.addWidget(self.status)
        self.setMinimumWidth(int(150 * theme.scale))
        self.show_reading(None, connected=False)

    def set_meta(self, meta: Metadata | None) -> None:
        """The PV's metadata (unit, enum states, description), or None: the server has no such PV."""
        self.meta = meta
        if meta is None:
            self.unit.setText("")
            self.value.setText("?")
            self.status.setText(f"no PV {self.name} on the server")
            self.setToolTip(f"{self.name}: not served")
            return
        self.unit.setText(meta.unit)
        self.setToolTip(f"{self.name}\n{meta.description}" if meta.description else self.name)

    def show_reading(self, reading: Reading | None, connected: bool) -> None:
        """Show a reading (or the lack of one)."""
        text = format_reading(reading, self.meta, self.entry.format)
        if text != self.value.text():
            self.value.setText(text)
            self._fit()
        self.status.setText(status_text(reading, connected))
        colors = severity_colors(reading.severity if reading is not None else None, connected and reading is not None)
        if colors != self._colors:
            self._colors = colors
            bg, fg = colors
            self.setStyleSheet(
                f"QFrame#tile {{ background: {bg}; border: 1px solid {BORDER}; border-radius: 4px; }}"
                f" QLabel {{ color: {fg}; background: transparent; }}"
            )

    def _set_value_pt(self, pt: int) -> None:
        if pt != self._shown_pt:
            self._shown_pt = pt
            self.value.setStyleSheet(f"font-size: {pt}pt; font-weight: bold;")

    def _fit(self) -> None:
        # Shrink the number (down to 40 %) rather than cut it off when the tile is narrow.
        key = (len(self.value.text()), self.width(), self.unit.text())
        if key == self._fitted:
            return  # same length, same room: same size (digits are about equally wide)
        self._fitted = key
        room = self.width() - self.unit.sizeHint().width() - 28
        if room <= 0:
            return
        font = QtGui.QFont(self.value.font())
        pt = self._value_pt
        while pt > 0.4 * self._value_pt:
            font.setPointSize(pt)
            if QtGui.QFontMetrics(font).horizontalAdvance(self.value.text()) <= room:
                break
            pt -= 1
        self._set_value_pt(pt)

    def resizeEvent(self, event: QtGui.QResizeEvent) -> None:  # noqa: N802 -- Qt's name
        """Fit the number to the new width."""
        super().resizeEvent(event)
        self._fit()

    @property
    def colors(self) -> tuple[str, str]:
        """(background, foreground) currently shown."""
        assert self._colors is not None
        return self._colors


class ValuesPanelWidget(QtWidgets.QFrame):
    """A grid of :class:`Tile`."""

    def __init__(self, panel: ValuesPanel, theme: Theme) -> None:
        super().__init__()
        self.setObjectName("panel")
        self.panel = panel
        box = QtWidgets.QVBoxLayout(self)
        box.setContentsMargins(6, 4, 6, 6)
        if panel.title:
            title = QtWidgets.QLabel(panel.title)
            title.setObjectName("panelTitle")
            box.addWidget(title)
        grid = QtWidgets.QGridLayout()
        grid.setSpacing(6)
        self.tiles: dict[str, list[Tile]] = {}
        for i, entry in enumerate(panel.pvs):
            tile = Tile(entry, theme)
            grid.addWidget(tile, i // panel.columns, i % panel.columns)
            self.tiles.setdefault(entry.pv, []).append(tile)
        box.addLayout(grid)
        box.addStretch(1)

    @property
    def names(self) -> list[str]:
        """The PVs on this panel."""
        return list(self.tiles)

    def bind(self, metas: Mapping[str, Metadata]) -> None:
        """Metadata from the server."""
        for name, tiles in self.tiles.items():
            for t in tiles:
                t.set_meta(metas.get(name))

    def show_value(self, name: str, reading: Reading | None, connected: bool) -> None:
        """Show a PV's reading on its tiles."""
        for t in self.tiles.get(name, ()):
            if t.meta is not None:
                t.show_reading(reading, connected)

    def show_all(self, latest: Mapping[str, Reading], connected: bool) -> None:
        """Show every PV's latest reading (after a connection change)."""
        for name in self.tiles:
            self.show_value(name, latest.get(name), connected)

    def tile(self, name: str) -> Tile:
        """The (first) tile of a PV."""
        return self.tiles[name][0]

