"""The display's connection to a server: a worker thread with its own asyncio loop.

Theory of operation. The Qt thread must never wait on the network, and Qt objects must
only be touched from the Qt thread, so the two sides share nothing but an :class:`Inbox`
and a few thread-safe requests:

* :class:`Link` owns one daemon thread running an asyncio loop. On it, a session from
  :func:`labctl.clients.session.connect` lists the server's PVs (on a site, every server's:
  :mod:`labctl.clients.site`), reads their current values,
  subscribes (one :class:`~labctl.clients.monitor.Monitor` for what the display shows plus the
  server's own alarm-summary, lock and interlock PVs) and polls the alarm list, locks and
  jobs where the session offers them. Everything it learns goes into the inbox.
* :class:`Inbox` is two bounded deques: samples (the oldest are dropped when full, and
  counted: a display that falls behind shows the newest data, never stalls the network)
  and events (connection state, history answers, tables, command results).
* The Qt side drains the inbox from a timer (see :mod:`labctl.clients.gui.window`) and calls
  :meth:`Link.watch`, :meth:`Link.request_history`, :meth:`Link.acknowledge` and
  :meth:`Link.poll_now`, which only hand work to the loop with ``call_soon_threadsafe``.

Connecting, the subscription and reconnection are the shared :class:`labctl.clients.link.Link`'s,
run on this thread's loop: any lost connection (a monitor that ends, a request that
fails or times out, a watchdog read every ``watchdog_s``) closes the session and
connects again with backoff from ``reconnect_min_s`` to ``reconnect_max_s``; the watched
PVs are subscribed again and the display is told (:class:`Disconnected`, then
:class:`Connected`). The subscription opens once the server's PV list is known, so
:class:`Connected` comes before any sample, and watched names the server lacks are
reported (:class:`Missing`) rather than subscribed. A login the server refuses is not
retried (retrying a wrong password only locks the account).

Optional session features (``history``, ``alarms``, ``acknowledge``, ``locks``, ``jobs``)
are used when the session has them; :attr:`Connected.features` says which, so the
display can fall back to the plain PVs every server publishes.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from labctl.clients import link as _link
from labctl.clients.errors import ClientError, ConnectError, ConnectionLost, RequestTimeout
from labctl.clients.session import Session
from labctl.clients.values import Metadata, Sample
from labctl.ioc.types import Reading

log = logging.getLogger("labctl.gui")

#: Session methods the display uses when present (see Connected.features).
FEATURES = ("history", "alarms", "acknowledge", "locks", "jobs")
#: PVs the server keeps for its own state; always watched.
SYSTEM_PREFIXES = ("ALARM:", "ARB:", "ILK:")
#: A command that waited longer than this for a connection is dropped, not sent late.
COMMAND_STALE_S = 10.0


# ---- what the link tells the display ---------------------------------------------------


@dataclass(frozen=True)
class Connected:
    """A session is up: who we are, and every PV the server serves."""

    url: str
    site: str
    user: str
    roles: tuple[str, ...]
    metas: dict[str, Metadata]
    readings: dict[str, Reading]
    features: frozenset[str]


@dataclass(frozen=True)
class Disconnected:
    """No session: why, and when the next attempt is (None: no more attempts)."""

    reason: str
    retry_in_s: float | None


@dataclass(frozen=True)
class Missing:
    """PVs the display asked for that the server does not have."""

    names: tuple[str, ...]


@dataclass(frozen=True)
class HistoryResult:
    """The answer to :meth:`Link.request_history` (``error`` set when it failed)."""

    request_id: int
    name: str
    since: float
    until: float
    times: np.ndarray | None = None
    values: np.ndarray | None = None
    error: str = ""


@dataclass(frozen=True)
class Table:
    """A fresh list from the session: ``kind`` is ``alarms``, ``locks`` or ``jobs``."""

    kind: str
    rows: list[Any]


@dataclass(frozen=True)
class CommandDone:
    """A command finished: ``error`` is empty on success, else the reason a person reads."""

    what: str
    error: str = ""


class Inbox:
    """Bounded, thread-safe hand-over from the link thread to the display thread."""

    def __init__(self, max_samples: int = 200_000, max_events: int = 10_000) -> None:
        self.samples: deque[Sample] = deque(maxlen=max_samples)
        self.events: deque[Any] = deque(maxlen=max_events)
        self.dropped = 0
        """Samples dropped because the display fell behind (approximate)."""

    def put_sample(self, sample: Sample) -> None:
        """Add a sample, dropping the oldest when full (deque appends are atomic)."""
        if len(self.samples) == self.samples.maxlen:
            self.dropped += 1
        self.samples.append(sample)

    def put_event(self, event: Any) -> None:
        """Add an event."""
        self.events.append(event)

    def take_samples(self, limit: int) -> list[Sample]:
        """Up to ``limit`` samples, oldest first."""
        out = []
        pop = self.samples.popleft
        try:
            for _ in range(limit):
                out.append(pop())
        except IndexError:
            pass
        return out

    def take_events(self) -> list[Any]:
        """Every event waiting, oldest first."""
        out = []
        pop = self.events.popleft
        try:
            while True:
                out.append(pop())
        except IndexError:
            return out


def unix_times(times: Any) -> np.ndarray:
    """History times as float UNIX seconds, whether floats, datetime64 or datetimes."""
    t = np.asarray(times)
    if t.dtype.kind == "M":
        return t.astype("datetime64[ns]").astype(np.int64) / 1e9
    if t.dtype.kind == "O":
        return np.array([x.timestamp() if isinstance(x, _dt.datetime) else float(x) for x in t], dtype=float)
    return t.astype(float)


def float_values(values: Any) -> np.ndarray:
    """History values as floats; None (an invalid sample) becomes NaN."""
    v = np.asarray(values)
    if v.dtype.kind == "O":
        return np.array([np.nan if x is None else float(x) for x in v], dtype=float)
    return v.astype(float)


@dataclass
class _Command:
    kind: str
    args: tuple[Any, ...]
    made_at: float = field(default_factory=time.monotonic)


class Link:
    """A self-reconnecting session in a worker thread, feeding an :class:`Inbox`."""

    def __init__(
        self,
        url: str,
        user: str | None = None,
        password: str | None = None,
        security: str = "auto",
        *,
        inbox: Inbox | None = None,
        timeout_s: float = 10.0,
        watchdog_s: float = 2.0,
        poll_s: float = 2.0,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 10.0,
        publishing_interval_ms: float = 100.0,
        history_concurrency: int = 4,
    ) -> None:
        self.url = url
        self.user = user
        self.inbox = inbox or Inbox()
        self.timeout_s = timeout_s
        self.watchdog_s = watchdog_s
        self.poll_s = poll_s
        self._core = _link.Link(
            url,
            user,
            password,
            security,
            timeout_s=timeout_s,
            reconnect_min_s=reconnect_min_s,
            reconnect_max_s=reconnect_max_s,
            publishing_interval_ms=publishing_interval_ms,
            queue_size=50_000,
            on_status=self._status,
            on_sample=self._sample,
            on_session=self._session,
        )
        self._lock = threading.Lock()
        self._watched: dict[str, None] = {}
        self._next_id = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._thread_main, name="labctl-gui-link", daemon=True)
        self._started = threading.Event()
        self._task: asyncio.Task[None] | None = None
        # loop-side state (touched only on the loop)
        self._commands: asyncio.Queue[_Command] | None = None
        self._poll_now: asyncio.Event | None = None
        self._history_slots = asyncio.Semaphore(history_concurrency)
        self._metas: dict[str, Metadata] | None = None
        self._system: list[str] = []
        self._told_missing: set[str] = set()

    @property
    def connects(self) -> int:
        """Sessions opened so far (for status display and tests)."""
        return self._core.connects

    # ---- display-thread API -----------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread; it connects and keeps connecting."""
        self._thread.start()
        self._started.wait()

    def stop(self, timeout_s: float = 5.0) -> None:
        """End the session and the thread."""
        if not self._thread.is_alive():
            if self._thread.ident is None and not self._loop.is_closed():
                self._loop.close()  # never started
            return
        self._call(lambda: self._task.cancel() if self._task else None)
        self._thread.join(timeout_s)

    def watch(self, names: Iterable[str]) -> None:
        """Subscribe to these PVs too (now, and after every reconnect)."""
        with self._lock:
            before = len(self._watched)
            for n in names:
                self._watched[n] = None
            changed = len(self._watched) != before
        if changed:
            self._call(self._subscribe)

    def request_history(self, name: str, since: float, until: float, every: float | None = None) -> int:
        """Ask for a PV's history in ``[since, until]`` (UNIX s); the answer is a :class:`HistoryResult` with the returned id."""
        with self._lock:
            self._next_id += 1
            rid = self._next_id
        self._command(_Command("history", (rid, name, since, until, every)))
        return rid

    def acknowledge(self, source: str, comment: str = "") -> None:
        """Acknowledge an alarm; a :class:`CommandDone` follows."""
        self._command(_Command("acknowledge", (source, comment)))

    def break_lock(self, resource: str) -> None:
        """Break whoever holds a resource's lock (admins); a :class:`CommandDone` follows."""
        self._command(_Command("break_lock", (resource,)))

    def poll_now(self) -> None:
        """Fetch the alarm list, locks and jobs again soon."""
        self._call(lambda: self._poll_now.set() if self._poll_now else None)

    def _command(self, cmd: _Command) -> None:
        self._call(lambda: self._commands.put_nowait(cmd) if self._commands else None)

    def _call(self, fn: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn)
        except RuntimeError:  # the loop is closed: the link was stopped
            pass

    # ---- the loop -----------------------------------------------------------------------

    def _thread_main(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        self._commands = asyncio.Queue()
        self._poll_now = asyncio.Event()
        self._task = loop.create_task(self._core.run(), name="labctl-gui-link")
        self._started.set()
        try:
            loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        finally:
            rest = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in rest:
                t.cancel()
            if rest:
                loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _status(self, status: _link.LinkStatus) -> None:
        """The shared link's state changed: the display hears of losses; Connected comes from :meth:`_session`."""
        if status.state is _link.LinkState.CONNECTED:
            # Subscribe once the PV list is known (below), so Connected comes before any sample.
            self._metas = None
            self._core.watch(())
        elif status.state is _link.LinkState.FAILED:
            self.inbox.put_event(Disconnected(status.reason, None))
        else:
            self.inbox.put_event(Disconnected(status.reason, status.retry_in_s))

    def _sample(self, sample: Sample) -> None:
        self.inbox.put_sample(sample)
        if sample.name.startswith(("ALARM:", "ARB:")) and self._poll_now is not None:
            self._poll_now.set()

    def _subscribe(self) -> None:
        """Hand the shared link the watched PVs this server has (and say which it lacks)."""
        metas = self._metas
        if metas is None:  # not connected: the next session subscribes them
            return
        with self._lock:
            wanted = list(dict.fromkeys(list(self._watched) + self._system))
        missing = [n for n in wanted if n not in metas and n not in self._told_missing]
        if missing:
            self._told_missing.update(missing)
            self.inbox.put_event(Missing(tuple(missing)))
        self._core.watch(n for n in wanted if n in metas and metas[n].type is not None)

    async def _session(self, session: Session) -> str:
        """Everything but the subscription, for one session: returns why the session is lost."""
        reason = "connection lost"
        try:
            metas = {m.name: m for m in await session.list_pvs(site=True)}  # on a site: every server's PVs
            typed = [n for n, m in metas.items() if m.type is not None]
            readings = {v.name: v.reading for v in await session.get_many(typed)} if typed else {}
            features = frozenset(f for f in FEATURES if callable(getattr(session, f, None)))
            self.inbox.put_event(Connected(self.url, session.site, session.user, session.roles, metas, readings, features))
            self._metas = metas
            self._system = [n for n in metas if n.startswith(SYSTEM_PREFIXES)]
            self._told_missing = set()
            self._subscribe()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._watchdog(session))
                tg.create_task(self._poller(session, features))
                tg.create_task(self._serve_commands(session, features, tg))
        except* ClientError as eg:
            reason = str(eg.exceptions[0])
        except* (OSError, TimeoutError) as eg:
            reason = f"connection lost: {eg.exceptions[0]}"
        except* Exception as eg:  # a bug: one traceback here, then carry on connecting
            log.error("display link failed", exc_info=eg.exceptions[0])
            reason = f"internal error: {eg.exceptions[0]!r}"
        finally:
            self._metas = None
        return reason

    async def _watchdog(self, session: Session) -> None:
        # A server that dies without closing its sockets leaves a monitor silent: ask.
        while True:
            await asyncio.sleep(self.watchdog_s)
            await session.whoami()

    async def _poller(self, session: Session, features: frozenset[str]) -> None:
        assert self._poll_now is not None
        kinds = [k for k in ("alarms", "locks", "jobs") if k in features]
        if not kinds:
            return
        while True:
            self._poll_now.clear()
            for kind in kinds:
                rows = await getattr(session, kind)()
                self.inbox.put_event(Table(kind, list(rows)))
            try:
                async with asyncio.timeout(self.poll_s):
                    await self._poll_now.wait()
            except TimeoutError:
                pass
            await asyncio.sleep(0.1)  # coalesce a burst of changes into one fetch

    async def _serve_commands(self, session: Session, features: frozenset[str], tg: asyncio.TaskGroup) -> None:
        assert self._commands is not None
        while True:
            cmd = await self._commands.get()
            if cmd.kind == "history":
                tg.create_task(self._history(session, features, *cmd.args))
            elif cmd.kind == "acknowledge":
                source, comment = cmd.args
                what = f"acknowledge {source}"
                if time.monotonic() - cmd.made_at > COMMAND_STALE_S:
                    self.inbox.put_event(CommandDone(what, "not sent: there was no connection to the server"))
                elif "acknowledge" not in features:
                    self.inbox.put_event(CommandDone(what, "this client cannot acknowledge alarms (no Session.acknowledge)"))
                else:
                    tg.create_task(self._do(session, what, session.acknowledge(source, comment)))
            elif cmd.kind == "break_lock":
                (resource,) = cmd.args
                what = f"break the lock on {resource}"
                if time.monotonic() - cmd.made_at > COMMAND_STALE_S:
                    self.inbox.put_event(CommandDone(what, "not sent: there was no connection to the server"))
                elif getattr(session, "break_lock", None) is None:
                    self.inbox.put_event(CommandDone(what, "this client cannot break locks (no Session.break_lock)"))
                else:
                    tg.create_task(self._do(session, what, session.break_lock(resource)))

    async def _do(self, session: Session, what: str, call: Awaitable[Any]) -> None:
        """Await one command; its outcome (the server's refusal, if any) as a :class:`CommandDone`."""
        try:
            await call
        except (ConnectError, ConnectionLost, RequestTimeout):
            self.inbox.put_event(CommandDone(what, "not done: the connection was lost"))
            raise
        except ClientError as e:  # refused: the server's reason
            self.inbox.put_event(CommandDone(what, str(e)))
        else:
            self.inbox.put_event(CommandDone(what))
        if self._poll_now is not None:
            self._poll_now.set()

    async def _history(self, session: Session, features: frozenset[str], rid: int, name: str, since: float, until: float, every: float | None) -> None:
        if "history" not in features:
            self.inbox.put_event(HistoryResult(rid, name, since, until, error="history is not available on this connection"))
            return
        async with self._history_slots:
            try:
                h = await session.history(name, since, until, every)  # type: ignore[attr-defined]
            except (ConnectionLost, RequestTimeout):
                raise
            except ClientError as e:
                self.inbox.put_event(HistoryResult(rid, name, since, until, error=str(e)))
                return
        times, values = unix_times(h.times), float_values(h.values)
        counts = getattr(h, "counts", None)
        if counts is not None:
            # Processed history: a bucket without samples means "no change archived", not "invalid";
            # drop it so the line runs on from the last bucket that had samples.
            keep = np.asarray(counts) > 0
            times, values = times[keep], values[keep]
        self.inbox.put_event(HistoryResult(rid, name, since, until, times, values))
