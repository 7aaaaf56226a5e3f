"""A whole site through one session: who owns a PV, sessions to the other servers, their monitors.

Theory of operation. A site is several labctl servers sharing one database, each owning
its own PVs; each publishes the site's directory in ``Objects/<site>/Site`` (its
``ThisServer``, a ``Servers`` folder with every server's endpoint and state, and the
method ``FindOwners``). A :class:`~labctl.clients.session.Session` connected to a server
that has that object (``session.server_name`` is then its name) gets a
:class:`SiteRouter`, which makes the whole site usable through it:

* **Routing.** A name is first taken as one of the connected server's own PVs (its
  metadata is read there, as for a single server); a name that server does not have is
  resolved with ``FindOwners`` (batches of :data:`FIND_BATCH` names; the answers are
  cached, at most :data:`OWNER_CACHE` names, least recently used first out), and the
  request goes to the owning server. A name no server of the site owns raises
  :class:`~labctl.clients.errors.NoSuchPV`, as before.
* **Sessions to the owners** are opened when first needed, with the same user, password,
  security and application certificate as the first one, and kept for later requests: at
  most ``max_sessions`` of them (:data:`MAX_SESSIONS` by default). When another one is
  needed, the least recently used one that no monitor or held lock uses is closed; if all
  are in use, :class:`~labctl.clients.errors.TooManySessions` is raised.
* **A server that is down.** If the directory says the owner is down, or its endpoint
  cannot be reached, a request raises :class:`~labctl.clients.errors.ServerDown` naming
  the PVs, the server, its endpoint and whether it is down or unreachable. Before giving
  up, the owner is asked for again (``FindOwners`` bypassing the cache): the server may
  have come back at another endpoint, or its PVs moved to another server. A kept session
  whose connection broke is dropped and opened again once.
* **Monitors** (:class:`SiteMonitor`) subscribe on each owner. A PV whose server is down,
  or goes down, yields one sample with ``connected=False`` and an INVALID/COMM reading
  without a value -- never its last value as if it were current -- and the monitor keeps
  trying (backoff from 0.5 s to 5 s), asking for the owner again each time; once the
  owner serves again the PV's current value comes first, as for a new monitor. Only the
  loss of the connected server itself ends the monitor (ConnectionLost), as for a single
  server.
* **History and audit** are read through the connected server: the archive is shared,
  and a labctl server answers HistoryRead for every PV the archive holds, so the history
  of a PV whose server is down stays readable. Its metadata comes from its owner when that
  is up; otherwise it is taken from the values (:func:`archived_metadata`).
* **Locks** of a resource are taken on the server that owns its lock PV
  (``ARB:<resource>:OWNER``); jobs, alarms and interlocks are the connected server's.

:meth:`~labctl.clients.session.Session.servers` lists the site from the ``Site`` folder
(:class:`ServerInfo`), and ``list_pvs(site=True)`` lists the PVs of every server that is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from asyncua import ua
from labctl.clients.errors import (
    ClientError,
    CommandRefused,
    ConnectError,
    ConnectionLost,
    LoginRefused,
    NoSuchPV,
    RequestTimeout,
    ServerDown,
    TooManySessions,
)
from labctl.clients.monitor import Monitor
from labctl.clients.values import Metadata, Sample
from labctl.ioc.types import PVType, Reading, Severity, Status

from labctl.backoff import Backoff

if TYPE_CHECKING:
    from labctl.clients.session import Session

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Sessions to other servers of the site one session opens at most (by default).
MAX_SESSIONS = 8
#: PV names asked about in one ``FindOwners`` call (the most a labctl server answers in one).
FIND_BATCH = 1000
#: PV owners remembered per session (the least recently used are forgotten first).
OWNER_CACHE = 100_000
#: Seconds closing a session to another server may take.
CLOSE_TIMEOUT_S = 5.0
#: The object of a labctl server that publishes its site, below ``Objects/<site>``.
SITE_OBJECT = "Site"
#: The variables of a server in ``Site/Servers/<name>``, in the order :meth:`SiteRouter.servers` reads them.
SERVER_VARIABLES = ("EndpointUrl", "Host", "CaAddress", "CaPort", "CaTcpPort", "State", "Health", "Detail", "Version",
                    "PvCount", "Started", "LastHeartbeat")  # fmt: skip

Opener = Callable[[str], Awaitable["Session"]]


@dataclass(frozen=True, slots=True)
class Owner:
    """The server that owns a PV, as ``FindOwners`` answers: its name, endpoint and state."""

    server: str
    endpoint: str
    state: str
    """``up`` or ``down``."""

    @property
    def up(self) -> bool:
        """Whether the site directory says it serves."""
        return self.state == "up"


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """One server of the site, as the ``Site`` folder of the connected server shows it."""

    name: str
    endpoint: str
    """Its OPC UA endpoint ("" when it serves none)."""
    state: str
    """``up`` or ``down``."""
    health: str = ""
    """``starting``, ``ok``, ``degraded``, ``conflict`` or ``stopped``."""
    detail: str = ""
    """What is degraded or in conflict ("" when nothing)."""
    version: str = ""
    pv_count: int = 0
    host: str = ""
    ca_address: str = ""
    """Its Channel Access interfaces, comma-separated ("" when it serves none)."""
    ca_port: int | None = None
    ca_tcp_port: int | None = None
    started: float | None = None
    """When it registered (UNIX seconds)."""
    heartbeat: float | None = None
    """Its last heartbeat (UNIX seconds)."""

    @property
    def up(self) -> bool:
        """Whether it serves."""
        return self.state == "up"

    def as_json(self) -> dict[str, Any]:
        """A JSON object: every field, times as ISO 8601 UTC (as ``labctl servers --json`` from the database)."""
        def iso(t: float | None) -> str | None:
            return None if t is None else _dt.datetime.fromtimestamp(t, _dt.UTC).isoformat()

        return {
            "name": self.name, "state": self.state, "health": self.health, "detail": self.detail,
            "opcua_endpoint": self.endpoint, "host": self.host, "ca_address": self.ca_address, "ca_port": self.ca_port,
            "ca_tcp_port": self.ca_tcp_port, "version": self.version, "pv_count": self.pv_count,
            "started": iso(self.started), "heartbeat": iso(self.heartbeat),
        }  # fmt: skip


def disconnected(name: str) -> Sample:
    """The sample of a PV whose server went away: INVALID/COMM, no value, not connected."""
    return Sample(name, Reading(None, time.time(), Severity.INVALID, Status.COMM), connected=False)


#: A Variant's type -> the PV type it carries (for PVs whose server is down: :func:`archived_metadata`).
_VARIANT_TYPES = {
    ua.VariantType.Double: PVType.FLOAT64, ua.VariantType.Float: PVType.FLOAT64, ua.VariantType.Int64: PVType.INT,
    ua.VariantType.Int32: PVType.INT, ua.VariantType.Boolean: PVType.BOOL, ua.VariantType.String: PVType.STRING,
    ua.VariantType.UInt32: PVType.ENUM,
}  # fmt: skip


def archived_metadata(name: str, values: Iterable[ua.DataValue]) -> Metadata:
    """Metadata of a PV whose server is down, from its archived values: the type their Variants carry.

    Unit, precision and enum states are unknown then (the owner describes them once it is back).
    """
    for dv in values:
        v = dv.Value
        if v is None or v.Value is None:
            continue
        t = _VARIANT_TYPES.get(v.VariantType)
        if t is PVType.FLOAT64 and v.is_array:
            t = PVType.FLOAT64_ARRAY
        return Metadata(name, t, historizing=True)
    return Metadata(name, PVType.FLOAT64, historizing=True)


class SiteRouter:
    """Routes one session's requests to the servers of its site that own the PVs (see the module docstring)."""

    def __init__(self, origin: Session, opener: Opener, *, max_sessions: int = MAX_SESSIONS, owner_cache: int = OWNER_CACHE) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, got {max_sessions}")
        self.origin = origin
        self.max_sessions = max_sessions
        self.owner_cache = owner_cache
        self._opener = opener
        self._owners: OrderedDict[str, str] = OrderedDict()
        """PV name -> owning server (other than the connected one), as last answered."""
        self._servers: dict[str, Owner] = {}
        """Server name -> its endpoint and state, as last answered."""
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        """Open sessions to other servers, least recently used first."""
        self._opening: dict[str, asyncio.Future[Session]] = {}
        self._busy: dict[str, int] = {}
        """Monitors and held locks using each server's session."""
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def sessions(self) -> dict[str, Session]:
        """The sessions to other servers open now, by server name."""
        return dict(self._sessions)

    # ---- owners ------------------------------------------------------------------------------------

    async def find_owners(self, names: Iterable[str]) -> dict[str, Owner | None]:
        """Ask the connected server who owns each PV now (None: no server of the site); remembers the answers."""
        names = list(dict.fromkeys(names))
        found: dict[str, Owner | None] = {}
        origin = self.origin
        for start in range(0, len(names), FIND_BATCH):
            batch = names[start : start + FIND_BATCH]
            servers, endpoints, states = await origin._command(
                SITE_OBJECT, "FindOwners", ua.Variant(batch, ua.VariantType.String, is_array=True)
            )
            for name, server, endpoint, state in zip(batch, servers or [], endpoints or [], states or [], strict=False):
                if not server:
                    found[name] = None
                    self._owners.pop(name, None)
                    continue
                owner = Owner(server, endpoint or "", state or "down")
                found[name] = owner
                self._servers[server] = owner
                if server != origin.server_name:
                    self._remember(name, server)
                else:
                    self._owners.pop(name, None)
        return found

    def _remember(self, name: str, server: str) -> None:
        self._owners[name] = server
        self._owners.move_to_end(name)
        while len(self._owners) > self.owner_cache:
            self._owners.popitem(last=False)

    def learn(self, names: Iterable[str], server: ServerInfo) -> None:
        """Remember that ``server`` owns ``names`` (from its own PV list)."""
        self._servers[server.name] = Owner(server.name, server.endpoint, server.state)
        for name in names:
            self._remember(name, server.name)

    async def route(self, names: Iterable[str]) -> tuple[list[str], dict[str, list[str]]]:
        """(The names the connected server serves, {other server: its names}), each in the order given.

        Raises NoSuchPV for the first name no server of the site owns.
        """
        origin = self.origin
        wanted = list(dict.fromkeys(names))
        local: list[str] = []
        remote: dict[str, list[str]] = {}
        unknown: list[str] = []
        for name in wanted:
            if name in origin._meta:
                local.append(name)
            elif name in self._owners:
                self._owners.move_to_end(name)
                remote.setdefault(self._owners[name], []).append(name)
            else:
                unknown.append(name)
        if unknown:
            missing = await origin._probe(unknown)
            local += [n for n in unknown if n not in missing]
            if missing:
                owners = await self.find_owners(missing)
                for name in missing:
                    owner = owners.get(name)
                    if owner is None or owner.server == origin.server_name:
                        raise NoSuchPV(name, message=f"no PV named {name!r} on any server of site {origin.site!r}")
                    remote.setdefault(owner.server, []).append(name)
        order = {n: i for i, n in enumerate(wanted)}
        local.sort(key=order.__getitem__)
        return local, remote

    def owner_of(self, server: str) -> Owner:
        """What is known of a server: its endpoint and state (state ``down`` and no endpoint if nothing)."""
        return self._servers.get(server) or Owner(server, "", "down")

    # ---- sessions ---------------------------------------------------------------------------------

    async def session_for(self, server: str, names: list[str], *, fresh: bool = False) -> tuple[str, Session]:
        """(The owner, a session to it) for ``names`` of ``server``: the connected session if it owns them now.

        ``fresh``: ask who owns ``names[0]`` first (the owner may have moved or come back).
        Raises ServerDown (down, or unreachable), LoginRefused, TooManySessions.
        """
        if self._closed:
            raise ConnectionLost(f"{self.origin.url}: the session is closed")
        if fresh and names:
            owner = (await self.find_owners(names[:1])).get(names[0])
            if owner is None:
                raise NoSuchPV(names[0], message=f"no PV named {names[0]!r} on any server of site {self.origin.site!r}")
            server = owner.server
        if server == self.origin.server_name:
            return server, self.origin
        owner = self.owner_of(server)
        if not owner.up:
            raise ServerDown(names, server, owner.endpoint, down=True)
        if not owner.endpoint:
            raise ServerDown(names, server, "", down=False, reason="it publishes no OPC UA endpoint (yet)")
        session = self._sessions.get(server)
        if session is not None and session.url == owner.endpoint and not session.closed:
            self._sessions.move_to_end(server)
            return server, session
        if session is not None:  # closed, or the server came back elsewhere
            self.drop(server)
        return server, await self._open(owner, names)

    async def _open(self, owner: Owner, names: list[str]) -> Session:
        pending = self._opening.get(owner.server)
        if pending is None:
            self._make_room()
            pending = asyncio.ensure_future(self._opener(owner.endpoint))
            self._opening[owner.server] = pending
            pending.add_done_callback(lambda f, s=owner.server: self._opened(s, f))
        try:
            return await asyncio.shield(pending)
        except LoginRefused:
            raise
        except ConnectError as e:
            raise ServerDown(names, owner.server, owner.endpoint, down=False, reason=_reason(e, owner.endpoint)) from None

    def _opened(self, server: str, future: asyncio.Future[Session]) -> None:
        if self._opening.get(server) is future:
            del self._opening[server]
        if future.cancelled() or future.exception() is not None:
            return
        session = future.result()
        if self._closed:
            self._close_later(session)
            return
        self._sessions[server] = session
        self._sessions.move_to_end(server)

    def _make_room(self) -> None:
        """Close the least recently used idle session if opening one more would exceed the bound."""
        while len(self._sessions) + len(self._opening) >= self.max_sessions:
            idle = next((s for s in self._sessions if not self._busy.get(s)), None)
            if idle is None:
                raise TooManySessions(
                    f"this session already uses {self.max_sessions} sessions to other servers of site "
                    f"{self.origin.site!r} ({', '.join(self._sessions)}), all in use by monitors or held locks; "
                    "close some, or connect with a larger max_sessions"
                )
            self.drop(idle)

    def drop(self, server: str) -> None:
        """Forget the session to ``server`` (closed in the background): the next request opens a new one."""
        session = self._sessions.pop(server, None)
        if session is not None:
            self._close_later(session)

    def _close_later(self, session: Session) -> None:
        task = asyncio.ensure_future(_close(session))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @contextlib.asynccontextmanager
    async def holding(self, server: str, names: list[str]) -> AsyncIterator[Session]:
        """A session to ``server`` kept open (not evicted) for the ``async with`` block."""
        owner, session = await self._call_session(server, names)
        self._busy[owner] = self._busy.get(owner, 0) + 1
        try:
            yield session
        finally:
            self._release(owner)

    def acquire(self, server: str) -> None:
        """Keep ``server``'s session from being evicted (a monitor uses it) until :meth:`release`."""
        self._busy[server] = self._busy.get(server, 0) + 1

    def _release(self, server: str) -> None:
        left = self._busy.get(server, 0) - 1
        if left > 0:
            self._busy[server] = left
        else:
            self._busy.pop(server, None)

    release = _release

    async def _call_session(self, server: str, names: list[str]) -> tuple[str, Session]:
        try:
            return await self.session_for(server, names)
        except ServerDown:
            if not names:
                raise
        return await self.session_for(server, names, fresh=True)  # it may have come back, or moved

    async def call(self, server: str, names: list[str], fn: Callable[[Session], Awaitable[T]]) -> T:
        """``await fn(session)`` on the owner of ``names`` (``server`` as last known); see the module docstring."""
        owner, session = await self._call_session(server, names)
        try:
            return await fn(session)
        except NoSuchPV:  # it no longer serves them (renamed, moved): asked for again next time
            for name in names:
                self._owners.pop(name, None)
            raise
        except ConnectionLost as e:
            if session is self.origin:
                raise
            self.drop(owner)
            lost = e
        owner, session = await self.session_for(owner, names, fresh=bool(names))
        try:
            return await fn(session)
        except ConnectionLost:
            if session is self.origin:
                raise
            self.drop(owner)
            raise ServerDown(names, owner, self.owner_of(owner).endpoint, down=False, reason=str(lost)) from None

    async def close(self) -> None:
        """Close every session to other servers."""
        self._closed = True
        for future in list(self._opening.values()):
            future.cancel()
        for server in list(self._sessions):
            self.drop(server)
        if self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)

    # ---- the Site folder ------------------------------------------------------------------------------

    async def servers(self) -> list[ServerInfo]:
        """Every server of the site, by name, from the connected server's ``Site/Servers`` folder."""
        origin = self.origin
        folder = ua.NodeId(f"/{origin.site}/{SITE_OBJECT}/Servers", origin.namespace_index)
        params = ua.BrowseParameters()
        desc = ua.BrowseDescription()
        desc.NodeId = folder
        desc.BrowseDirection = ua.BrowseDirection.Forward
        desc.ReferenceTypeId = ua.NodeId(ua.ObjectIds.HierarchicalReferences)
        desc.IncludeSubtypes = True
        desc.NodeClassMask = ua.NodeClass.Object
        desc.ResultMask = ua.BrowseResultMask.BrowseName
        params.NodesToBrowse.append(desc)
        (result,) = await origin._call(origin.client.uaclient.browse(params))
        names = sorted(ref.BrowseName.Name for ref in result.References or [])
        reqs = [(ua.NodeId(f"{folder.Identifier}/{n}/{v}", origin.namespace_index), ua.AttributeIds.Value)
                for n in names for v in SERVER_VARIABLES]  # fmt: skip
        values = await origin._read(reqs) if reqs else []
        out = []
        per = len(SERVER_VARIABLES)
        for i, name in enumerate(names):
            v = dict(zip(SERVER_VARIABLES, (_value(dv) for dv in values[i * per : (i + 1) * per]), strict=True))
            info = ServerInfo(
                name=name, endpoint=v["EndpointUrl"] or "", state=v["State"] or "down", health=v["Health"] or "",
                detail=v["Detail"] or "", version=v["Version"] or "", pv_count=int(v["PvCount"] or 0), host=v["Host"] or "",
                ca_address=v["CaAddress"] or "", ca_port=v["CaPort"] or None, ca_tcp_port=v["CaTcpPort"] or None,
                started=_unix(v["Started"]), heartbeat=_unix(v["LastHeartbeat"]),
            )  # fmt: skip
            out.append(info)
            self._servers[name] = Owner(name, info.endpoint, info.state)
        return out

    async def list_pvs(self, pattern: str | None, local: list[Metadata]) -> list[Metadata]:
        """``local`` (the connected server's PVs), then those of every other server that is up, each name once."""
        out = list(local)
        seen = {m.name for m in out}
        for server in await self.servers():
            if server.name == self.origin.server_name or not server.up:
                continue
            try:
                metas = await self.call(server.name, [], lambda s: s.list_pvs(pattern))
            except (ServerDown, ConnectError, RequestTimeout, TooManySessions) as e:
                log.warning("not listing the PVs of server %r: %s", server.name, e)
                continue
            mine = [m for m in metas if m.name not in seen]
            seen.update(m.name for m in mine)
            self.learn((m.name for m in mine), server)
            out += mine
        return out


class SiteMonitor:
    """Samples of PVs of any server of the site (made by :meth:`labctl.clients.session.Session.monitor`).

    The same interface as :class:`~labctl.clients.monitor.Monitor`; see the module
    docstring for PVs whose server is down. :attr:`disconnected` says which PVs are, and why.
    """

    def __init__(self, session: Session, names: list[str], queue_size: int, interval_ms: float, *, retry_max_s: float = 5.0) -> None:
        self.session = session
        self.names = names
        self.queue_size = queue_size
        self.interval_ms = interval_ms
        self.retry_max_s = retry_max_s
        self.disconnected: dict[str, str] = {}
        """PV name -> why it is disconnected now (its server is down or unreachable)."""
        self._single: Monitor | None = None
        self._queue: deque[Sample] = deque(maxlen=max(1, queue_size))
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._inner: set[Monitor] = set()
        self._lost: str | None = None
        self._started = False
        self._closed = False

    @property
    def router(self) -> SiteRouter:
        router = self.session._site
        assert router is not None
        return router

    async def start(self) -> SiteMonitor:
        """Subscribe on each owner (done by the first ``async for`` or ``async with`` if not called).

        Raises NoSuchPV for a name no server of the site owns, ConnectionLost if the
        connected server is lost; a PV whose server is down is not an error (see the class).
        """
        if self._started:
            return self
        local, remote = await self.router.route(self.names)
        self._started = True
        self.session._monitors.add(self)  # type: ignore[arg-type]  # closed with the session
        if not remote:
            self._single = Monitor(self.session, local, self.queue_size, self.interval_ms)
            await self._single.start()
            return self
        if local:
            mon = Monitor(self.session, local, self.queue_size, self.interval_ms)
            await mon.start()
            self._inner.add(mon)
            self._spawn(self._follow_local(mon))
        firsts = await asyncio.gather(*(self._subscribe(server, names, fresh=False) for server, names in remote.items()))
        for (server, names), first in zip(remote.items(), firsts, strict=True):
            self._spawn(self._follow(server, names, first))
        return self

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _push(self, sample: Sample) -> None:
        self._queue.append(sample)  # beyond queue_size the oldest goes
        self._wake.set()

    def _disconnect(self, names: list[str], why: str) -> None:
        for name in names:
            if name not in self.disconnected:
                self._push(disconnected(name))
            self.disconnected[name] = why

    async def _subscribe(self, server: str, names: list[str], *, fresh: bool) -> tuple[str, Monitor] | None:
        """A started monitor of ``names`` on their owner, or None (then they are disconnected, with why)."""
        try:
            owner, session = await self.router.session_for(server, names, fresh=fresh)
            if session is self.session:  # its PVs moved to the connected server
                raise NoSuchPV(names[0], message=f"{names[0]}: now served by the connected server")
            mon = Monitor(session, names, self.queue_size, self.interval_ms)
            self.router.acquire(owner)
            try:
                await mon.start()
            except BaseException:
                self.router.release(owner)
                with contextlib.suppress(Exception):
                    await mon.close()
                raise
        except (ServerDown, ConnectError, ConnectionLost, RequestTimeout, TooManySessions, CommandRefused, NoSuchPV) as e:
            if isinstance(e, ConnectionLost):
                self.router.drop(server)
            self._disconnect(names, str(e))
            return None
        self._inner.add(mon)
        return owner, mon

    async def _follow(self, server: str, names: list[str], first: tuple[str, Monitor] | None) -> None:
        """Forward one owner's samples; when it is lost, mark the PVs disconnected and subscribe again."""
        backoff = Backoff(0.5, self.retry_max_s)
        current = first
        while True:
            if current is not None:
                owner, mon = current
                backoff.reset()
                why = f"server {owner!r}: the subscription ended"
                try:
                    async for sample in mon:
                        self.disconnected.pop(sample.name, None)
                        self._push(sample)
                except (ConnectionLost, RequestTimeout) as e:
                    why = f"server {owner!r}: {e}"
                finally:
                    self.router.release(owner)
                    self._inner.discard(mon)
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(mon.close(), CLOSE_TIMEOUT_S)
                self.router.drop(owner)
                self._disconnect(names, why)
                server = owner
            await asyncio.sleep(backoff.next())
            current = await self._subscribe(server, names, fresh=True)

    async def _follow_local(self, mon: Monitor) -> None:
        try:
            async for sample in mon:
                self._push(sample)
            self._lost = ""
        except (ConnectionLost, RequestTimeout) as e:
            self._lost = str(e)
        self._wake.set()

    async def close(self) -> None:
        """Unsubscribe everywhere."""
        if self._closed:
            return
        self._closed = True
        self.session._monitors.discard(self)  # type: ignore[arg-type]
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        inner = [m for m in (self._single, *self._inner) if m is not None]
        await asyncio.gather(*(asyncio.wait_for(m.close(), CLOSE_TIMEOUT_S) for m in inner), return_exceptions=True)
        self._inner.clear()
        self._wake.set()

    async def __aenter__(self) -> SiteMonitor:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[Sample]:
        return self

    async def __anext__(self) -> Sample:
        if self._closed:
            raise StopAsyncIteration
        await self.start()
        if self._single is not None:
            return await self._single.__anext__()
        while True:
            if self._queue:
                return self._queue.popleft()
            if self._closed:
                raise StopAsyncIteration
            if self._lost is not None:
                if self._lost == "":
                    raise StopAsyncIteration
                raise ConnectionLost(self._lost)
            self._wake.clear()
            await self._wake.wait()

    async def next(self, timeout_s: float | None = None) -> Sample:
        """The next sample, waiting as long as it takes, or at most ``timeout_s`` (as :meth:`Monitor.next`)."""
        if timeout_s is None:
            return await self.__anext__()
        try:
            return await asyncio.wait_for(self.__anext__(), timeout_s)
        except TimeoutError:
            raise RequestTimeout(f"no change of {', '.join(self.names)} within {timeout_s:g} s") from None


async def _close(session: Session) -> None:
    try:
        await asyncio.wait_for(session.close(), CLOSE_TIMEOUT_S)
    except (TimeoutError, ClientError, OSError) as e:
        log.debug("closing a session to %s: %s", session.url, e)


def _reason(error: ConnectError, endpoint: str) -> str:
    """A connection error's sentence without the endpoint it starts with (the ServerDown names it)."""
    text = str(error)
    for opening in (f"cannot connect to {endpoint}: ", f"{endpoint}: "):
        if text.startswith(opening):
            return text[len(opening) :]
    return text


def _value(dv: ua.DataValue) -> Any:
    if dv.StatusCode is not None and not dv.StatusCode.is_good():
        return None
    return dv.Value.Value if dv.Value is not None else None


def _unix(t: Any) -> float | None:
    if not isinstance(t, _dt.datetime):
        return None
    return (t if t.tzinfo is not None else t.replace(tzinfo=_dt.UTC)).timestamp()


