"""The control layer over OPC UA: locks (Part 100 LockingServices), jobs, alarms, interlocks, audit.

Theory of operation. :class:`OpcUaControl` adds nodes to the site's address space and
answers their method calls for the caller's session; every decision is the core's
(:class:`server.control.ControlService`, with the caller's identity), the adapter only
translates arguments, results and refusals.

*Nodes.*

* ``Objects/<site>/Resources/<resource>/Lock`` for each lockable resource: an object of
  ``LockingServicesType`` (OPC UA for Devices, Part 100, namespace
  ``http://opcfoundation.org/UA/DI/``, ``i=6388``), with the standard properties
  ``Locked``, ``LockingClient``, ``LockingUser``, ``RemainingLockTime`` (ms) and methods
  ``InitLock(Context) -> InitLockStatus``, ``RenewLock() -> RenewLockStatus``,
  ``ExitLock() -> ExitLockStatus``, ``BreakLock() -> BreakLockStatus``. The DI nodeset
  does not ship with asyncua, so the type is declared here with its standard NodeIds
  and BrowseNames (see ``docs/decisions/opcua-control.md``). labctl adds
  ``RequestLock(DurationS, Priority, Wait) -> (Status, Token, ExpiresAt)``,
  ``RenewLease(Token, DurationS) -> ExpiresAt`` and ``ReleaseLease(Token)``: a lease of
  a chosen duration, a place in the priority queue, and a token to renew or release it.
* ``Objects/<site>/Control``: the jobs, alarm, interlock and audit methods
  (:data:`CONTROL_METHODS`); structured results are JSON strings (schemas in the
  decision record).
* Event types ``LeaseEventType`` and ``InterlockEventType`` (:mod:`server.opcua.events`).

*Who.* A method acts for the session's identity. The lock's *client* is the session
(``opcua:session-<n>@<host>``): Part 100's InitLock/RenewLock/ExitLock act on this
session's lease or queued request, a RenewLease/ReleaseLease with a token on that lease
from any session, and a ReleaseLease without a token on the user's own lease.

*Lock state.* Locked, LockingClient and LockingUser change with every lease event
(subscribers are notified); RemainingLockTime is computed when a session reads it.

*Refusals.* A refused call ends Bad (:data:`BadUserAccessDenied` for roles,
:data:`BadLocked` for a lock held by someone else, :data:`BadInvalidArgument`,
:data:`BadInvalidState`...) and its sentence is kept for the session in
``Objects/<site>/Session/LastCallRefusal`` as ``<Method>: <reason>``. Part 100's
methods answer as the standard says, with a status output (0 OK, -1
E_AlreadyLocked/E_NotLocked, -2 E_Invalid) and the reason in LastCallRefusal too.

*Session end.* When a session closes cleanly (CloseSession), its leases are released
at once; when it disappears (connection lost, session timeout) they are left to lapse
at their expiry, which is what leases are for, and a client that comes back in time may
renew with its token. Either way its queued requests are withdrawn: nobody is there to
use a grant.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from asyncua import ua

from ioc.alarms import AlarmError, AlarmEvent
from ioc.arbiter import Lease, LeaseEvent, LockError, Waiter
from ioc.errors import LockedBy, PermissionDenied
from ioc.interlocks import InterlockError, Transition
from ioc.jobs import Job, JobError
from ioc.types import Identity, Severity, Status
from server.control import ControlDenied
from server.opcua import events
from server.opcua.address_space import Builder, SiteNodes

if TYPE_CHECKING:
    from server.control import ControlService
    from server.opcua.sessions import LabctlInternalServer, LabctlSession

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

_STRING = ua.ObjectIds.String
_DOUBLE = ua.ObjectIds.Double
_INT32 = ua.ObjectIds.Int32
_INT64 = ua.ObjectIds.Int64
_BOOLEAN = ua.ObjectIds.Boolean
_BYTES = ua.ObjectIds.ByteString
_TEXT = ua.ObjectIds.LocalizedText

#: Part 9's Acknowledge method (AcknowledgeableConditionType), called on a ConditionId.
ACKNOWLEDGE = ua.NodeId(ua.ObjectIds.AcknowledgeableConditionType_Acknowledge)


@dataclass(frozen=True)
class MethodSpec:
    """A method's name, arguments ``(name, DataType id, description)`` and what it does."""

    name: str
    inputs: tuple[tuple[str, int, str], ...] = ()
    outputs: tuple[tuple[str, int, str], ...] = ()
    description: str = ""
    di: bool = False
    """Its BrowseName is in the DI namespace (Part 100's own methods)."""


_JSON = (("Json", _STRING, "the result as JSON (schema in the labctl documentation)"),)

LOCK_METHODS: tuple[MethodSpec, ...] = (
    MethodSpec("InitLock", (("Context", _STRING, "what the client is about to do"),), (("InitLockStatus", _INT32, "0 OK, -1 E_AlreadyLocked, -2 E_Invalid"),), "lock the resource (Part 100)", di=True),
    MethodSpec("RenewLock", (), (("RenewLockStatus", _INT32, "0 OK, -1 E_NotLocked"),), "renew this session's lock (Part 100)", di=True),
    MethodSpec("ExitLock", (), (("ExitLockStatus", _INT32, "0 OK, -1 E_NotLocked"),), "release this session's lock (Part 100)", di=True),
    MethodSpec("BreakLock", (), (("BreakLockStatus", _INT32, "0 OK, -1 E_NotLocked"),), "break anyone's lock: admins (Part 100)", di=True),
    MethodSpec(
        "RequestLock",
        (("DurationS", _DOUBLE, "lease duration in seconds"), ("Priority", _INT32, "higher is served first"), ("Wait", _BOOLEAN, "queue if held, else fail with BadLocked")),
        (("Status", _INT32, "0 granted, 1 queued"), ("Token", _STRING, "renews or releases the lease"), ("ExpiresAt", _DOUBLE, "UNIX seconds; 0 while queued")),
        "take the lock for a duration, or queue for it by priority then arrival",
    ),
    MethodSpec("RenewLease", (("Token", _STRING, "the lease's token"), ("DurationS", _DOUBLE, "new duration in seconds; 0 keeps the lease's")), (("ExpiresAt", _DOUBLE, "UNIX seconds"),), "renew a lease from now"),
    MethodSpec("ReleaseLease", (("Token", _STRING, "the lease's (or queued request's) token; empty: your own"),), (), "release a lease or withdraw a queued request"),
)  # fmt: skip

CONTROL_METHODS: tuple[MethodSpec, ...] = (
    MethodSpec("ListLocks", (), _JSON, "every resource's lock: holder, expiry, queue"),
    MethodSpec("ListProcedures", (), _JSON, "the procedures jobs run, with their parameters"),
    MethodSpec("SubmitTask", (("Procedure", _STRING, "procedure name"), ("ParamsJson", _STRING, "parameters as a JSON object"), ("Priority", _INT32, "higher runs first")), (("JobId", _INT64, "the new job's id"),), "queue a job"),
    MethodSpec("CancelTask", (("JobId", _INT64, "the job"),), (), "cancel a queued or running job: its owner or an admin"),
    MethodSpec("ListJobs", (("MineOnly", _BOOLEAN, "only this user's jobs"),), _JSON, "jobs, newest first"),
    MethodSpec("GetJob", (("JobId", _INT64, "the job"),), _JSON, "a job with its log and results: its owner or an admin"),
    MethodSpec("ListAudit", (("SinceUnix", _DOUBLE, "UNIX seconds"), ("User", _STRING, "only this user (empty: all)"), ("PV", _STRING, "only this PV or target (empty: all)")), _JSON, "the audit trail"),
    MethodSpec("ListAlarms", (("ActiveOnly", _BOOLEAN, "only alarms that need attention"),), _JSON, "alarm states"),
    MethodSpec("AcknowledgeAlarm", (("Source", _STRING, "the PV in alarm"), ("Comment", _STRING, "why, what was done")), (), "acknowledge an alarm"),
    MethodSpec("ShelveAlarm", (("Source", _STRING, "the PV in alarm"), ("DurationS", _DOUBLE, "seconds"), ("Reason", _STRING, "why (required)")), (), "silence an alarm for a while: experts"),
    MethodSpec("UnshelveAlarm", (("Source", _STRING, "the PV"),), (), "end shelving early: experts"),
    MethodSpec("ListInterlocks", (), _JSON, "interlock states"),
    MethodSpec("ResetInterlock", (("Name", _STRING, "the interlock"),), (), "reset an interlock waiting for it: its reset roles"),
)  # fmt: skip

_ACKNOWLEDGE_SPEC = MethodSpec("Acknowledge", (("EventId", _BYTES, ""), ("Comment", _TEXT, "")), (), "Part 9 Acknowledge")


class Refused(Exception):
    """A method call refused with a StatusCode and a sentence."""

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(reason)


@dataclass
class Caller:
    """Who calls, from which session; ``note`` is the reason of a non-zero Part 100 status."""

    session: LabctlSession
    identity: Identity
    client: str
    note: str = ""


@dataclass(frozen=True)
class _Target:
    spec: MethodSpec
    resource: str | None = None
    source: str | None = None


def client_id(session: Any) -> str:
    """The lock client of an OPC UA session."""
    return f"opcua:session-{session.session_id.Identifier}@{session.host or '?'}"


def to_json(value: Any) -> ua.Variant:
    """A JSON string Variant (tuples as lists; NaN and infinities as JSON's non-standard literals, which Python reads)."""
    return ua.Variant(json.dumps(value, default=_plain, separators=(",", ":")), ua.VariantType.String)


def _plain(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, bytes):
        return value.hex()
    return repr(value)


# ---- JSON views of the core's state ------------------------------------------------------------------


def job_json(job: Job, *, detail: bool = False) -> dict[str, Any]:
    """A job as JSON data; ``detail`` adds its log and results."""
    out = job.summary()
    if detail:
        out["log"] = [[t, line] for t, line in job.log]
        out["results"] = [
            {"time": r.time, "pv": r.pv, "value": r.value, "severity": Severity(r.severity).name, "status": Status(r.status).name, "label": r.label}
            for r in job.results
        ]
    return out


def lock_json(control: ControlService, resource: str) -> dict[str, Any]:
    """A resource's lock state as JSON data."""
    arbiter = control.arbiter
    cfg = arbiter.resources[resource]
    lease = arbiter.holder(resource) if cfg.lockable else None
    live = lease is not None and lease.expires_at > control.db.clock()
    return {
        "resource": resource,
        "description": cfg.description,
        "lockable": cfg.lockable,
        "max_lease_s": cfg.max_lease_s,
        "owner": lease.user if live and lease else "",
        "client": lease.client if live and lease else "",
        "priority": lease.priority if live and lease else None,
        "job": lease.job if live and lease else None,
        "expires_at": lease.expires_at if live and lease else None,
        "queue": [{"user": w.user, "priority": w.priority, "client": w.client, "requested_at": w.requested_at} for w in (arbiter.queue(resource) if cfg.lockable else [])],
    }  # fmt: skip


class OpcUaControl:
    """The control nodes of one OPC UA service and the answers to their method calls."""

    def __init__(self, control: ControlService, iserver: LabctlInternalServer, nodes: SiteNodes, site: str, di_index: int) -> None:
        self.control = control
        self.db = control.db
        self.iserver = iserver
        self.nodes = nodes
        self.site = site
        self.idx = nodes.namespace_index
        self.di = di_index
        self.lockable = [r for r, cfg in control.arbiter.resources.items() if cfg.lockable]
        self._targets: dict[ua.NodeId, _Target] = {}
        self._lock_objects: dict[ua.NodeId, str] = {}
        self._lock_vars: dict[str, dict[str, ua.NodeId]] = {}
        self._remaining: dict[ua.NodeId, str] = {}
        self._type_methods = {ua.NodeId(i, di_index): name for name, i in DI_METHOD_IDS.items()}
        self._lock_specs = {s.name: s for s in LOCK_METHODS}
        self._recent_events: dict[str, deque[bytes]] = {}
        self._last_severity: dict[str, int] = {}
        self._mandatory: list[ua.NodeId] = []
        self.events = events.EventQueue(iserver)
        self.lease_type = events.event_type_id("LeaseEventType", site, self.idx)
        self.interlock_type = events.event_type_id("InterlockEventType", site, self.idx)
        self._handlers: dict[str, Callable[..., Any]] = {
            s.name: getattr(self, f"_m_{s.name}") for s in (*LOCK_METHODS, *CONTROL_METHODS)
        }
        self._running = False

    # ---- nodes ---------------------------------------------------------------------------------------------

    def build(self) -> None:
        """Create the types, the Control object and the resources' Lock objects (before the server starts)."""
        b = Builder(self.iserver, self.idx)
        self._build_types(b)
        b.flush()
        base = f"/{self.site}"
        control = b.object(f"{base}/Control", "Control", self.nodes.site_folder, ua.ObjectIds.BaseObjectType)
        for spec in CONTROL_METHODS:
            self._method(b, ua.NodeId(f"{base}/Control/{spec.name}", self.idx), spec, control)
        if self.lockable:
            folder = b.object(f"{base}/Resources", "Resources", self.nodes.site_folder)
            for res in self.lockable:
                self._build_lock(b, res, folder)
        b.flush()
        self._capability(b)

    def _build_types(self, b: Builder) -> None:
        di = self.di
        type_id = ua.NodeId(LOCKING_SERVICES_TYPE, di)
        b.add(_type_item(type_id, ua.QualifiedName("LockingServicesType", di), ua.ObjectIds.BaseObjectType, "Part 100 locking services"))
        declarations = []
        for name, dtype in (("Locked", ua.ObjectIds.Boolean), ("LockingClient", _STRING), ("LockingUser", _STRING), ("RemainingLockTime", ua.ObjectIds.Duration)):
            nid = ua.NodeId(f"LockingServicesType/{name}", di)
            b.variable(nid, ua.QualifiedName(name, di), type_id, reference=ua.ObjectIds.HasProperty, typedef=ua.ObjectIds.PropertyType,
                       value=_initial(dtype), datatype=ua.NodeId(dtype))  # fmt: skip
            declarations.append(nid)
        for spec in LOCK_METHODS:
            if spec.di:
                nid = ua.NodeId(DI_METHOD_IDS[spec.name], di)
                self._method(b, nid, spec, type_id, target=False)
                declarations.append(nid)
        for name, fields in events.EVENT_TYPES.items():
            tid = events.event_type_id(name, self.site, self.idx)
            b.add(_type_item(tid, ua.QualifiedName(name, self.idx), ua.ObjectIds.BaseEventType, f"labctl {name}"))
            for field, doc in fields:
                nid = ua.NodeId(f"{tid.Identifier}/{field}", self.idx)
                b.variable(nid, ua.QualifiedName(field, self.idx), tid, reference=ua.ObjectIds.HasProperty, typedef=ua.ObjectIds.PropertyType,
                           value=ua.Variant("", ua.VariantType.String), datatype=ua.NodeId(_STRING), description=doc)  # fmt: skip
                declarations.append(nid)
        self._mandatory = declarations

    def _capability(self, b: Builder) -> None:
        # Part 100: MaxInactiveLockTime on ServerCapabilities; and the type's declarations are Mandatory.
        b.variable(
            ua.NodeId(MAX_INACTIVE_LOCK_TIME, self.di), ua.QualifiedName("MaxInactiveLockTime", self.di),
            ua.NodeId(ua.ObjectIds.Server_ServerCapabilities), reference=ua.ObjectIds.HasProperty, typedef=ua.ObjectIds.PropertyType,
            value=ua.Variant(PART100_LEASE_S * 1000.0, ua.VariantType.Double), datatype=ua.NodeId(ua.ObjectIds.Duration),
            description="lease of InitLock and RenewLock, ms",
        )  # fmt: skip
        refs = []
        for nid in self._mandatory:
            ref = ua.AddReferencesItem()
            ref.SourceNodeId = nid
            ref.ReferenceTypeId = ua.NodeId(ua.ObjectIds.HasModellingRule)
            ref.IsForward = True
            ref.TargetNodeId = ua.NodeId(ua.ObjectIds.ModellingRule_Mandatory)
            ref.TargetNodeClass = ua.NodeClass.Object
            refs.append(ref)
        b.flush()  # the declarations must exist before references are added to them
        for ref, status in zip(refs, self.iserver.node_mgt_service.add_references(refs), strict=True):
            if not status.is_good():
                raise RuntimeError(f"cannot add a modelling rule to {ref.SourceNodeId}: {status.name}")

    def _build_lock(self, b: Builder, res: str, folder: ua.NodeId) -> None:
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
        self._lock_objects[lock] = res
        variables = {}
        for name, dtype in (("Locked", ua.ObjectIds.Boolean), ("LockingClient", _STRING), ("LockingUser", _STRING), ("RemainingLockTime", ua.ObjectIds.Duration)):
            nid = ua.NodeId(f"{base}/Lock/{name}", self.idx)
            b.variable(nid, ua.QualifiedName(name, self.di), lock, reference=ua.ObjectIds.HasProperty, typedef=ua.ObjectIds.PropertyType,
                       value=_initial(dtype), datatype=ua.NodeId(dtype))  # fmt: skip
            variables[name] = nid
        self._lock_vars[res] = variables
        self._remaining[variables["RemainingLockTime"]] = res
        for spec in LOCK_METHODS:
            self._method(b, ua.NodeId(f"{base}/Lock/{spec.name}", self.idx), spec, lock, resource=res)

    def _method(self, b: Builder, nid: ua.NodeId, spec: MethodSpec, parent: ua.NodeId, *, resource: str | None = None, target: bool = True) -> None:
        b.method(
            nid,
            ua.QualifiedName(spec.name, self.di if spec.di else self.idx),
            parent,
            inputs=[_argument(*a) for a in spec.inputs],
            outputs=[_argument(*a) for a in spec.outputs],
            description=spec.description,
        )
        if target:
            self._targets[nid] = _Target(spec, resource)

    # ---- life cycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Follow the core: lease, alarm and interlock changes become variable updates and events."""
        self._running = True
        self.events.start()
        self.control.on_lease_events(self._on_lease_events)
        self.control.alarms.on_event(self._on_alarm_event)
        self.control.interlocks.on_transition(self._on_interlock)
        for res in self.lockable:
            self._publish_lock(res)
        # Alarms already active: retained conditions, for a client's ConditionRefresh.
        now = self.db.clock()
        for alarm in self.control.alarms.table.active(now, include_shelved=True):
            self._on_alarm_event(AlarmEvent("raised", alarm, alarm.since))

    async def stop(self) -> None:
        """Stop following the core (its listeners stay registered and do nothing)."""
        self._running = False
        await self.events.stop()

    # ---- following the core -------------------------------------------------------------------------------

    def _on_lease_events(self, batch: list[LeaseEvent]) -> None:
        if not self._running:
            return
        for res in {e.resource for e in batch} & set(self._lock_vars):
            self._publish_lock(res)
        for e in batch:
            if e.resource in self._lock_vars:
                lock = ua.NodeId(f"/{self.site}/Resources/{e.resource}/Lock", self.idx)
                self.events.put(events.lease_event(e, self.lease_type, lock))

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

    def _on_alarm_event(self, ev: AlarmEvent) -> None:
        if not self._running:
            return
        source = ev.alarm.source
        if source not in self.nodes.pvs:
            return
        event, event_id = events.condition_event(ev, self.idx, self._last_severity.get(source, 1), self.db.clock())
        self._last_severity[source] = event.Severity
        self._recent_events.setdefault(source, deque(maxlen=16)).append(event_id)
        self.events.put(event)

    def _on_interlock(self, t: Transition) -> None:
        if self._running:
            self.events.put(events.interlock_event(t, self.interlock_type, self.idx))

    def session_closed(self, session: LabctlSession, clean: bool) -> None:
        """Release a closing session's leases (clean close only) and withdraw its queued requests."""
        if not self._running:
            return
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
                except LockError as e:  # gone meanwhile
                    log.debug("releasing %s for a closed session: %s", res, e)

    # ---- method calls -------------------------------------------------------------------------------------

    def handles(self, req: ua.CallMethodRequest) -> bool:
        """Whether a method call is one of ours."""
        return self._target(req) is not None

    def _target(self, req: ua.CallMethodRequest) -> _Target | None:
        target = self._targets.get(req.MethodId)
        if target is not None:
            return target if target.resource is None or req.ObjectId in self._lock_objects else None
        name = self._type_methods.get(req.MethodId)
        if name is not None and req.ObjectId in self._lock_objects:  # the type's method called on an instance
            return _Target(self._lock_specs[name], self._lock_objects[req.ObjectId])
        if req.MethodId == ACKNOWLEDGE:
            source = events.source_of_condition(req.ObjectId, self.idx)
            if source is not None:
                return _Target(_ACKNOWLEDGE_SPEC, source=source)
        return None

    async def call(self, session: LabctlSession, req: ua.CallMethodRequest) -> ua.CallMethodResult:
        """Answer one method call of ``session``."""
        target = self._target(req)
        assert target is not None
        spec = target.spec
        result = ua.CallMethodResult()
        given = list(req.InputArguments or [])
        if len(given) != len(spec.inputs):
            code = _S.BadArgumentsMissing if len(given) < len(spec.inputs) else _S.BadTooManyArguments
            reason = f"expected {len(spec.inputs)} argument(s) ({', '.join(a[0] for a in spec.inputs) or 'none'}), got {len(given)}"
            return self._refuse(session, spec, result, code, reason)
        values, problems = [], []
        for (name, dtype, _), variant in zip(spec.inputs, given, strict=True):
            try:
                values.append(_coerce(variant, dtype))
                problems.append(ua.StatusCode())
            except TypeError as e:
                problems.append(ua.StatusCode(_S.BadTypeMismatch))
                values.append(f"{name}: {e}")
        if any(not p.is_good() for p in problems):
            result.InputArgumentResults = problems
            bad = "; ".join(v for v, p in zip(values, problems, strict=True) if not p.is_good())
            return self._refuse(session, spec, result, _S.BadInvalidArgument, bad)
        caller = Caller(session, session.identity, client_id(session))
        try:
            if spec is _ACKNOWLEDGE_SPEC:
                outputs = self._acknowledge_condition(caller, target.source or "", *values)
            elif target.resource is not None:
                outputs = self._handlers[spec.name](caller, target.resource, *values)
            else:
                outputs = self._handlers[spec.name](caller, *values)
            if inspect.isawaitable(outputs):
                outputs = await outputs
        except Refused as r:
            return self._refuse(session, spec, result, r.code, r.reason)
        except Exception:  # a bug in the core or here: report it once, keep serving
            log.exception("OPC UA method %s by %s failed unexpectedly", spec.name, caller.identity)
            return self._refuse(session, spec, result, _S.BadInternalError, "internal server error (see the server log)")
        result.OutputArguments = outputs
        result.InputArgumentResults = problems
        session.last_call_refusal = f"{spec.name}: {caller.note}" if caller.note else ""
        return result

    def _refuse(self, session: LabctlSession, spec: MethodSpec, result: ua.CallMethodResult, code: int, reason: str) -> ua.CallMethodResult:
        session.last_call_refusal = f"{spec.name}: {reason}"
        log.info("opcua call %s by %s -> %s: %s", spec.name, session.identity, ua.StatusCode(code).name, reason)
        result.StatusCode = ua.StatusCode(code)
        return result

    # ---- Part 100 locking ---------------------------------------------------------------------------------

    def _own(self, res: str, client: str) -> tuple[Lease | None, Waiter | None]:
        arbiter = self.control.arbiter
        lease = arbiter.holder(res)
        waiter = next((w for w in arbiter.queue(res) if w.client == client), None)
        return (lease if lease is not None and lease.client == client else None), waiter

    def _held_by(self, res: str) -> str:
        lease = self.control.arbiter.holder(res)
        if lease is None:
            return f"resource {res!r} is not locked"
        return LockedBy("", res, lease.user, lease.expires_at, lease.job).reason + f" (client {lease.client})"

    def _m_InitLock(self, c: Caller, res: str, context: str) -> list[ua.Variant]:  # noqa: N802 -- the standard's name
        arbiter = self.control.arbiter
        if arbiter.holder(res) is not None or arbiter.queue(res):
            c.note = self._held_by(res) if arbiter.holder(res) is not None else f"resource {res!r} has {len(arbiter.queue(res))} request(s) waiting"
            return [_int32(E_ALREADY_LOCKED)]
        try:
            self.control.request_lock(res, c.identity, duration_s=PART100_LEASE_S, client=c.client, wait=False)
        except PermissionDenied as e:
            raise Refused(_S.BadUserAccessDenied, f"user {c.identity.user!r} may not write resource {res!r}, so may not lock it") from e
        except LockedBy as e:
            c.note = e.reason
            return [_int32(E_ALREADY_LOCKED)]
        except LockError as e:
            c.note = str(e)
            return [_int32(E_INVALID)]
        if context:
            log.info("%s locked %s over OPC UA: %s", c.identity, res, context)
        return [_int32(E_OK)]

    def _m_RenewLock(self, c: Caller, res: str) -> list[ua.Variant]:  # noqa: N802
        lease, _ = self._own(res, c.client)
        if lease is None:
            c.note = f"{self._held_by(res)}; this session holds no lock on it"
            return [_int32(E_NOT_LOCKED)]
        self.control.renew_lock(res, lease.token, PART100_LEASE_S)
        return [_int32(E_OK)]

    def _m_ExitLock(self, c: Caller, res: str) -> list[ua.Variant]:  # noqa: N802
        lease, waiter = self._own(res, c.client)
        mine = lease or waiter
        if mine is None:
            c.note = f"{self._held_by(res)}; this session holds no lock on it"
            return [_int32(E_NOT_LOCKED)]
        self.control.release_lock(res, mine.token, c.identity)
        return [_int32(E_OK)]

    def _m_BreakLock(self, c: Caller, res: str) -> list[ua.Variant]:  # noqa: N802
        if self.control.arbiter.holder(res) is None:
            c.note = f"resource {res!r} is not locked"
            return [_int32(E_NOT_LOCKED)]
        try:
            self.control.break_lock(res, c.identity, f"BreakLock over OPC UA by {c.identity.user}")
        except PermissionDenied as e:
            raise Refused(_S.BadUserAccessDenied, f"user {c.identity.user!r} may not break locks (admins only)") from e
        return [_int32(E_OK)]

    def _m_RequestLock(self, c: Caller, res: str, duration_s: float, priority: int, wait: bool) -> list[ua.Variant]:  # noqa: N802
        _positive("DurationS", duration_s)
        try:
            got = self.control.request_lock(res, c.identity, duration_s=duration_s, priority=priority, client=c.client, wait=wait)
        except PermissionDenied as e:
            raise Refused(_S.BadUserAccessDenied, f"user {c.identity.user!r} may not write resource {res!r}, so may not lock it") from e
        except LockedBy as e:
            raise Refused(_S.BadLocked, e.reason) from e
        except LockError as e:
            raise Refused(_S.BadInvalidArgument, str(e)) from e
        if isinstance(got, Lease):
            return [_int32(GRANTED), _string(got.token), _double(got.expires_at)]
        return [_int32(QUEUED), _string(got.token), _double(0.0)]

    def _m_RenewLease(self, c: Caller, res: str, token: str, duration_s: float) -> list[ua.Variant]:  # noqa: N802
        if not math.isfinite(duration_s) or duration_s < 0:
            raise Refused(_S.BadInvalidArgument, f"DurationS must be a positive number of seconds (0: the lease's own), got {duration_s}")
        try:
            lease = self.control.renew_lock(res, token, duration_s or None)
        except LockError as e:
            raise Refused(_S.BadInvalidState, str(e)) from e
        return [_double(lease.expires_at)]

    def _m_ReleaseLease(self, c: Caller, res: str, token: str) -> list[ua.Variant]:  # noqa: N802
        try:
            self.control.release_lock(res, token or None, c.identity)
        except LockError as e:
            raise Refused(_S.BadInvalidState, str(e)) from e
        return []

    # ---- locks, jobs, audit -----------------------------------------------------------------------------

    def _m_ListLocks(self, c: Caller) -> list[ua.Variant]:  # noqa: N802
        return [to_json([lock_json(self.control, r) for r in self.control.arbiter.resources])]

    def _m_ListProcedures(self, c: Caller) -> list[ua.Variant]:  # noqa: N802
        policy, out = self.db.policy, []
        for name, proc in self.control.jobs.procedures.items():
            params = {p: {"type": cfg.type, "default": cfg.default, "description": cfg.description, "min": cfg.min, "max": cfg.max} for p, cfg in proc.params.items()}
            allowed = bool(set(c.identity.roles) & set(proc.roles)) or policy.can(c.identity, "admin")
            out.append({"name": name, "description": proc.description, "resources": list(proc.resources), "params": params, "roles": list(proc.roles), "may_submit": allowed})
        return [to_json(out)]

    def _m_SubmitTask(self, c: Caller, procedure: str, params_json: str, priority: int) -> list[ua.Variant]:  # noqa: N802
        try:
            params = json.loads(params_json) if params_json.strip() else {}
        except ValueError as e:
            raise Refused(_S.BadInvalidArgument, f"ParamsJson is not JSON: {e}") from e
        if not isinstance(params, dict):
            raise Refused(_S.BadInvalidArgument, f"ParamsJson must be a JSON object of parameters, got {type(params).__name__}")
        try:
            job = self.control.submit_job(procedure, params, c.identity, priority=priority)
        except JobError as e:
            proc = self.control.jobs.procedures.get(procedure)
            denied = proc is not None and not (set(c.identity.roles) & set(proc.roles)) and not self.db.policy.can(c.identity, "admin")
            raise Refused(_S.BadUserAccessDenied if denied else _S.BadInvalidArgument, str(e)) from e
        return [ua.Variant(job.id, ua.VariantType.Int64)]

    def _m_CancelTask(self, c: Caller, job_id: int) -> list[ua.Variant]:  # noqa: N802
        try:
            self.control.cancel_job(job_id, c.identity)
        except JobError as e:
            job = self.control.jobs.jobs.get(job_id)
            if job is None:
                code = _S.BadInvalidArgument
            elif job.owner != c.identity.user and not self.db.policy.can(c.identity, "admin"):
                code = _S.BadUserAccessDenied
            else:
                code = _S.BadInvalidState
            raise Refused(code, str(e)) from e
        return []

    def _m_ListJobs(self, c: Caller, mine_only: bool) -> list[ua.Variant]:  # noqa: N802
        jobs = self.control.jobs.list(c.identity.user if mine_only else None)
        return [to_json([job_json(j) for j in jobs])]

    def _m_GetJob(self, c: Caller, job_id: int) -> list[ua.Variant]:  # noqa: N802
        try:
            job = self.control.job_detail(job_id, c.identity)
        except JobError as e:
            raise Refused(_S.BadInvalidArgument, str(e)) from e
        except ControlDenied as e:
            raise Refused(_S.BadUserAccessDenied, str(e)) from e
        return [to_json(job_json(job, detail=True))]

    async def _m_ListAudit(self, c: Caller, since: float, user: str, pv: str) -> list[ua.Variant]:  # noqa: N802
        try:
            records = await self.control.read_audit(c.identity, since, user=user or None, target=pv or None)
        except ControlDenied as e:
            raise Refused(_S.BadUserAccessDenied, str(e)) from e
        keys = ("time", "action", "user", "protocol", "host", "target", "old", "new", "accepted", "reason")
        return [to_json([{k: getattr(r, k) for k in keys} for r in records])]

    # ---- alarms and interlocks -------------------------------------------------------------------------

    def _m_ListAlarms(self, c: Caller, active_only: bool) -> list[ua.Variant]:  # noqa: N802
        table = self.control.alarms.table
        now = self.db.clock()
        alarms = table.active(now, include_shelved=True) if active_only else table.all()
        out = [
            {
                "source": a.source, "severity": a.latched.name, "current": a.current.name, "status": a.status.name,
                "acked": a.acked, "active": a.active, "latch": a.latch, "value": a.value, "message": a.message,
                "guidance": a.guidance, "since": a.since, "shelved_until": a.shelved_until if a.shelved(now) else None,
                "shelved_by": a.shelved_by, "shelve_reason": a.shelve_reason,
            }
            for a in alarms
        ]  # fmt: skip
        return [to_json(out)]

    def _alarm_refusal(self, e: AlarmError, c: Caller, source: str, capability: str, state_code: int = _S.BadInvalidState) -> Refused:
        if not self.db.policy.can(c.identity, capability):  # type: ignore[arg-type]
            return Refused(_S.BadUserAccessDenied, str(e))
        if source not in self.control.alarms.table:
            return Refused(_S.BadInvalidArgument, str(e))
        return Refused(state_code, str(e))

    def _m_AcknowledgeAlarm(self, c: Caller, source: str, comment: str) -> list[ua.Variant]:  # noqa: N802
        try:
            self.control.alarms.acknowledge(source, c.identity, comment)
        except AlarmError as e:
            raise self._alarm_refusal(e, c, source, "acknowledge") from e
        return []

    def _acknowledge_condition(self, c: Caller, source: str, event_id: bytes, comment: str) -> list[ua.Variant]:
        if event_id not in self._recent_events.get(source, ()):
            raise Refused(_S.BadEventIdUnknown, f"{source}: EventId {event_id.hex() if event_id else '(empty)'} is not one of this condition's recent events")
        table = self.control.alarms.table
        if source in table and table.get(source).acked and self.db.policy.can(c.identity, "acknowledge"):
            raise Refused(_S.BadConditionBranchAlreadyAcked, f"{source} is already acknowledged")
        try:
            self.control.alarms.acknowledge(source, c.identity, comment)
        except AlarmError as e:
            raise self._alarm_refusal(e, c, source, "acknowledge") from e
        return []

    def _m_ShelveAlarm(self, c: Caller, source: str, duration_s: float, reason: str) -> list[ua.Variant]:  # noqa: N802
        try:
            self.control.alarms.shelve(source, c.identity, duration_s, reason)
        except AlarmError as e:
            raise self._alarm_refusal(e, c, source, "shelve", _S.BadInvalidArgument) from e
        return []

    def _m_UnshelveAlarm(self, c: Caller, source: str) -> list[ua.Variant]:  # noqa: N802
        try:
            self.control.alarms.unshelve(source, c.identity)
        except AlarmError as e:
            raise self._alarm_refusal(e, c, source, "shelve") from e
        return []

    def _m_ListInterlocks(self, c: Caller) -> list[ua.Variant]:  # noqa: N802
        out = []
        for name, rule in self.control.interlocks.rules.items():
            cfg = rule.cfg
            out.append({
                "name": name, "state": rule.state, "reason": rule.reason, "description": cfg.description, "since": rule.since,
                "reset": cfg.reset, "reset_roles": list(cfg.reset_roles), "engaged": rule.engaged,
            })  # fmt: skip
        return [to_json(out)]

    def _m_ResetInterlock(self, c: Caller, name: str) -> list[ua.Variant]:  # noqa: N802
        try:
            self.control.interlocks.reset(name, c.identity)
        except InterlockError as e:
            rule = self.control.interlocks.rules.get(name)
            if rule is None:
                code = _S.BadInvalidArgument
            elif not (set(c.identity.roles) & set(rule.cfg.reset_roles)) and not self.db.policy.can(c.identity, "admin"):
                code = _S.BadUserAccessDenied
            else:
                code = _S.BadInvalidState
            raise Refused(code, str(e)) from e
        return []


# ---- helpers ---------------------------------------------------------------------------------------------


def _argument(name: str, dtype: int, description: str) -> ua.Argument:
    arg = ua.Argument()
    arg.Name = name
    arg.DataType = ua.NodeId(dtype)
    arg.ValueRank = ua.ValueRank.Scalar
    arg.ArrayDimensions = []
    arg.Description = ua.LocalizedText(description)
    return arg


def _type_item(nodeid: ua.NodeId, browse: ua.QualifiedName, supertype: int, description: str) -> ua.AddNodesItem:
    attrs = ua.ObjectTypeAttributes()
    attrs.DisplayName = ua.LocalizedText(browse.Name)
    attrs.Description = ua.LocalizedText(description)
    attrs.IsAbstract = False
    attrs.WriteMask = attrs.UserWriteMask = 0
    item = ua.AddNodesItem()
    item.RequestedNewNodeId = nodeid
    item.BrowseName = browse
    item.NodeClass = ua.NodeClass.ObjectType
    item.ParentNodeId = ua.NodeId(supertype)
    item.ReferenceTypeId = ua.NodeId(ua.ObjectIds.HasSubtype)
    item.NodeAttributes = attrs
    return item


def _initial(dtype: int) -> ua.Variant:
    if dtype == ua.ObjectIds.Boolean:
        return ua.Variant(False, ua.VariantType.Boolean)
    if dtype == ua.ObjectIds.Duration:
        return ua.Variant(0.0, ua.VariantType.Double)
    return ua.Variant("", ua.VariantType.String)


def _coerce(variant: ua.Variant, dtype: int) -> Any:
    """An input argument in the declared type; numbers of any width are accepted, nothing else is converted."""
    v = variant.Value if isinstance(variant, ua.Variant) else variant
    number = isinstance(v, (int, float)) and not isinstance(v, bool)
    if dtype == _DOUBLE and number:
        return float(v)
    if dtype in (_INT32, _INT64) and isinstance(v, int) and not isinstance(v, bool):
        return v
    if dtype == _BOOLEAN and isinstance(v, bool):
        return v
    if dtype == _STRING and (v is None or isinstance(v, str)):
        return v or ""
    if dtype == _TEXT and (v is None or isinstance(v, (str, ua.LocalizedText))):
        return (v.Text or "") if isinstance(v, ua.LocalizedText) else (v or "")
    if dtype == _BYTES and (v is None or isinstance(v, bytes)):
        return v or b""
    expected = {_DOUBLE: "a number", _INT32: "an integer", _INT64: "an integer", _BOOLEAN: "a Boolean", _STRING: "a String",
                _TEXT: "a LocalizedText", _BYTES: "a ByteString"}[dtype]  # fmt: skip
    raise TypeError(f"expected {expected}, got {type(v).__name__} {v!r}")


def _positive(name: str, value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise Refused(_S.BadInvalidArgument, f"{name} must be a positive number of seconds, got {value}")


def _int32(v: int) -> ua.Variant:
    return ua.Variant(v, ua.VariantType.Int32)


def _string(v: str) -> ua.Variant:
    return ua.Variant(v, ua.VariantType.String)


def _double(v: float) -> ua.Variant:
    return ua.Variant(float(v), ua.VariantType.Double)
