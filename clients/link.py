"""An interactive client's connection: one session, the wanted PVs subscribed, reconnected by itself.

Theory of operation. The terminal UI and the control-room display both need the same
thing from the network: a session that stays up without the user doing anything, and
the PVs they show kept subscribed across server restarts. :class:`Link` is that, on one
asyncio loop; each UI adapts it to its own thread model (:mod:`labctl.clients.tui.link`
runs it in a Textual worker on the app's loop, :mod:`labctl.clients.gui.link` on a loop
of its own in a worker thread) and says what it does with what arrives:

* :meth:`Link.run` connects and keeps exactly one
  :class:`~labctl.clients.monitor.Monitor` open for the wanted set (:meth:`Link.watch`
  replaces the set; the monitor is replaced once per change). Each sample goes to
  ``on_sample``. A wanted name the server lacks is dropped from the subscription
  (:attr:`Link.unknown`) and reported to ``on_missing``.
* ``on_session`` (optional) is more work for each session -- list the PVs, poll tables,
  serve commands -- run beside the monitor. It returns (or raises a
  :class:`~labctl.clients.errors.ClientError`, an OSError or a TimeoutError) when the
  connection is lost; its reason is the link's. Anything else it raises is a bug and
  ends :meth:`Link.run` with its traceback.
* Every state change goes to ``on_status`` as a :class:`LinkStatus`: connecting,
  connected (who the server says we are), reconnecting with the attempt count and the
  delay before the next attempt, failed.

When the connection is lost -- the monitor ends, a request fails, ``on_session``
returns, or the UI calls :meth:`Link.lost` -- the link closes the session and connects
again after a delay from :class:`~labctl.backoff.Backoff` (doubling from
``reconnect_min_s`` to ``reconnect_max_s``, reset by each success); once connected it
opens the monitor for the same set, whose first samples are the current values, so every
view is restored. A login the server refuses (:class:`~labctl.clients.errors.LoginRefused`,
told apart by its type) is not retried: the same password cannot succeed and each try
counts against the account; the link ends in :attr:`LinkState.FAILED`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace

from labctl.clients.errors import ClientError, ConnectError, ConnectionLost, LoginRefused, NoSuchPV, RequestTimeout
from labctl.clients.monitor import Monitor
from labctl.clients.session import Session, connect
from labctl.clients.values import Sample

from labctl.backoff import Backoff

log = logging.getLogger(__name__)


class LinkState(enum.StrEnum):
    """Where the connection stands."""

    CONNECTING = "connecting"
    """Not connected yet (the first attempts)."""
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    """The connection was lost; attempts go on with backoff."""
    FAILED = "failed"
    """The server refused the login; the link has stopped."""


@dataclass(frozen=True)
class LinkStatus:
    """The connection as a status line and a banner show it."""

    state: LinkState
    url: str
    user: str = ""
    """Who the server says we are (the requested user before the first connection)."""
    roles: tuple[str, ...] = ()
    site: str = ""
    reason: str = ""
    """Why the connection was lost or could not be made."""
    attempt: int = 0
    """Connection attempts since the connection was lost (or since the start)."""
    retry_in_s: float | None = None
    """Seconds until the next attempt (None: connected, or no more attempts)."""
    since: float = field(default_factory=time.time)
    """When this state began (UNIX s): for RECONNECTING, when the connection was lost."""


Connector = Callable[[], Awaitable[Session]]
#: More work per session, beside the monitor: returns (or raises) when the connection is lost, with why.
SessionWork = Callable[[Session], Awaitable[str | None]]


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
        queue_size: int = 10_000,
        on_status: Callable[[LinkStatus], None] | None = None,
        on_sample: Callable[[Sample], None] | None = None,
        on_missing: Callable[[tuple[str, ...]], None] | None = None,
        on_session: SessionWork | None = None,
        connector: Connector | None = None,
    ) -> None:
        self.url = url
        self.user = user
        self.timeout_s = timeout_s
        self.publishing_interval_ms = publishing_interval_ms
        self.queue_size = queue_size
        self.backoff = Backoff(reconnect_min_s, reconnect_max_s)
        """Delays between connection attempts (reset by each success)."""
        self.on_status: Callable[[LinkStatus], None] = on_status or (lambda status: None)
        self.on_sample: Callable[[Sample], None] = on_sample or (lambda sample: None)
        self.on_missing: Callable[[tuple[str, ...]], None] = on_missing or (lambda names: None)
        self.on_session = on_session
        self._connector: Connector = connector or (lambda: connect(url, user, password, security, timeout_s=timeout_s))
        self.session: Session | None = None
        """The open session (None while disconnected)."""
        self.status = LinkStatus(LinkState.CONNECTING, url, user or "")
        self.connects = 0
        """Sessions opened so far."""
        self.unknown: set[str] = set()
        """Wanted names the server does not have (dropped from the subscription until the next connection)."""
        self._wanted: frozenset[str] = frozenset()
        self._changed = asyncio.Event()
        self._lost = asyncio.Event()
        self._lost_reason = ""
        self._task: asyncio.Task | None = None

    # ---- what the UI calls (on the link's loop) ----------------------------------------------

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

    def lost(self, reason: str) -> None:
        """Tell the link its connection is broken (a request failed with ConnectionLost)."""
        self._lost_reason = reason
        self._lost.set()

    async def close(self) -> None:
        """Stop :meth:`run` and wait until its session is closed."""
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
                except LoginRefused as e:
                    self._report(LinkState.FAILED, reason=str(e), retry_in_s=None)
                    return
                except ConnectError as e:
                    await self._wait_retry(str(e))
                    continue
                self.backoff.reset()
                self.unknown.clear()
                self.session = session
                self.connects += 1
                self._lost.clear()
                self._report(
                    LinkState.CONNECTED,
                    user=session.user,
                    roles=session.roles,
                    site=session.site,
                    reason="",
                    attempt=0,
                    retry_in_s=None,
                )
                try:
                    reason = await self._live(session)
                finally:
                    self.session = None
                    await close_session(session)
                await self._wait_retry(reason)
        finally:
            self.session = None

    # ---- inside ----------------------------------------------------------------------------------

    def _report(self, state: LinkState, **changes: object) -> None:
        since = self.status.since if state is self.status.state else time.time()  # retries keep the time of the loss
        self.status = replace(self.status, state=state, since=since, **changes)  # type: ignore[arg-type]
        self.on_status(self.status)

    async def _wait_retry(self, reason: str) -> None:
        delay = self.backoff.next()
        state = LinkState.RECONNECTING if self.connects else LinkState.CONNECTING
        self._report(state, reason=reason, attempt=self.backoff.attempt, retry_in_s=delay)
        await asyncio.sleep(delay)

    async def _live(self, session: Session) -> str:
        """Serve one session (the monitor, and ``on_session`` beside it) until it is lost; return why."""
        serve = asyncio.ensure_future(self._serve(session))
        work = asyncio.ensure_future(self._work(session)) if self.on_session is not None else None
        try:
            if work is not None:
                await asyncio.wait([serve, work], return_when=asyncio.FIRST_COMPLETED)
                if not serve.done():
                    reason = work.result()  # a bug in on_session raises here
                    if reason is not None:
                        return reason
            return await serve
        finally:
            for fut in (serve, work):
                if fut is not None and not fut.done():
                    fut.cancel()
            await asyncio.gather(*(f for f in (serve, work) if f is not None), return_exceptions=True)

    async def _work(self, session: Session) -> str | None:
        assert self.on_session is not None
        try:
            return await self.on_session(session)
        except (ClientError, OSError, TimeoutError) as e:
            return str(e) or f"{self.url}: connection lost"

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
                self.on_missing((e.name,))
                continue
            if reason is not None:
                return reason

    async def _monitor(self, session: Session, names: list[str]) -> str | None:
        """Run one monitor until the wanted set changes (None) or the link is lost (why)."""
        lost = asyncio.ensure_future(self._lost.wait())
        changed = asyncio.ensure_future(self._changed.wait())
        consumer: asyncio.Future[None] | None = None
        mon = session.monitor(names, queue_size=self.queue_size, publishing_interval_ms=self.publishing_interval_ms) if names else None
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
                with contextlib.suppress(ClientError, OSError, TimeoutError):
                    await asyncio.wait_for(mon.close(), self.timeout_s)

    async def _consume(self, mon: Monitor) -> None:
        deliver = self.on_sample
        async for sample in mon:
            deliver(sample)


async def close_session(session: Session) -> None:
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
