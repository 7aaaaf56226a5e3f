"""Channel Access users in the arbiter: lock command channels, and access rights that follow the lock.

Theory of operation. The arbiter's *state* is public on every protocol through database
PVs that the control layer keeps (``ARB:<RES>:OWNER``, ``:EXPIRES``, ``:QUEUE``; see
:func:`labctl.ioc.arbiter.lock_pv_names`). Its *commands* are protocol-specific: OPC UA has
methods, and Channel Access, which has none, gets two writable channels per lockable
resource, built here and served by the CA adapter only (they are not database PVs):

``<prefix>ARB:<RES>:REQUEST``
    DBR_STRING. Write ``"duration[,priority]"`` -- the lease in seconds, and optionally
    an integer priority from -1000 to 1000 (:data:`~labctl.ioc.arbiter.MIN_PRIORITY` ..
    :data:`~labctl.ioc.arbiter.MAX_PRIORITY`; default 0, higher first) -- or just a number
    (the duration). Anything else fails the put (ECA_PUTFAIL), audited as InvalidArgument.
    The put completes once the request was *granted or queued*, and OWNER, EXPIRES and
    QUEUE already show which when it does. Writing it again while holding the lock
    *renews* the lease for the new duration from now: a CA client has no token, so this
    is how it keeps its lock, and a lease not renewed lapses (a crashed client never
    holds a lock forever). Writing it again while queued keeps the place in the queue
    (priority and duration unchanged).
``<prefix>ARB:<RES>:RELEASE``
    DBR_STRING. Write anything: gives up the client's lease, or withdraws its queued
    request (a connection that closes withdraws its queued requests; its lease lapses). A put when the client holds and waits for nothing fails (ECA_PUTFAIL), so a
    script learns that its lease had already lapsed.

A request acts for the CA client's :class:`~labctl.ioc.types.Identity` (reported user, host or
address, roles from the access rules) through ``server.control``. The lease's
``client`` is the circuit, ``ca:<user>@<host>/<ip>:<port>`` (:func:`client_id`), so a
release acts on that circuit's own lease or request, a renewal is recognised as the same
circuit's, and only that circuit writes the resource: another connection reporting the
same user name is refused (a lock is held by a client, not a name). Both
channels read back the last command accepted (as a ``stringout`` record would) and grant
write access to clients whose roles may write the resource; the arbiter refuses the
rest with ECA_NOWTACCESS (audited by the control layer). A malformed request fails the
put with ECA_PUTFAIL and is audited here.

Access rights. A channel's rights are READ|WRITE when the core would accept a write from
that client now, which on a lockable resource means holding its lease. Channel Access
sends rights when a channel is created; :class:`ArbiterChannels` subscribes to the
control layer's lease events and, when a lease changes hands (granted, released,
expired, broken), re-sends the rights of the resource's open channels to every client
whose rights changed (CA_PROTO_ACCESS_RIGHTS: libca updates its channel and calls the
access-rights handler; pyepics shows it as ``PV.write_access``). The control layer calls
its listeners inline and they must not wait, so the refresh is queued on each client
connection, whose own task sends it (see
:meth:`~labctl.server.ca.context.LabctlContext.schedule_access_rights`: a client that stops
reading delays no one else). A put to REQUEST or RELEASE waits for its own client's
refresh before it completes, so a client that waited for its put-callback already has
its new rights.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, Protocol

from caproto import AccessRights, ChannelString, ChannelType
from caproto._dbr import native_type
from labctl.ioc.arbiter import MAX_PRIORITY, MIN_PRIORITY, Arbiter, Lease, LeaseEvent, Waiter, lock_pv_names
from labctl.ioc.database import Database
from labctl.ioc.errors import InvalidArgument, Refused, WrongType
from labctl.ioc.policy import Action as PolicyAction
from labctl.ioc.types import Identity
from labctl.server.ca.access import AccessRules, Client
from labctl.server.ca.channels import TextValues
from labctl.server.ca.context import LabctlContext
from labctl.server.ca.wire import ENCODING, MAX_STRING_BYTES, VALUE_TYPES, clip_utf8

#: What a write to ``ARB:<RES>:REQUEST`` holds.
REQUEST_FORMAT = "duration[,priority]"
#: Lease events after which someone else may write the resource: access rights are re-sent.
HANDOVER = frozenset({"granted", "released", "expired", "broken"})

Action = Literal["request", "release"]


def command_pv_names(resource: str) -> dict[Action, str]:
    """Names (without prefix) of a resource's CA command channels, beside its lock-state PVs."""
    base = lock_pv_names(resource)["owner"].removesuffix(":OWNER")
    return {"request": f"{base}:REQUEST", "release": f"{base}:RELEASE"}


def client_id(identity: Identity) -> str:
    """The arbiter's ``client`` of a CA client's leases: its circuit, ``ca:<user>@<host>/<ip>:<port>`` (see :attr:`Client.circuit`)."""
    return identity.client or f"ca:{identity.user}@{identity.host}"


@dataclass(frozen=True, slots=True)
class LockRequest:
    """A parsed write to ``ARB:<RES>:REQUEST``."""

    duration_s: float
    priority: int = 0

    def __str__(self) -> str:
        return f"{self.duration_s:g},{self.priority}"


def parse_request(text: str) -> LockRequest:
    """``"duration[,priority]"`` -> :class:`LockRequest`; ValueError saying what was expected."""
    parts = [p.strip() for p in text.split(",")]
    expected = f"expected {REQUEST_FORMAT!r} (seconds, then an optional integer priority), got {text!r}"
    if len(parts) > 2:
        raise ValueError(expected)
    try:
        duration = float(parts[0])
    except ValueError:
        raise ValueError(expected) from None
    if not (math.isfinite(duration) and duration > 0):
        raise ValueError(f"the lease duration must be a positive number of seconds, got {parts[0]!r}")
    if len(parts) == 1:
        return LockRequest(duration)
    try:
        priority = float(parts[1])
    except ValueError:
        raise ValueError(expected) from None
    if not (priority.is_integer() and MIN_PRIORITY <= priority <= MAX_PRIORITY):
        raise ValueError(f"the priority must be an integer from {MIN_PRIORITY} to {MAX_PRIORITY}, got {parts[1]!r}")
    return LockRequest(duration, int(priority))


def command_text(data: Any, data_type: ChannelType) -> str:
    """A command put's wire data as text; several elements are joined with commas.

    Strings come as DBR_STRING (``caput`` sends those) or DBR_CHAR; numbers of any type
    are written as text, so ``put(600)`` and ``put("600")`` mean the same.
    """
    native = native_type(data_type)
    if native == ChannelType.STRING:
        items = [_decode(v) for v in data]
    elif native == ChannelType.CHAR:
        raw = bytes(data.tobytes() if hasattr(data, "tobytes") else bytes(data))
        items = [_decode(raw.split(b"\x00", 1)[0])]
    else:
        values = data.tolist() if hasattr(data, "tolist") else list(data)
        items = [f"{v:g}" if isinstance(v, float) else str(v) for v in values]
    return ",".join(items)


def _decode(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(ENCODING)  # UnicodeDecodeError is a ValueError: refused by the caller
    return str(value)


class Control(Protocol):
    """What the channels need from the control layer (``server.control.ControlService``)."""

    arbiter: Arbiter

    def request_lock(
        self, resource: str, who: Identity, *, duration_s: float, priority: int = 0, client: str | None = None, wait: bool = True
    ) -> Lease | Waiter:
        """Take (or queue for) a resource's lock."""
        ...

    def release_lock(self, resource: str, token: str | None, who: Identity, client: str | None = None) -> None:
        """Release the caller's lease or request."""
        ...

    def on_lease_events(self, fn: Callable[[list[LeaseEvent]], None]) -> None:
        """Call ``fn`` after every batch of lease events."""
        ...


class CommandChannel(TextValues, ChannelString):
    """``ARB:<RES>:REQUEST`` or ``ARB:<RES>:RELEASE``: a put is a lock command for its client."""

    def __init__(self, owner: ArbiterChannels, resource: str, action: Action, pvname: str) -> None:
        super().__init__(value="", string_encoding=ENCODING, reported_record_type="stringout")
        self.owner = owner
        self.resource = resource
        self.action = action
        self.pvname = pvname

    def check_access(self, hostname: str | None, username: str | None) -> AccessRights:
        """READ|WRITE for clients whose roles may write the resource, else READ."""
        return self.owner.rights(self.resource, Client(username, hostname))

    async def auth_write(self, hostname, username, data, data_type, metadata, *, flags=0, user_address=None):
        """A client's command: act on the arbiter for it (raises if refused), then read it back."""
        client = Client.of(hostname, username, user_address)
        accepted = await self.owner.command(self, data, ChannelType(data_type), client, user_address)
        await self.write(clip_utf8(accepted, MAX_STRING_BYTES), verify_value=False)

    async def verify_value(self, data: Any) -> Any:
        """Never reached: client puts take :meth:`auth_write`."""
        raise WrongType(self.pvname, "lock commands go through the arbiter")


class ArbiterChannels:
    """The CA side of the arbiter: command channels per lockable resource, and rights refreshes.

    Built by the CA service when its server has a control layer. ``context`` is the
    running caproto context (set by :meth:`start`), whose open channels are refreshed.
    """

    def __init__(
        self,
        db: Database,
        control: Control,
        rules: AccessRules,
        prefix: str = "",
        publish: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.db = db
        self.control = control
        self.rules = rules
        self.prefix = prefix
        self.publish = publish
        """Serve a PV's pending update now (the CA service's), so a completed command shows on OWNER/QUEUE."""
        arbiter = control.arbiter
        lockable = [res for res in arbiter.resources if arbiter.lockable(res)]
        self._resource_pvs: dict[str, frozenset[str]] = {
            res: frozenset(info.name for info in db.infos() if info.resource == res) for res in lockable
        }
        """The PVs of each lockable resource (whose rights follow its lease)."""
        self.channels: dict[str, CommandChannel] = {}
        """Command channels by served name (with the prefix)."""
        for res in lockable:
            for action, name in command_pv_names(res).items():
                served = prefix + name
                self.channels[served] = CommandChannel(self, res, action, served)
        self.context: LabctlContext | None = None

    # ---- life cycle -----------------------------------------------------------------------

    def start(self, context: LabctlContext) -> None:
        """Follow lease changes on the open channels of ``context`` (running), and its closing connections."""
        self.context = context
        context.circuit_listeners.append(self.circuit_closed)

    def circuit_closed(self, hostname: str | None, username: str | None, address: Any) -> None:
        """A client connection is gone: withdraw its queued lock requests (nobody is there to use a grant).

        Its leases are left to lapse at their expiry (a closed TCP connection does not say
        whether the client meant it), as an OPC UA session that disappears.
        """
        who = self.rules.identity(Client.of(hostname, username, address))
        arbiter = self.control.arbiter
        for res in self._resource_pvs:
            for waiter in arbiter.queue(res):
                if waiter.client == who.client:
                    try:
                        self.control.release_lock(res, waiter.token, who)
                    except Refused:  # granted or gone meanwhile (audited by the core)
                        pass

    def stop(self) -> None:
        """Stop following lease changes (the context is stopping)."""
        self.context = None

    # ---- lease events -> access rights ------------------------------------------------------

    def lease_events(self, events: list[LeaseEvent]) -> None:
        """The control layer's listener (inline, never waits): queue rights refreshes on every circuit."""
        if self.context is None:
            return
        pvs: set[str] = set()
        for ev in events:
            if ev.kind in HANDOVER:
                pvs |= self._resource_pvs.get(ev.resource, frozenset())
        if pvs:
            self.context.schedule_access_rights(pvs)

    async def _refresh_own(self, resource: str, address: Any) -> None:
        """Send the commanding client its new rights on the resource before its put completes."""
        if self.context is None or address is None:
            return
        pvs = self._resource_pvs.get(resource, frozenset())
        for circuit in list(self.context.circuits):
            if circuit.circuit.address == address:
                await circuit.schedule_rights_refresh(pvs)

    # ---- commands ---------------------------------------------------------------------------

    def rights(self, resource: str, client: Client) -> AccessRights:
        """Rights on a resource's command channels: write if the client's roles may write it."""
        if self.db.policy.may_write(self.rules.identity(client), resource):
            return AccessRights.READ | AccessRights.WRITE
        return AccessRights.READ

    async def command(
        self, channel: CommandChannel, data: Any, data_type: ChannelType, client: Client, address: Any
    ) -> str:
        """Carry out a put to a command channel for ``client``; return the command as read back."""
        who = self.rules.identity(client)
        action = PolicyAction.LOCK_REQUEST if channel.action == "request" else PolicyAction.LOCK_RELEASE

        def refuse(reason: str, value: Any = None) -> NoReturn:  # a put this adapter cannot read: audited once, by the core
            raise self.db.refuse(who, InvalidArgument(reason, action=action, target=channel.resource), new=value)

        if native_type(data_type) not in VALUE_TYPES:  # alarm acknowledgements (PUT_ACKS/ACKT)
            refuse(f"{channel.pvname}: cannot write a {data_type.name} value")
        try:
            text = command_text(data, data_type)
        except ValueError:
            refuse(f"{channel.pvname}: expected UTF-8 text, got {data!r}")
        # the control layer decides (the policy, then the arbiter) and audits its refusals
        if channel.action == "request":
            try:
                request = parse_request(text)
            except ValueError as e:
                refuse(f"{channel.pvname}: {e}", text)
            self.control.request_lock(
                channel.resource, who, duration_s=request.duration_s, priority=request.priority, client=client_id(who)
            )
            accepted = str(request)
        else:
            self.control.release_lock(channel.resource, None, who, client=client_id(who))
            accepted = text
        if self.publish is not None:
            for name in lock_pv_names(channel.resource).values():
                await self.publish(name)
        await self._refresh_own(channel.resource, address)
        return accepted
