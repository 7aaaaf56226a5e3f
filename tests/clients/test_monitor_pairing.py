"""A monitor pairs each value with its AlarmState by time, however a publish orders them.

The server sends a reading whose severity changed as two notifications -- the value and the
PV's ``AlarmState`` (``100 x severity + status``), both stamped with the reading's time --
in one publish, grouped per monitored item, so either may come first. These tests feed
:meth:`labctl.clients.monitor.Monitor._take` publishes as asyncua delivers them and check
that every reading is one sample with its own severity.
"""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

from asyncua import ua
from asyncua.common.subscription import DataChangeEvent
from labctl.clients.monitor import Monitor
from labctl.clients.values import Metadata
from labctl.ioc.types import PVType, Severity, Status

T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def at(s: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=s)


def value(v: float | None, s: float, code: int = ua.StatusCodes.Good) -> tuple[str, ua.DataValue]:
    variant = ua.Variant(v, ua.VariantType.Double) if v is not None else ua.Variant()
    return "T", ua.DataValue(variant, ua.StatusCode(code), SourceTimestamp=at(s))


def alarm(state: int, s: float) -> tuple[str, ua.DataValue]:
    return "T.AlarmState", ua.DataValue(ua.Variant(state, ua.VariantType.Int32), ua.StatusCode(), SourceTimestamp=at(s))


def monitor() -> Monitor:
    session = SimpleNamespace(_meta={"T": Metadata("T", PVType.FLOAT64)}, url="opc.tcp://test")
    mon = Monitor(session, ["T"], 100, 50.0)  # type: ignore[arg-type]
    mon._by_handle = {ua.NodeId("T", 2): ("T", False), ua.NodeId("T.AlarmState", 2): ("T", True)}
    return mon


def publish(mon: Monitor, *items: tuple[str, ua.DataValue]) -> list[tuple[float | None, Severity, Status, float]]:
    """Hand one publish to the monitor; the samples it yields as (value, severity, status, seconds after T0)."""
    events = [
        DataChangeEvent(node=SimpleNamespace(nodeid=ua.NodeId(n, 2)), value=None, data=SimpleNamespace(monitored_item=SimpleNamespace(Value=dv)))  # type: ignore[arg-type]
        for n, dv in items
    ]
    mon._take(events)
    out = [(s.reading.value, s.reading.severity, s.reading.status, s.reading.timestamp - T0.timestamp()) for s in mon._ready]
    mon._ready.clear()
    return out


def test_a_reading_is_one_sample_with_its_severity_whichever_notification_comes_first():
    mon = monitor()
    assert publish(mon, value(1.0, 0), alarm(0, 0)) == [(1.0, Severity.NO_ALARM, Status.NO_ALARM, 0)]
    assert publish(mon, value(150.0, 1), alarm(104, 1)) == [(150.0, Severity.MINOR, Status.HIGH, 1)]
    assert publish(mon, alarm(203, 2), value(250.0, 2)) == [(250.0, Severity.MAJOR, Status.HIHI, 2)]


def test_several_readings_in_one_publish_each_get_the_state_of_their_time():
    mon = monitor()
    publish(mon, value(1.0, 0), alarm(0, 0))
    # grouped per item: the values first, then the alarm states
    got = publish(mon, value(50.0, 1), value(150.0, 2), value(250.0, 3), value(5.0, 4), alarm(104, 2), alarm(203, 3), alarm(0, 4))
    assert got == [
        (50.0, Severity.NO_ALARM, Status.NO_ALARM, 1),
        (150.0, Severity.MINOR, Status.HIGH, 2),
        (250.0, Severity.MAJOR, Status.HIHI, 3),
        (5.0, Severity.NO_ALARM, Status.NO_ALARM, 4),
    ]


def test_an_alarm_change_without_a_value_change_is_a_sample_of_its_own():
    mon = monitor()
    publish(mon, value(150.0, 0), alarm(0, 0))
    # the value did not change (the server sends no value notification); an alarm delay expired
    assert publish(mon, alarm(104, 5)) == [(150.0, Severity.MINOR, Status.HIGH, 5)]


def test_a_state_newer_than_the_first_value_is_the_state_in_force_and_no_extra_sample():
    mon = monitor()
    # a value posted with an old timestamp: the AlarmState (set at start-up) is newer than it
    assert publish(mon, value(4.2, -3600), alarm(0, 0)) == [(4.2, Severity.NO_ALARM, Status.NO_ALARM, -3600)]
    assert publish(mon, alarm(0, 10)) == [], "an AlarmState that says what is in force already is no change"


def test_a_bad_value_is_invalid_whatever_the_state_says():
    mon = monitor()
    publish(mon, value(1.0, 0), alarm(0, 0))
    got = publish(mon, value(None, 1, ua.StatusCodes.BadCommunicationError), alarm(309, 1))
    assert got == [(None, Severity.INVALID, Status.COMM, 1)]
    assert publish(mon, value(2.0, 2), alarm(0, 2)) == [(2.0, Severity.NO_ALARM, Status.NO_ALARM, 2)]
