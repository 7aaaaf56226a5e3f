"""What every mode's screen shares: banner, status line, footer, and the app's state pushed down.

The app owns the connection and the data; it pushes them down into the screen of the
current mode through the methods of :class:`LiveScreen` (attributes down). A screen tells
the app what it needs with messages (messages up): :class:`LiveScreen.Shown` when it
comes to the front, :class:`LiveScreen.WantsChanged` when the set of PVs it shows
changes, :class:`LiveScreen.LeaseChanged` when the user took or gave back a lock.
Network calls of a screen run in workers (:func:`session_work`: Textual's ``@work``) on
its own session attribute, set by the app while connected (None while not). A worker's
answer may come back after its screen was taken down (the user quit meanwhile): its
widgets are gone then, and there is nothing to show.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from labctl.clients.errors import ClientError, ConnectionLost
from labctl.clients.session import Session
from labctl.clients.tui.link import LinkState, LinkStatus
from labctl.clients.tui.model import AlarmSummary
from labctl.clients.tui.widgets import Banner, StatusLine
from labctl.clients.values import Metadata
from labctl.ioc.types import Reading
from textual import work
from textual.app import ComposeResult
from textual.css.query import NoMatches
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer

W = TypeVar("W", bound=Callable[..., Awaitable[Any]])


def session_work(**work_options: Any) -> Callable[[W], W]:
    """``@work(**work_options)`` for a screen's call to the server, quiet when the screen is taken down meanwhile.

    A widget the worker looks for after its await is missing only when the screen is being
    removed (its widgets are composed once): then the answer is dropped. A missing widget
    on a screen that stays is a bug, and raised as Textual's workers do.
    """

    def decorate(method: W) -> W:
        @functools.wraps(method)
        async def run(screen: Screen, *args: Any, **kwargs: Any) -> Any:
            try:
                return await method(screen, *args, **kwargs)
            except NoMatches:
                if screen.is_attached and not getattr(screen, "_pruning", False):
                    raise
                return None

        return work(**work_options)(run)  # type: ignore[return-value]

    return decorate


def api(session: Session | None, name: str) -> Callable[..., Any] | None:
    """A session call of the agreed control API (locks, alarms, jobs, history), if this client has it."""
    fn = getattr(session, name, None) if session is not None else None
    return fn if callable(fn) else None


class LiveScreen(Screen):
    """Base of each mode's screen: banner on top, the screen's body, status line and keys below."""

    class Shown(Message):
        """The screen came to the front: the app pushes its state down and subscribes for it."""

        def __init__(self, screen: LiveScreen) -> None:
            super().__init__()
            self.screen = screen

    class WantsChanged(Message):
        """The PVs the screen shows changed: the app replaces the subscription."""

    class LeaseChanged(Message):
        """The user took (lease) or gave back (None) a resource's lock."""

        def __init__(self, resource: str, lease: Any | None) -> None:
            super().__init__()
            self.resource = resource
            self.lease = lease

    class ConnectionBroken(Message):
        """A request found the connection gone: the app's link reconnects."""

        def __init__(self, reason: str) -> None:
            super().__init__()
            self.reason = reason

    def __init__(self) -> None:
        super().__init__()
        self.session: Session | None = None
        """The app's session while connected."""
        self.site = ""
        self.metas: Mapping[str, Metadata] = {}
        """Every PV of the server, in browse order."""
        self.readings: Mapping[str, Reading] = {}
        """The latest reading of each PV received (the app's dictionary)."""
        self.leases: Mapping[str, Any] = {}
        """The locks this app holds, by resource."""

    def compose(self) -> ComposeResult:
        yield Banner(id="banner")
        yield from self.compose_body()
        yield StatusLine(id="status")
        yield Footer()

    def compose_body(self) -> ComposeResult:
        """The screen's own widgets."""
        yield from ()

    def on_screen_resume(self) -> None:
        self.post_message(self.Shown(self))

    # ---- pushed down by the app -----------------------------------------------------------

    def wanted(self) -> set[str]:
        """The PVs this screen shows (the app subscribes to them while it is in front)."""
        return set()

    def set_session(self, session: Session | None) -> None:
        """Connected (a session) or not (None)."""
        self.session = session

    def set_catalog(self, site: str, metas: Mapping[str, Metadata], readings: Mapping[str, Reading]) -> None:
        """The server's PVs (after each connection)."""
        self.site, self.metas, self.readings = site, metas, readings

    def apply_readings(self, changed: Mapping[str, Reading]) -> None:
        """New readings (the app's dictionary already holds them)."""

    def set_leases(self, leases: Mapping[str, Any]) -> None:
        """The locks this app holds."""
        self.leases = leases

    def set_link(self, status: LinkStatus, summary: AlarmSummary, held: tuple[str, ...] = ()) -> None:
        """The connection state and alarm summary: banner, status line, stale styling."""
        if not self.is_mounted:
            return
        self.query_one(Banner).show(status)
        self.query_one(StatusLine).show(status, summary, len(self.metas), held)
        self.set_class(status.state is not LinkState.CONNECTED, "-offline")

    # ---- helpers for the screens ----------------------------------------------------------

    def report(self, error: ClientError, what: str) -> None:
        """Tell the user a request failed (and the app, when the connection is gone)."""
        if isinstance(error, ConnectionLost):
            self.post_message(self.ConnectionBroken(str(error)))
        self.notify(f"{what}: {error}", severity="error", timeout=8)
