"""Alarms and interlocks over OPC UA: condition events, Acknowledge, shelving, interlock trip and reset.

A whole server with the simulated cryostat (fast time constants, so a warm-up takes about
a second, as in ``tests/system/test_cryostat_warmup.py``) runs for the module. Clients
subscribe to events on the Server object, as generic alarm clients do.
"""

from __future__ import annotations

import asyncio

import pytest
from asyncua import ua
from labctl.clients.errors import AccessDenied, CommandConflict, CommandInvalid, CommandNotFound
from labctl.ioc.interlocks import STATES

from tests.helpers import wait_for
from tests.protocol.opcua.control_support import (  # noqa: F401 -- fixtures
    NAMESPACE,
    SITE,
    call_diagnosed,
    call_json,
    module_loop_leak_check,
    module_server,
    open_session_fixture,
    open_ua_fixture,
    refusal,
    s,
)
from tests.sites import FAST_CRYOSTAT

pytestmark = pytest.mark.asyncio(loop_scope="module")

BODY = """
resources: [{name: cryostat}]
""" + FAST_CRYOSTAT + """pvs:
  - {name: "LAB:PRES", type: float64, unit: mbar, writable: true, initial: 1.0e-6,
     alarm: {high: 1.0e-3, hihi: 1.0e-2, latch: true, guidance: "close the gate valve"}}
interlocks:
  - name: mxc_warm
    description: "mixing chamber too warm"
    pv: "CRYO:MXC:TEMP"
    warn: 0.04
    trip: 0.05
    resume: 0.03
    for_s: 0.3
    reset: manual
    actions:
      hold_queue: true
      set:
        - {pv: "CRYO:MXC:HTR:RANGE", value: 0}
        - {pv: "CRYO:STILL:HTR", value: 0}
"""

served = module_server(BODY)


class Events:
    """Events from a subscription on the Server object."""

    def __init__(self) -> None:
        self.items: list = []
        self._changed = asyncio.Event()

    def event_notification(self, event) -> None:
        self.items.append(event)
        self._changed.set()

    async def seen(self, predicate, timeout: float = 15.0):
        """The first event so far (or to come) matching ``predicate``."""
        async with asyncio.timeout(timeout):
            while True:
                for item in self.items:
                    if predicate(item):
                        return item
                self._changed.clear()
                await self._changed.wait()


async def subscribe(client, *types) -> Events:
    events = Events()
    sub = await client.create_subscription(50, events)
    await sub.subscribe_events(client.nodes.server, list(types))
    return events


def field(event, name: str):
    return getattr(event, name, None)


async def test_a_warm_up_raises_alarm_events_trips_the_interlock_and_is_acknowledged_and_reset(served, open_ua, open_session):
    await wait_for(lambda: served.db.read("CRYO:MXC:TEMP").valid, what="first reading")
    alice, vic, erin = [await open_ua(served.url, u) for u in ("alice", "vic", "erin")]
    idx = await alice.get_namespace_index(NAMESPACE)
    interlock_type = alice.get_node(ua.NodeId(f"/{SITE}/types/InterlockEventType", idx))
    events = await subscribe(alice, alice.get_node(ua.ObjectIds.AlarmConditionType), interlock_type)

    served.server.plants["cryo"].stop_compressor()
    major = await events.seen(lambda e: e.SourceName == "CRYO:MXC:TEMP" and e.Severity == 700)
    assert major.EventType == ua.NodeId(ua.ObjectIds.AlarmConditionType)
    assert major.Message.Text.startswith("CRYO:MXC:TEMP HIHI (MAJOR): ")
    assert major.SourceNode == ua.NodeId("CRYO:MXC:TEMP", idx)
    assert major.ConditionName == "CRYO:MXC:TEMP" and major.Time is not None
    assert field(major, "Retain") is True
    assert field(major, "AckedState/Id") is False and field(major, "ActiveState/Id") is True
    # On its way up the reading passed HIGH (MINOR) unless one scan took it from below HIGH to above
    # HIHI (a loaded machine): the MAJOR event's LastSeverity says which, and there was a MINOR event
    # exactly when it passed.
    minor = [e for e in events.items if e.SourceName == "CRYO:MXC:TEMP" and e.Severity == 300]
    if field(major, "LastSeverity") == 300:
        assert minor and minor[0].Message.Text.startswith("CRYO:MXC:TEMP HIGH (MINOR)")
        assert events.items.index(minor[0]) < events.items.index(major)
    else:
        assert field(major, "LastSeverity") in (0, 1) and not minor, [(e.SourceName, e.Severity) for e in events.items]

    # The interlock trips: an event, and its state PV over OPC UA.
    tripped = await events.seen(lambda e: field(e, "ToState") == "TRIPPED")
    assert (tripped.Interlock, tripped.SourceName, tripped.Severity) == ("mxc_warm", "ILK:MXC_WARM:STATE", 800)
    assert tripped.Message.Text.startswith("interlock mxc_warm: PENDING -> TRIPPED (CRYO:MXC:TEMP = ")
    state = alice.get_node(ua.NodeId("ILK:MXC_WARM:STATE", idx))
    dv = await state.read_data_value(raise_on_bad_status=False)
    assert dv.Value.Value == STATES.index("TRIPPED")
    assert dv.StatusCode.value == ua.StatusCodes.Good  # an alarm is no quality problem...
    assert await alice.get_node(ua.NodeId("ILK:MXC_WARM:STATE.AlarmState", idx)).read_value() == 207  # ...its AlarmState says MAJOR STATE
    assert await events.seen(lambda e: e.SourceName == "ILK:MXC_WARM:STATE" and e.Severity == 700)  # its alarm too
    await wait_for(lambda: served.db.read("CRYO:STILL:HTR").value == 0.0, what="heater off")

    # A viewer's acknowledge is refused; an operator's (Part 9 Acknowledge on the condition) works.
    mark = served.mark()
    res, denied = await call_diagnosed(vic, "Control", "AcknowledgeAlarm", s("CRYO:MXC:TEMP"), s("seen"))
    assert res.StatusCode.value == ua.StatusCodes.BadUserAccessDenied
    assert (denied["kind"], denied["action"], denied["target"]) == ("forbidden", "alarm.ack", "CRYO:MXC:TEMP")
    assert denied["fields"] == {"user": "vic", "needs": "a role that may acknowledge alarms"}
    assert "CRYO:MXC:TEMP" in await refusal(vic)
    latest = [e for e in events.items if e.SourceName == "CRYO:MXC:TEMP"][-1]
    condition = alice.get_node(field(latest, "NodeId"))
    assert condition.nodeid == ua.NodeId("CRYO:MXC:TEMP.Alarm", idx)
    with pytest.raises(ua.UaStatusCodeError) as unknown:
        await condition.call_method(ua.NodeId(ua.ObjectIds.AcknowledgeableConditionType_Acknowledge), b"not an event", ua.LocalizedText("x"))
    assert unknown.value.code == ua.StatusCodes.BadEventIdUnknown
    await condition.call_method(
        ua.NodeId(ua.ObjectIds.AcknowledgeableConditionType_Acknowledge), latest.EventId, ua.LocalizedText("compressor tripped")
    )
    acked = await events.seen(lambda e: e.SourceName == "CRYO:MXC:TEMP" and field(e, "AckedState/Id") is True)
    assert (acked.ClientUserId, field(acked, "Comment").Text) == ("alice", "compressor tripped")
    assert "acknowledged by alice: compressor tripped" in acked.Message.Text
    with pytest.raises(ua.UaStatusCodeError) as twice:
        await condition.call_method(ua.NodeId(ua.ObjectIds.AcknowledgeableConditionType_Acknowledge), acked.EventId, ua.LocalizedText(""))
    assert twice.value.code == ua.StatusCodes.BadConditionBranchAlreadyAcked

    # Reset: not by an operator, not before the condition clears; by an expert after cooling.
    alice_s, erin_s = await open_session(served.url, "alice"), await open_session(served.url, "erin")
    with pytest.raises(AccessDenied) as operator:
        await alice_s.reset_interlock("mxc_warm")
    assert (operator.value.action, operator.value.target, operator.value.fields["user"]) == ("interlock.reset", "mxc_warm", "alice")
    with pytest.raises(CommandConflict) as early:
        await erin_s.reset_interlock("mxc_warm")
    assert (early.value.status, early.value.error, early.value.fields["interlock"]) == ("BadInvalidState", "NotResettable", "mxc_warm")
    assert early.value.fields["state"] != "RESET_NEEDED"  # its condition has not cleared yet
    served.server.plants["cryo"].start_compressor()
    await wait_for(lambda: served.control.interlocks.state("mxc_warm") == "RESET_NEEDED", timeout=15, what="cleared")
    (info,) = await erin_s.interlocks()
    assert (info.name, info.state, info.description) == ("mxc_warm", "RESET_NEEDED", "mixing chamber too warm")
    await erin_s.reset_interlock("mxc_warm")
    assert await events.seen(lambda e: field(e, "ToState") == "OK" and field(e, "FromState") == "RESET_NEEDED")
    assert (await state.read_data_value(raise_on_bad_status=False)).Value.Value == STATES.index("OK")
    actions = [(r.action, r.user, r.accepted) for r in served.audit if r.action.startswith(("interlock.", "alarm."))]
    assert ("interlock.trip", "labctl", True) in actions
    assert ("alarm.ack", "alice", True) in actions and ("interlock.reset", "erin", True) in actions
    # Each refusal audited once: the viewer's, the unknown EventId, the second Acknowledge, the operator's and the early reset.
    assert served.refusals(mark) == [
        ("alarm.ack", "vic", "CRYO:MXC:TEMP"), ("alarm.ack", "alice", "CRYO:MXC:TEMP"), ("alarm.ack", "alice", "CRYO:MXC:TEMP"),
        ("interlock.reset", "alice", "mxc_warm"), ("interlock.reset", "erin", "mxc_warm"),
    ]  # fmt: skip


async def test_a_latched_alarm_is_listed_acknowledged_and_shelved(served, open_session, open_ua):
    alice, vic, erin = [await open_session(served.url, u) for u in ("alice", "vic", "erin")]
    served.db.post("LAB:PRES", 0.05)  # HIHI
    served.db.post("LAB:PRES", 1.0e-6)  # back to normal, still latched
    (alarm,) = [a for a in await alice.alarms() if a.source == "LAB:PRES"]
    assert (alarm.severity, alarm.current, alarm.acked, alarm.active) == ("MAJOR", "NO_ALARM", False, True)
    assert alarm.guidance == "close the gate valve" and alarm.shelved_until is None
    assert "LAB:PRES" in {a.source for a in await alice.alarms(active_only=False)}
    mark = served.mark()
    with pytest.raises(AccessDenied) as viewer:
        await vic.acknowledge("LAB:PRES", "seen")
    assert (viewer.value.action, viewer.value.target, viewer.value.fields["user"]) == ("alarm.ack", "LAB:PRES", "vic")
    await alice.acknowledge("LAB:PRES", "vented on purpose")
    assert "LAB:PRES" not in {a.source for a in await alice.alarms()}
    with pytest.raises(CommandConflict) as nothing:
        await alice.acknowledge("LAB:PRES")
    assert (nothing.value.status, nothing.value.error, nothing.value.fields) == ("BadInvalidState", "AlarmStateConflict", {"source": "LAB:PRES"})
    assert "not in alarm" in nothing.value.reason  # not in alarm, or already acknowledged: the sentence says which
    with pytest.raises(CommandNotFound) as unknown:
        await alice.acknowledge("NOPE")
    assert (unknown.value.status, unknown.value.error, unknown.value.target) == ("BadInvalidArgument", "NoSuchAlarm", "NOPE")

    served.db.post("LAB:PRES", 5.0e-3)  # HIGH
    with pytest.raises(AccessDenied) as operator:
        await alice.shelve("LAB:PRES", 3600, "pumping down")
    assert (operator.value.action, operator.value.fields) == ("alarm.shelve", {"user": "alice", "needs": "a role that may shelve alarms"})
    with pytest.raises(CommandInvalid) as no_reason:
        await erin.shelve("LAB:PRES", 3600, " ")
    assert (no_reason.value.status, no_reason.value.error, no_reason.value.action) == ("BadInvalidArgument", "BadShelving", "alarm.shelve")
    await erin.shelve("LAB:PRES", 3600, "pumping down")
    (shelved,) = [a for a in await alice.alarms() if a.source == "LAB:PRES"]
    assert shelved.shelved_until is not None and shelved.severity == "MINOR"
    raw = await open_ua(served.url, "alice")
    (listed,) = [a for a in await call_json(raw, "ListAlarms", ua.Variant(True, ua.VariantType.Boolean)) if a["source"] == "LAB:PRES"]
    assert (listed["shelved_by"], listed["shelve_reason"]) == ("erin", "pumping down")
    await erin.unshelve("LAB:PRES")
    served.db.post("LAB:PRES", 1.0e-6)
    await alice.acknowledge("LAB:PRES")
    shelving = [(r.action, r.user, r.accepted) for r in served.audit if r.action in ("alarm.shelve", "alarm.unshelve")]
    assert shelving == [
        ("alarm.shelve", "alice", False), ("alarm.shelve", "erin", False), ("alarm.shelve", "erin", True), ("alarm.unshelve", "erin", True),
    ]  # fmt: skip
    assert served.refusals(mark) == [
        ("alarm.ack", "vic", "LAB:PRES"), ("alarm.ack", "alice", "LAB:PRES"), ("alarm.ack", "alice", "NOPE"),
        ("alarm.shelve", "alice", "LAB:PRES"), ("alarm.shelve", "erin", "LAB:PRES"),
    ]  # fmt: skip


async def test_condition_refresh_refuses_what_part_9_refuses(served, open_ua):
    vic = await open_ua(served.url, "vic")
    condition_type = vic.get_node(ua.ObjectIds.ConditionType)
    refresh, refresh2 = ua.NodeId(ua.ObjectIds.ConditionType_ConditionRefresh), ua.NodeId(ua.ObjectIds.ConditionType_ConditionRefresh2)

    async def status(method, *args) -> str:
        try:
            await condition_type.call_method(method, *(ua.Variant(a, ua.VariantType.UInt32) for a in args))
        except ua.UaStatusCodeError as e:
            return ua.StatusCode(e.code).name
        return "Good"

    values = await vic.create_subscription(50, None)
    handles = await values.subscribe_data_change([vic.get_node(ua.NodeId("LAB:PRES", await vic.get_namespace_index(NAMESPACE)))])
    assert await status(refresh, values.subscription_id) == "BadNothingToDo", "no event monitored items"
    assert await status(refresh2, values.subscription_id, handles[0]) == "BadMonitoredItemIdInvalid", "not an event item"
    assert await status(refresh, 4_000_000) == "BadSubscriptionIdInvalid"
    await values.delete()
