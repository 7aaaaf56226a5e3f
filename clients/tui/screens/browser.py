"""The PV browser: folder tree, filter, live table, and the selected PV's details.

The rows shown are the PVs below the chosen folder that match the filter; they are the
screen's *visible set*, which the app subscribes to (one subscription per set). The
table is laid out again only when the set changes (the filter waits for a pause in
typing); readings update its cells in place. The detail pane follows the cursor: it
asks the server for the PV's recent history when the session can (``Session.history``),
then goes on with live values.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from labctl.clients.errors import ClientError
from labctl.clients.tui.model import carried_forward, numeric, select, time_text
from labctl.clients.tui.screens.base import LiveScreen, api, session_work
from labctl.clients.tui.screens.write import WriteDialog, WriteOutcome
from labctl.clients.tui.widgets import DetailPane, PVTable, PVTree
from labctl.clients.tui.widgets.detail import POINTS
from labctl.clients.values import Metadata, format_value
from labctl.ioc.types import Reading
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.timer import Timer
from textual.widgets import DataTable, Input, Tree

#: Seconds of history the sparkline starts with.
HISTORY_S = 600.0
#: Seconds the filter waits after the last key before the rows change.
FILTER_PAUSE_S = 0.15


class BrowserScreen(LiveScreen):
    """Browse, watch and write PVs."""

    BINDINGS = [
        Binding("slash", "filter", "Filter"),
        Binding("w", "write", "Write"),
        Binding("f", "focus_tree", "Folders"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.folder = ""
        self.query_text = ""
        self.shown_names: list[str] = []
        self._filter_timer: Timer | None = None

    def compose_body(self) -> ComposeResult:
        with Horizontal(id="browser"):
            yield PVTree(id="tree")
            with Vertical(id="browser-main"):
                yield Input(placeholder="/ filter: words, or a glob like CRYO:*:TEMP", id="filter")
                yield PVTable(id="pvs")
                yield DetailPane(id="detail")

    def on_mount(self) -> None:
        self.query_one(PVTable).focus()

    @property
    def table(self) -> PVTable:
        """The PV table."""
        return self.query_one(PVTable)

    @property
    def detail(self) -> DetailPane:
        """The detail pane."""
        return self.query_one(DetailPane)

    # ---- pushed down ------------------------------------------------------------------------

    def wanted(self) -> set[str]:
        names = set(self.shown_names)
        if self.is_mounted and self.detail.name_shown:
            names.add(self.detail.name_shown)
        return names

    def set_catalog(self, site: str, metas: Mapping[str, Metadata], readings: Mapping[str, Reading]) -> None:
        super().set_catalog(site, metas, readings)
        self.query_one(PVTree).show(site, metas.values())
        self._lay_out()

    def apply_readings(self, changed: Mapping[str, Reading]) -> None:
        self.table.apply(changed)
        shown = self.detail.name_shown
        if shown is not None and shown in changed:
            self.detail.apply(changed[shown])

    # ---- rows -------------------------------------------------------------------------------

    def _lay_out(self) -> None:
        visible = select(self.metas.values(), self.folder, self.query_text)
        if visible == self.shown_names and self.table.row_count == len(visible):
            return
        self.shown_names = visible
        self.table.show(visible, self.metas, self.readings)
        self._follow_cursor()
        self.post_message(self.WantsChanged())

    def _follow_cursor(self) -> None:
        name = self.table.current_name
        if name == self.detail.name_shown:
            return
        meta = self.metas.get(name) if name else None
        self.detail.show(meta, self.readings.get(name) if name else None)
        if meta is not None and numeric(meta):
            self.load_history(name)
        self.post_message(self.WantsChanged())

    @on(DataTable.RowHighlighted, "#pvs")
    def _row_highlighted(self) -> None:
        self._follow_cursor()

    @on(DataTable.RowSelected, "#pvs")
    def _row_selected(self) -> None:
        self.action_write()

    @on(Tree.NodeSelected, "#tree")
    def _folder_selected(self, event: Tree.NodeSelected) -> None:
        self.folder = event.node.data or ""
        self._lay_out()

    @on(Input.Changed, "#filter")
    def _filter_typed(self, event: Input.Changed) -> None:
        if self._filter_timer is not None:
            self._filter_timer.stop()
        value = event.value

        def apply() -> None:
            self.query_text = value
            self._lay_out()

        self._filter_timer = self.set_timer(FILTER_PAUSE_S, apply)

    @on(Input.Submitted, "#filter")
    def _filter_done(self, event: Input.Submitted) -> None:
        self.apply_filter(event.value)
        self.table.focus()

    def apply_filter(self, text: str) -> None:
        """Set the filter text at once (what typing it does after a pause)."""
        self.query_one("#filter", Input).value = text
        if self._filter_timer is not None:
            self._filter_timer.stop()
        self.query_text = text
        self._lay_out()

    # ---- history ----------------------------------------------------------------------------

    @session_work(exclusive=True, group="history")
    async def load_history(self, name: str) -> None:
        """Put the PV's recent history in front of the sparkline (servers with a historian)."""
        history = api(self.session, "history")
        if history is None:
            return
        now = time.time()
        try:
            h = await history(name, now - HISTORY_S, now, every=HISTORY_S / POINTS)
        except ClientError as e:
            if self.detail.name_shown == name:
                why = getattr(e, "status", "") or str(e)
                self.detail.set_history([], f"live values (no history: {why})")
            return
        if self.detail.name_shown == name:
            self.detail.set_history(carried_forward(h.values), f"history since {time_text(now - HISTORY_S)[:8]}, then live")

    # ---- actions ----------------------------------------------------------------------------

    def action_filter(self) -> None:
        """Focus the filter."""
        self.query_one("#filter", Input).focus()

    def action_focus_tree(self) -> None:
        """Focus the folder tree."""
        self.query_one(PVTree).focus()

    def action_clear_filter(self) -> None:
        """Clear the filter and go back to the table."""
        if self.query_text or self.query_one("#filter", Input).value:
            self.apply_filter("")
        self.table.focus()

    def action_write(self) -> None:
        """Open the write dialog for the PV under the cursor."""
        name = self.table.current_name
        meta = self.metas.get(name) if name else None
        if meta is None:
            return
        if not meta.writable:
            self.notify(f"{name} is read-only", severity="warning")
            return
        if self.session is None:
            self.notify("not connected", severity="error")
            return
        self.app.push_screen(WriteDialog(meta, self.readings.get(name), self.session), self._written)

    def _written(self, outcome: WriteOutcome | None) -> None:
        if outcome is None:
            return
        if outcome.lease is not None:
            self.post_message(self.LeaseChanged(outcome.resource, outcome.lease))
        if outcome.written:
            meta = self.metas.get(outcome.name)
            value = outcome.value
            shown = format_value(meta, tuple(value) if isinstance(value, list) else value) if meta else repr(value)
            unit = f" {meta.unit}" if meta and meta.unit else ""
            self.notify(f"{outcome.name} ← {shown}{unit}", title="written")
