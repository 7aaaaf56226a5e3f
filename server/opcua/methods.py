"""The ``Control`` object's methods over OPC UA: jobs, alarms, interlocks, locks listing, audit.

Theory of operation. ``Objects/<site>/Control`` carries the methods of
:data:`CONTROL_METHODS`; :class:`ControlMethods` answers them for the caller's session
(:class:`labctl.server.opcua.calls.OpcUaControl` routes the calls here). Every decision is
the core's (:class:`labctl.server.control.ControlService`, with the caller's identity), the
adapter only translates arguments, results and refusals. Structured results are JSON
strings (:func:`job_json`, :func:`lock_json`; schemas in ``docs/decisions/opcua-control.md``).

It also answers Part 9's methods of an alarm condition, called with the type's MethodId
on the ConditionId ``ns=<site>;s=<PV>.Alarm`` (the conditions are not nodes, so generic
clients call them so; for the shelving methods the ObjectId may also be
``<PV>.Alarm/ShelvingState``):

* ``Acknowledge(EventId, Comment)`` (:data:`ACKNOWLEDGE`): the EventId must be one of that
  condition's recent events (:meth:`ControlMethods.remember_event`, fed with the condition
  events of :mod:`labctl.server.opcua.control_events`; a refreshed event keeps its EventId).
  It is the core's acknowledge, so the alarm is acknowledged for every protocol (the
  ``ALARM:UNACKED:*`` PVs over Channel Access too).
* ``Confirm``: labctl's alarms have no ConfirmedState (acknowledging is enough), so their
  conditions have no Confirm method (BadMethodInvalid, with the reason as data).
* Shelving (:data:`SHELVING`, the ShelvedStateMachineType's methods): ``TimedShelve2(ShelvingTime,
  Comment)`` shelves for ShelvingTime ms with the comment as the reason, ``Unshelve2(Comment)``
  and ``Unshelve()`` end it. labctl's shelving needs a reason, so ``TimedShelve(ShelvingTime)``,
  which carries none, is refused (BadInvalidArgument, naming TimedShelve2); shelving until the
  alarm clears (``OneShotShelve``, ``OneShotShelve2``) is not supported (BadNotSupported).
  Part 9's codes: BadConditionAlreadyShelved, BadConditionNotShelved, BadShelvingTimeOutOfRange.

*Refusals.* Every decision is the core's: its typed refusals (forbidden, not found,
conflict, invalid, unavailable, with their fields) propagate to the call router
(:mod:`labctl.server.opcua.calls`), which maps each to its StatusCode through the one table
of :mod:`labctl.server.opcua.refusals` and sends it to the client as data. Where OPC UA names
a more specific code (Part 9's BadEventIdUnknown, BadConditionBranchAlreadyAcked), the
handler raises :class:`~labctl.server.opcua.arguments.Refused` with that code and the core's
refusal, which is audited all the same.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from asyncua import ua
from labctl.ioc.alarms import AlarmStateConflict, BadShelving, NoSuchAlarm
from labctl.ioc.errors import InvalidArgument
from labctl.ioc.jobs import Job
from labctl.ioc.policy import Action, Target
from labctl.ioc.types import Severity, Status
from labctl.server.opcua.arguments import (
    BOOLEAN,
    BYTES,
    DOUBLE,
    INT32,
    INT64,
    JSON_RESULT,
    STRING,
    TEXT,
    Caller,
    MethodSpec,
    Refused,
    to_json,
)

if TYPE_CHECKING:
    from labctl.server.control import ControlService

_S = ua.StatusCodes

#: Part 9's Acknowledge method (AcknowledgeableConditionType), called on a ConditionId.
ACKNOWLEDGE = ua.NodeId(ua.ObjectIds.AcknowledgeableConditionType_Acknowledge)

#: How many recent events of each condition an Acknowledge may name.
RECENT_EVENTS = 16

CONTROL_METHODS: tuple[MethodSpec, ...] = (
    MethodSpec("ListLocks", (), JSON_RESULT, "every resource's lock: holder, expiry, queue"),
    MethodSpec("UseLease", (("Token", STRING, "the token of a lease another session of your user holds"),), (("Resource", STRING, "the lease's resource"), ("ExpiresAt", DOUBLE, "UNIX seconds")), "write under a lease handed over by its token, from this session, until it ends"),
    MethodSpec("ListProcedures", (), JSON_RESULT, "the procedures jobs run, with their parameters"),
    MethodSpec("SubmitTask", (("Procedure", STRING, "procedure name"), ("ParamsJson", STRING, "parameters as a JSON object"), ("Priority", INT32, "higher runs first")), (("JobId", INT64, "the new job's id"),), "queue a job"),
    MethodSpec("CancelTask", (("JobId", INT64, "the job"),), (), "cancel a queued or running job: its owner or an admin"),
    MethodSpec("ListJobs", (("MineOnly", BOOLEAN, "only this user's jobs"),), JSON_RESULT, "jobs, newest first"),
    MethodSpec("GetJob", (("JobId", INT64, "the job"),), JSON_RESULT, "a job with its log and results: its owner or an admin"),
    MethodSpec("ListAudit", (("SinceUnix", DOUBLE, "UNIX seconds"), ("User", STRING, "only this user (empty: all)"), ("PV", STRING, "only this PV or target (empty: all)")), JSON_RESULT, "the audit trail"),
    MethodSpec("ListAlarms", (("ActiveOnly", BOOLEAN, "only alarms that need attention"),), JSON_RESULT, "alarm states"),
    MethodSpec("AcknowledgeAlarm", (("Source", STRING, "the PV in alarm"), ("Comment", STRING, "why, what was done")), (), "acknowledge an alarm"),
    MethodSpec("ShelveAlarm", (("Source", STRING, "the PV in alarm"), ("DurationS", DOUBLE, "seconds"), ("Reason", STRING, "why (required)")), (), "silence an alarm for a while: experts"),
    MethodSpec("UnshelveAlarm", (("Source", STRING, "the PV"),), (), "end shelving early: experts"),
    MethodSpec("ListInterlocks", (), JSON_RESULT, "interlock states"),
    MethodSpec("ResetInterlock", (("Name", STRING, "the interlock"),), (), "reset an interlock waiting for it: its reset roles"),
)  # fmt: skip

ACKNOWLEDGE_SPEC = MethodSpec("Acknowledge", (("EventId", BYTES, ""), ("Comment", TEXT, "")), (), "Part 9 Acknowledge")
#: Part 9's Confirm (not supported: labctl's alarms have no ConfirmedState).
CONFIRM = ua.NodeId(ua.ObjectIds.AcknowledgeableConditionType_Confirm)
CONFIRM_SPEC = MethodSpec("Confirm", (("EventId", BYTES, ""), ("Comment", TEXT, "")), (), "Part 9 Confirm")

#: Part 9's ConditionRefresh and ConditionRefresh2, called on the ConditionType.
CONDITION_TYPE = ua.NodeId(ua.ObjectIds.ConditionType)
REFRESH: dict[ua.NodeId, MethodSpec] = {
    ua.NodeId(ua.ObjectIds.ConditionType_ConditionRefresh): MethodSpec("ConditionRefresh", (("SubscriptionId", INT32, ""),), (), "Part 9 ConditionRefresh"),
    ua.NodeId(ua.ObjectIds.ConditionType_ConditionRefresh2): MethodSpec(
        "ConditionRefresh2", (("SubscriptionId", INT32, ""), ("MonitoredItemId", INT32, "")), (), "Part 9 ConditionRefresh2"
    ),
}

#: The ShelvedStateMachineType's methods (Part 9 5.8.10), called on a condition.
SHELVING: dict[ua.NodeId, MethodSpec] = {
    ua.NodeId(ua.ObjectIds.ShelvedStateMachineType_TimedShelve): MethodSpec("TimedShelve", (("ShelvingTime", DOUBLE, "ms"),)),
    ua.NodeId(ua.ObjectIds.ShelvedStateMachineType_TimedShelve2): MethodSpec("TimedShelve2", (("ShelvingTime", DOUBLE, "ms"), ("Comment", TEXT, "why"))),
    ua.NodeId(ua.ObjectIds.ShelvedStateMachineType_Unshelve): MethodSpec("Unshelve"),
    ua.NodeId(ua.ObjectIds.ShelvedStateMachineType_Unshelve2): MethodSpec("Unshelve2", (("Comment", TEXT, ""),)),
    ua.NodeId(ua.ObjectIds.ShelvedStateMachineType_OneShotShelve): MethodSpec("OneShotShelve"),
    ua.NodeId(ua.ObjectIds.ShelvedStateMachineType_OneShotShelve2): MethodSpec("OneShotShelve2", (("Comment", TEXT, ""),)),
}

#: The longest ParamsJson a SubmitTask takes, and the deepest nesting of its arrays and objects.
MAX_PARAMS_JSON = 64 * 1024
MAX_PARAMS_DEPTH = 8


def parse_params_json(text: str, procedure: str) -> dict[str, Any]:
    """SubmitTask's ParamsJson as a dict, bounded before it is parsed; else Refused(BadInvalidArgument).

    Bounds: :data:`MAX_PARAMS_JSON` characters, :data:`MAX_PARAMS_DEPTH` levels of nesting
    (counted before parsing, so deep nesting never reaches the parser's recursion). JSON's
    non-standard ``NaN``/``Infinity`` literals are refused; the procedure's declared types and
    ranges are checked by the core (:func:`labctl.ioc.procedure.convert_param`).
    """

    def refuse(reason: str) -> Refused:
        return Refused(_S.BadInvalidArgument, InvalidArgument(f"ParamsJson {reason}", action=Action.JOB_SUBMIT, target=procedure))

    if len(text) > MAX_PARAMS_JSON:
        raise refuse(f"is {len(text)} characters long; at most {MAX_PARAMS_JSON} are accepted")
    if not text.strip():
        return {}
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:  # nesting outside strings
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_PARAMS_DEPTH:
                raise refuse(f"nests arrays or objects more than {MAX_PARAMS_DEPTH} deep")
        elif ch in "]}":
            depth -= 1

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    try:
        params = json.loads(text, parse_constant=no_constant)
    except (ValueError, RecursionError) as e:
        raise refuse(f"is not JSON: {e}") from None
    if not isinstance(params, dict):
        raise refuse(f"must be a JSON object of parameters, got {type(params).__name__}")
    return params


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


class ControlMethods:
    """The answers to the ``Control`` object's method calls (and to Part 9's Acknowledge)."""

    def __init__(self, control: ControlService) -> None:
        self.control = control
        self.db = control.db
        self.recent_events: dict[str, deque[bytes]] = {}
        """The EventIds of each condition's recent events, which an Acknowledge may name."""

    def handlers(self) -> dict[str, Callable[..., Any]]:
        """The answer to each method of :data:`CONTROL_METHODS`, called with the caller and the arguments."""
        return {s.name: getattr(self, f"_m_{s.name}") for s in CONTROL_METHODS}

    def remember_event(self, source: str, event_id: bytes) -> None:
        """Note the EventId of a condition event of ``source``'s alarm."""
        self.recent_events.setdefault(source, deque(maxlen=RECENT_EVENTS)).append(event_id)

    # ---- locks, jobs, audit -----------------------------------------------------------------------------

    def _m_ListLocks(self, c: Caller) -> list[ua.Variant]:  # noqa: N802
        return [to_json([lock_json(self.control, r) for r in self.control.arbiter.resources])]

    def _m_ListProcedures(self, c: Caller) -> list[ua.Variant]:  # noqa: N802
        policy, out = self.db.policy, []
        for name, proc in self.control.jobs.procedures.items():
            params = {p: {"type": cfg.type, "default": cfg.default, "description": cfg.description, "min": cfg.min, "max": cfg.max} for p, cfg in proc.params.items()}
            allowed = policy.allows(c.identity, Action.JOB_SUBMIT, Target(name, roles=frozenset(proc.roles)))
            out.append({"name": name, "description": proc.description, "resources": list(proc.resources), "params": params, "roles": list(proc.roles), "may_submit": allowed})
        return [to_json(out)]

    def _m_UseLease(self, c: Caller, token: str) -> list[ua.Variant]:  # noqa: N802
        lease = self.control.use_lease(token, c.identity)
        return [ua.Variant(lease.resource, ua.VariantType.String), ua.Variant(lease.expires_at, ua.VariantType.Double)]

    def _m_SubmitTask(self, c: Caller, procedure: str, params_json: str, priority: int) -> list[ua.Variant]:  # noqa: N802
        params = parse_params_json(params_json, procedure)
        job = self.control.submit_job(procedure, params, c.identity, priority=priority)
        return [ua.Variant(job.id, ua.VariantType.Int64)]

    def _m_CancelTask(self, c: Caller, job_id: int) -> list[ua.Variant]:  # noqa: N802
        self.control.cancel_job(job_id, c.identity)
        return []

    def _m_ListJobs(self, c: Caller, mine_only: bool) -> list[ua.Variant]:  # noqa: N802
        jobs = self.control.jobs.list(c.identity.user if mine_only else None)
        return [to_json([job_json(j) for j in jobs])]

    def _m_GetJob(self, c: Caller, job_id: int) -> list[ua.Variant]:  # noqa: N802
        return [to_json(job_json(self.control.job_detail(job_id, c.identity), detail=True))]

    async def _m_ListAudit(self, c: Caller, since: float, user: str, pv: str) -> list[ua.Variant]:  # noqa: N802
        records = await self.control.read_audit(c.identity, since, user=user or None, target=pv or None)
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

    def _m_AcknowledgeAlarm(self, c: Caller, source: str, comment: str) -> list[ua.Variant]:  # noqa: N802
        self.control.alarms.acknowledge(source, c.identity, comment)
        return []

    def acknowledge_condition(self, c: Caller, source: str, event_id: bytes, comment: str) -> list[ua.Variant]:
        """Part 9's Acknowledge called on the ConditionId of ``source``'s alarm."""
        self.db.policy.decide(c.identity, Action.ALARM_ACK, Target(source))  # permission before state
        if event_id not in self.recent_events.get(source, ()):
            raise Refused(_S.BadEventIdUnknown, NoSuchAlarm(f"EventId {event_id.hex() if event_id else '(empty)'} is not one of this condition's recent events", source=source, action=Action.ALARM_ACK))
        try:
            self.control.alarms.acknowledge(source, c.identity, comment)
        except AlarmStateConflict as e:
            if self.control.alarms.table.get(source).acked:
                raise Refused(_S.BadConditionBranchAlreadyAcked, e) from None
            raise
        return []

    def confirm_condition(self, c: Caller, source: str, event_id: bytes, comment: str) -> list[ua.Variant]:
        """Part 9's Confirm: refused, labctl's alarms have no ConfirmedState."""
        raise Refused(_S.BadMethodInvalid, InvalidArgument("Confirm: labctl's alarms have no confirmed state; Acknowledge is all they need", action=Action.ALARM_ACK, target=source))

    def shelve_condition(self, c: Caller, source: str, method: str, *args: Any) -> list[ua.Variant]:
        """A ShelvedStateMachineType method called on ``source``'s condition (see the module docstring)."""
        alarms = self.control.alarms
        if method.startswith("OneShotShelve"):
            raise Refused(_S.BadNotSupported, InvalidArgument(f"{method}: shelving until the alarm clears is not supported; use TimedShelve2", action=Action.ALARM_SHELVE, target=source))
        if method.startswith("Unshelve"):
            self.db.policy.decide(c.identity, Action.ALARM_UNSHELVE, Target(source))  # permission before state
            if not alarms.table.get(source, Action.ALARM_UNSHELVE).shelved(self.db.clock()):
                raise Refused(_S.BadConditionNotShelved, AlarmStateConflict("not shelved", source=source, action=Action.ALARM_UNSHELVE))
            alarms.unshelve(source, c.identity)
            return []
        self.db.policy.decide(c.identity, Action.ALARM_SHELVE, Target(source))
        shelving_ms = args[0]
        reason = args[1] if len(args) > 1 else ""
        if method == "TimedShelve":
            raise Refused(_S.BadInvalidArgument, BadShelving("TimedShelve carries no reason and labctl's shelving needs one: call TimedShelve2 with a Comment", source=source, action=Action.ALARM_SHELVE))
        if alarms.table.get(source, Action.ALARM_SHELVE).shelved(self.db.clock()):
            raise Refused(_S.BadConditionAlreadyShelved, AlarmStateConflict("already shelved; Unshelve2 first", source=source, action=Action.ALARM_SHELVE))
        try:
            alarms.shelve(source, c.identity, shelving_ms / 1000.0, reason)
        except BadShelving as e:
            if not (shelving_ms > 0 and math.isfinite(shelving_ms)):
                raise Refused(_S.BadShelvingTimeOutOfRange, e) from None
            raise
        return []

    def _m_ShelveAlarm(self, c: Caller, source: str, duration_s: float, reason: str) -> list[ua.Variant]:  # noqa: N802
        self.control.alarms.shelve(source, c.identity, duration_s, reason)
        return []

    def _m_UnshelveAlarm(self, c: Caller, source: str) -> list[ua.Variant]:  # noqa: N802
        self.control.alarms.unshelve(source, c.identity)
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
        self.control.reset_interlock(name, c.identity)
        return []
