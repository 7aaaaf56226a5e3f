"""The locks panel: who holds which resource, until when, and who waits.

Every labctl server publishes each lockable resource's lock as PVs (``ARB:<RES>:OWNER``,
``EXPIRES``, ``QUEUE``); the panel subscribes to them, so it is live on any server. With
the session's lock calls (``Session.locks``/``lock``/``renew``/``unlock``) it also shows
the queue by name and priority and lets the user take, renew and release locks, and an
admin break someone else's (after a confirmation; the holder is told and the break
audited by the server); a refusal is shown as the server words it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from labctl.clients.errors import ClientError
from labctl.clients.tui.model import LockRow, lock_pvs, lock_row_of, lock_rows, time_text
from labctl.clients.tui.screens.base import LiveScreen, api, session_work
from labctl.clients.tui.screens.write import LOCK_DURATION_S
from labctl.ioc.types import Reading
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Static

COLUMNS = (("RESOURCE", "resource"), ("HOLDER", "owner"), ("UNTIL", "until"), ("QUEUE", "queue"), ("MINE", "mine"))


class LocksScreen(LiveScreen):
    """Resource locks: holders, expiry, queues; take, renew, release."""

    BINDINGS = [
        Binding("t", "take", "Take lock"),
        Binding("n", "renew", "Renew"),
        Binding("u", "release", "Release"),
        Binding("b", "break_lock", "Break (admins)"),
        Binding("r", "refresh", "Refresh"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[LockRow] = []

    def compose_body(self) -> ComposeResult:
        with Vertical(id="locks-body"):
            yield Static("", id="locks-note")
            yield DataTable(id="locks", cursor_type="row")
            yield Static("", id="lock-detail")

    def on_mount(self) -> None:
        table = self.query_one("#locks", DataTable)
        for label, key in COLUMNS:
            table.add_column(label, key=key)
        table.focus()

    def wanted(self) -> set[str]:
        return set(lock_pvs(self.metas))

    def set_catalog(self, site: str, metas: Mapping[str, Any], readings: Mapping[str, Reading]) -> None:
        super().set_catalog(site, metas, readings)
        self.post_message(self.WantsChanged())
        self.refresh_locks()

    def on_screen_resume(self) -> None:
        super().on_screen_resume()
        self.refresh_locks()

    def set_leases(self, leases: Mapping[str, Any]) -> None:
        super().set_leases(leases)
        if self.is_mounted:
            self.show_rows(self.rows)

    def apply_readings(self, changed: Mapping[str, Reading]) -> None:
        if any(name.startswith("ARB:") for name in changed):
            self.refresh_locks()

    # ---- data --------------------------------------------------------------------------------

    def refresh_locks(self) -> None:
        """Show the locks: from the session's lock call when it has one, else from the lock PVs."""
        if api(self.session, "locks") is not None:
            self.fetch_locks()
        elif self.is_mounted:
            self.show_rows(lock_rows(self.metas, self.readings))

    @session_work(exclusive=True, group="locks")
    async def fetch_locks(self) -> None:
        """Ask the server for every lock with its queue."""
        locks = api(self.session, "locks")
        if locks is None:
            return
        try:
            infos = await locks()
        except ClientError as e:
            self.report(e, "locks")
            return
        self.show_rows([lock_row_of(i) for i in infos if getattr(i, "lockable", True)])

    def show_rows(self, rows: list[LockRow]) -> None:
        """Lay out the lock rows (the cursor stays on the same resource)."""
        self.rows = rows
        me = self.session.user if self.session is not None else ""
        table = self.query_one("#locks", DataTable)
        keep = self.current
        table.clear()
        for r in rows:
            queue = ", ".join(f"{u} (prio {p})" for u, p in r.queue) if r.queue else (str(r.queue_length) if r.queue_length else "")
            owner: Any = r.owner or Content.styled("free", "$success")
            if r.owner and r.owner == me:
                owner = Content.styled(f"{r.owner} (you)", "bold $accent")
            table.add_row(
                r.resource,
                owner,
                time_text(r.expires_at)[:8] if r.owner else "",
                queue,
                "yes" if r.resource in self.leases else "",
                key=r.resource,
            )
        names = [r.resource for r in rows]
        if keep is not None and keep.resource in names:
            table.move_cursor(row=names.index(keep.resource), animate=False)
        calls = "take (t), renew (n), release (u) or, as an admin, break (b) locks here" if api(self.session, "lock") else "this client cannot take locks (its session has no lock call); the list is live from the ARB:* PVs"
        self.query_one("#locks-note", Static).update(f"{len(rows)} lockable resources; {calls}")
        self._show_detail()

    @property
    def current(self) -> LockRow | None:
        """The resource under the cursor."""
        table = self.query_one("#locks", DataTable)
        row = table.cursor_row
        return self.rows[row] if self.rows and 0 <= row < len(self.rows) else None

    @on(DataTable.RowHighlighted, "#locks")
    def _show_detail(self) -> None:
        r = self.current
        detail = self.query_one("#lock-detail", Static)
        if r is None:
            detail.update("")
            return
        if r.owner:
            text = f"{r.resource} is locked by {r.owner}" + (f" ({r.client})" if r.client else "")
            if r.expires_at:
                text += f" until {time_text(r.expires_at, date=True)}"
        else:
            text = f"{r.resource} is free"
        if r.queue:
            text += "\nwaiting: " + ", ".join(f"{u} (priority {p})" for u, p in r.queue)
        elif r.queue_length:
            text += f"\n{r.queue_length} waiting"
        lease = self.leases.get(r.resource)
        if lease is not None:
            text += f"\nyou hold this lock until {time_text(getattr(lease, 'expires_at', None), date=True)}"
        detail.update(text)

    # ---- actions ------------------------------------------------------------------------------

    def action_refresh(self) -> None:
        """Fetch the locks again."""
        self.refresh_locks()

    def action_take(self) -> None:
        """Take the lock of the resource under the cursor."""
        r = self.current
        if r is not None:
            self.lock_command("lock", r.resource)

    def action_renew(self) -> None:
        """Renew the lock this app holds on the resource under the cursor."""
        r = self.current
        if r is not None:
            self.lock_command("renew", r.resource)

    def action_release(self) -> None:
        """Give back the lock of the resource under the cursor."""
        r = self.current
        if r is not None:
            self.lock_command("unlock", r.resource)

    def action_break_lock(self) -> None:
        """Break the lock of the resource under the cursor (admins), after asking."""
        r = self.current
        if r is None:
            return
        if not r.owner:
            self.notify(f"{r.resource} is not locked", severity="warning")
            return

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.lock_command("break_lock", r.resource)

        self.app.push_screen(BreakDialog(r.resource, r.owner), confirmed)

    @session_work(exclusive=True, group="lock-command")
    async def lock_command(self, call: str, resource: str) -> None:
        """Run one lock call; show the server's refusal word for word."""
        fn = api(self.session, call)
        if fn is None:
            self.notify(f"this client cannot {call} locks (its session has no {call} call)", severity="error")
            return
        lease = self.leases.get(resource)
        token = getattr(lease, "token", None)
        try:
            if call == "lock":
                lease = await fn(resource, duration_s=LOCK_DURATION_S)
            elif call == "break_lock":
                await fn(resource)
                self.notify(f"{resource}: lock broken")
                self.refresh_locks()
                return
            elif call == "renew":
                if token is None:
                    self.notify(f"you hold no lock on {resource} taken here", severity="warning")
                    return
                lease = await fn(resource, token, LOCK_DURATION_S)
            else:
                await fn(resource, token)
                lease = None
        except ClientError as e:
            verb = {"lock": "lock", "renew": "renew", "unlock": "release", "break_lock": "break"}.get(call, call)
            self.notify(f"{verb} {resource}: {getattr(e, 'reason', None) or e}", severity="error", timeout=10)
            return
        self.post_message(self.LeaseChanged(resource, lease))
        self.notify(f"{resource}: " + ("released" if lease is None else f"yours until {time_text(lease.expires_at)[:8]}"))
        self.refresh_locks()


class BreakDialog(ModalScreen[bool]):
    """Ask before breaking someone's lock."""

    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("y", "confirm", "Break", show=False)]

    def __init__(self, resource: str, owner: str) -> None:
        super().__init__()
        self.resource = resource
        self.owner = owner

    def compose(self) -> ComposeResult:
        with Vertical(id="break-box", classes="dialog"):
            yield Static(Content.styled(f"Break {self.owner}'s lock on {self.resource}?", "bold"))
            yield Static(f"{self.owner} loses write access at once and is told; the break is audited.")
            with Horizontal(classes="buttons"):
                yield Button("Break (y)", id="break-ok", variant="error")
                yield Button("Cancel", id="break-cancel")

    @on(Button.Pressed, "#break-ok")
    def action_confirm(self) -> None:
        """Break it."""
        self.dismiss(True)

    @on(Button.Pressed, "#break-cancel")
    def action_cancel(self) -> None:
        """Keep the lock as it is."""
        self.dismiss(False)
