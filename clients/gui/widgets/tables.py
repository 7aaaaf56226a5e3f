"""Tables of the control room: resource locks, the job queue, interlocks.

* Locks come from the lock PVs every server publishes (``ARB:<RES>:OWNER``, ``:EXPIRES``,
  ``:QUEUE``), live; when the session offers ``locks()`` its answer adds who waits. A held
  lock's context menu offers to break it (admins: the server decides).
* Jobs come from ``Session.jobs()`` (polled by the link); without it the table says the
  queue is not available on this connection.
* Interlocks come from ``ILK:<NAME>:STATE`` PVs, coloured by what the state means.

A table is rewritten only when its rows change, so a quiet display costs nothing.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Mapping, Sequence
from typing import Any

from labctl.clients.gui.layout import InterlocksPanel, JobsPanel, LocksPanel
from labctl.clients.gui.style import INTERLOCK_SEVERITY, Theme, severity_colors
from labctl.clients.values import Metadata, format_value
from labctl.ioc.types import Reading, Severity
from PySide6 import QtCore, QtGui, QtWidgets

LOCK_PV = re.compile(r"^ARB:(?P<res>.+):OWNER$")
INTERLOCK_PV = re.compile(r"^ILK:(?P<name>.+):STATE$")
ACTIVE_JOB_STATES = ("running", "queued")


def clock(ts: float) -> str:
    """A UNIX time as local HH:MM:SS."""
    return _dt.datetime.fromtimestamp(ts).strftime("%H:%M:%S")


def remaining(seconds: float) -> str:
    """A duration as ``m:ss`` or ``h:mm:ss``."""
    s = max(0, int(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


#: Colours of a held lock (not an alarm: yellow would say MINOR).
HELD_COLORS = ("#1565c0", "#ffffff")

#: A row: its cells, and how its state cell is coloured (a severity, explicit colours, or not at all).
Row = tuple[tuple[str, ...], Severity | tuple[str, str] | None]


class TablePanel(QtWidgets.QFrame):
    """A titled table whose rows are replaced as a whole."""

    def __init__(self, title: str, header: Sequence[str], theme: Theme) -> None:
        super().__init__()
        self.setObjectName("panel")
        self.theme = theme
        box = QtWidgets.QVBoxLayout(self)
        box.setContentsMargins(6, 4, 6, 6)
        self.title = QtWidgets.QLabel(title)
        self.title.setObjectName("panelTitle")
        self.table = QtWidgets.QTableWidget(0, len(header))
        self.table.setHorizontalHeaderLabels(list(header))
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.horizontalHeader().setSectionResizeMode(QtWidgets.QHeaderView.ResizeMode.ResizeToContents)
        self.table.setEditTriggers(QtWidgets.QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionMode(QtWidgets.QAbstractItemView.SelectionMode.NoSelection)
        self.table.setFocusPolicy(QtGui.Qt.FocusPolicy.NoFocus)
        box.addWidget(self.title)
        box.addWidget(self.table, 1)
        self.setMinimumHeight(int(150 * theme.scale))
        self.rows: list[Row] = []

    def set_rows(self, rows: list[Row], state_column: int = 1) -> None:
        """Replace the rows; ``state_column`` is coloured by the row's severity."""
        if rows == self.rows:
            return
        self.rows = rows
        self.table.clearSpans()
        self.table.setRowCount(len(rows))
        for i, (cells, severity) in enumerate(rows):
            for j in range(self.table.columnCount()):
                item = QtWidgets.QTableWidgetItem(cells[j] if j < len(cells) else "")
                if j == state_column and severity is not None:
                    bg, fg = severity if isinstance(severity, tuple) else severity_colors(severity)
                    item.setBackground(QtGui.QColor(bg))
                    item.setForeground(QtGui.QColor(fg))
                self.table.setItem(i, j, item)
            if len(cells) == 1:  # a message across the table
                self.table.setSpan(i, 0, 1, self.table.columnCount())

    def texts(self) -> list[tuple[str, ...]]:
        """The cells of every row (for inspection)."""
        return [cells for cells, _ in self.rows]


class LocksTable(TablePanel):
    """Who holds which resource, until when, and how many wait; an admin may break a lock (context menu)."""

    break_requested = QtCore.Signal(str, str)
    """``(resource, holder)``: the user asked to break this lock (the window confirms and sends it)."""

    def __init__(self, panel: LocksPanel, theme: Theme) -> None:
        super().__init__(panel.title, ["Resource", "Holder", "Until", "Queue"], theme)
        self.panel = panel
        self.resources: list[str] = []
        self.table.setContextMenuPolicy(QtCore.Qt.ContextMenuPolicy.CustomContextMenu)
        self.table.customContextMenuRequested.connect(self._menu)

    def held(self, row: int) -> tuple[str, str] | None:
        """``(resource, holder)`` of a row whose lock is held, else None."""
        if not 0 <= row < len(self.rows):
            return None
        cells = self.rows[row][0]
        return (cells[0], cells[1]) if len(cells) >= 2 and cells[1] not in ("", "free") else None

    def _menu(self, pos: QtCore.QPoint) -> None:
        target = self.held(self.table.rowAt(pos.y()))
        if target is None:
            return
        menu = QtWidgets.QMenu(self)
        action = menu.addAction(f"Break {target[1]}'s lock on {target[0]}…")
        if menu.exec(self.table.viewport().mapToGlobal(pos)) is action:
            self.break_requested.emit(*target)

    def bind(self, metas: Mapping[str, Metadata]) -> None:
        """Find the lockable resources from their lock PVs."""
        wanted = {r.upper() for r in self.panel.resources} if self.panel.resources is not None else None
        self.resources = [m.group("res") for n in metas if (m := LOCK_PV.match(n)) and (wanted is None or m.group("res") in wanted)]

    def refresh_rows(self, latest: Mapping[str, Reading], locks: Sequence[Any] | None, now: float, connected: bool) -> None:
        """Refresh from the lock PVs (and ``Session.locks`` rows when available)."""
        by_res = {str(getattr(x, "resource", "")).upper(): x for x in locks or ()}
        rows: list[Row] = []
        for res in self.resources:
            info = by_res.get(res)
            owner_r = latest.get(f"ARB:{res}:OWNER")
            expires_r = latest.get(f"ARB:{res}:EXPIRES")
            queue_r = latest.get(f"ARB:{res}:QUEUE")
            owner = owner_r.value if owner_r is not None and owner_r.value else ""
            expires = expires_r.value if expires_r is not None and isinstance(expires_r.value, float) else 0.0
            queue = str(queue_r.value) if queue_r is not None and queue_r.value is not None else ""
            name = str(info.resource) if info is not None else res.lower()
            if info is not None:
                waiting = ", ".join(u for u, _ in getattr(info, "queue", ()) or ())
                if waiting:
                    queue = f"{queue}: {waiting}"
            if not connected:
                rows.append(((name, owner or "free", "", queue), None))
                continue
            until = f"{clock(expires)} (in {remaining(expires - now)})" if owner and expires > 0 else ""
            rows.append(((name, owner or "free", until, queue), HELD_COLORS if owner else None))
        if not self.resources:
            rows = [(("no lockable resources",), None)]
        self.set_rows(rows)


class JobsTable(TablePanel):
    """The job queue: running and queued jobs first, then the latest finished ones.

    ``Why`` says what holds a queued or paused job (``held by interlock mxc_warm: ...``,
    ``waiting for lock cryostat held by operator ...``), else why a failed job failed.
    """

    def __init__(self, panel: JobsPanel, theme: Theme) -> None:
        super().__init__(panel.title, ["Id", "Procedure", "Owner", "State", "Priority", "Submitted", "Why"], theme)
        self.panel = panel
        self.set_rows([(("waiting for the job list",), None)], state_column=3)

    def refresh_rows(self, jobs: Sequence[Any] | None, available: bool) -> None:
        """Refresh from ``Session.jobs()`` rows (``JobInfo``)."""
        if not available:
            self.set_rows([(("the job queue is not available on this connection",), None)], state_column=3)
            return
        if jobs is None:
            return
        active = [j for j in jobs if str(j.state) in ACTIVE_JOB_STATES]
        active.sort(key=lambda j: (str(j.state) != "running", -int(j.priority), float(j.submitted_at)))
        done = [j for j in jobs if str(j.state) not in ACTIVE_JOB_STATES]
        done.sort(key=lambda j: -(j.ended_at or j.submitted_at))
        rows: list[Row] = []
        for j in active + done[: self.panel.finished]:
            state = str(j.state) + (" (paused)" if getattr(j, "paused", False) else "")
            state += " (cleanup)" if getattr(j, "phase", "") == "cleanup" else ""
            severity = {"failed": Severity.MAJOR, "running": Severity.NO_ALARM, "queued": None}.get(str(j.state))
            why = getattr(j, "waiting_reason", "") or (j.error if str(j.state) == "failed" else "")
            if getattr(j, "paused", False) or (getattr(j, "waiting", None) or {}).get("kind") in ("interlock", "hold"):
                severity = Severity.MINOR
            rows.append(((str(j.id), j.procedure, j.owner, state, str(j.priority), clock(j.submitted_at), why), severity))
        self.set_rows(rows or [(("no jobs",), None)], state_column=3)


class InterlocksTable(TablePanel):
    """Each interlock and its state."""

    def __init__(self, panel: InterlocksPanel, theme: Theme) -> None:
        super().__init__(panel.title, ["Interlock", "State"], theme)
        self.panel = panel
        self.pvs: dict[str, str] = {}
        self.metas: Mapping[str, Metadata] = {}

    def bind(self, metas: Mapping[str, Metadata]) -> None:
        """Find the interlocks from their state PVs."""
        self.metas = metas
        self.pvs = {n: m.group("name").lower() for n in metas if (m := INTERLOCK_PV.match(n))}

    def refresh_rows(self, latest: Mapping[str, Reading], connected: bool) -> None:
        """Refresh from the state PVs."""
        rows: list[Row] = []
        for pv, name in self.pvs.items():
            r = latest.get(pv)
            meta = self.metas.get(pv)
            state = format_value(meta, r.value) if r is not None and meta is not None else "?"
            rows.append(((name, state), INTERLOCK_SEVERITY.get(state, Severity.INVALID) if connected and r is not None else None))
        self.set_rows(rows or [(("no interlocks",), None)])
