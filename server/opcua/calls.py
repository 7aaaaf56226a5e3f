"""The control layer over OPC UA: its nodes, its events, and method calls routed to their answers.

Theory of operation. :class:`OpcUaControl` adds the control layer's nodes to the site's
address space and answers their method calls for the caller's session; every decision is
the core's (:class:`labctl.server.control.ControlService`, with the caller's identity), the
adapter only translates arguments, results and refusals. The answers live by concern:

* :mod:`labctl.server.opcua.locking` -- ``Objects/<site>/Resources/<resource>/Lock``,
  Part 100's LockingServices with labctl's leases (RequestLock, RenewLease, ReleaseLease);
* :mod:`labctl.server.opcua.methods` -- ``Objects/<site>/Control``: the jobs, alarm,
  interlock and audit methods (structured results are JSON strings, schemas in the
  decision record), and Part 9's methods of the alarm conditions (Acknowledge, Confirm,
  the shelving methods) on a ConditionId;
* :mod:`labctl.server.opcua.control_events` -- Part 9's ConditionRefresh and
  ConditionRefresh2 on the ConditionType, answered for the calling session's subscription;
* :mod:`labctl.server.opcua.arguments` -- the methods' signatures, argument checks and
  results;
* event types ``LeaseEventType`` and ``InterlockEventType``, and the events of alarms,
  interlocks and leases (:mod:`labctl.server.opcua.control_events`), declared and
  emitted from here.

*Who.* A method acts for the session's identity (asyncua's method service would not know
it: :class:`~labctl.server.opcua.sessions.LabctlSession` hands the calls here).

*Refusals.* Argument count and types are checked first (BadArgumentsMissing,
BadTooManyArguments, BadInvalidArgument with BadTypeMismatch per argument). A refused
call ends Bad with the code of :mod:`labctl.server.opcua.refusals` (BadUserAccessDenied
for permission, BadLocked for a lock held by someone else, BadInvalidArgument,
BadInvalidState...); every refusal is audited once by the core, and the refusal itself
(kind, fields, sentence) goes back with the response as the call's DiagnosticInfo. Part
100's methods answer as the standard says, with a status output (0 OK, -1
E_AlreadyLocked/E_NotLocked, -2 E_Invalid) and Good, the refusal still audited and sent as
data. The sentence is also kept for the session in
``Objects/<site>/Session/LastCallRefusal`` as ``<Method>: <reason>``. A bug in a handler is
logged once with its traceback and answered BadInternalError.

*Session end.* A closing session's leases and queued requests are handed to
:meth:`labctl.server.opcua.locking.LockingServices.session_closed`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from asyncua import ua
from labctl.ioc.alarms import AlarmEvent
from labctl.ioc.arbiter import LeaseEvent
from labctl.ioc.errors import InvalidArgument, LabctlError
from labctl.ioc.errors import Refused as CoreRefused
from labctl.ioc.interlocks import Transition
from labctl.ioc.policy import Action, Target
from labctl.server.opcua import control_events
from labctl.server.opcua.arguments import (
    STRING,
    Caller,
    MethodSpec,
    Refused,
    add_mandatory_rules,
    add_method,
    client_id,
    coerce,
    type_item,
)
from labctl.server.opcua.builders import Builder
from labctl.server.opcua.locking import LockingServices
from labctl.server.opcua.methods import (
    ACKNOWLEDGE,
    ACKNOWLEDGE_SPEC,
    CONDITION_TYPE,
    CONFIRM,
    CONFIRM_SPEC,
    CONTROL_METHODS,
    REFRESH,
    SHELVING,
    ControlMethods,
)
from labctl.server.opcua.refusals import status_of

if TYPE_CHECKING:
    from labctl.server.control import ControlService
    from labctl.server.opcua.address_space import SiteNodes
    from labctl.server.opcua.sessions import LabctlInternalServer, LabctlSession

log = logging.getLogger(__name__)

_S = ua.StatusCodes

#: The action each method performs, for the audit record of a call refused before it
#: reached the core (wrong arguments): the same action a refusal by the core names.
METHOD_ACTIONS: dict[str, Action] = {
    "InitLock": Action.LOCK_REQUEST, "RequestLock": Action.LOCK_REQUEST, "RenewLock": Action.LOCK_RENEW,
    "RenewLease": Action.LOCK_RENEW, "ExitLock": Action.LOCK_RELEASE, "ReleaseLease": Action.LOCK_RELEASE,
    "BreakLock": Action.LOCK_BREAK, "UseLease": Action.LOCK_REQUEST, "ListLocks": Action.LOCK_LIST, "ListProcedures": Action.PROCEDURE_LIST,
    "SubmitTask": Action.JOB_SUBMIT, "CancelTask": Action.JOB_CANCEL, "ListJobs": Action.JOB_LIST, "GetJob": Action.JOB_VIEW,
    "ListAudit": Action.AUDIT_READ, "ListAlarms": Action.ALARM_LIST, "AcknowledgeAlarm": Action.ALARM_ACK,
    "Acknowledge": Action.ALARM_ACK, "ShelveAlarm": Action.ALARM_SHELVE, "UnshelveAlarm": Action.ALARM_UNSHELVE,
    "ListInterlocks": Action.INTERLOCK_LIST, "ResetInterlock": Action.INTERLOCK_RESET,
    "Confirm": Action.ALARM_ACK, "ConditionRefresh": Action.ALARM_LIST, "ConditionRefresh2": Action.ALARM_LIST,
    "TimedShelve": Action.ALARM_SHELVE, "TimedShelve2": Action.ALARM_SHELVE, "OneShotShelve": Action.ALARM_SHELVE,
    "OneShotShelve2": Action.ALARM_SHELVE, "Unshelve": Action.ALARM_UNSHELVE, "Unshelve2": Action.ALARM_UNSHELVE,
}  # fmt: skip

#: Which kind of call a :class:`_Target` is, beyond the Control object's and the locks' methods.
CONDITION, REFRESHING, SHELVE = "condition", "refresh", "shelve"


@dataclass(frozen=True)
class _Target:
    spec: MethodSpec
    resource: str | None = None
    source: str | None = None
    kind: str = ""
    """CONDITION (Acknowledge, Confirm), SHELVE or REFRESHING; empty for the other methods."""


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
        self._targets: dict[ua.NodeId, _Target] = {}
        self._last_severity: dict[str, int] = {}
        self.retained = control_events.RetainedConditions()
        """The retained conditions, for ConditionRefresh."""
        self.events = control_events.EventQueue(iserver, emitted=self.retained.emitted)
        self.lease_type = control_events.event_type_id("LeaseEventType", site, self.idx)
        self.interlock_type = control_events.event_type_id("InterlockEventType", site, self.idx)
        self.locking = LockingServices(control, iserver, site, self.idx, di_index, self.events, self.lease_type)
        """Part 100 locks of the resources."""
        self.methods = ControlMethods(control)
        """The Control object's methods."""
        self._handlers: dict[str, Callable[..., Any]] = {**self.locking.handlers(), **self.methods.handlers()}
        self._running = False

    # ---- nodes ---------------------------------------------------------------------------------------------

    def build(self) -> None:
        """Create the types, the Control object and the resources' Lock objects (before the server starts)."""
        b = Builder(self.iserver, self.idx)
        declarations = self.locking.build_type(b)
        declarations += self._build_event_types(b)
        b.flush()
        base = f"/{self.site}"
        control = b.object(f"{base}/Control", "Control", self.nodes.site_folder, ua.ObjectIds.BaseObjectType)
        for spec in CONTROL_METHODS:
            nid = ua.NodeId(f"{base}/Control/{spec.name}", self.idx)
            add_method(b, nid, spec, control, self.di)
            self._targets[nid] = _Target(spec)
        for nid, spec, res in self.locking.build_locks(b, self.nodes.site_folder):
            self._targets[nid] = _Target(spec, res)
        b.flush()
        # Part 100: MaxInactiveLockTime on ServerCapabilities; and the types' declarations are Mandatory.
        self.locking.add_capability(b)
        add_mandatory_rules(self.iserver, b, declarations)

    def _build_event_types(self, b: Builder) -> list[ua.NodeId]:
        declarations = []
        for name, fields in control_events.EVENT_TYPES.items():
            tid = control_events.event_type_id(name, self.site, self.idx)
            b.add(type_item(tid, ua.QualifiedName(name, self.idx), ua.ObjectIds.BaseEventType, f"labctl {name}"))
            for field, doc in fields:
                nid = ua.NodeId(f"{tid.Identifier}/{field}", self.idx)
                b.variable(nid, ua.QualifiedName(field, self.idx), tid, reference=ua.ObjectIds.HasProperty, typedef=ua.ObjectIds.PropertyType,
                           value=ua.Variant("", ua.VariantType.String), datatype=ua.NodeId(STRING), description=doc)  # fmt: skip
                declarations.append(nid)
        return declarations

    # ---- life cycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Follow the core: lease, alarm and interlock changes become variable updates and events."""
        self._running = True
        control_events.install_of_type()  # alarm clients filter conditions by OfType(a supertype)
        self.events.start()
        self.control.on_lease_events(self._on_lease_events)
        self.control.alarms.on_event(self._on_alarm_event)
        self.control.interlocks.on_transition(self._on_interlock)
        self.locking.publish_all()
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
        if self._running:
            self.locking.on_lease_events(batch)

    def session_value(self, nodeid: ua.NodeId) -> ua.Variant | None:
        """The value of a variable computed at the time of reading (RemainingLockTime), or None."""
        return self.locking.session_value(nodeid)

    def _on_alarm_event(self, ev: AlarmEvent) -> None:
        if not self._running:
            return
        source = ev.alarm.source
        if source not in self.nodes.pvs:
            return
        event, event_id = control_events.condition_event(ev, self.idx, self._last_severity.get(source, 1), self.db.clock())
        self._last_severity[source] = event.Severity
        self.methods.remember_event(source, event_id)
        self.events.put(event)

    def _on_interlock(self, t: Transition) -> None:
        if self._running:
            self.events.put(control_events.interlock_event(t, self.interlock_type, self.idx))

    def session_closed(self, session: LabctlSession, clean: bool) -> None:
        """Release a closing session's leases (clean close only) and withdraw its queued requests."""
        if self._running:
            self.locking.session_closed(session, clean)

    # ---- method calls -------------------------------------------------------------------------------------

    def handles(self, req: ua.CallMethodRequest) -> bool:
        """Whether a method call is one of ours."""
        return self._target(req) is not None

    def _target(self, req: ua.CallMethodRequest) -> _Target | None:
        target = self._targets.get(req.MethodId)
        if target is not None:
            return target if target.resource is None or req.ObjectId in self.locking.lock_objects else None
        spec = self.locking.type_methods.get(req.MethodId)
        if spec is not None and req.ObjectId in self.locking.lock_objects:  # the type's method called on an instance
            return _Target(spec, self.locking.lock_objects[req.ObjectId])
        if req.MethodId in REFRESH:
            return _Target(REFRESH[req.MethodId], kind=REFRESHING) if req.ObjectId == CONDITION_TYPE else None
        if req.MethodId in (ACKNOWLEDGE, CONFIRM):
            source = control_events.source_of_condition(req.ObjectId, self.idx)
            if source is not None:
                return _Target(ACKNOWLEDGE_SPEC if req.MethodId == ACKNOWLEDGE else CONFIRM_SPEC, source=source, kind=CONDITION)
        if req.MethodId in SHELVING:
            obj = req.ObjectId
            if isinstance(obj.Identifier, str) and obj.Identifier.endswith("/ShelvingState"):
                obj = ua.NodeId(obj.Identifier[: -len("/ShelvingState")], obj.NamespaceIndex)
            source = control_events.source_of_condition(obj, self.idx)
            if source is not None:
                return _Target(SHELVING[req.MethodId], source=source, kind=SHELVE)
        return None

    async def call(self, session: LabctlSession, req: ua.CallMethodRequest) -> tuple[ua.CallMethodResult, LabctlError | None]:
        """Answer one method call of ``session``: the result, and the refusal (or None) to send as data."""
        target = self._target(req)
        assert target is not None
        spec = target.spec
        result = ua.CallMethodResult()
        given = list(req.InputArguments or [])
        what = target.resource or target.source or spec.name
        if len(given) != len(spec.inputs):
            code = _S.BadArgumentsMissing if len(given) < len(spec.inputs) else _S.BadTooManyArguments
            reason = f"{spec.name}: expected {len(spec.inputs)} argument(s) ({', '.join(a[0] for a in spec.inputs) or 'none'}), got {len(given)}"
            return self._refuse(session, spec, result, Refused(code, InvalidArgument(reason, action=METHOD_ACTIONS[spec.name], target=what)))
        values, problems = [], []
        for (name, dtype, _), variant in zip(spec.inputs, given, strict=True):
            try:
                values.append(coerce(variant, dtype))
                problems.append(ua.StatusCode())
            except TypeError as e:
                problems.append(ua.StatusCode(_S.BadTypeMismatch))
                values.append(f"{name}: {e}")
        if any(not p.is_good() for p in problems):
            result.InputArgumentResults = problems
            bad = "; ".join(v for v, p in zip(values, problems, strict=True) if not p.is_good())
            return self._refuse(session, spec, result, Refused(_S.BadInvalidArgument, InvalidArgument(f"{spec.name}: {bad}", action=METHOD_ACTIONS[spec.name], target=what)))
        caller = Caller(session, session.identity, client_id(session))
        try:
            if spec is ACKNOWLEDGE_SPEC:
                outputs = self.methods.acknowledge_condition(caller, target.source or "", *values)
            elif spec is CONFIRM_SPEC:
                outputs = self.methods.confirm_condition(caller, target.source or "", *values)
            elif target.kind == SHELVE:
                outputs = self.methods.shelve_condition(caller, target.source or "", spec.name, *values)
            elif target.kind == REFRESHING:
                self.db.policy.decide(caller.identity, Action.ALARM_LIST, Target("alarms"))
                await self.retained.refresh(session, *values)
                outputs = []
            elif target.resource is not None:
                outputs = self._handlers[spec.name](caller, target.resource, *values)
            else:
                outputs = self._handlers[spec.name](caller, *values)
            if inspect.isawaitable(outputs):
                outputs = await outputs
        except (Refused, CoreRefused) as r:
            return self._refuse(session, spec, result, r)
        except Exception:  # a bug in the core or here: report it once, keep serving
            log.exception("OPC UA method %s by %s failed unexpectedly", spec.name, caller.identity)
            session.last_call_refusal = f"{spec.name}: internal server error (see the server log)"
            result.StatusCode = ua.StatusCode(_S.BadInternalError)
            return result, None
        result.OutputArguments = outputs
        result.InputArgumentResults = problems
        session.last_call_refusal = f"{spec.name}: {caller.note}" if caller.note else ""
        return result, caller.refusal

    def _refuse(self, session: LabctlSession, spec: MethodSpec, result: ua.CallMethodResult, refusal: Refused | CoreRefused) -> tuple[ua.CallMethodResult, CoreRefused]:
        """A refused call: audited once by the core (a no-op if the core refused it), Bad with its code."""
        error = refusal.error if isinstance(refusal, Refused) else refusal
        code = refusal.code if isinstance(refusal, Refused) else status_of(error)
        self.db.refuse(session.identity, error)
        session.last_call_refusal = f"{spec.name}: {error.reason}"
        result.StatusCode = ua.StatusCode(code)
        return result, error

