"""The write dialog: check the value here, send it, and show the server's answer as it is.

Theory of operation. The typed text is parsed into the PV's type (numbers, true/false,
a state name or index, text, a list of numbers) and checked against the states and the
drive limits before anything is sent (:func:`~labctl.clients.tui.model.parse_input`,
:func:`~labctl.clients.tui.model.check_limits`); a number outside the range the server
publishes asks for a second Enter, since that range may be the display range rather than
the drive limits. The server stays the judge: when it refuses, the dialog shows its
status and its sentence word for word (who holds the lock and until when, which limit,
which interlock). When the refusal is about a lockable resource and the session can take
locks, the dialog offers to take the lock (``ctrl+l``) and then sends the value again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from labctl.clients.errors import ClientError, PutRefused
from labctl.clients.session import Session
from labctl.clients.tui.model import (
    InputError,
    check_limits,
    parse_input,
    range_text,
    range_warning,
    refused_resource,
    time_text,
    value_text,
)
from labctl.clients.tui.screens.base import api, session_work
from labctl.clients.values import Metadata, format_value
from labctl.ioc.types import PVType, Reading
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Static

#: Seconds a lock taken from the write dialog lasts (renewed from the locks panel).
LOCK_DURATION_S = 600.0


@dataclass(frozen=True)
class WriteOutcome:
    """What the dialog did: the value written (if any) and a lock it took (if any)."""

    name: str
    written: bool
    value: Any = None
    lease: Any = None
    resource: str = ""


def hint(meta: Metadata) -> str:
    """What the PV takes, in one line."""
    t = meta.type
    if t is PVType.ENUM:
        return "one of: " + ", ".join(f"{s} ({i})" for i, s in enumerate(meta.states))
    if t is PVType.BOOL:
        return "true or false (1/0, on/off)"
    if t is PVType.FLOAT64_ARRAY:
        return "numbers: 1, 2, 3 or [1, 2, 3]" + (f" (exactly {meta.length})" if meta.length else "")
    if t is PVType.STRING:
        return "text"
    kind = "a number" if t is PVType.FLOAT64 else "an integer"
    drive = getattr(meta, "drive", None)
    if drive:
        return f"{kind} within the drive limits {range_text(tuple(drive), meta.unit)}"
    if meta.display:
        return f"{kind}; published range {range_text(meta.display, meta.unit)}"
    return kind + (f" in {meta.unit}" if meta.unit else "")


def initial_text(meta: Metadata, reading: Reading | None) -> str:
    """The current value as text the dialog accepts back."""
    if reading is None or reading.value is None:
        return ""
    if meta.type is PVType.FLOAT64_ARRAY:
        return ", ".join(f"{x:g}" for x in reading.value)
    if meta.type is PVType.FLOAT64:
        return f"{reading.value:g}"
    return format_value(meta, reading.value)


class WriteDialog(ModalScreen[WriteOutcome]):
    """Write one PV."""

    BINDINGS = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+l", "take_lock", "Take lock", show=False),
    ]

    def __init__(self, meta: Metadata, reading: Reading | None, session: Session) -> None:
        super().__init__()
        self.meta = meta
        self.reading = reading
        self.session = session
        self.lock_resource = ""
        """The resource a refusal named, when the lock can be taken from here."""
        self.lease: Any = None
        self.refusal = ""
        """The server's last refusal, word for word."""
        self.message = ""
        """The line under the input (errors, warnings, the server's answer)."""
        self._pending: Any = None
        self._warned = ""

    def compose(self) -> ComposeResult:
        meta = self.meta
        with Vertical(id="write-box"):
            yield Static(Content.styled(f"Write {meta.name}", "bold"), id="write-title")
            now = value_text(meta, self.reading) + (f" {meta.unit}" if meta.unit else "")
            when = f" at {time_text(self.reading.timestamp)}" if self.reading is not None else ""
            lines = [f"now {now}{when}", f"takes {hint(meta)}"]
            if not meta.user_writable:
                lines.append("the server says you may not write it now (role or lock); try, and it will say why")
            yield Static("\n".join(lines), id="write-info")
            yield Input(initial_text(meta, self.reading), id="write-value", select_on_focus=True)
            yield Static("", id="write-message")
            with Horizontal(id="write-buttons"):
                yield Button("Send", id="write-send", variant="primary")
                yield Button("Take lock", id="write-lock", variant="warning")
                yield Button("Cancel", id="write-cancel")

    def on_mount(self) -> None:
        self.query_one("#write-lock", Button).display = False
        self.query_one("#write-value", Input).focus()

    # ---- messages shown --------------------------------------------------------------------

    def say(self, text: str, kind: str = "") -> None:
        """Show a line under the input (kind: error, warning, ok, or plain)."""
        self.message = text
        msg = self.query_one("#write-message", Static)
        msg.update(Content(text))
        for k in ("error", "warning", "ok"):
            msg.set_class(k == kind, f"-{k}")

    # ---- events -----------------------------------------------------------------------------

    @on(Input.Changed, "#write-value")
    def _typed(self) -> None:
        self._warned = ""

    @on(Input.Submitted, "#write-value")
    @on(Button.Pressed, "#write-send")
    def _submit(self) -> None:
        text = self.query_one("#write-value", Input).value
        try:
            value = parse_input(self.meta, text)
            check_limits(self.meta, value)
        except InputError as e:
            self.say(str(e), "error")
            return
        warning = range_warning(self.meta, value)
        if warning and self._warned != text:
            self._warned = text
            self.say(f"{warning}: press Enter again to send it anyway", "warning")
            return
        self._pending = value
        self.send(value)

    @on(Button.Pressed, "#write-lock")
    def _lock_pressed(self) -> None:
        self.action_take_lock()

    @on(Button.Pressed, "#write-cancel")
    def action_cancel(self) -> None:
        """Close without writing (keeping a lock taken here)."""
        self.dismiss(WriteOutcome(self.meta.name, False, lease=self.lease, resource=self.lock_resource))

    # ---- network ----------------------------------------------------------------------------

    @session_work(exclusive=True, group="write")
    async def send(self, value: Any) -> None:
        """Write the value; on refusal show the server's reason (and offer its lock)."""
        self.say(f"sending {value!r} …")
        try:
            await self.session.put(self.meta.name, value)
        except PutRefused as e:
            self.refusal = e.reason
            self.say(f"refused ({e.status}): {e.reason}", "error")
            resource = refused_resource(e)
            can_lock = resource is not None and api(self.session, "lock") is not None and self.lease is None
            self.lock_resource = resource or ""
            button = self.query_one("#write-lock", Button)
            button.label = f"Take lock on {resource} (ctrl+l)" if can_lock else "Take lock"
            button.display = can_lock
            return
        except ClientError as e:
            self.say(str(e), "error")
            return
        self.dismiss(WriteOutcome(self.meta.name, True, value, self.lease, self.lock_resource))

    def action_take_lock(self) -> None:
        """Take the lock the last refusal named, then send the value again."""
        if not self.lock_resource or api(self.session, "lock") is None:
            return
        self.take_lock(self.lock_resource)

    @session_work(exclusive=True, group="lock")
    async def take_lock(self, resource: str) -> None:
        """Ask the server for the resource's lock; show its refusal word for word."""
        lock = api(self.session, "lock")
        assert lock is not None
        self.say(f"taking the lock on {resource} …")
        try:
            self.lease = await lock(resource, duration_s=LOCK_DURATION_S)
        except ClientError as e:
            self.say(f"lock refused: {getattr(e, 'reason', None) or e}", "error")
            return
        self.query_one("#write-lock", Button).display = False
        until = time_text(getattr(self.lease, "expires_at", None))[:8]
        self.say(f"lock on {resource} taken until {until}", "ok")
        if self._pending is not None:
            self.send(self._pending)
