"""OPC UA for Devices (Part 100) locking of the resources, and labctl's leases on top.

Theory of operation. :class:`LockingServices` adds a lock to each lockable resource and
answers its methods for the caller's session; every decision is the core's
(:class:`labctl.server.control.ControlService`, with the caller's identity), the adapter only
translates arguments, results and refusals. :class:`labctl.server.opcua.calls.OpcUaControl`
routes the calls here.

*Nodes.* ``Objects/<site>/Resources/<resource>/Lock`` for each lockable resource: an
object of ``LockingServicesType`` (OPC UA for Devices, Part 100, namespace
``http://opcfoundation.org/UA/DI/``, ``i=6388``), with the standard properties
``Locked``, ``LockingClient``, ``LockingUser``, ``RemainingLockTime`` (ms) and methods
``InitLock(Context) -> InitLockStatus``, ``RenewLock() -> RenewLockStatus``,
``ExitLock() -> ExitLockStatus``, ``BreakLock() -> BreakLockStatus``. The DI nodeset
does not ship with asyncua, so the type is declared here with its standard NodeIds
and BrowseNames (see ``docs/decisions/opcua-control.md``). labctl adds
``RequestLock(DurationS, Priority, Wait) -> (Status, Token, ExpiresAt)``,
``RenewLease(Token, DurationS) -> ExpiresAt`` and ``ReleaseLease(Token)``: a lease of
a chosen duration, a place in the priority queue, and a token to renew or release it.
Every lease change is also a ``LeaseEventType`` event from the Lock object
(:mod:`labctl.server.opcua.control_events`).

*Who.* The lock's *client* is the session (``opcua:session-<n>@<host>``): Part 100's
InitLock/RenewLock/ExitLock act on this session's lease or queued request, a
RenewLease/ReleaseLease with a token on that lease from any session, and a ReleaseLease
without a token on the user's own lease.

*Lock state.* Locked, LockingClient and LockingUser change with every lease event
(subscribers are notified); RemainingLockTime is computed when a session reads it.

*Refusals.* Part 100's methods answer as the standard says, with a status output (0 OK,
-1 E_AlreadyLocked/E_NotLocked, -2 E_Invalid) and the reason in the session's
LastCallRefusal; a role that may not ends Bad (:data:`BadUserAccessDenied`). labctl's
methods end Bad: :data:`BadLocked` for a lock held by someone else,
:data:`BadInvalidArgument`, :data:`BadInvalidState` for a lease that is gone.

*Session end.* When a session closes cleanly (CloseSession), its leases are released
at once; when it disappears (connection lost, session timeout) they are left to lapse
at their expiry, which is what leases are for, and a client that comes back in time may
renew with its token. Either way its queued requests are withdrawn: nobody is there to
use a grant.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from asyncua import ua
from labctl.ioc.arbiter import Lease, LeaseEvent, LockHeld, LockRefused, NoLease, Waiter
from labctl.ioc.errors import LockedBy
from labctl.server.opcua import control_events
from labctl.server.opcua.arguments import (
    BOOLEAN,
    DOUBLE,
    INT32,
    STRING,
    Caller,
    MethodSpec,
    add_method,
    client_id,
    double_variant,
    initial,
    int32_variant,
    string_variant,
    type_item,
)

if TYPE_CHECKING:
    from labctl.server.control import ControlService
    from labctl.server.opcua.builders import Builder
    from labctl.server.opcua.control_events import EventQueue
    from labctl.server.opcua.sessions import LabctlInternalServer, LabctlSession

log = logging.getLogger(__name__)

_S = ua.StatusCodes

#: The namespace of OPC UA for Devices (Part 100).
DI_NAMESPACE = "http://opcfoundation.org/UA/DI/"
#: Part 100 NodeIds (numeric, in the DI namespace).
LOCKING_SERVICES_TYPE = 6388
MAX_INACTIVE_LOCK_TIME = 6387
DI_METHOD_IDS = {"InitLock": 6393, "RenewLock": 6396, "ExitLock": 6398, "BreakLock": 6400}
#: The lease an InitLock takes, and a RenewLock restores (Part 100's MaxInactiveLockTime).
PART100_LEASE_S = 60.0
#: Part 100 method status values.
E_OK = 0
E_ALREADY_LOCKED = -1
E_NOT_LOCKED = -1
E_INVALID = -2

#: RequestLock's Status output.
GRANTED = 0
QUEUED = 1

LOCK_METHODS: tuple[MethodSpec, ...] = (
    MethodSpec("InitLock", (("Context", STRING, "what the client is about to do"),), (("InitLockStatus", INT32, "0 OK, -1 E_AlreadyLocked, -2 E_Invalid"),), "lock the resource (Part 100)", di=True),
    MethodSpec("RenewLock", (), (("RenewLockStatus", INT32, "0 OK, -1 E_NotLocked"),), "renew this session's lock (Part 100)", di=True),
    MethodSpec("ExitLock", (), (("ExitLockStatus", INT32, "0 OK, -1 E_NotLocked"),), "release this session's lock (Part 100)", di=True),
    MethodSpec("BreakLock", (), (("BreakLockStatus", INT32, "0 OK, -1 E_NotLocked"),), "break anyone's lock: admins (Part 100)", di=True),
    MethodSpec(
        "RequestLock",
        (("DurationS", DOUBLE, "lease duration in seconds"), ("Priority", INT32, "higher is served first"), ("Wait", BOOLEAN, "queue if held, else fail with BadLocked")),
        (("Status", INT32, "0 granted, 1 queued"), ("Token", STRING, "renews or releases the lease"), ("ExpiresAt", DOUBLE, "UNIX seconds; 0 while queued")),
        "take the lock for a duration, or queue for it by priority then arrival",
    ),
    MethodSpec("RenewLease", (("Token", STRING, "the lease's token"), ("DurationS", DOUBLE, "new duration in seconds; 0 keeps the lease's")), (("ExpiresAt", DOUBLE, "UNIX seconds"),), "renew a lease from now"),
    MethodSpec("ReleaseLease", (("Token", STRING, "the lease's (or queued request's) token; empty: your own"),), (), "release a lease or withdraw a queued request"),
)  # fmt: skip


class LockingServices:
    """The Lock objects of the lockable resources and the answers to their method calls."""

    def __init__(
        self,
        control: ControlService,
        iserver: LabctlInternalServer,
        site: str,
        idx: int,
        di_index: int,
        events: EventQueue,
        lease_type: ua.NodeId,
    ) -> None:
        self.control = control
        self.db = control.db
        self.iserver = iserver
        self.site = site
        self.idx = idx
        self.di = di_index
        self.events = events
        self.lease_type = lease_type
        self.lockable = [r for r, cfg in control.arbiter.resources.items() if cfg.lockable]
        self.lock_objects: dict[ua.NodeId, str] = {}
        """Each Lock object's resource."""
        self.type_methods: dict[ua.NodeId, MethodSpec] = {ua.NodeId(DI_METHOD_IDS[s.name], di_index): s for s in LOCK_METHODS if s.di}
        """The type's methods (Part 100's), which clients may call on any Lock object."""
        self._lock_vars: dict[str, dict[str, ua.NodeId]] = {}
        self._remaining: dict[ua.NodeId, str] = {}

    def handlers(self) -> dict[str, Callable[..., Any]]:
        """The answer to each lock method, called with the caller, the resource and the arguments."""
        return {s.name: getattr(self, f"_m_{s.name}") for s in LOCK_METHODS}

    # ---- nodes ---------------------------------------------------------------------------------------------

    def build_type(self, b: Builder) -> list[ua.NodeId]:
        """Declare LockingServicesType; return its declarations (to be made Mandatory)."""
        di = self.di
        type_id = ua.NodeId(LOCKING_SERVICES_TYPE, di)
        b.add(type_item(type_id, ua.QualifiedName("LockingServicesType", di), ua.ObjectIds.BaseObjectType, "Part 100 locking services"))
        declarations = []
        for name, dtype in (("Locked", ua.ObjectIds.Boolean), ("LockingClient", STRING), ("LockingUser", STRING), ("RemainingLockTime", ua.ObjectIds.Duration)):
            nid = ua.NodeId(f"LockingServicesType/{name}", di)
            b.variable(nid, ua.QualifiedName(name, di), type_id, reference=ua.ObjectIds.HasProperty, typedef=ua.ObjectIds.PropertyType,
                       value=initial(dtype), datatype=ua.NodeId(dtype))  # fmt: skip
            declarations.append(nid)
        for spec in LOCK_METHODS:
            if spec.di:
                nid = ua.NodeId(DI_METHOD_IDS[spec.name], di)
                add_method(b, nid, spec, type_id, di)
                declarations.append(nid)
        return declarations

    def add_capability(self, b: Builder) -> None:
        """Part 100: MaxInactiveLockTime on ServerCapabilities."""
        b.variable(
            ua.NodeId(MAX_INACTIVE_LOCK_TIME, self.di), ua.QualifiedName("MaxInactiveLockTime", self.di),
            ua.NodeId(ua.ObjectIds.Server_ServerCapabilities), reference=ua.ObjectIds.HasProperty, typedef=ua.ObjectIds.PropertyType,
            value=ua.Variant(PART100_LEASE_S * 1000.0, ua.VariantType.Double), datatype=ua.NodeId(ua.ObjectIds.Duration),
            description="lease of InitLock and RenewLock, ms",
        )  # fmt: skip

    def build_locks(self, b: Builder, site_folder: ua.NodeId) -> list[tuple[ua.NodeId, MethodSpec, str]]:
        """The Resources folder and each lockable resource's Lock; return the method nodes ``(nodeid, spec, resource)``."""
        methods: list[tuple[ua.NodeId, MethodSpec, str]] = []
        if self.lockable:
            folder = b.object(f"/{self.site}/Resources", "Resources", site_folder)
            for res in self.lockable:
                methods += self._build_lock(b, res, folder)
        return methods

    def _build_lock(self, b: Builder, res: str, folder: ua.NodeId) -> list[tuple[ua.NodeId, MethodSpec, str]]:
        base = f"/{self.site}/Resources/{res}"
        cfg = self.control.arbiter.resources[res]
        obj = b.object(base, res, folder, ua.ObjectIds.BaseObjectType)
        lock = ua.NodeId(f"{base}/Lock", self.idx)
        attrs = ua.ObjectAttributes()
        attrs.DisplayName = ua.LocalizedText("Lock")
        attrs.Description = ua.LocalizedText(f"lock of {res}" + (f": {cfg.description}" if cfg.description else ""))
        attrs.EventNotifier = 0
        attrs.WriteMask = attrs.UserWriteMask = 0
        item = ua.AddNodesItem()
        item.RequestedNewNodeId = lock
        item.BrowseName = ua.QualifiedName("Lock", self.di)
        item.NodeClass = ua.NodeClass.Object
        item.ParentNodeId = obj
        item.ReferenceTypeId = ua.NodeId(ua.ObjectIds.HasComponent)
        item.TypeDefinition = ua.NodeId(LOCKING_SERVICES_TYPE, self.di)
        item.NodeAttributes = attrs
        b.add(item)
        self.lock_objects[lock] = res
        variables = {}
        for name, dtype in (("Locked", ua.ObjectIds.Boolean), ("LockingClient", STRING), ("LockingUser", STRING), ("RemainingLockTime", ua.ObjectIds.Duration)):
            nid = ua.NodeId(f"{base}/Lock/{name}", self.idx)
            b.variable(nid, ua.QualifiedName(name, self.di), lock, reference=ua.ObjectIds.HasProperty, typedef=ua.ObjectIds.PropertyType,
                       value=initial(dtype), datatype=ua.NodeId(dtype))  # fmt: skip
            variables[name] = nid
        self._lock_vars[res] = variables
        self._remaining[variables["RemainingLockTime"]] = res
        methods = []
        for spec in LOCK_METHODS:
            nid = ua.NodeId(f"{base}/Lock/{spec.name}", self.idx)
            add_method(b, nid, spec, lock, self.di)
            methods.append((nid, spec, res))
        return methods

    # ---- lock state -----------------------------------------------------------------------------------------

    def publish_all(self) -> None:
        """Set every Lock's variables from the arbiter."""
        for res in self.lockable:
            self._publish_lock(res)

    def on_lease_events(self, batch: list[LeaseEvent]) -> None:
        """Update the Locks a batch of lease events changed, and send their LeaseEventType events."""
        for res in {e.resource for e in batch} & set(self._lock_vars):
            self._publish_lock(res)
        for e in batch:
            if e.resource in self._lock_vars:
                lock = ua.NodeId(f"/{self.site}/Resources/{e.resource}/Lock", self.idx)
                self.events.put(control_events.lease_event(e, self.lease_type, lock))

    def _publish_lock(self, res: str) -> None:
        aspace = self.iserver.aspace
        for name, value in self._lock_values(res).items():
            attr = aspace[self._lock_vars[res][name]].attributes[ua.AttributeIds.Value]
            self.events.changed(attr, ua.DataValue(value))

    def _lock_values(self, res: str) -> dict[str, ua.Variant]:
        now = self.db.clock()
        lease = self.control.arbiter.holder(res)
        live = lease is not None and lease.expires_at > now
        return {
            "Locked": ua.Variant(live, ua.VariantType.Boolean),
            "LockingClient": ua.Variant(lease.client if live and lease else "", ua.VariantType.String),
            "LockingUser": ua.Variant(lease.user if live and lease else "", ua.VariantType.String),
            "RemainingLockTime": ua.Variant(lease.remaining(now) * 1000.0 if live and lease else 0.0, ua.VariantType.Double),
        }

    def session_value(self, nodeid: ua.NodeId) -> ua.Variant | None:
        """The value of a variable computed at the time of reading (RemainingLockTime), or None."""
        res = self._remaining.get(nodeid)
        return self._lock_values(res)["RemainingLockTime"] if res is not None else None

    def session_closed(self, session: LabctlSession, clean: bool) -> None:
        """Release a closing session's leases (clean close only) and withdraw its queued requests."""
        client = client_id(session)
        arbiter = self.control.arbiter
        for res in self.lockable:
            tokens = [w.token for w in arbiter.queue(res) if w.client == client]
            lease = arbiter.holder(res)
            if clean and lease is not None and lease.client == client:
                tokens.insert(0, lease.token)
            for token in tokens:
                try:
                    self.control.release_lock(res, token, session.identity)
                except LockRefused as e:  # gone meanwhile
                    log.debug("releasing %s for a closed session: %s", res, e)

    # ---- Part 100 locking ---------------------------------------------------------------------------------

    def _own(self, res: str, client: str) -> tuple[Lease | None, Waiter | None]:
        arbiter = self.control.arbiter
        lease = arbiter.holder(res)
        waiter = next((w for w in arbiter.queue(res) if w.client == client), None)
        return (lease if lease is not None and lease.client == client else None), waiter

    # Part 100's methods answer a refusal of the lock's state with their status output
    # (E_AlreadyLocked, E_NotLocked, E_Invalid) and Good; a refusal of permission ends Bad.
    # Either way the core decided and audited it, once.

    def _m_InitLock(self, c: Caller, res: str, context: str) -> list[ua.Variant]:  # noqa: N802 -- the standard's name
        try:
            self.control.request_lock(res, c.identity, duration_s=PART100_LEASE_S, client=c.client, wait=False, exclusive=True)
        except LockHeld as e:
            c.note, c.refusal = f"{e.reason} (client {self.control.arbiter.holder(res).client})" if self.control.arbiter.holder(res) else e.reason, e
            return [int32_variant(E_ALREADY_LOCKED)]
        except LockRefused as e:
            c.note, c.refusal = str(e), e
            return [int32_variant(E_INVALID)]
        if context:
            log.info("%s locked %s over OPC UA: %s", c.identity, res, context)
        return [int32_variant(E_OK)]

    def _m_RenewLock(self, c: Caller, res: str) -> list[ua.Variant]:  # noqa: N802
        try:
            self.control.renew_lock(res, None, c.identity, PART100_LEASE_S, client=c.client)
        except NoLease as e:
            c.note, c.refusal = f"{self._held_by(res)}; this session holds no lock on it", e
            return [int32_variant(E_NOT_LOCKED)]
        return [int32_variant(E_OK)]

    def _m_ExitLock(self, c: Caller, res: str) -> list[ua.Variant]:  # noqa: N802
        try:
            self.control.release_lock(res, None, c.identity, client=c.client)
        except NoLease as e:
            c.note, c.refusal = f"{self._held_by(res)}; this session holds no lock on it", e
            return [int32_variant(E_NOT_LOCKED)]
        return [int32_variant(E_OK)]

    def _m_BreakLock(self, c: Caller, res: str) -> list[ua.Variant]:  # noqa: N802
        try:
            self.control.break_lock(res, c.identity, f"BreakLock over OPC UA by {c.identity.user}")
        except NoLease as e:
            c.note, c.refusal = f"resource {res!r} is not locked", e
            return [int32_variant(E_NOT_LOCKED)]
        return [int32_variant(E_OK)]

    def _held_by(self, res: str) -> str:
        lease = self.control.arbiter.holder(res)
        if lease is None:
            return f"resource {res!r} is not locked"
        return LockedBy("", res, lease.user, lease.expires_at, lease.job).reason + f" (client {lease.client})"

    def _m_RequestLock(self, c: Caller, res: str, duration_s: float, priority: int, wait: bool) -> list[ua.Variant]:  # noqa: N802
        got = self.control.request_lock(res, c.identity, duration_s=duration_s, priority=priority, client=c.client, wait=wait)
        if isinstance(got, Lease):
            return [int32_variant(GRANTED), string_variant(got.token), double_variant(got.expires_at)]
        return [int32_variant(QUEUED), string_variant(got.token), double_variant(0.0)]

    def _m_RenewLease(self, c: Caller, res: str, token: str, duration_s: float) -> list[ua.Variant]:  # noqa: N802
        lease = self.control.renew_lock(res, token, c.identity, duration_s or None)  # 0: the lease's own duration
        return [double_variant(lease.expires_at)]

    def _m_ReleaseLease(self, c: Caller, res: str, token: str) -> list[ua.Variant]:  # noqa: N802
        self.control.release_lock(res, token or None, c.identity)
        return []
