"""The interlocks panel: each interlock's state, why it is there, and a reset for those who may.

Every labctl server publishes an interlock's state as an enum PV (``ILK:<NAME>:STATE``);
the panel subscribes to those, so it is live, and asks the session's ``interlocks`` call
for the reasons, descriptions and times whenever a state changes. ``x`` resets the
interlock under the cursor when it waits for a manual reset (experts and admins: the
server decides, and a refusal is shown as the server words it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from labctl.clients.errors import ClientError
from labctl.clients.tui.model import time_text
from labctl.clients.tui.screens.base import LiveScreen, api, session_work
from labctl.ioc.types import Reading
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.widgets import DataTable, Static

COLUMNS = (("INTERLOCK", "name"), ("STATE", "state"), ("SINCE", "since"), ("REASON", "reason"))
#: How each state is styled (and always written out, for terminals without colour).
STATE_STYLES = {
    "OK": "$success",
    "WARN": "$warning",
    "PENDING": "$warning",
    "TRIPPED": "bold $error",
    "CLEARING": "$error",
    "RESET_NEEDED": "bold $error",
}


def state_pvs(metas: Mapping[str, Any]) -> list[str]:
    """The interlock state PVs among ``metas``."""
    return [n for n in metas if n.startswith("ILK:") and n.endswith(":STATE")]


class InterlocksScreen(LiveScreen):
    """Interlocks: states, trip reasons, reset."""

    BINDINGS = [
        Binding("x", "reset", "Reset (experts)"),
        Binding("r", "refresh", "Refresh"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[Any] = []

    def compose_body(self) -> ComposeResult:
        with Vertical(id="interlocks-body"):
            yield Static("", id="interlocks-note")
            yield DataTable(id="interlocks", cursor_type="row")
            yield Static("", id="interlock-detail")

    def on_mount(self) -> None:
        table = self.query_one("#interlocks", DataTable)
        for label, key in COLUMNS:
            table.add_column(label, key=key)
        table.focus()

    def wanted(self) -> set[str]:
        return set(state_pvs(self.metas))

    def set_catalog(self, site: str, metas: Mapping[str, Any], readings: Mapping[str, Reading]) -> None:
        super().set_catalog(site, metas, readings)
        self.post_message(self.WantsChanged())
        self.fetch()

    def on_screen_resume(self) -> None:
        super().on_screen_resume()
        self.fetch()

    def apply_readings(self, changed: Mapping[str, Reading]) -> None:
        if any(name.startswith("ILK:") for name in changed):
            self.fetch()

    # ---- data --------------------------------------------------------------------------------

    @session_work(exclusive=True, group="interlocks")
    async def fetch(self) -> None:
        """Ask the server for every interlock's state and reason."""
        call = api(self.session, "interlocks")
        if call is None:
            if self.is_mounted:
                self.query_one("#interlocks-note", Static).update("this client cannot list interlocks (its session has no interlocks call)")
            return
        try:
            infos = await call()
        except ClientError as e:
            self.report(e, "interlocks")
            return
        self.show_rows(list(infos))

    def show_rows(self, rows: list[Any]) -> None:
        """Lay out the interlocks (the cursor stays on the same one)."""
        self.rows = rows
        table = self.query_one("#interlocks", DataTable)
        keep = self.current
        table.clear()
        for r in rows:
            state = Content.styled(r.state, STATE_STYLES.get(r.state, "$error"))
            table.add_row(r.name, state, time_text(r.since)[:8] if r.since else "", r.reason, key=r.name)
        names = [r.name for r in rows]
        if keep is not None and keep.name in names:
            table.move_cursor(row=names.index(keep.name), animate=False)
        waiting = sum(r.state == "RESET_NEEDED" for r in rows)
        note = f"{len(rows)} interlocks" + (f"; {waiting} waiting for a reset (x)" if waiting else "")
        self.query_one("#interlocks-note", Static).update(note)
        self._show_detail()

    @property
    def current(self) -> Any | None:
        """The interlock under the cursor."""
        table = self.query_one("#interlocks", DataTable)
        row = table.cursor_row
        return self.rows[row] if self.rows and 0 <= row < len(self.rows) else None

    @on(DataTable.RowHighlighted, "#interlocks")
    def _show_detail(self) -> None:
        r = self.current
        detail = self.query_one("#interlock-detail", Static)
        if r is None:
            detail.update("")
            return
        text = f"{r.name}: {r.state}" + (f" since {time_text(r.since, date=True)}" if r.since else "")
        if r.description:
            text += f"\n{r.description}"
        if r.reason:
            text += f"\nwhy: {r.reason}"
        detail.update(text)

    # ---- actions ------------------------------------------------------------------------------

    def action_refresh(self) -> None:
        """Fetch the interlocks again."""
        self.fetch()

    def action_reset(self) -> None:
        """Reset the interlock under the cursor."""
        r = self.current
        if r is not None:
            self.reset(r.name)

    @session_work(exclusive=True, group="interlock-reset")
    async def reset(self, name: str) -> None:
        """Ask the server to reset one interlock; show its refusal word for word."""
        call = api(self.session, "reset_interlock")
        if call is None:
            self.notify("this client cannot reset interlocks (its session has no reset_interlock call)", severity="error")
            return
        try:
            await call(name)
        except ClientError as e:
            self.notify(f"reset {name}: {e}", severity="error", timeout=10)
            return
        self.notify(f"{name}: reset")
        self.fetch()
