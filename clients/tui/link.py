"""The terminal UI's connection: one session, one subscription, reconnected by itself.

Theory of operation. :class:`Link` owns the :class:`~labctl.clients.session.Session` of the app.
:meth:`Link.run` (the app runs it in a worker) connects, then keeps exactly one
:class:`~labctl.clients.monitor.Monitor` open for the set of PVs the screens want to see
(:meth:`Link.watch` replaces the set; the monitor is replaced once per change, so there
is one subscription per visible set). Samples are not handed on one by one: the newest
reading of each PV waits in :attr:`Link.pending` until the app takes the whole batch on
its display tick (:meth:`Link.take`), so a burst of thousands of changes costs one
repaint, and a PV that changes faster than the screen keeps only its latest value.

When the monitor reports the connection lost (the server stopped, the network broke,
a request timed out) the link closes the session, says so through ``on_status``, and
reconnects with a doubling delay (:class:`~labctl.clients.tui.model.Backoff`); once connected
again it opens the monitor for the same set, whose first samples are the current values,
so every view is restored without the user doing anything. A login the server refuses
is not retried: another attempt with the same password cannot succeed and would count
against the account.

Nothing here touches the terminal; the app turns :class:`LinkStatus` into the status
line and the banner.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace

from labctl.clients.errors import ClientError, ConnectError, ConnectionLost, NoSuchPV, RequestTimeout
from labctl.clients.session import Session, connect
from labctl.clients.tui.model import Backoff
from labctl.clients.values import Sample
from labctl.ioc.types import Reading

log = logging.getLogger(__name__)


class LinkState(enum.StrEnum):
    """Where the connection stands."""

    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    FAILED = "failed"
    """The server refused the login; the link has stopped."""


@dataclass(frozen=True)
class LinkStatus:
    """The connection as the status line and banner show it."""

    state: LinkState
    url: str
    user: str = ""
    """Who the server says we are (empty before the first connection)."""
    roles: tuple[str, ...] = ()
    site: str = ""
    reason: str = ""
    """Why the connection was lost or could not be made."""
    attempt: int = 0
    """Reconnect attempts since the connection was lost."""
    retry_in_s: float | None = None
    since: float = field(default_factory=time.time)
    """When this state began (UNIX s): for RECONNECTING, when the connection was lost."""


Connector = Callable[[], Awaitable[Session]]


def is_login_refusal(error: ConnectError) -> bool:
    """True when the server refused the user or password (not worth retrying).

    :func:`labctl.clients.session.connect` raises ConnectError for every failure; the wording of
    its login refusals is the only difference it exposes.
    """
    text = str(error)
    return "login refused" in text or "requires a user name" in text


class Link:
    """One session to a server, one subscription for the wanted PVs, reconnected with backoff."""

    def __init__(
        self,
        url: str,
        user: str | None = None,
        password: str | None = None,
        security: str = "auto",
        *,
        timeout_s: float = 10.0,
        reconnect_min_s: float = 0.25,
        reconnect_max_s: float = 5.0,
        publishing_interval_ms: float = 100.0,
        on_status: Callable[[LinkStatus], None] | None = None,
        connector: Connector | None = None,
    ) -> None:
        self.url = url
        self.user = user
        self.timeout_s = timeout_s
        self.publishing_interval_ms = publishing_interval_ms
        self.backoff = Backoff(reconnect_min_s, reconnect_max_s)
        self.on_status = on_status or (lambda status: None)
        self._connector: Connector = connector or (
            lambda: connect(url, user, password, security, timeout_s=timeout_s)
        )
        self.session: Session | None = None
        """The open session (None while disconnected)."""
        self.status = LinkStatus(LinkState.CONNECTING, url, user or "")
        self.pending: dict[str, Reading] = {}
        """Newest reading of each PV that changed since the last :meth:`take`."""
        self.unknown: set[str] = set()
        """Wanted names the server does not have (dropped from the subscription)."""
        self._wanted: frozenset[str] = frozenset()
        self._changed = asyncio.Event()
        self._lost = asyncio.Event()
        self._lost_reason = ""
        self._task: asyncio.Task | None = None

    # ---- what the app calls ------------------------------------------------------------

    @property
    def wanted(self) -> frozenset[str]:
        """The PVs the subscription covers (once connected)."""
        return self._wanted

    def watch(self, names: Iterable[str]) -> None:
        """Subscribe to exactly these PVs from now on (replaces the previous set)."""
        wanted = frozenset(names)
        if wanted != self._wanted:
            self._wanted = wanted
            self._changed.set()

    def take(self) -> dict[str, Reading]:
        """The readings that arrived since the last call (newest per PV)."""
        batch, self.pending = self.pending, {}
        return batch

    def lost(self, reason: str) -> None:
        """Tell the link its connection is broken (a request failed with ConnectionLost)."""
        self._lost_reason = reason
        self._lost.set()

    async def close(self) -> None:
        """Stop :meth:`run` and wait until its session is closed (the app calls this as it ends)."""
        task = self._task
        if task is None or task.done() or task is asyncio.current_task():
            return
        if not task.cancelling():  # a second cancel would interrupt the session's closing
            task.cancel()
        await asyncio.wait([task], timeout=self.timeout_s)

    async def run(self) -> None:
        """Connect, subscribe and reconnect until cancelled (or the login is refused)."""
        self._task = asyncio.current_task()
        try:
            while True:
                try:
                    session = await self._connector()
                except ConnectError as e:
                    if is_login_refusal(e):
                        self._report(LinkState.FAILED, reason=str(e))
                        return
                    await self._wait_retry(str(e))
                    continue
                self.backoff.reset()
                self.unknown.clear()
                self.session = session
                self._lost.clear()
                self._report(LinkState.CONNECTED, user=session.user, roles=session.roles, site=session.site, reason="")
                try:
                    reason = await self._serve(session)
                finally:
                    self.session = None
                    await _close(session)
                await self._wait_retry(reason)
        finally:
            self.session = None

    # ---- inside ---------------------------------------------------------------------------

    def _report(self, state: LinkState, **changes: object) -> None:
        since = self.status.since if state is self.status.state else time.time()  # retries keep the time of the loss
        self.status = replace(self.status, state=state, since=since, **changes)  # type: ignore[arg-type]
        self.on_status(self.status)

    async def _wait_retry(self, reason: str) -> None:
        delay = self.backoff.next()
        state = LinkState.RECONNECTING if self.status.site else LinkState.CONNECTING
        self._report(state, reason=reason, attempt=self.backoff.attempt, retry_in_s=delay)
        await asyncio.sleep(delay)

    async def _serve(self, session: Session) -> str:
        """Keep one monitor open for the wanted set until the connection is lost; return why."""
        while True:
            self._changed.clear()
            names = sorted(self._wanted - self.unknown)
            try:
                reason = await self._monitor(session, names)
            except (ConnectionLost, RequestTimeout) as e:
                return str(e)
            except NoSuchPV as e:  # the server (perhaps restarted with another site) lacks it
                log.info("not subscribing to %s: %s", e.name, e)
                self.unknown.add(e.name)
                continue
            if reason is not None:
                return reason

    async def _monitor(self, session: Session, names: list[str]) -> str | None:
        """Run one monitor until the wanted set changes (None) or the link is lost (why)."""
        lost = asyncio.ensure_future(self._lost.wait())
        changed = asyncio.ensure_future(self._changed.wait())
        consumer: asyncio.Future[None] | None = None
        mon = session.monitor(names, publishing_interval_ms=self.publishing_interval_ms) if names else None
        try:
            waiting: set[asyncio.Future] = {lost, changed}
            if mon is not None:
                await mon.start()
                consumer = asyncio.ensure_future(self._consume(mon))
                waiting.add(consumer)
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if consumer is not None and consumer in done:
                consumer.result()  # raises ConnectionLost
                return f"{self.url}: the subscription ended"
            if lost in done:
                return self._lost_reason or f"{self.url}: connection lost"
            return None
        finally:
            for fut in (lost, changed, consumer):
                if fut is not None and not fut.done():
                    fut.cancel()
            await asyncio.gather(*(f for f in (lost, changed, consumer) if f is not None), return_exceptions=True)
            current = asyncio.current_task()
            if mon is not None and not (current is not None and current.cancelling()):
                # (when the link stops, closing the session deletes the subscription anyway)
                with contextlib.suppress(ClientError, OSError):
                    await asyncio.wait_for(mon.close(), self.timeout_s)

    async def _consume(self, mon: object) -> None:
        sample: Sample
        async for sample in mon:  # type: ignore[attr-defined]
            self.pending[sample.name] = sample.reading


async def _close(session: Session) -> None:
    """Close a session (whose connection may be gone) to the end, even if cancelled meanwhile.

    A close cut short leaves the socket open; so it runs as a task of its own, and a
    cancellation waits for it before going on.
    """

    async def close() -> None:
        try:
            await asyncio.wait_for(session.close(), session.timeout_s)
        except (TimeoutError, ClientError, OSError) as e:
            log.debug("closing a lost session: %s", e)

    closing = asyncio.ensure_future(close())
    try:
        await asyncio.shield(closing)
    except asyncio.CancelledError:
        await asyncio.wait([closing])
        raise
