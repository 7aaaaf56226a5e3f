"""The detail pane: everything about the selected PV, and a sparkline of its recent values.

The screen sets the PV (:meth:`DetailPane.show`), hands it history when the server has
some (:meth:`DetailPane.set_history`), and every new reading (:meth:`DetailPane.apply`);
the sparkline keeps the last :data:`POINTS` values, history first, then live.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from labctl.clients.tui.model import alarm_text, as_float, limits, numeric, range_text, time_text, value_text
from labctl.clients.tui.widgets.pv_table import severity_style
from labctl.clients.values import Metadata
from labctl.ioc.types import Reading
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.content import Content
from textual.css.query import NoMatches
from textual.widgets import Sparkline, Static

#: Values the sparkline keeps.
POINTS = 120


def _alarm_limits(meta: Metadata) -> str:
    """Alarm limits, when the session reports them (``Metadata.alarm``: lolo/low/high/hihi)."""
    alarm = getattr(meta, "alarm", None)
    if not alarm:
        return "not published by the server"
    get = alarm.get if isinstance(alarm, dict) else (lambda k: getattr(alarm, k, None))
    parts = [f"{k.upper()} {get(k):g}" for k in ("lolo", "low", "high", "hihi") if get(k) is not None]
    return ", ".join(parts) or "none"


def detail_content(meta: Metadata | None, reading: Reading | None) -> Content:
    """The pane's text for a PV."""
    if meta is None:
        return Content("Select a PV to see its details.")
    access = "read-only" if not meta.writable else ("writable" if meta.user_writable else "writable (not by you)")
    kind = meta.type.value if meta.type else "?"
    if meta.states:
        kind += f" {{{', '.join(f'{i}={s}' for i, s in enumerate(meta.states))}}}"
    lines: list[Content | str] = [
        Content.styled(meta.name, "bold") + (f"  {meta.description}" if meta.description else ""),
        f"type {kind}   unit {meta.unit or '-'}{' (' + meta.unit_description + ')' if meta.unit_description and meta.unit_description != meta.unit else ''}   {access}",
    ]
    rng = limits(meta)
    lim = f"drive {range_text(rng, meta.unit)}" if rng else ""
    if meta.display:
        lim += ("   " if lim else "") + f"range {range_text(meta.display, meta.unit)}"
    lines.append(f"limits {lim or 'none'}   alarm limits {_alarm_limits(meta)}")
    resource = getattr(meta, "resource", "")
    lines.append(f"path {meta.path or '-'}" + (f"   resource {resource}" if resource else ""))
    if reading is None:
        lines.append("value …")
    else:
        sev = severity_style(reading.severity)
        alarm = alarm_text(reading)
        value = Content("value ") + Content.styled(value_text(meta, reading) + (f" {meta.unit}" if meta.unit else ""), sev or "bold")
        if alarm:
            value += Content("  ") + Content.styled(alarm, sev)
        value += f"   at {time_text(reading.timestamp, date=True)}"
        lines.append(value)
    return Content("\n").join(lines)


class DetailPane(Vertical):
    """Metadata, limits, current reading and a sparkline of the selected PV."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.meta: Metadata | None = None
        self.reading: Reading | None = None
        self.values: deque[float] = deque(maxlen=POINTS)
        self.history_note = ""

    def compose(self) -> ComposeResult:
        yield Static(detail_content(None, None), id="detail-text")
        yield Sparkline([], id="detail-spark")
        yield Static("", id="detail-spark-note")

    @property
    def name_shown(self) -> str | None:
        """The PV shown."""
        return self.meta.name if self.meta is not None else None

    def show(self, meta: Metadata | None, reading: Reading | None) -> None:
        """Show another PV (its sparkline starts again, from this reading)."""
        self.meta, self.reading = meta, reading
        self.values.clear()
        self.history_note = "live values" if numeric(meta) else ""
        if reading is not None and numeric(meta) and (v := as_float(reading.value)) is not None:
            self.values.append(v)
        self._draw()

    def set_history(self, values: Iterable[float], note: str) -> None:
        """Put history in front of the live values received so far."""
        live = list(self.values)
        self.values.clear()
        self.values.extend(v for v in (as_float(x) for x in values) if v is not None)
        self.values.extend(live)
        self.history_note = note
        self._draw()

    def apply(self, reading: Reading) -> None:
        """A new reading of the PV shown (the same reading again, as a new subscription sends it, draws no new point)."""
        again = self.reading is not None and reading == self.reading
        self.reading = reading
        if not again and numeric(self.meta) and (v := as_float(reading.value)) is not None:
            self.values.append(v)
        self._draw()

    def on_mount(self) -> None:
        self._draw()  # what arrived before the pane's parts were there

    def _draw(self) -> None:
        try:
            text = self.query_one("#detail-text", Static)
        except NoMatches:  # a reading before the pane is composed: on_mount draws it
            return
        text.update(detail_content(self.meta, self.reading))
        spark = self.query_one("#detail-spark", Sparkline)
        spark.display = numeric(self.meta) and len(self.values) > 1  # one point draws as a solid block
        spark.data = list(self.values)
        note = self.query_one("#detail-spark-note", Static)
        if self.values and numeric(self.meta):
            lo, hi = min(self.values), max(self.values)
            points = f"{len(self.values)} point{'s' if len(self.values) != 1 else ''}"
            note.update(f"{self.history_note}: {points}, min {lo:.6g}, max {hi:.6g}")
        else:
            note.update(self.history_note)
