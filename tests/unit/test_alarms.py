"""Alarm states: raise, latch, acknowledge, shelve, summary, and the notification rate limit."""

from __future__ import annotations

import pytest
from labctl.ioc.alarms import AlarmStateConflict, AlarmTable, BadShelving, NoSuchAlarm, RateLimiter
from labctl.ioc.types import Reading, Severity, Status

OK = (Severity.NO_ALARM, Status.NO_ALARM)
HIGH = (Severity.MINOR, Status.HIGH)
HIHI = (Severity.MAJOR, Status.HIHI)
COMM = (Severity.INVALID, Status.COMM)


def r(t, v, sev_status):
    return Reading(v, t, *sev_status)


@pytest.fixture
def table():
    return AlarmTable({"T": (False, "", "K"), "L": (True, "Call the cryo expert.", "K")})


def kinds(events):
    return [e.kind for e in events]


def test_non_latching_alarm_follows_the_value(table):
    assert kinds(table.update("T", r(1, 5.0, HIGH))) == ["raised"]
    a = table.get("T")
    assert a.active and a.unacknowledged and a.message == "T HIGH (MINOR): 5 K"
    assert kinds(table.update("T", r(2, 9.0, HIHI))) == ["changed"]
    assert table.get("T").latched is Severity.MAJOR
    assert kinds(table.update("T", r(3, 1.0, OK))) == ["cleared"]
    assert not table.get("T").active
    assert table.update("T", r(4, 1.1, OK)) == []  # no change of alarm state


def test_a_channel_switched_off_is_not_an_alarm_but_a_lost_one_is(table):
    disabled = (Severity.INVALID, Status.DISABLE)
    assert table.update("T", r(1, 0.0, disabled)) == [], "output off: INVALID/DISABLE, no alarm (as EPICS)"
    assert not table.get("T").active
    assert kinds(table.update("T", r(2, 0.0, COMM))) == ["raised"]
    assert kinds(table.update("T", r(3, 0.0, disabled))) == ["cleared"]


def test_latching_alarm_stays_until_acknowledged(table):
    table.update("L", r(1, 9.0, HIHI))
    assert kinds(table.update("L", r(2, 1.0, OK))) == ["returned"]
    a = table.get("L")
    assert a.active and a.latched is Severity.MAJOR and a.current is Severity.NO_ALARM
    assert a.guidance == "Call the cryo expert."
    assert kinds(table.acknowledge("L", "olga", 3)) == ["acknowledged", "cleared"]
    assert not table.get("L").active


def test_acknowledging_an_alarm_still_present_keeps_it_active_and_a_worse_one_needs_a_new_ack(table):
    table.update("L", r(1, 5.0, HIGH))
    table.acknowledge("L", "olga", 2)
    a = table.get("L")
    assert a.active and a.acked
    with pytest.raises(AlarmStateConflict, match="already acknowledged"):
        table.acknowledge("L", "olga", 3)
    table.update("L", r(4, 9.0, HIHI))
    assert table.get("L").unacknowledged
    table.update("L", r(5, 0.0, COMM))
    assert table.get("L").latched is Severity.INVALID and table.get("L").message == "L COMM (INVALID)"


def test_acknowledge_needs_an_alarm(table):
    with pytest.raises(AlarmStateConflict, match="not in alarm") as e:
        table.acknowledge("T", "olga", 1)
    assert (e.value.kind, e.value.source, e.value.action) == ("conflict", "T", "alarm.ack")
    with pytest.raises(NoSuchAlarm) as e:
        table.acknowledge("X", "olga", 1)
    assert (e.value.kind, e.value.fields()) == ("not_found", {"source": "X"})


def test_shelving_hides_from_the_summary_and_expires(table):
    table.update("T", r(1, 9.0, HIHI))
    table.update("L", r(1, 5.0, HIGH))
    s = table.summary(1)
    assert (s["active_MAJOR"], s["active_MINOR"], s["unacked_MAJOR"], s["highest"]) == (1, 1, 1, 2)
    with pytest.raises(BadShelving, match="give a reason"):
        table.shelve("T", "erin", 2, 60, " ")
    assert kinds(table.shelve("T", "erin", 2, 60, "sensor being replaced")) == ["shelved"]
    s = table.summary(3)
    assert (s["active_MAJOR"], s["highest"]) == (0, 1)
    assert [a.source for a in table.active(3)] == ["L"]
    assert kinds(table.expire_shelving(61)) == []
    assert kinds(table.expire_shelving(62)) == ["unshelved"]
    assert table.summary(62)["highest"] == 2


def test_restore_keeps_saved_state_but_current_configuration(table):
    table.update("L", r(1, 9.0, HIHI))
    saved = table.all()
    fresh = AlarmTable({"T": (False, "", "K"), "L": (True, "new guidance", "K")})
    fresh.restore(saved)
    assert fresh.get("L").unacknowledged and fresh.get("L").guidance == "new guidance"


def test_rate_limiter_bounds_a_flapping_source_and_counts_what_it_held_back():
    rl = RateLimiter(burst=3, window_s=10, global_burst=100)
    sent = [rl.allow("T", t * 0.1)[0] for t in range(100)]  # 100 flaps in 10 s
    assert sent.count(True) == 3
    ok, suppressed = rl.allow("T", 20.0)
    assert ok and suppressed == 97
    assert rl.allow("other", 20.0) == (True, 0)
