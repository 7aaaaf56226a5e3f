"""The Channel Access service: the process database served over CA by caproto.

Theory of operation. :class:`CAService` serves one channel per PV (named with the
site's ``server.ca.prefix``), built the first time a client searches for it
(:class:`Channels`), subscribes **once** to the database with every event bit, and runs
caproto's asyncio server on the server's own event loop.

Updates flow from the database straight to the channels: the database calls the
service inline for every update that passed a deadband or changed the alarm state, and :meth:`ServedChannel.apply_now` stores the reading and queues it,
encoded, on the connection of every client monitoring it the common way (see
:mod:`labctl.server.ca.monitors`), all without waiting. What needs caproto's coroutines --
monitors of other types or with channel filters, record fields that follow the PV --
goes through :class:`UpdateQueue`: it keeps the latest pending update per PV (merging
the event bits of any update it replaces, so a coalesced LOG or ALARM bit is not lost)
and one pump task publishes them in arrival order. Under overload, intermediate values
are dropped and the latest kept, per client connection for direct monitors and per PV in
the queue, as an IOC does, and memory stays bounded. Reads do not wait for updates: a
channel asks the core for the latest reading (:meth:`CAService.current`) when a client
reads it or subscribes to it, so what the deadband filters out of monitors is still read
back at once (see :mod:`labctl.server.ca.channels`).

Writes flow client -> channel ``auth_write`` -> :meth:`CAService.put` ->
``Database.write`` with the client's :class:`~labctl.ioc.types.Identity` (its reported user,
its host as the access rules see it, protocol ``ca``, and the roles the rules grant).
Once the core write returns, the PV's pending update is applied at once, so a client
reading right after its put-callback completed sees the value it wrote (or the
read-back). Refusals raise the core's errors, which the core has already audited;
:meth:`CAService.refuse` audits the few refusals decided here (writes to record fields,
alarm acknowledgements), so every write attempt reaches the audit trail.

Sites. In a server that is part of a site (it has a site directory service), a
:class:`~labctl.server.ca.names.NameService` answers name searches that arrive over TCP
(clients' ``EPICS_CA_NAME_SERVERS``) for PVs other servers of the site own, with the
owner's address; UDP searches are answered for this server's PVs only.

Locks. In a server with a control layer (``server.control``), each lockable resource
also gets the CA-only command channels ``ARB:<RES>:REQUEST`` and ``ARB:<RES>:RELEASE``,
and access rights of open channels are re-sent when a lease changes hands (see
:mod:`labctl.server.ca.arbiter`).

See :mod:`labctl.server.ca.env` for addresses, ports and subscription latency,
:mod:`labctl.server.ca.access` for access rights, :mod:`labctl.server.ca.channels` for types and
event masks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from caproto import AccessRights
from labctl.ioc.access import AuditRecord
from labctl.ioc.arbiter import LeaseEvent
from labctl.ioc.database import Database
from labctl.ioc.errors import WrongType
from labctl.ioc.subscription import Callback
from labctl.ioc.types import EventMask, PVType, Reading, Update
from labctl.server.ca.access import AccessRules, Client, access_rights
from labctl.server.ca.arbiter import ArbiterChannels, Control
from labctl.server.ca.channels import ServedChannel, build_channel
from labctl.server.ca.context import CAStartError, LabctlContext
from labctl.server.ca.env import MIN_ARRAY_BYTES, CASettings, resolve, tune_latency
from labctl.server.ca.metadata import long_string_bytes
from labctl.server.ca.names import NameService, SiteDirectory

from labctl.backoff import Backoff
from labctl.supervision import supervise

if TYPE_CHECKING:  # the site model imports this package (its ``server.ca`` section)
    from labctl.server.site import SiteConfig

log = logging.getLogger("labctl.ca")


class Host(Protocol):
    """What the service needs from the server it runs in (``server.app.Server``).

    A server with a control layer also has ``control`` (the arbiter's commands); without
    one, no lock command channels are served. A server of a site also has
    ``service("sitedir")`` (its site directory), used by the name service.
    """

    db: Database
    site: SiteConfig


def default_max_array_bytes(db: Database) -> int:
    """An IOC's default largest message (16 384 bytes) plus what the largest PV's value needs."""
    largest = 0
    for info in db.infos():
        if info.type is PVType.FLOAT64_ARRAY:
            largest = max(largest, 8 * info.max_length)
        elif info.type is PVType.STRING:
            largest = max(largest, long_string_bytes(info))  # whole UTF-8 strings, through NAME.VAL$
    return MIN_ARRAY_BYTES + largest


class UpdateQueue:
    """Database updates waiting for their channel: the latest per PV, bits merged."""

    def __init__(self, apply: Callable[[Update], Awaitable[None]]) -> None:
        self._apply = apply
        self._pending: dict[str, Update] = {}
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self.coalesced = 0
        """Updates replaced by a newer one of the same PV before they were published."""

    def offer(self, update: Update) -> None:
        """Queue an update (the database's inline callback: never waits)."""
        old = self._pending.pop(update.name, None)
        if old is not None:
            self.coalesced += 1
            update = Update(update.name, update.reading, update.mask | old.mask)
        self._pending[update.name] = update
        self._wake.set()

    async def run(self) -> None:
        """Apply pending updates as they come, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            async with self._lock:
                batch, self._pending = self._pending, {}
                for update in batch.values():
                    await self._apply_one(update)

    async def flush(self, name: str) -> None:
        """Apply the pending update of ``name`` now (and wait for one being applied)."""
        async with self._lock:
            update = self._pending.pop(name, None)
            if update is not None:
                await self._apply_one(update)

    async def _apply_one(self, update: Update) -> None:
        try:
            await self._apply(update)
        except Exception:  # one PV's failure must not stop the others' updates
            log.exception("publishing %s over Channel Access failed", update.name)


class Channels(dict[str, ServedChannel]):
    """The served channels by PV name: a channel is built the first time it is asked for.

    A client's search or connection asks for it; until then a PV costs the Channel Access
    service nothing (a site of 100 000 PVs starts in a moment and holds only what clients
    use). Asking for a name that is no PV raises KeyError.
    """

    def __init__(self, build: Callable[[str], ServedChannel | None]) -> None:
        super().__init__()
        self._build = build

    def __missing__(self, name: str) -> ServedChannel:
        channel = self._build(name)
        if channel is None:
            raise KeyError(name)
        self[name] = channel
        return channel


class ServedNames(dict[str, Any]):
    """caproto's ``pvdb``: served names (prefix + PV name) to channels, built on demand.

    Record fields (``NAME.EGU``) and the lock command channels are stored in it as caproto
    and the service add them.
    """

    def __init__(self, channels: Channels, prefix: str) -> None:
        super().__init__()
        self._channels = channels
        self._prefix = prefix

    def __missing__(self, served: str) -> Any:
        if not served.startswith(self._prefix):
            raise KeyError(served)
        channel = self._channels[served[len(self._prefix) :]]
        self[served] = channel
        return channel


class CAService:
    """Serves the database over Channel Access (see the module docstring)."""

    name = "ca"

    def __init__(self, server: Host) -> None:
        self._host = server
        self.db = server.db
        self.site = server.site
        self.config = server.site.server.ca
        self.rules = AccessRules(self.config.access)
        self.prefix = self.config.prefix
        self.settings: CASettings | None = None
        self.latency: dict[str, float] = {}
        self.channels: Channels = Channels(self._build)
        """Channels by PV name (without the prefix), each built when first asked for."""
        self.context: LabctlContext | None = None
        self._queue = UpdateQueue(self._apply)
        self._subscription: Callback | None = None
        self._pump: asyncio.Task[None] | None = None
        self.control: Control | None = getattr(server, "control", None)
        self.arbiter: ArbiterChannels | None = None
        """Lock command channels and access-rights refreshes (with a control layer)."""
        self.names: NameService | None = None
        """In a site: the name service answering TCP name searches for other servers' PVs."""
        if self.control is not None:
            self.control.on_lease_events(self._lease_events)

    # ---- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the CA ports and serve every PV; return once clients can connect."""
        self.settings = resolve(self.config)
        self.latency = tune_latency()
        self.channels = Channels(self._build)
        pvdb = ServedNames(self.channels, self.prefix)
        if self.control is not None:
            self.arbiter = ArbiterChannels(self.db, self.control, self.rules, self.prefix, publish=self._publish_now)
            for name, command in self.arbiter.channels.items():
                if name.startswith(self.prefix) and name[len(self.prefix) :] in self.db:
                    raise CAStartError(
                        f"Channel Access: PV {name!r} has the name of resource {command.resource!r}'s lock command "
                        "channel; rename the PV"
                    )
                pvdb[name] = command
        # No await between reading the initial values and subscribing: no update is missed.
        self._queue = UpdateQueue(self._apply)
        self._subscription = self.db.subscribe(self._on_update, mask=EventMask.ALL)
        self.context = LabctlContext(
            pvdb,
            self.settings,
            check_client_ip=self.rules.check_client_ip,
            limits=self.config.limits,
            max_array_bytes=default_max_array_bytes(self.db),
        )
        try:
            await self.context.start()
        except BaseException:
            self.db.unsubscribe(self._subscription)
            self._subscription = None
            self.context = None
            raise
        self._pump = supervise("ca updates", self._queue.run, backoff=Backoff(0.05, 5.0)).task  # restarted if it fails
        directory = self._site_directory()
        if directory is not None:
            self.names = NameService(directory, self.prefix)
            await self.names.start()
            self.context.names = self.names
        if self.arbiter is not None:
            self.arbiter.start(self.context)
        log.info(
            "Channel Access: %d PVs on %s, UDP %d / TCP %d; beacons to %s",
            len(self.db),
            ", ".join(self.settings.interfaces),
            self.context.ca_server_port,
            self.context.port,
            ", ".join(f"{h}:{p}" for h, p in self.settings.beacon_addresses) or "nowhere",
        )

    async def stop(self) -> None:
        """Stop serving: unsubscribe, close every connection and socket."""
        if self._subscription is not None:
            self.db.unsubscribe(self._subscription)
            self._subscription = None
        if self.names is not None:
            if self.context is not None:
                self.context.names = None
            await self.names.stop()
            self.names = None
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
            self._pump = None
        if self.arbiter is not None:
            self.arbiter.stop()
        if self.context is not None:
            await self.context.stop()
            self.context = None

    def endpoints(self) -> list[str]:
        """``ca://<interface>:<port>`` per bound interface, with the PV prefix (and the name service, in a site)."""
        if self.context is None:
            return []
        prefix = f" (PV prefix {self.prefix!r})" if self.prefix else ""
        names = " (name server of the site's PVs on TCP)" if self.names is not None else ""
        return [f"ca://{i}:{self.context.ca_server_port}{prefix}{names}" for i in self.context.interfaces]

    def _site_directory(self) -> SiteDirectory | None:
        """The server's site directory service, when it is part of a site and ``server.ca.name_service`` is on."""
        if not self.config.name_service:
            return None
        find = getattr(self._host, "service", None)
        if find is None:
            return None
        try:
            return find("sitedir")
        except KeyError:  # a single server: no directory
            return None

    @property
    def port(self) -> int:
        """The UDP search port (clients' ``EPICS_CA_SERVER_PORT``)."""
        if self.context is None:
            raise RuntimeError("the Channel Access service is not running")
        return self.context.ca_server_port

    @property
    def tcp_port(self) -> int:
        """The TCP port of client circuits (the server port unless it was taken)."""
        if self.context is None:
            raise RuntimeError("the Channel Access service is not running")
        return self.context.port

    async def refresh_access_rights(self, pvs: Collection[str] | None = None) -> int:
        """Push changed access rights to open channels (e.g. after a lock changed hands)."""
        if self.context is None:
            return 0
        return await self.context.refresh_access_rights(pvs)

    async def _publish_now(self, pv: str) -> None:
        await self._queue.flush(pv)

    def _lease_events(self, events: list[LeaseEvent]) -> None:
        """The control layer's listener (inline, never waits): rights follow the lock."""
        if self.arbiter is not None:
            self.arbiter.lease_events(events)

    # ---- the channels' binding ----------------------------------------------------------

    def _build(self, name: str) -> ServedChannel | None:
        """The channel of PV ``name`` holding its current reading; None if there is no such PV."""
        if name not in self.db:
            return None
        return build_channel(self.db.info(name), self.db.read(name), self, self.prefix + name)

    def _on_update(self, update: Update) -> None:
        """The database's inline callback: serve the update now, queue caproto's share of it."""
        channel = self.channels.get(update.name)
        if channel is None:
            return
        try:
            slow = channel.apply_now(update.reading, update.mask)
        except Exception:  # one PV's failure must not stop the others' updates
            log.exception("publishing %s over Channel Access failed", update.name)
            return
        if slow:
            self._queue.offer(update)

    async def _apply(self, update: Update) -> None:
        await self.channels[update.name].publish_slow(update.mask)

    def current(self, pv: str) -> Reading:
        """The latest reading the core holds of ``pv`` (a channel's read refreshes from it)."""
        return self.db.read(pv)

    def acknowledgement(self, pv: str) -> tuple[int, int]:
        """ACKT and ACKS of ``pv`` (DBR_STSACK_STRING): its alarm's latch, and the severity not yet acknowledged."""
        alarms = getattr(self.control, "alarms", None)
        table = getattr(alarms, "table", None)
        if table is None or pv not in table:
            return 0, 0
        alarm = table.get(pv)
        return int(alarm.latch), int(alarm.latched) if alarm.unacknowledged else 0

    def rights(self, pv: str, client: Client) -> AccessRights:
        """Access rights of ``client`` on ``pv`` now."""
        return access_rights(self.db, pv, self.rules.identity(client))

    async def put(self, pv: str, value: Any, client: Client) -> None:
        """Write ``value`` to ``pv`` for ``client`` through the core write path."""
        await self.db.write(pv, value, self.rules.identity(client))
        await self._queue.flush(pv)

    def refuse_value(self, pv: str, client: Client, value: Any, error: WrongType) -> NoReturn:
        """Refuse a put whose value this adapter cannot convert (audited once, by the core).

        The write path's order holds: a client that may not write the PV at all (read-only,
        role, lock) is refused for that, as the core refuses it; otherwise for the value.
        """
        identity = self.rules.identity(client)
        if not self.db.may_write(pv, identity):
            with self.db.refusals_audited(identity, new=value):
                self.db.check_write(pv, value, identity)  # raises the refusal of the identity
        raise self.db.refuse(identity, error, old=self.db.read(pv).value, new=value)

    def refuse(self, target: str, client: Client, value: Any, error: Exception) -> NoReturn:
        """Audit a write refused by the adapter itself, then raise ``error``."""
        reason = getattr(error, "reason", str(error))
        self.db.audit(
            AuditRecord.of(
                self.db.clock(), "write", self.rules.identity(client), target, new=value, accepted=False, reason=reason
            )
        )
        raise error
