"""OPC UA events of the control layer: alarm conditions, interlock transitions, lease changes.

Theory of operation. Every event is emitted by the Server object (``i=2253``), the node
generic clients (UaExpert's event view, SCADA alarm lists) subscribe to; its
SourceNode and SourceName say what it is about. Three kinds:

* **Alarm conditions** (Part 9 Alarms & Conditions, as far as asyncua carries it): each
  :class:`labctl.ioc.alarms.AlarmEvent` (raised, changed, returned, cleared, acknowledged,
  shelved, unshelved) becomes an ``AlarmConditionType`` event of the PV's condition.
  SourceNode/InputNode are the PV's node, SourceName and ConditionName its name, the
  ConditionId (the event field ``NodeId``) is ``ns=<site>;s=<PV>.Alarm``, Severity maps
  the EPICS severity through :data:`SEVERITY`, and ActiveState (the value is in alarm
  now), AckedState, LatchedState, ShelvingState (Unshelved or TimedShelved, with
  UnshelveTime), SuppressedOrShelved, Retain (the alarm still needs attention), Quality
  (the StatusCode of its value: Good unless INVALID), Comment and ClientUserId follow the
  alarm. The conditions are not nodes of the address space (Part 9 allows that), so their
  methods are called with the type's MethodId on the ConditionId (see
  :mod:`labctl.server.opcua.methods`: Acknowledge, TimedShelve2, Unshelve2...).
  *Refresh* (Part 9 5.5.7, 5.5.8): :class:`RetainedConditions` keeps the latest event of
  every condition whose Retain is true, as it was sent; ConditionRefresh(SubscriptionId)
  queues, for the calling session's subscription, a RefreshStartEvent to each of its event
  monitored items, every retained condition event (the same EventId, so it can be
  acknowledged) to the items whose filter it meets, and a RefreshEndEvent; ConditionRefresh2
  does the same for one monitored item. The bracket events ignore the where clause, as
  Part 9 4.5 asks. New events may come between them, as Part 9 allows.
  *Filters.* Alarm clients select conditions with a where clause ``OfType(ConditionType)``
  or ``OfType(AcknowledgeableConditionType)`` (node-opcua's alarm list does); Part 4 7.7.3
  makes OfType true for the type and its subtypes, where asyncua's evaluator compares the
  EventType for equality only. :func:`install_of_type` makes it follow the subtypes.
* **Interlock transitions**: an ``InterlockEventType`` event (labctl namespace, subtype
  of BaseEventType, fields Interlock, FromState, ToState, Reason) from the interlock's
  state PV ``ILK:<NAME>:STATE``.
* **Lease changes**: a ``LeaseEventType`` event (fields Resource, Kind, User, Client,
  By, Reason) from the resource's Lock object for every grant, renewal, release,
  expiry, break, queueing and withdrawal, so a holder whose lock is broken is told.

Listeners of the core are synchronous and must not wait; they hand events to an
:class:`EventQueue`, whose one task triggers them in order. The queue is bounded: if
nobody drains it (a stuck server) the oldest events are dropped, never the loop.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from asyncua import ua
from asyncua.common.event_objects import AlarmCondition, BaseEvent, RefreshEndEvent, RefreshStartEvent
from asyncua.server.address_space import AttributeValue
from asyncua.server.internal_server import InternalServer
from asyncua.server.monitored_item_service import WhereClauseEvaluator
from labctl.ioc.alarms import Alarm, AlarmEvent
from labctl.ioc.arbiter import LeaseEvent
from labctl.ioc.errors import Conflict, Forbidden, InvalidArgument, NotFound
from labctl.ioc.interlocks import Transition, state_pv
from labctl.ioc.policy import Action
from labctl.ioc.types import Reading, Severity
from labctl.server.opcua.arguments import Refused
from labctl.server.opcua.values import status_code

from labctl.backoff import Backoff
from labctl.supervision import supervise

log = logging.getLogger(__name__)

_S = ua.StatusCodes

#: EPICS severity -> OPC UA event Severity (1..1000).
SEVERITY: dict[Severity, int] = {Severity.NO_ALARM: 1, Severity.MINOR: 300, Severity.MAJOR: 700, Severity.INVALID: 900}
#: Interlock state -> event Severity.
INTERLOCK_SEVERITY = {"OK": 100, "WARN": 300, "PENDING": 500, "TRIPPED": 800, "CLEARING": 600, "RESET_NEEDED": 600}
#: Lease event kind -> event Severity (a broken lock matters most to its holder).
LEASE_SEVERITY = {"broken": 600, "expired": 400}

#: Events waiting for the emitter task; beyond this the oldest are dropped.
QUEUE_LIMIT = 10_000

SERVER = ua.NodeId(ua.ObjectIds.Server)
PROCESS_CONDITION_CLASS = ua.NodeId(ua.ObjectIds.ProcessConditionClassType)
#: ShelvingState/CurrentState/Id of a condition: Part 9's ShelvedStateMachineType states.
UNSHELVED = ua.NodeId(ua.ObjectIds.ShelvedStateMachineType_Unshelved)
TIMED_SHELVED = ua.NodeId(ua.ObjectIds.ShelvedStateMachineType_TimedShelved)

#: Custom event types (labctl namespace): type name -> (field, description) in order.
EVENT_TYPES: dict[str, tuple[tuple[str, str], ...]] = {
    "LeaseEventType": (
        ("Resource", "the resource whose lock changed"),
        ("Kind", "granted, renewed, released, expired, broken, queued or withdrawn"),
        ("User", "the lease's (or request's) owner"),
        ("Client", "the owner's client: an OPC UA session, a CA client, a job"),
        ("By", "who caused it when not the owner (an admin's break)"),
        ("Reason", "why, when given"),
    ),
    "InterlockEventType": (
        ("Interlock", "the interlock's name"),
        ("FromState", "the state it left"),
        ("ToState", "the state it entered"),
        ("Reason", "the condition that caused it"),
    ),
}


def event_type_id(name: str, site: str, idx: int) -> ua.NodeId:
    """NodeId of a custom event type (``/<site>/types/<name>``)."""
    return ua.NodeId(f"/{site}/types/{name}", idx)


def condition_id(source: str, idx: int) -> ua.NodeId:
    """The ConditionId of a PV's alarm condition."""
    return ua.NodeId(f"{source}.Alarm", idx)


def source_of_condition(nodeid: ua.NodeId, idx: int) -> str | None:
    """The PV whose condition this ConditionId is, or None."""
    ident = nodeid.Identifier
    if nodeid.NamespaceIndex == idx and isinstance(ident, str) and ident.endswith(".Alarm") and "/" not in ident:
        return ident[: -len(".Alarm")]
    return None


def _utc(ts: float) -> _dt.datetime:
    return _dt.datetime.fromtimestamp(ts, _dt.UTC)


def _stamp(event: BaseEvent, ts: float) -> bytes:
    event_id = uuid.uuid4().bytes
    event.EventId = event_id
    event.Time = _utc(ts)
    event.ReceiveTime = _dt.datetime.now(_dt.UTC)
    return event_id


def _state(flag: bool, true: str, false: str) -> ua.LocalizedText:
    return ua.LocalizedText(true if flag else false)


def alarm_severity(alarm: Alarm) -> int:
    """The event Severity of an alarm: its latched severity while it needs attention, else its current one."""
    return SEVERITY[alarm.latched if alarm.active else alarm.current]


def condition_event(ev: AlarmEvent, idx: int, last_severity: int, now: float) -> tuple[AlarmCondition, bytes]:
    """The AlarmConditionType event of an alarm transition, and its EventId."""
    a = ev.alarm
    e = AlarmCondition()
    e.emitting_node = SERVER
    event_id = _stamp(e, ev.time)
    pv = ua.NodeId(a.source, idx)
    e.SourceNode = pv
    e.SourceName = a.source
    e.InputNode = pv
    e.Message = ua.LocalizedText(_message(ev))
    e.Severity = alarm_severity(a)
    e.ConditionClassId = PROCESS_CONDITION_CLASS
    e.ConditionClassName = ua.LocalizedText("Process")
    e.ConditionName = a.source
    e.BranchId = ua.NodeId()
    e.add_property("NodeId", condition_id(a.source, idx), ua.VariantType.NodeId)
    e.Retain = a.active
    e.EnabledState = ua.LocalizedText("Enabled")
    setattr(e, "EnabledState/Id", True)
    in_alarm = a.current > Severity.NO_ALARM
    e.ActiveState = _state(in_alarm, "Active", "Inactive")
    setattr(e, "ActiveState/Id", in_alarm)
    e.AckedState = _state(a.acked, "Acknowledged", "Unacknowledged")
    setattr(e, "AckedState/Id", a.acked)
    latched = a.latch and a.active and a.current < a.latched
    e.LatchedState = _state(latched, "Latched", "Unlatched")
    setattr(e, "LatchedState/Id", latched)
    shelved = a.shelved(now)
    e.SuppressedOrShelved = shelved
    shelving = ua.LocalizedText("TimedShelved" if shelved else "Unshelved")
    e.add_variable("ShelvingState", shelving, ua.VariantType.LocalizedText)
    e.add_property("ShelvingState/CurrentState", shelving, ua.VariantType.LocalizedText)
    e.add_property("ShelvingState/CurrentState/Id", TIMED_SHELVED if shelved else UNSHELVED, ua.VariantType.NodeId)
    remaining_ms = max(0.0, (a.shelved_until - now) * 1000.0) if shelved and a.shelved_until is not None else 0.0
    e.add_property("ShelvingState/UnshelveTime", remaining_ms, ua.VariantType.Double)
    e.Quality = status_code(Reading(a.value, a.since, a.current, a.status))
    e.LastSeverity = last_severity
    e.Comment = ua.LocalizedText(ev.reason if ev.kind in ("acknowledged", "shelved") else "")
    e.ClientUserId = ev.user
    return e, event_id


def _message(ev: AlarmEvent) -> str:
    a = ev.alarm
    text = a.message or f"{a.source} {a.current.name}"
    if ev.kind == "acknowledged":
        return f"{text} -- acknowledged by {ev.user}{': ' + ev.reason if ev.reason else ''}"
    if ev.kind == "shelved":
        return f"{text} -- shelved by {ev.user}: {ev.reason}"
    if ev.kind == "unshelved":
        return f"{text} -- unshelved{' by ' + ev.user if ev.user else ''}{': ' + ev.reason if ev.reason else ''}"
    if ev.kind == "returned":
        return f"{a.source} back to normal, still latched at {a.latched.name} until acknowledged"
    return text


def _custom(type_id: ua.NodeId, source: ua.NodeId, source_name: str, ts: float, severity: int, message: str) -> BaseEvent:
    e = BaseEvent()
    e.emitting_node = SERVER
    e.EventType = type_id
    e.SourceNode = source
    e.SourceName = source_name
    e.Severity = severity
    e.Message = ua.LocalizedText(message)
    _stamp(e, ts)
    return e


def lease_event(ev: LeaseEvent, type_id: ua.NodeId, lock_node: ua.NodeId) -> BaseEvent:
    """The LeaseEventType event of a lease change."""
    who = f" by {ev.by}" if ev.by and ev.by != ev.user else ""
    why = f" ({ev.reason})" if ev.reason and ev.reason != ev.kind else ""
    message = f"{ev.resource}: lock of {ev.user} {ev.kind}{who}{why}"
    e = _custom(type_id, lock_node, ev.resource, ev.time, LEASE_SEVERITY.get(ev.kind, 200), message)
    for name, value in (("Resource", ev.resource), ("Kind", ev.kind), ("User", ev.user), ("Client", ev.client), ("By", ev.by), ("Reason", ev.reason)):
        e.add_property(name, value, ua.VariantType.String)
    return e


def interlock_event(t: Transition, type_id: ua.NodeId, idx: int) -> BaseEvent:
    """The InterlockEventType event of an interlock transition."""
    pv = state_pv(t.name)
    message = f"interlock {t.name}: {t.old} -> {t.new}{' (' + t.reason + ')' if t.reason else ''}"
    e = _custom(type_id, ua.NodeId(pv, idx), pv, t.time, INTERLOCK_SEVERITY.get(t.new, 200), message)
    for name, value in (("Interlock", t.name), ("FromState", t.old), ("ToState", t.new), ("Reason", t.reason)):
        e.add_property(name, value, ua.VariantType.String)
    return e


class EventQueue:
    """Events (and data changes of control variables) from synchronous listeners, sent in order by one task."""

    def __init__(self, iserver: InternalServer, limit: int = QUEUE_LIMIT, emitted: Callable[[Any], None] | None = None) -> None:
        """``emitted(event)`` is called for each event once it is sent (the retained conditions follow it)."""
        self.iserver = iserver
        self.emitted = emitted
        self._events: deque[Any] = deque(maxlen=limit)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    def put(self, event: Any) -> None:
        """Queue an event (the oldest waiting one is dropped when full)."""
        if len(self._events) == self._events.maxlen:
            self.dropped += 1
        self._events.append(event)
        self._wake.set()

    def start(self) -> None:
        """Start the emitter task."""
        self._task = supervise("opcua events", self._run, backoff=Backoff(0.05, 5.0)).task  # restarted if it fails

    async def stop(self) -> None:
        """Stop the emitter task (events still queued are not sent)."""
        if self._task is None:
            return
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None

    def changed(self, attr: AttributeValue, dv: ua.DataValue) -> None:
        """Store a variable's new value now and queue its data change for the monitored items watching it."""
        attr.value = dv
        if attr.datachange_callbacks:
            self.put((attr, dv))

    async def drain(self) -> None:
        """Trigger every queued event (and data change) now."""
        service = self.iserver.subscription_service
        while self._events:
            item = self._events.popleft()
            try:
                if isinstance(item, tuple):
                    attr, dv = item
                    for handle, callback in list(attr.datachange_callbacks.items()):
                        await callback(handle, dv)
                else:
                    await service.trigger_event(item)
                    if self.emitted is not None:
                        self.emitted(item)
            except Exception:  # one malformed event must not stop the others
                log.exception("triggering OPC UA event %s failed", item)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.drain()


# ---- ConditionRefresh ----------------------------------------------------------------------------------


class RetainedConditions:
    """The latest event of every retained condition, as it was sent, and ConditionRefresh (Part 9 5.5.7, 5.5.8)."""

    def __init__(self) -> None:
        self._events: dict[ua.NodeId, AlarmCondition] = {}
        self._refreshing: set[int] = set()

    def emitted(self, event: Any) -> None:
        """Follow a sent event: a condition with Retain true is kept, one without is let go."""
        if not isinstance(event, AlarmCondition):
            return
        cid = getattr(event, "NodeId", None)
        if cid is None:
            return
        if event.Retain:
            self._events[cid] = event
        else:
            self._events.pop(cid, None)

    def retained(self) -> list[AlarmCondition]:
        """The retained conditions' latest events, oldest condition first."""
        return list(self._events.values())

    async def refresh(self, session: Any, subscription_id: int, monitored_item_id: int | None = None) -> None:
        """Send the refresh to ``session``'s subscription (or one of its monitored items); else raise Refused.

        Refusals (Part 9 tables 21 and 23): BadSubscriptionIdInvalid (no such subscription),
        BadUserAccessDenied (another session's), BadMonitoredItemIdInvalid (ConditionRefresh2:
        not an event item of it), BadNothingToDo (it has no event monitored items),
        BadRefreshInProgress (a refresh of it is still running).
        """
        target = f"subscription {subscription_id}"
        method = "ConditionRefresh" if monitored_item_id is None else "ConditionRefresh2"
        sub = session.subscription_service.subscriptions.get(subscription_id)
        if sub is None:
            raise Refused(_S.BadSubscriptionIdInvalid, NotFound(f"{method}: no subscription {subscription_id}", action=Action.ALARM_LIST, target=target))
        if sub.session_id != session.session_id:
            raise Refused(_S.BadUserAccessDenied, Forbidden(f"{method}: subscription {subscription_id} is not this session's", action=Action.ALARM_LIST, target=target))
        service = sub.monitored_item_srv
        items = service._monitored_items  # noqa: SLF001 -- asyncua 2.1 (pinned) keeps them there
        event_items = [mid for mid, data in items.items() if isinstance(data.filter, ua.EventFilter)]
        if monitored_item_id is not None:
            if monitored_item_id not in event_items:
                raise Refused(_S.BadMonitoredItemIdInvalid, InvalidArgument(f"{method}: subscription {subscription_id} has no event monitored item {monitored_item_id}", action=Action.ALARM_LIST, target=target))
            event_items = [monitored_item_id]
        if not event_items:
            raise Refused(_S.BadNothingToDo, InvalidArgument(f"{method}: subscription {subscription_id} has no event monitored items", action=Action.ALARM_LIST, target=target))
        if subscription_id in self._refreshing:
            raise Refused(_S.BadRefreshInProgress, Conflict(f"{method}: a refresh of subscription {subscription_id} is still running", action=Action.ALARM_LIST, target=target))
        self._refreshing.add(subscription_id)
        try:
            start, end = _bracket(RefreshStartEvent(), "started"), _bracket(RefreshEndEvent(), "ended")
            for mid in event_items:
                await _enqueue(service, mid, start, filtered=False)
            retained = self.retained()
            server_items = set(service._monitored_events.get(SERVER, ()))  # noqa: SLF001 -- the items on the Server object, which emits the conditions
            for event in retained:
                for mid in event_items:
                    if mid in server_items:
                        await _enqueue(service, mid, event, filtered=True)
            for mid in event_items:
                await _enqueue(service, mid, end, filtered=False)
        finally:
            self._refreshing.discard(subscription_id)


def _bracket(event: BaseEvent, what: str) -> BaseEvent:
    """A RefreshStartEvent or RefreshEndEvent from the Server object."""
    event.emitting_node = SERVER
    event.SourceNode = SERVER
    event.SourceName = "Server"
    event.Severity = 100
    event.Message = ua.LocalizedText(f"ConditionRefresh {what}")
    _stamp(event, _dt.datetime.now(_dt.UTC).timestamp())
    return event


async def _enqueue(service: Any, mid: int, event: BaseEvent, *, filtered: bool) -> None:
    """Queue one event for one monitored item (its select clauses; its where clause only if ``filtered``)."""
    data = service._monitored_items.get(mid)  # noqa: SLF001
    if data is None:
        return
    if filtered and (data.where_clause_evaluator is None or not data.where_clause_evaluator.eval(event)):
        return
    fields = ua.EventFieldList()
    fields.ClientHandle = data.client_handle
    fields.EventFields = event.to_event_fields(data.filter.SelectClauses)
    await service.isub.enqueue_event(mid, fields, data.queue_size)


# ---- OfType in where clauses ---------------------------------------------------------------------------

_HAS_SUBTYPE = ua.NodeId(ua.ObjectIds.HasSubtype)


def is_subtype(aspace: Any, node: ua.NodeId, base: ua.NodeId) -> bool:
    """Whether type ``node`` is ``base`` or one of its subtypes (following inverse HasSubtype references)."""
    seen: set[ua.NodeId] = set()
    current: ua.NodeId | None = node
    while current is not None and current not in seen:
        if current == base:
            return True
        seen.add(current)
        data = aspace.get(current)
        current = None
        for ref in data.references if data is not None else ():
            if not ref.IsForward and ref.ReferenceTypeId == _HAS_SUBTYPE:
                current = ref.NodeId
                break
    return False


def install_of_type() -> None:
    """Make asyncua's where-clause evaluator answer OfType for subtypes too (Part 4 7.7.3). Idempotent.

    Checked against the pinned asyncua: if the method it wraps changes, asyncua is left as
    it is and a warning says so.
    """
    cls: Any = WhereClauseEvaluator
    current = cls._eval_el
    if getattr(current, "_labctl", False):
        return
    if "OfType" not in current.__code__.co_names or current.__code__.co_argcount != 3:
        log.warning("asyncua's WhereClauseEvaluator changed; OfType keeps matching the exact event type only")
        return

    def _eval_el(self: Any, index: int, event: Any) -> Any:
        el = self.elements[index]
        if el.FilterOperator == ua.FilterOperator.OfType:
            base = self._eval_op(el.FilterOperands[0], event)
            return isinstance(base, ua.NodeId) and is_subtype(self._aspace, event.EventType, base)
        return current(self, index, event)

    _eval_el._labctl = True  # type: ignore[attr-defined]
    cls._eval_el = _eval_el
