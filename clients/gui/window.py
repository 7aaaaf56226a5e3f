"""The control-room window: alarm banner on top, the layout's grid of panels below.

Theory of operation. Everything here runs on the Qt thread. A :class:`~PySide6.QtCore.QTimer`
fires every ``tick_ms`` (50 ms: 20 Hz) and:

1. drains the link's events (connection changes, history answers, alarm/lock/job lists,
   command results) and handles each;
2. drains up to ``max_samples_per_tick`` samples into the latest-reading table and the
   charts' ring buffers (a display that falls behind catches up over a few ticks; the
   link's bounded inbox drops the oldest samples rather than grow);
3. refreshes what changed: tiles of changed PVs, the banner, the tables, and each chart
   (``setData`` on the curves that got points, the sliding time window).

Nothing on this thread waits for the network: commands go to the link's loop
(:class:`~labctl.clients.gui.link.Link`), answers come back through the inbox.

The charts share one time axis: their views are linked to the first chart's, one span
(the selector in the status bar, 1 min ... 1 day; at first the first chart's ``span_s``)
applies to all, and a pan or zoom by hand on any chart stops them all following ("Live"
on any resumes them all), so every chart always shows the same minutes.

Ctrl-C and SIGTERM close the window (:func:`labctl.clients.gui.app.stop_on_signals`).

Without a layout file the window waits for the first connection and builds
:func:`~labctl.clients.gui.layout.default_layout` from the server's PVs. After a reconnect the
same panels carry on: charts show a gap for the outage (and fill it from history when the
session offers history), tiles go grey while disconnected.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from labctl.clients.gui.layout import (
    ChartPanel,
    InterlocksPanel,
    JobsPanel,
    Layout,
    LocksPanel,
    ValuesPanel,
    default_layout,
    is_system,
)
from labctl.clients.gui.link import CommandDone, Connected, Disconnected, HistoryResult, Link, Missing, Table
from labctl.clients.gui.style import DIM, Theme
from labctl.clients.gui.widgets.banner import AlarmBanner, AlarmRow, rows_from_alarms, rows_from_readings
from labctl.clients.gui.widgets.chart import StripChart
from labctl.clients.gui.widgets.tables import InterlocksTable, JobsTable, LocksTable
from labctl.clients.gui.widgets.values import ValuesPanelWidget
from labctl.clients.values import Metadata
from labctl.ioc.types import Reading, Severity
from PySide6 import QtCore, QtGui, QtWidgets

SUMMARY_SEVERITIES = (Severity.MINOR, Severity.MAJOR, Severity.INVALID)
#: The spans the time-axis selector offers, (label, seconds).
SPANS = (("1 min", 60.0), ("5 min", 300.0), ("10 min", 600.0), ("30 min", 1800.0), ("1 h", 3600.0), ("6 h", 21600.0), ("1 day", 86400.0))
#: Grid row stretch by panel type: charts take the height, tables and numbers what they need.
ROW_WEIGHT = {"chart": 3, "values": 1, "locks": 1, "jobs": 1, "interlocks": 1}


class MainWindow(QtWidgets.QMainWindow):
    """The display for one server (see the module docstring)."""

    def __init__(
        self,
        link: Link,
        layout: Layout | None = None,
        *,
        large: bool = False,
        tick_ms: int = 50,
        max_samples_per_tick: int = 100_000,
    ) -> None:
        super().__init__()
        self.link = link
        self.layout_config = layout
        self.theme = Theme(large or (layout.large if layout is not None else False))
        self.max_samples_per_tick = max_samples_per_tick
        self.setStyleSheet(self.theme.stylesheet())
        self.setWindowTitle(f"labctl · {link.url}")

        # what the display knows
        self.connected = False
        self.connection: Connected | None = None
        self.last_disconnect: Disconnected | None = None
        self.metas: dict[str, Metadata] = {}
        self.latest: dict[str, Reading] = {}
        self.features: frozenset[str] = frozenset()
        self.missing: set[str] = set()
        self.alarm_rows: list[AlarmRow] | None = None
        self.lock_rows: list[Any] | None = None
        self.jobs: list[Any] | None = None

        # panels
        self.charts: list[StripChart] = []
        self.value_panels: list[ValuesPanelWidget] = []
        self.lock_tables: list[LocksTable] = []
        self.job_tables: list[JobsTable] = []
        self.interlock_tables: list[InterlocksTable] = []
        self._chart_routes: dict[str, list[StripChart]] = {}

        central = QtWidgets.QWidget()
        box = QtWidgets.QVBoxLayout(central)
        box.setContentsMargins(6, 6, 6, 6)
        box.setSpacing(6)
        self.banner = AlarmBanner(self.theme)
        self.banner.acknowledge_requested.connect(self.acknowledge)
        box.addWidget(self.banner)
        self.grid_host = QtWidgets.QWidget()
        self.grid = QtWidgets.QGridLayout(self.grid_host)
        self.grid.setContentsMargins(0, 0, 0, 0)
        self.grid.setSpacing(6)
        box.addWidget(self.grid_host, 1)
        self.placeholder = QtWidgets.QLabel(f"connecting to {link.url} …")
        self.placeholder.setStyleSheet(f"color: {DIM}; font-size: {self.theme.pt(14)}pt;")
        self.placeholder.setAlignment(QtCore.Qt.AlignmentFlag.AlignCenter)
        self.grid.addWidget(self.placeholder, 0, 0)
        self.setCentralWidget(central)
        self.connection_label = QtWidgets.QLabel("connecting …")
        self.stats_label = QtWidgets.QLabel("")
        self.span_box = QtWidgets.QComboBox()
        self.span_box.setToolTip("time span of every chart")
        for label, seconds in SPANS:
            self.span_box.addItem(label, seconds)
        self.span_box.setVisible(False)  # shown once there are charts
        self.span_box.activated.connect(lambda i: self.set_span(float(self.span_box.itemData(i))))
        self.statusBar().addWidget(self.connection_label, 1)
        self.statusBar().addPermanentWidget(self.stats_label)
        self.statusBar().addPermanentWidget(self.span_box)
        self.resize(1600, 1000)

        if layout is not None:
            self._build(layout)
        self.timer = QtCore.QTimer(self)
        self.timer.setInterval(tick_ms)
        self.timer.timeout.connect(self.tick)
        self.timer.start()

    # ---- building ---------------------------------------------------------------------

    def _build(self, layout: Layout) -> None:
        self.layout_config = layout
        if layout.title:
            self.setWindowTitle(layout.title)
        self.banner.setVisible(layout.banner)
        self.grid.removeWidget(self.placeholder)
        self.placeholder.hide()
        weights: dict[int, int] = {}
        for panel, (row, col, rowspan, colspan) in zip(layout.panels, layout.cells(), strict=True):
            widget = self._make(panel)
            self.grid.addWidget(widget, row, col, rowspan, colspan)
            weights[row] = max(weights.get(row, 0), ROW_WEIGHT[panel.type])
        for row, w in weights.items():
            self.grid.setRowStretch(row, w)
        for col in range(layout.columns):
            self.grid.setColumnStretch(col, 1)
        self._link_charts()
        if self.connection is not None:
            self._bind(self.connection)
        self.link.watch(layout.pv_names())

    def _link_charts(self) -> None:
        """One time axis for every chart: views linked to the first, one span, following together."""
        if not self.charts:
            return
        first = self.charts[0]
        for chart in self.charts:
            if chart is not first:
                chart.vb.setXLink(first.vb)
            chart.on_manual = self._stop_following
            chart.on_follow = self._follow
        span = first.span_s
        if self.span_box.findData(span) < 0:
            self.span_box.addItem(_span_label(span), span)
        self.span_box.setCurrentIndex(self.span_box.findData(span))
        self.span_box.setVisible(True)
        for chart in self.charts:
            chart.span_s = span

    def set_span(self, span_s: float) -> None:
        """Show the last ``span_s`` seconds on every chart (and follow live data)."""
        now = time.time()
        i = self.span_box.findData(span_s)
        if i < 0:
            self.span_box.addItem(_span_label(span_s), span_s)
            i = self.span_box.findData(span_s)
        self.span_box.setCurrentIndex(i)
        for chart in self.charts:
            chart.follow()
            chart.set_span(span_s, now)

    def _stop_following(self) -> None:
        for chart in self.charts:
            chart.stop_following()

    def _follow(self) -> None:
        for chart in self.charts:
            if not chart.following:
                chart.follow()

    def _make(self, panel: Any) -> QtWidgets.QWidget:
        if isinstance(panel, ChartPanel):
            chart = StripChart(panel, self.theme, self.link.request_history)
            chart.setMinimumHeight(int(180 * self.theme.scale))
            self.charts.append(chart)
            for name in chart.names:
                self._chart_routes.setdefault(name, []).append(chart)
            return chart
        if isinstance(panel, ValuesPanel):
            w = ValuesPanelWidget(panel, self.theme)
            self.value_panels.append(w)
            return w
        if isinstance(panel, LocksPanel):
            t = LocksTable(panel, self.theme)
            t.break_requested.connect(self.break_lock)
            self.lock_tables.append(t)
            return t
        if isinstance(panel, JobsPanel):
            j = JobsTable(panel, self.theme)
            self.job_tables.append(j)
            return j
        if isinstance(panel, InterlocksPanel):
            i = InterlocksTable(panel, self.theme)
            self.interlock_tables.append(i)
            return i
        raise TypeError(f"no widget for panel type {type(panel).__name__}")

    def _bind(self, c: Connected) -> None:
        now = time.time()
        for chart in self.charts:
            chart.bind(c.metas, "history" in c.features, now)
        for p in self.value_panels:
            p.bind(c.metas)
        for t in self.lock_tables:
            t.bind(c.metas)
        for t in self.interlock_tables:
            t.bind(c.metas)

    # ---- the tick ---------------------------------------------------------------------

    def tick(self) -> None:
        """Drain the link's inbox and refresh what changed (runs every ``tick_ms``)."""
        for event in self.link.inbox.take_events():
            self._handle(event)
        changed: set[str] = set()
        routes = self._chart_routes
        for sample in self.link.inbox.take_samples(self.max_samples_per_tick):
            self.latest[sample.name] = sample.reading
            changed.add(sample.name)
            for chart in routes.get(sample.name, ()):
                chart.ingest(sample.name, sample.reading)
        self._refresh(changed)

    def _handle(self, event: Any) -> None:
        if isinstance(event, Connected):
            self._connected(event)
        elif isinstance(event, Disconnected):
            self._disconnected(event)
        elif isinstance(event, Missing):
            self.missing.update(event.names)
            self._status()
        elif isinstance(event, HistoryResult):
            for chart in self.charts:
                if chart.on_history(event.request_id, event.since, event.until, event.times, event.values, event.error):
                    break
        elif isinstance(event, Table):
            if event.kind == "alarms":
                self.alarm_rows = rows_from_alarms(event.rows)
            elif event.kind == "locks":
                self.lock_rows = event.rows
            elif event.kind == "jobs":
                self.jobs = event.rows
                for t in self.job_tables:
                    t.refresh_rows(self.jobs, True)
        elif isinstance(event, CommandDone):
            self.banner.show_message(f"{event.what}: {event.error}" if event.error else f"{event.what}: done", bool(event.error))

    def _connected(self, c: Connected) -> None:
        first = self.connection is None
        self.connection = c
        self.connected = True
        self.metas = c.metas
        self.features = c.features
        self.latest.update(c.readings)
        self.missing.clear()
        if self.layout_config is None:
            self._build(default_layout(list(c.metas.values()), c.readings, title=f"labctl · {c.site}"))
        else:
            if first and not self.layout_config.title:
                self.setWindowTitle(f"labctl · {c.site}")
            self._bind(c)
            self.missing.update(n for n in self.layout_config.pv_names() if n not in c.metas)
        if self.link.user is None:
            self.banner.set_acknowledge(False, "log in (labctl gui --user) to acknowledge")
        elif "acknowledge" not in c.features:
            self.banner.set_acknowledge(False, "this client cannot acknowledge alarms")
        else:
            self.banner.set_acknowledge(True)
        for t in self.job_tables:
            t.refresh_rows(None, "jobs" in c.features)
        self.banner.set_connected(True)
        self._refresh(set(self.latest), force=True)
        self._status()

    def _disconnected(self, d: Disconnected) -> None:
        was = self.connected
        self.connected = False
        self.last_disconnect = d
        if was:
            for chart in self.charts:
                chart.connection_lost()
        self.banner.set_connected(False, d.reason)
        self._refresh(set(), force=True)
        self._status()

    def _refresh(self, changed: set[str], force: bool = False) -> None:
        now = time.time()
        connected = self.connected
        for p in self.value_panels:
            for name in p.names if force else changed.intersection(p.names):
                p.show_value(name, self.latest.get(name), connected)
        if force or any(n.startswith("ALARM:") for n in changed):
            self._banner_summary()
        shown = self._shown_names()
        if "alarms" in self.features and self.alarm_rows is not None:
            self.banner.set_rows(self.alarm_rows, True)
        elif force or changed.intersection(shown):
            self.banner.set_rows(rows_from_readings(self.latest, shown), False)
        for t in self.lock_tables:
            t.refresh_rows(self.latest, self.lock_rows, now, connected)
        if force or any(n.startswith("ILK:") for n in changed):
            for t in self.interlock_tables:
                t.refresh_rows(self.latest, connected)
        for chart in self.charts:
            chart.refresh(now)
        dropped = self.link.inbox.dropped
        self.stats_label.setText(f"{dropped} samples dropped (display behind)" if dropped else "")

    def _shown_names(self) -> list[str]:
        if self.layout_config is None:
            return []
        return [n for n in self.layout_config.pv_names() if not is_system(n)]

    def _banner_summary(self) -> None:
        def count(prefix: str) -> dict[Severity, int]:
            out = {}
            for s in SUMMARY_SEVERITIES:
                r = self.latest.get(f"ALARM:{prefix}:{s.name}")
                out[s] = int(r.value) if r is not None and isinstance(r.value, int) else 0
            return out

        highest = self.latest.get("ALARM:HIGHEST")
        severity = None
        if highest is not None and isinstance(highest.value, int) and 0 <= highest.value <= int(Severity.INVALID):
            severity = Severity(highest.value)
        self.banner.set_summary(severity, count("ACTIVE"), count("UNACKED"))

    def _status(self) -> None:
        if self.connected and self.connection is not None:
            c = self.connection
            who = f"{c.user} [{', '.join(c.roles)}]" if c.roles else c.user
            text = f"● connected to {c.url} (site {c.site}) as {who}"
        elif self.last_disconnect is not None:
            d = self.last_disconnect
            retry = f"; retrying in {d.retry_in_s:g} s" if d.retry_in_s is not None else "; not retrying"
            text = f"○ disconnected: {d.reason}{retry}"
        else:
            text = f"connecting to {self.link.url} …"
        if self.missing:
            text += f"   · not on the server: {', '.join(sorted(self.missing))}"
        self.connection_label.setText(text)

    # ---- commands ---------------------------------------------------------------------

    def acknowledge(self, sources: Iterable[str]) -> None:
        """Ask the server to acknowledge these alarms."""
        sources = list(sources)
        for s in sources:
            self.link.acknowledge(s, "acknowledged from the control-room display")
        self.banner.show_message(f"acknowledging {', '.join(sources)} …")

    def break_lock(self, resource: str, holder: str) -> None:
        """Ask to be sure, then ask the server to break ``holder``'s lock on ``resource`` (admins)."""
        if not self.confirm(f"Break {holder}'s lock on {resource}?", f"{holder} loses write access at once and is told; the break is audited."):
            return
        self.link.break_lock(resource)
        self.banner.show_message(f"breaking the lock on {resource} …")

    def confirm(self, question: str, detail: str) -> bool:
        """A yes/no question to the person at the display."""
        box = QtWidgets.QMessageBox(QtWidgets.QMessageBox.Icon.Warning, "labctl", question, parent=self)
        box.setInformativeText(detail)
        box.setStandardButtons(QtWidgets.QMessageBox.StandardButton.Yes | QtWidgets.QMessageBox.StandardButton.Cancel)
        box.setDefaultButton(QtWidgets.QMessageBox.StandardButton.Cancel)
        return box.exec() == QtWidgets.QMessageBox.StandardButton.Yes

    def save_screenshot(self, path: str | Path) -> None:
        """Save a picture of the window (PNG by the file's extension)."""
        if not self.grab().save(str(path)):
            raise OSError(f"could not save a screenshot to {path}")

    def closeEvent(self, event: QtGui.QCloseEvent) -> None:  # noqa: N802 -- Qt's name
        """Stop the timer and the link."""
        self.timer.stop()
        self.link.stop()
        super().closeEvent(event)

    # ---- inspection -----------------------------------------------------------------

    def settled(self) -> bool:
        """Connected, panels built, every chart with live points and no history outstanding."""
        if not self.connected or self.layout_config is None:
            return False
        return all(c.settled() for c in self.charts)

    def time_ranges(self) -> list[tuple[float, float]]:
        """Each chart's visible time range (they are linked: all the same)."""
        return [c.time_range() for c in self.charts]

    def chart(self, title: str) -> StripChart:
        """A chart by title (or by its first PV when untitled)."""
        for c in self.charts:
            if c.panel.title == title or (not c.panel.title and c.names[0] == title):
                return c
        raise KeyError(title)


def _span_label(seconds: float) -> str:
    """``90 s``, ``15 min``, ``2 h``, ``3 days``: a span for the selector."""
    for unit, size in (("day", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size and seconds % size == 0:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if unit == 'day' and n > 1 else ''}"
    return f"{seconds:g} s"
