"""The terminal UI's pure decisions: formats, filter, folders, input checks, lock and alarm rows."""

from __future__ import annotations

import math

import pytest
from labctl.clients.errors import refusal_from_dict
from labctl.clients.tui.link import LinkState, LinkStatus
from labctl.clients.tui.model import (
    AlarmSummary,
    InputError,
    alarm_rows,
    alarm_text,
    carried_forward,
    folders,
    lock_pvs,
    lock_rows,
    matches,
    parse_input,
    range_warning,
    refused_resource,
    select,
    value_text,
)
from labctl.clients.tui.widgets.status import banner_content, status_content
from labctl.clients.values import Metadata
from labctl.ioc.errors import LockedBy, OutOfRange
from labctl.ioc.types import PVType, Reading, Severity, Status

TEMP = Metadata("CRYO:MXC:TEMP", PVType.FLOAT64, "mixing chamber temperature", "K", display=(0.0, 0.5), path="demo/bridge/temperature:6")
SETP = Metadata("CRYO:MXC:SETP", PVType.FLOAT64, "setpoint", "K", display=(0.0, 0.3), writable=True, path="demo/bridge/setpoint:0")
RANGE = Metadata("MAG:HTR:RANGE", PVType.ENUM, "heater range", states=("Off", "Low", "High"), writable=True, path="demo/magtc/heater_range:1")
COUNT = Metadata("LAB:COUNT", PVType.INT, writable=True, path="demo/soft/LAB:COUNT")
WAVE = Metadata("LAB:WAVE", PVType.FLOAT64_ARRAY, unit="V", length=3, writable=True, path="demo/soft/LAB:WAVE")
NOTE = Metadata("LAB:NOTE", PVType.STRING, writable=True, path="demo/soft/LAB:NOTE")
ON = Metadata("SMU1:OUT", PVType.BOOL, writable=True, path="demo/smu1/output_enabled")
DEEP = Metadata("BIG:G07:CH01", PVType.FLOAT64, path="big/soft/BIG/G07/BIG:G07:CH01")
ALL = [TEMP, SETP, RANGE, COUNT, WAVE, NOTE, ON]


def r(value, severity=Severity.NO_ALARM, status=Status.NO_ALARM, ts=1.0):
    return Reading(value, ts, severity, status)


def test_value_and_alarm_text():
    assert value_text(TEMP, None) == "…"
    assert value_text(TEMP, r(0.0123456789)) == "0.0123457"
    assert value_text(RANGE, r(2)) == "High"
    assert value_text(TEMP, r(None, Severity.INVALID, Status.COMM)) == "(invalid)"
    assert alarm_text(r(1.0)) == ""
    assert alarm_text(r(1.0, Severity.MAJOR, Status.HIHI)) == "MAJOR HIHI"
    assert alarm_text(r(None, Severity.INVALID, Status.COMM)) == "INVALID COMM"


def test_filter_words_and_globs():
    assert matches(TEMP, "mxc temp") and matches(TEMP, "MIXING") and matches(TEMP, "K")
    assert not matches(TEMP, "mxc setp")
    assert matches(TEMP, "cryo:*:temp") and not matches(SETP, "cryo:*:temp")
    assert select(ALL, "demo/bridge") == ["CRYO:MXC:TEMP", "CRYO:MXC:SETP"]
    assert select(ALL, "", "lab:*") == ["LAB:COUNT", "LAB:WAVE", "LAB:NOTE"]
    assert select(ALL, "demo/soft", "note") == ["LAB:NOTE"]
    assert select(ALL, "demo/bri") == [], "a folder is a whole path segment"


def test_folders_in_server_order_with_parents():
    assert folders(ALL) == ["demo", "demo/bridge", "demo/magtc", "demo/soft", "demo/smu1"]
    assert folders([DEEP]) == ["big", "big/soft", "big/soft/BIG", "big/soft/BIG/G07"]


@pytest.mark.parametrize(
    ("meta", "text", "value"),
    [
        (SETP, " 0.1 ", 0.1),
        (COUNT, "0x10", 16),
        (RANGE, "High", 2),
        (RANGE, "1", 1),
        (ON, "on", True),
        (WAVE, "1, 2, 3", [1.0, 2.0, 3.0]),
        (WAVE, "[4, 5, 6]", [4.0, 5.0, 6.0]),
        (NOTE, "  spaces kept ", "  spaces kept "),
        (NOTE, "", ""),
    ],
)
def test_parse_input(meta, text, value):
    assert parse_input(meta, text) == value


@pytest.mark.parametrize(
    ("meta", "text", "message"),
    [
        (SETP, "", "type a value"),
        (SETP, "warm", "CRYO:MXC:SETP is float64: expected a number, got 'warm'"),
        (RANGE, "Turbo", "MAG:HTR:RANGE is enum: expected one of ['Off', 'Low', 'High'] or a state index, got 'Turbo'"),
        (RANGE, "3", "MAG:HTR:RANGE has states 0..2: Off, Low, High"),
        (WAVE, "1, 2, 3, 4", "LAB:WAVE takes at most 3 numbers, got 4"),
        (ON, "maybe", "SMU1:OUT is bool: expected true or false (or 1/0, on/off), got 'maybe'"),
    ],
)
def test_parse_input_refuses_with_a_reason(meta, text, message):
    with pytest.raises(InputError) as e:
        parse_input(meta, text)
    assert str(e.value) == message


def test_published_range_only_warns():
    assert range_warning(SETP, 0.2) == ""
    assert range_warning(SETP, 0.5) == "0.5 is outside the published range [0, 0.3] K"
    assert range_warning(COUNT, 10**6) == "", "no range published"


def test_the_resource_a_refusal_names_is_read_from_its_fields():
    held = refusal_from_dict(LockedBy("CRYO:MXC:SETP", "cryostat", "alice", 1_750_000_000.0).to_dict(), status="BadLocked")
    free = refusal_from_dict(LockedBy("CRYO:MXC:SETP", "cryostat", "", None).to_dict(), status="BadLocked")
    assert refused_resource(held) == refused_resource(free) == "cryostat"
    out_of_range = refusal_from_dict(OutOfRange("CRYO:MXC:SETP", 1.0, 0, 0.3).to_dict(), status="BadOutOfRange")
    assert refused_resource(out_of_range) is None


def test_lock_rows_from_the_lock_pvs():
    metas = {
        "ARB:CRYOSTAT:OWNER": Metadata("ARB:CRYOSTAT:OWNER", PVType.STRING, "cryostat lock holder"),
        "ARB:CRYOSTAT:EXPIRES": Metadata("ARB:CRYOSTAT:EXPIRES", PVType.FLOAT64),
        "ARB:CRYOSTAT:QUEUE": Metadata("ARB:CRYOSTAT:QUEUE", PVType.INT),
        "ARB:SMU1:OWNER": Metadata("ARB:SMU1:OWNER", PVType.STRING, "smu1 lock holder"),
        "CRYO:MXC:TEMP": TEMP,
    }
    readings = {"ARB:CRYOSTAT:OWNER": r("alice"), "ARB:CRYOSTAT:EXPIRES": r(1000.0), "ARB:CRYOSTAT:QUEUE": r(2), "ARB:SMU1:OWNER": r("")}
    assert lock_pvs(metas) == ["ARB:CRYOSTAT:OWNER", "ARB:CRYOSTAT:EXPIRES", "ARB:CRYOSTAT:QUEUE", "ARB:SMU1:OWNER"]
    rows = lock_rows(metas, readings)
    assert [(x.resource, x.owner, x.expires_at, x.queue_length) for x in rows] == [("cryostat", "alice", 1000.0, 2), ("smu1", "", None, 0)]


def test_alarm_rows_and_summary_from_pvs():
    readings = {
        "A": r(1.0, Severity.MINOR, Status.HIGH),
        "B": r(None, Severity.INVALID, Status.COMM),
        "C": r(1.0),
        "ALARM:HIGHEST": r(3),
        "ALARM:ACTIVE:MINOR": r(1),
        "ALARM:ACTIVE:INVALID": r(1),
        "ALARM:UNACKED:INVALID": r(1),
    }
    assert [(a.source, a.severity, a.status, a.acked) for a in alarm_rows(readings)] == [("B", "INVALID", "COMM", None), ("A", "MINOR", "HIGH", None)]
    s = AlarmSummary.of(readings)
    assert (s.highest, s.active, s.unacked, s.total_active, s.total_unacked) == (Severity.INVALID, (1, 0, 1), (0, 0, 1), 2, 1)
    assert AlarmSummary.of({}) == AlarmSummary()


def test_history_buckets_carry_the_last_value():
    nan = math.nan
    assert carried_forward([nan, 1.0, nan, nan, 2.0, nan]) == [1.0, 1.0, 1.0, 2.0, 2.0]
    assert carried_forward([True, False]) == [1.0, 0.0]


def test_status_line_and_banner():
    ok = LinkStatus(LinkState.CONNECTED, "opc.tcp://h:4840", "operator", ("operator",), "demo")
    alarms = AlarmSummary(Severity.MAJOR, (0, 1, 0), (0, 1, 0))
    line = status_content(ok, alarms, 47, ("cryostat",)).plain
    assert line == "● connected  demo · operator [operator]  │ 47 PVs  │ alarms: 1 active (MAJOR), 1 unacknowledged  │ my locks: cryostat"
    assert status_content(ok, AlarmSummary(), 47).plain.endswith("│ no alarms")
    lost = LinkStatus(LinkState.RECONNECTING, "opc.tcp://h:4840", "operator", site="demo", reason="connection refused", attempt=3, retry_in_s=1.0, since=0.0)
    assert "Connection lost since" in banner_content(lost).plain
    assert "connection refused; attempt 3, next in 1 s. Values shown are the last received." in banner_content(lost).plain
    first = LinkStatus(LinkState.CONNECTING, "opc.tcp://h:4840")
    assert banner_content(first).plain == "Connecting to opc.tcp://h:4840 …"

