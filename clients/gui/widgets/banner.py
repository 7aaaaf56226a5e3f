"""The alarm banner: the highest active severity, the unacknowledged alarms, acknowledge.

The severity box shows ``ALARM:HIGHEST`` (a PV every server keeps), coloured as the
severity, and the counts from ``ALARM:ACTIVE:*`` / ``ALARM:UNACKED:*``. Without a
connection it says so in the INVALID colour: a wall display that silently stops
updating is worse than one that admits it.

The list shows the unacknowledged alarms from the session's alarm list
(``Session.alarms``: source, severity, message, since, guidance as a tooltip) when the
session offers it; otherwise it lists the displayed PVs that are in alarm now, from their
own readings. "Acknowledge" (the selected rows) and "Acknowledge all" are enabled for a
logged-in user when the session can acknowledge; the server still decides, and its
refusal is shown on the banner.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from labctl.clients.gui.style import DIM, Theme, severity_colors
from labctl.ioc.types import Reading, Severity
from PySide6 import QtCore, QtGui, QtWidgets


@dataclass(frozen=True)
class AlarmRow:
    """One line of the banner's list."""

    source: str
    severity: Severity
    message: str
    since: float | None
    acked: bool = False
    active: bool = True
    guidance: str = ""


def _severity(word: Any) -> Severity:
    if isinstance(word, Severity):
        return word
    try:
        return Severity[str(word).upper()]
    except KeyError:
        return Severity.INVALID


def rows_from_alarms(alarms: Iterable[Any]) -> list[AlarmRow]:
    """Unacknowledged alarms (``AlarmInfo`` from ``Session.alarms``), worst and oldest first."""
    rows = [
        AlarmRow(a.source, _severity(a.severity), a.message or a.status, a.since, a.acked, a.active, a.guidance)
        for a in alarms
        if not a.acked
    ]
    return sorted(rows, key=lambda r: (-int(r.severity), r.since or 0.0))


def rows_from_readings(latest: Mapping[str, Reading], names: Iterable[str]) -> list[AlarmRow]:
    """PVs among ``names`` whose latest reading is in alarm (when no alarm list is available)."""
    rows = []
    for n in names:
        r = latest.get(n)
        if r is not None and r.severity is not Severity.NO_ALARM:
            rows.append(AlarmRow(n, r.severity, r.status.name, r.timestamp))
    return sorted(rows, key=lambda r: (-int(r.severity), r.source))


class AlarmBanner(QtWidgets.QFrame):
    """Highest severity, counts, the unacknowledged alarms, and the acknowledge buttons."""

    acknowledge_requested = QtCore.Signal(list)
    """Sources the user asked to acknowledge."""

    def __init__(self, theme: Theme) -> None:
        super().__init__()
        self.setObjectName("panel")
        self.theme = theme
        self.highest: Severity | None = None
        self.connected = False
        self.rows: list[AlarmRow] = []
        self.from_alarm_list = False
        self.can_acknowledge = False
        self._colors: tuple[str, str] | None = None

        box = QtWidgets.QHBoxLayout(self)
        box.setContentsMargins(6, 6, 6, 6)
        left = QtWidgets.QVBoxLayout()
        self.severity = QtWidgets.QLabel("CONNECTING")
        self.severity.setAlignment(QtCore.Qt.AlignmentFlag.AlignCenter)
        self.severity.setMinimumWidth(int(220 * theme.scale))
        self.counts = QtWidgets.QLabel("")
        self.counts.setAlignment(QtCore.Qt.AlignmentFlag.AlignCenter)
        self.counts.setStyleSheet(f"color: {DIM}; font-size: {theme.pt(9)}pt;")
        left.addWidget(self.severity, 1)
        left.addWidget(self.counts)
        box.addLayout(left)

        middle = QtWidgets.QVBoxLayout()
        self.caption = QtWidgets.QLabel("Unacknowledged alarms")
        self.caption.setObjectName("panelTitle")
        self.table = QtWidgets.QTableWidget(0, 4)
        self.table.setHorizontalHeaderLabels(["Severity", "Source", "Alarm", "Since"])
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.horizontalHeader().setSectionResizeMode(QtWidgets.QHeaderView.ResizeMode.ResizeToContents)
        self.table.setEditTriggers(QtWidgets.QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QtWidgets.QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setMaximumHeight(int(110 * theme.scale))
        self.message = QtWidgets.QLabel("")
        self.message.setStyleSheet(f"font-size: {theme.pt(9)}pt;")
        middle.addWidget(self.caption)
        middle.addWidget(self.table)
        middle.addWidget(self.message)
        box.addLayout(middle, 1)

        right = QtWidgets.QVBoxLayout()
        self.ack_button = QtWidgets.QPushButton("Acknowledge")
        self.ack_all_button = QtWidgets.QPushButton("Acknowledge all")
        self.ack_button.clicked.connect(self._ack_selected)
        self.ack_all_button.clicked.connect(self._ack_all)
        right.addWidget(self.ack_button)
        right.addWidget(self.ack_all_button)
        right.addStretch(1)
        box.addLayout(right)
        self.set_acknowledge(False, "connecting")
        self._paint()

    # ---- state ----------------------------------------------------------------------

    def set_summary(self, highest: Severity | None, active: Mapping[Severity, int], unacked: Mapping[Severity, int]) -> None:
        """From ALARM:HIGHEST, ALARM:ACTIVE:* and ALARM:UNACKED:*."""
        self.highest = highest
        n_active, n_unacked = sum(active.values()), sum(unacked.values())
        self.counts.setText(f"{n_active} active · {n_unacked} unacknowledged")
        self._paint()

    def set_connected(self, connected: bool, reason: str = "") -> None:
        """Connection state: without one, the banner says so instead of showing stale calm."""
        self.connected = connected
        if not connected:
            self.counts.setText(reason)
        self._paint()

    def set_rows(self, rows: list[AlarmRow], from_alarm_list: bool) -> None:
        """The alarms listed (unacknowledged ones, or PVs in alarm as a fallback)."""
        if rows == self.rows and from_alarm_list == self.from_alarm_list:
            return
        selected = set(self.selected_sources())
        self.rows = rows
        self.from_alarm_list = from_alarm_list
        self.caption.setText("Unacknowledged alarms" if from_alarm_list else "In alarm now (shown PVs)")
        self.table.setRowCount(len(rows))
        for i, r in enumerate(rows):
            bg, fg = severity_colors(r.severity)
            since = _dt.datetime.fromtimestamp(r.since).strftime("%H:%M:%S") if r.since else ""
            state = "" if r.active else " (cleared)"
            for j, text in enumerate((r.severity.name, r.source, r.message + state, since)):
                item = QtWidgets.QTableWidgetItem(text)
                if j == 0:
                    item.setBackground(QtGui.QColor(bg))
                    item.setForeground(QtGui.QColor(fg))
                if r.guidance:
                    item.setToolTip(r.guidance)
                self.table.setItem(i, j, item)
            if r.source in selected:
                self.table.selectRow(i)
        self._update_buttons()

    def set_acknowledge(self, allowed: bool, why_not: str = "") -> None:
        """Whether this user can acknowledge here (the server still decides)."""
        self.can_acknowledge = allowed
        tip = "" if allowed else f"cannot acknowledge: {why_not}"
        self.ack_button.setToolTip(tip)
        self.ack_all_button.setToolTip(tip)
        self._update_buttons()

    def show_message(self, text: str, error: bool = False) -> None:
        """A line under the list (the result of an acknowledge)."""
        color = severity_colors(Severity.MAJOR)[0] if error else DIM
        self.message.setStyleSheet(f"color: {color}; font-size: {self.theme.pt(9)}pt;")
        self.message.setText(text)

    def selected_sources(self) -> list[str]:
        """Sources of the selected rows."""
        rows = sorted({i.row() for i in self.table.selectedIndexes()})
        return [self.rows[i].source for i in rows if i < len(self.rows)]

    # ---- inside -----------------------------------------------------------------------

    def _update_buttons(self) -> None:
        usable = self.can_acknowledge and self.from_alarm_list and self.connected
        self.ack_button.setEnabled(usable and bool(self.rows))
        self.ack_all_button.setEnabled(usable and bool(self.rows))

    def _paint(self) -> None:
        if not self.connected:
            text, colors = "NO CONNECTION", severity_colors(Severity.INVALID)
        elif self.highest is None:
            text, colors = "…", severity_colors(None, connected=False)
        else:
            text = "NO ALARM" if self.highest is Severity.NO_ALARM else self.highest.name
            colors = severity_colors(self.highest)
            if self.highest is Severity.NO_ALARM:
                colors = ("#1b5e20", "#ffffff")
        if colors != self._colors or self.severity.text() != text:
            self._colors = colors
            bg, fg = colors
            self.severity.setText(text)
            self.severity.setStyleSheet(
                f"background: {bg}; color: {fg}; font-size: {self.theme.pt(20)}pt; font-weight: bold; border-radius: 4px; padding: 6px;"
            )
        self._update_buttons()

    def _ack_selected(self) -> None:
        sources = self.selected_sources()
        if sources:
            self.acknowledge_requested.emit(sources)

    def _ack_all(self) -> None:
        if self.rows:
            self.acknowledge_requested.emit([r.source for r in self.rows])

    @property
    def severity_text(self) -> str:
        """What the severity box says."""
        return self.severity.text()
