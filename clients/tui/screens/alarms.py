"""The alarms panel: active and unacknowledged alarms, acknowledge and shelve.

With the session's alarm calls (``Session.alarms``/``acknowledge``/``shelve``) the panel
shows the server's alarm table: latched severity, the current one, acknowledged or not,
since when, the message and the operator guidance. Without them it lists the PVs whose
readings are in alarm (the acknowledge state is then unknown). It refreshes when it comes
to the front, whenever an alarm summary PV (``ALARM:*``) changes, and on ``r``.
"""

from __future__ import annotations

from collections.abc import Mapping

from labctl.clients.errors import ClientError
from labctl.clients.tui.model import ALARM_SUMMARY, AlarmRow, AlarmSummary, alarm_row_of, alarm_rows, time_text
from labctl.clients.tui.screens.base import LiveScreen, api, session_work
from labctl.clients.tui.widgets.pv_table import severity_style
from labctl.ioc.types import Reading, Severity
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Input, Static

COLUMNS = (("SOURCE", "source"), ("LATCHED", "severity"), ("NOW", "current"), ("STATUS", "status"), ("ACK", "ack"), ("SINCE", "since"), ("MESSAGE", "message"))


def _sev(name: str) -> Content:
    sev = Severity.__members__.get(name)
    style = severity_style(sev)
    return Content.styled(name, style) if style else Content(name)


def summary_line(summary: AlarmSummary) -> str:
    """``active: MINOR 1  MAJOR 0  INVALID 0   unacknowledged: ...``."""
    names = ("MINOR", "MAJOR", "INVALID")
    active = " ".join(f"{n} {c}" for n, c in zip(names, summary.active, strict=True))
    unacked = " ".join(f"{n} {c}" for n, c in zip(names, summary.unacked, strict=True))
    return f"highest {summary.highest.name} · active: {active} · unacknowledged: {unacked}"


class AlarmsScreen(LiveScreen):
    """Alarms with acknowledge and shelve."""

    BINDINGS = [
        Binding("a", "acknowledge", "Acknowledge"),
        Binding("A,shift+a", "acknowledge_all", "Ack all"),
        Binding("s", "shelve", "Shelve"),
        Binding("v", "toggle_active", "Active/all"),
        Binding("r", "refresh", "Refresh"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.active_only = True
        self.rows: list[AlarmRow] = []

    def compose_body(self) -> ComposeResult:
        with Vertical(id="alarms-body"):
            yield Static("", id="alarms-summary")
            table: DataTable = DataTable(id="alarms", cursor_type="row")
            yield table
            yield Static("", id="alarm-detail")

    def on_mount(self) -> None:
        table = self.query_one("#alarms", DataTable)
        for label, key in COLUMNS:
            table.add_column(label, key=key)
        table.focus()

    def wanted(self) -> set[str]:
        return set(ALARM_SUMMARY)

    def on_screen_resume(self) -> None:
        super().on_screen_resume()
        self.refresh_alarms()

    def set_session(self, session: object) -> None:
        super().set_session(session)  # type: ignore[arg-type]
        if session is not None and self.is_mounted:
            self.refresh_alarms()

    def apply_readings(self, changed: Mapping[str, Reading]) -> None:
        if any(name in changed for name in ALARM_SUMMARY):
            self._show_summary()
            self.refresh_alarms()

    def _show_summary(self) -> None:
        if api(self.session, "alarms"):
            source = "active alarms" if self.active_only else "all alarms"
        else:
            source = "PVs in alarm (no alarm calls in this client)"
        self.query_one("#alarms-summary", Static).update(f"{summary_line(AlarmSummary.of(self.readings))}\nshowing {source}")

    # ---- data --------------------------------------------------------------------------------

    @session_work(exclusive=True, group="alarms")
    async def refresh_alarms(self) -> None:
        """Fetch the alarm list and show it."""
        session = self.session
        if session is None:
            return
        alarms = api(session, "alarms")
        try:
            if alarms is not None:
                rows = [alarm_row_of(a) for a in await alarms(active_only=self.active_only)]
            else:
                names = [n for n in self.metas if n not in ALARM_SUMMARY]
                values = await session.get_many(names) if names else []
                rows = alarm_rows({v.name: v.reading for v in values})
        except ClientError as e:
            self.report(e, "alarms")
            return
        self.show_rows(rows)

    def show_rows(self, rows: list[AlarmRow]) -> None:
        """Lay out the alarm rows (the cursor stays on the same source)."""
        self.rows = rows
        self._show_summary()
        table = self.query_one("#alarms", DataTable)
        keep = self.current
        table.clear()
        for a in rows:
            ack = "-" if a.acked is None else ("yes" if a.acked else Content.styled("NO", "bold $warning"))
            shelved = f" (shelved until {time_text(a.shelved_until)[:8]})" if a.shelved_until else ""
            table.add_row(
                a.source,
                _sev(a.severity),
                _sev(a.current),
                a.status,
                ack,
                time_text(a.since)[:8],
                (a.message + shelved).strip(),
                key=a.source,
            )
        sources = [a.source for a in rows]
        if keep is not None and keep.source in sources:
            table.move_cursor(row=sources.index(keep.source), animate=False)
        self._show_detail()

    @property
    def current(self) -> AlarmRow | None:
        """The alarm under the cursor."""
        table = self.query_one("#alarms", DataTable)
        if not table.row_count or not self.rows:
            return None
        row = table.cursor_row
        return self.rows[row] if 0 <= row < len(self.rows) else None

    @on(DataTable.RowHighlighted, "#alarms")
    def _show_detail(self) -> None:
        a = self.current
        detail = self.query_one("#alarm-detail", Static)
        if a is None:
            detail.update("No alarms." if self.session is not None else "")
            return
        lines = [f"{a.source}: {a.severity} ({a.status}), now {a.current}" + (f", since {time_text(a.since, date=True)}" if a.since else "")]
        if a.guidance:
            lines.append(f"guidance: {a.guidance}")
        detail.update("\n".join(lines))

    # ---- actions ------------------------------------------------------------------------------

    def action_refresh(self) -> None:
        """Fetch the alarm list again."""
        self.refresh_alarms()

    def action_toggle_active(self) -> None:
        """Show active alarms only, or every alarm the server knows."""
        self.active_only = not self.active_only
        self.refresh_alarms()

    def action_acknowledge(self) -> None:
        """Acknowledge the alarm under the cursor."""
        a = self.current
        if a is not None:
            self.acknowledge([a.source])

    def action_acknowledge_all(self) -> None:
        """Acknowledge every unacknowledged alarm shown."""
        sources = [a.source for a in self.rows if a.acked is not True]
        if sources:
            self.acknowledge(sources)

    @session_work(exclusive=True, group="alarm-command")
    async def acknowledge(self, sources: list[str]) -> None:
        """Acknowledge alarms on the server (audited there)."""
        ack = api(self.session, "acknowledge")
        if ack is None:
            self.notify("this client cannot acknowledge alarms (its session has no acknowledge call)", severity="error")
            return
        for source in sources:
            try:
                await ack(source)
            except ClientError as e:
                self.report(e, f"acknowledge {source}")
                return
        self.notify(f"acknowledged {', '.join(sources)}")
        self.refresh_alarms()

    def action_shelve(self) -> None:
        """Shelve the alarm under the cursor for a while, with a reason."""
        a = self.current
        if a is None:
            return
        if api(self.session, "shelve") is None:
            self.notify("this client cannot shelve alarms (its session has no shelve call)", severity="error")
            return

        def done(answer: tuple[float, str] | None) -> None:
            if answer is not None:
                self.shelve(a.source, *answer)

        self.app.push_screen(ShelveDialog(a.source), done)

    @session_work(exclusive=True, group="alarm-command")
    async def shelve(self, source: str, duration_s: float, reason: str) -> None:
        """Shelve an alarm on the server."""
        shelve = api(self.session, "shelve")
        assert shelve is not None
        try:
            await shelve(source, duration_s, reason)
        except ClientError as e:
            self.report(e, f"shelve {source}")
            return
        self.notify(f"{source} shelved for {duration_s / 60:g} min")
        self.refresh_alarms()


class ShelveDialog(ModalScreen[tuple[float, str]]):
    """How long to shelve an alarm, and why."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source

    def compose(self) -> ComposeResult:
        with Vertical(id="shelve-box", classes="dialog"):
            yield Static(Content.styled(f"Shelve {self.source}", "bold"))
            yield Input("30", placeholder="minutes", id="shelve-minutes")
            yield Input("", placeholder="reason (required)", id="shelve-reason")
            yield Static("", id="shelve-message")
            with Horizontal(classes="buttons"):
                yield Button("Shelve", id="shelve-ok", variant="warning")
                yield Button("Cancel", id="shelve-cancel")

    @on(Input.Submitted)
    @on(Button.Pressed, "#shelve-ok")
    def _ok(self) -> None:
        try:
            minutes = float(self.query_one("#shelve-minutes", Input).value)
        except ValueError:
            minutes = 0.0
        reason = self.query_one("#shelve-reason", Input).value.strip()
        if minutes <= 0 or not reason:
            self.query_one("#shelve-message", Static).update("give a positive number of minutes and a reason")
            return
        self.dismiss((minutes * 60.0, reason))

    @on(Button.Pressed, "#shelve-cancel")
    def action_cancel(self) -> None:
        """Close without shelving."""
        self.dismiss(None)
