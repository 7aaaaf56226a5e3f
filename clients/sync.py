"""A blocking wrapper of :mod:`labctl.clients.session` for scripts and notebooks.

Theory of operation. A :class:`SyncSession` owns one event loop running in one daemon
thread; each method submits the matching coroutine of the async
:class:`~labctl.clients.session.Session` to that loop and waits for its result for at most
``timeout_s`` seconds. A call that runs out of time is cancelled on the loop and raises
:class:`~labctl.clients.errors.RequestTimeout`, so a dead server never hangs a script.
Nothing else is shared between the threads, and nothing here blocks the loop.

Notebooks already run an event loop in their main thread; the wrapper's own loop thread
works there too (``await`` the async API directly if you prefer).

The control calls (locks, jobs, alarms, interlocks, audit) mirror the async ones. The
one call that may wait longer than ``timeout_s`` is ``lock(..., wait=True)``: it waits
for its own ``timeout_s`` (None: until granted, or Ctrl-C, which withdraws the request).
:meth:`SyncSession.hold_lock` keeps a lease renewed by a task on the loop thread while
the ``with`` block runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from labctl.clients import session as _session
from labctl.clients.errors import ClientError, RequestTimeout
from labctl.clients.monitor import Monitor
from labctl.clients.records import (
    AlarmInfo,
    HeldLock,
    InterlockInfo,
    JobDetail,
    JobInfo,
    Lease,
    LockInfo,
    ProcedureInfo,
)
from labctl.clients.site import MAX_SESSIONS, Owner, ServerInfo, SiteMonitor
from labctl.clients.values import Metadata, PVValue, Sample

T = TypeVar("T")


class SyncSession:
    """A blocking session to a labctl server (made by :func:`connect`)."""

    def __init__(self, timeout_s: float = 10.0) -> None:
        self.timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="labctl-client", daemon=True)
        self._thread.start()
        self._session: _session.Session | None = None

    def _run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None, *, forever: bool = False) -> T:
        if self._loop.is_closed():
            coro.close()
            raise ClientError("the session is closed")
        limit = None if forever else self.timeout_s if timeout_s is None else timeout_s
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(limit)
        except concurrent.futures.TimeoutError:
            if future.done():  # the coroutine's own TimeoutError (RequestTimeout is one), or a last-instant result
                return future.result()
            future.cancel()
            raise RequestTimeout(f"no answer within {limit:g} s") from None
        except KeyboardInterrupt:  # stop the coroutine too (a waiting lock request withdraws itself)
            future.cancel()
            raise

    @property
    def session(self) -> _session.Session:
        """The async session underneath (use its methods only from its loop)."""
        if self._session is None:
            raise ClientError("not connected")
        return self._session

    @property
    def site(self) -> str:
        """The server's site name."""
        return self.session.site

    @property
    def user(self) -> str:
        """Who the server says this session is."""
        return self.session.user

    @property
    def roles(self) -> tuple[str, ...]:
        """The roles of this session's user."""
        return self.session.roles

    @property
    def server_name(self) -> str:
        """The connected server's name in its site ("" for a server that is not part of a site)."""
        return self.session.server_name

    def list_pvs(self, pattern: str | None = None, *, site: bool = False) -> list[Metadata]:
        """Every PV (or those matching a glob pattern) with its metadata (``site``: of every server of the site that is up)."""
        return self._run(self.session.list_pvs(pattern, site=site), max(self.timeout_s, 60.0) if site else None)

    def servers(self) -> list[ServerInfo]:
        """The servers of the connected server's site (empty for a server that is not part of a site)."""
        return self._run(self.session.servers())

    def find_owners(self, names: Iterable[str]) -> dict[str, Owner | None]:
        """The server of the site that owns each PV (None: none does)."""
        return self._run(self.session.find_owners(list(names)))

    def info(self, name: str) -> Metadata:
        """A PV's metadata."""
        return self._run(self.session.info(name))

    def get(self, name: str) -> PVValue:
        """A PV's reading and metadata."""
        return self._run(self.session.get(name))

    def get_many(self, names: Sequence[str]) -> list[PVValue]:
        """Several PVs' readings in one request."""
        return self._run(self.session.get_many(names))

    def put(self, name: str, value: Any, *, lease: str | Lease | None = None) -> None:
        """Write a PV (``lease``: under a lease handed over by its token); raises PutRefused with the server's status and reason."""
        self._run(self.session.put(name, value, lease=lease))

    def use_lease(self, token: str) -> Lease:
        """Write under the lease with ``token`` from this session (another session of this user took it)."""
        return self._run(self.session.use_lease(token))

    def whoami(self) -> tuple[str, tuple[str, ...]]:
        """This session's user and roles."""
        return self._run(self.session.whoami())

    # ---- control ---------------------------------------------------------------------

    def locks(self) -> list[LockInfo]:
        """Every resource's lock state."""
        return self._run(self.session.locks())

    def lock(
        self, resource: str, *, duration_s: float = 600, priority: int = 0, wait: bool = False, timeout_s: float | None = None
    ) -> Lease:
        """Take a resource's lock; with ``wait``, queue and wait for it (``timeout_s``; None: until granted)."""
        coro = self.session.lock(resource, duration_s=duration_s, priority=priority, wait=wait, timeout_s=timeout_s)
        if not wait:
            return self._run(coro)
        return self._run(coro, forever=timeout_s is None, timeout_s=None if timeout_s is None else timeout_s + self.timeout_s)

    def renew(self, resource: str, token: str, duration_s: float | None = None) -> Lease:
        """Renew a lease from now."""
        return self._run(self.session.renew(resource, token, duration_s))

    def unlock(self, resource: str, token: str | None = None) -> None:
        """Release a lease or withdraw a queued request (by token, else your own)."""
        self._run(self.session.unlock(resource, token))

    def break_lock(self, resource: str) -> None:
        """Break whoever holds a resource's lock (admins)."""
        self._run(self.session.break_lock(resource))

    @contextlib.contextmanager
    def hold_lock(
        self, resource: str, duration_s: float = 60.0, *, priority: int = 0, wait: bool = False, timeout_s: float | None = None
    ) -> Iterator[HeldLock]:
        """Hold a resource's lock for the ``with`` block, renewed every third of ``duration_s``; released at the end."""
        manager = self.session.hold_lock(resource, duration_s, priority=priority, wait=wait, timeout_s=timeout_s)
        held = self._run(manager.__aenter__(), forever=wait and timeout_s is None,
                         timeout_s=None if not wait or timeout_s is None else timeout_s + self.timeout_s)  # fmt: skip
        try:
            yield held
        finally:
            self._run(manager.__aexit__(None, None, None))

    def alarms(self, *, active_only: bool = True) -> list[AlarmInfo]:
        """Alarm states."""
        return self._run(self.session.alarms(active_only=active_only))

    def acknowledge(self, source: str, comment: str = "") -> None:
        """Acknowledge an alarm."""
        self._run(self.session.acknowledge(source, comment))

    def shelve(self, source: str, duration_s: float, reason: str) -> None:
        """Shelve an alarm for a while, with a reason."""
        self._run(self.session.shelve(source, duration_s, reason))

    def unshelve(self, source: str) -> None:
        """End an alarm's shelving early."""
        self._run(self.session.unshelve(source))

    def interlocks(self) -> list[InterlockInfo]:
        """Every interlock's state."""
        return self._run(self.session.interlocks())

    def reset_interlock(self, name: str) -> None:
        """Reset an interlock waiting for it."""
        self._run(self.session.reset_interlock(name))

    def procedures(self) -> list[ProcedureInfo]:
        """The procedures jobs run."""
        return self._run(self.session.procedures())

    def submit(self, procedure: str, params: dict, *, priority: int = 0) -> int:
        """Queue a job; its id."""
        return self._run(self.session.submit(procedure, params, priority=priority))

    def jobs(self, *, mine: bool = False) -> list[JobInfo]:
        """Jobs, newest first."""
        return self._run(self.session.jobs(mine=mine))

    def job(self, job_id: int) -> JobDetail:
        """A job with its log and results."""
        return self._run(self.session.job(job_id))

    def cancel(self, job_id: int) -> None:
        """Cancel a job."""
        self._run(self.session.cancel(job_id))

    def audit(self, since: float, *, user: str | None = None, pv: str | None = None) -> list[dict]:
        """Audit records since ``since`` (UNIX s)."""
        return self._run(self.session.audit(since, user=user, pv=pv))

    def history(
        self, name: str, since: Any, until: Any = None, every: float | None = None, *, bounds: bool = True, timeout_s: float | None = None
    ) -> Any:
        """A PV's history as :class:`labctl.clients.history.History` (see ``Session.history``); the whole
        read, every page of it, may take ``timeout_s`` (default: the session's, at least 60 s)."""
        limit = max(self.timeout_s, 60.0) if timeout_s is None else timeout_s
        return self._run(self.session.history(name, since, until, every, bounds=bounds), limit)

    def monitor(
        self, names: Iterable[str], *, queue_size: int = 10_000, publishing_interval_ms: float = 100.0, timeout_s: float | None = None
    ) -> SyncMonitor:
        """Watch PVs; iterate the result and close it. Each sample is waited for as long as it
        takes (a quiet PV is no error), or at most ``timeout_s`` (then RequestTimeout)."""
        mon = self.session.monitor(names, queue_size=queue_size, publishing_interval_ms=publishing_interval_ms)
        self._run(mon.start())
        return SyncMonitor(self, mon, timeout_s)

    def close(self) -> None:
        """End the session and its loop thread."""
        if self._loop.is_closed():
            return
        try:
            if self._session is not None:
                self._run(self._session.close())
        finally:
            try:
                self._run(self._loop.shutdown_default_executor())  # its worker threads end too
            except RequestTimeout:
                pass  # a worker stuck in blocking I/O; it is a daemon and the loop is stopped anyway
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(self.timeout_s)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> SyncSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncMonitor:
    """Blocking iteration over a :class:`~labctl.clients.monitor.Monitor`."""

    def __init__(self, owner: SyncSession, monitor: Monitor | SiteMonitor, timeout_s: float | None = None) -> None:
        self._owner = owner
        self._monitor = monitor
        self.timeout_s = timeout_s
        """How long iteration waits for each sample (None: as long as it takes)."""

    def next(self, timeout_s: float | None = None) -> Sample:
        """The next sample, waited for as long as it takes, or at most ``timeout_s`` (default:
        the monitor's ``timeout_s``); raises RequestTimeout then. Ctrl-C stops the wait."""
        limit = self.timeout_s if timeout_s is None else timeout_s
        if limit is None:
            return self._owner._run(self._monitor.next(), forever=True)
        # the inner timeout fires first (with its clearer message); the outer one only guards the thread
        return self._owner._run(self._monitor.next(limit), limit + 5.0)

    def __iter__(self) -> Iterator[Sample]:
        return self

    def __next__(self) -> Sample:
        try:
            return self.next()
        except StopAsyncIteration:  # the monitor was closed
            raise StopIteration from None

    def close(self) -> None:
        """Unsubscribe."""
        self._owner._run(self._monitor.close())

    def __enter__(self) -> SyncMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    url: str,
    user: str | None = None,
    password: str | None = None,
    security: str = "auto",
    *,
    timeout_s: float = 10.0,
    certificate: str | None = None,
    private_key: str | None = None,
    site: bool = True,
    max_sessions: int = MAX_SESSIONS,
) -> SyncSession:
    """Open a blocking session (arguments as :func:`labctl.clients.session.connect`)."""
    sync = SyncSession(timeout_s)
    try:
        sync._session = sync._run(
            _session.connect(url, user, password, security, timeout_s=timeout_s, certificate=certificate,
                             private_key=private_key, site=site, max_sessions=max_sessions),
            timeout_s * 3,
        )  # fmt: skip
    except BaseException:
        sync.close()
        raise
    return sync
