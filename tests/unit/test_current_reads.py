"""Reads are always current: deadbands filter monitors and archiving, never what ``read`` returns.

As MDEL and ADEL in an EPICS record: a post inside the monitor deadband, or a scan of an
unchanged value, is stored with its time stamp and read back at once; subscribers hear
only of what passes their deadband. ``next_reading`` and ``read_fresh`` see every post.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from labctl.ioc.build import build_database
from labctl.ioc.errors import DriverTimeout
from labctl.ioc.types import EventMask, Identity, Severity, Status, Update
from labctl.server.site import parse_site

from tests.helpers import wait_for
from tests.unit.memdriver import MemoryInstrument

SITE = """
site: t
instruments:
  - name: gauge
    driver: memory
    resource: "MEM::1"
    scan_s: 0.01
    pvs:
      - {name: "G:PRES", type: float64, channel: pres, deadband: {monitor: 0.5, archive: 1.0}}
  - name: pusher
    driver: memory
    resource: "MEM::2"
    pvs:
      - {name: "P:TEMP", type: float64, channel: temp}
pvs:
  - {name: "T:AO", type: float64, writable: true, initial: 5.0, deadband: {monitor: 0.5, archive: 1.0}}
  - {name: "T:AO2", type: float64, expr: "2 * a", inputs: {a: "T:AO"}, deadband: {monitor: 1.0}}
"""

OPERATOR = Identity("alice", frozenset({"operator"}), "test", "host")


class PushOnly(MemoryInstrument):
    """An instrument whose channels cannot be read: its values come as pushes only."""

    def readable(self, channel: str) -> bool:
        return False


def make_db(clock: Any = None):
    site = parse_site(SITE, "t.yaml")
    return build_database(site) if clock is None else build_database(site, clock=clock)


class Recorder:
    """Every update a callback and a monitor subscriber receive, by event bits."""

    def __init__(self, db: Any, name: str) -> None:
        self.value: list[Update] = []
        self.log: list[Update] = []
        db.subscribe(self.value.append, names=[name], mask=EventMask.VALUE)
        db.subscribe(self.log.append, names=[name], mask=EventMask.LOG)


def test_a_post_inside_the_monitor_deadband_is_read_back_with_its_time():
    now = [1000.0]
    db = make_db(clock=lambda: now[0])
    rec = Recorder(db, "T:AO")
    now[0] = 1001.0
    assert db.post("T:AO", 4.6) is None, "inside both deadbands: nobody is told"
    r = db.read("T:AO")
    assert (r.value, r.timestamp, r.severity, r.status) == (4.6, 1001.0, Severity.NO_ALARM, Status.NO_ALARM)
    assert rec.value == [] and rec.log == []
    # past the monitor deadband (from 5.0, the last value monitors saw), inside the archive's
    update = db.post("T:AO", 4.4, 1002.0)
    assert update is not None and update.mask == EventMask.VALUE
    assert [u.reading.value for u in rec.value] == [4.4] and rec.log == []
    # past the archive deadband too
    db.post("T:AO", 3.9, 1003.0)
    assert [u.reading.value for u in rec.log] == [3.9]
    assert db.read("T:AO").timestamp == 1003.0


def test_an_unchanged_value_renews_the_time_stamp_only():
    db = make_db()
    rec = Recorder(db, "T:AO")
    first = db.read("T:AO")
    assert db.post("T:AO", 5.0, first.timestamp + 10) is None
    assert db.read("T:AO").timestamp == first.timestamp + 10
    assert db.read("T:AO") is not first, "a new reading object: adapters compare by identity"
    assert rec.value == [] and rec.log == []


def test_a_derived_pv_is_current_whatever_its_own_deadband():
    db = make_db()
    db.post("T:AO", 5.3, 2000.0)  # T:AO2 moves by 0.6, inside its monitor deadband of 1.0
    r = db.read("T:AO2")
    assert (r.value, r.timestamp) == (pytest.approx(10.6), 2000.0)


async def test_a_monitor_hears_only_what_passes_the_deadband():
    db = make_db()
    with db.monitor(["T:AO"]) as mon:
        assert (await mon.get()).reading.value == 5.0  # the current value first
        db.post("T:AO", 4.8)
        db.post("T:AO", 4.7)
        assert mon.pending() == 0
        db.post("T:AO", 6.0)
        assert [u.reading.value for u in mon.get_nowait()] == [6.0]
    assert db.read("T:AO").value == 6.0


async def test_next_reading_resolves_on_any_post():
    db = make_db()
    fut = db.next_reading("T:AO")
    assert not fut.done()
    db.post("T:AO", 5.0)  # unchanged: no subscriber hears it, the waiter does
    assert fut.done() and fut.result() is db.read("T:AO")
    cancelled = db.next_reading("T:AO")
    cancelled.cancel()
    db.post("T:AO", 5.0)  # a cancelled waiter is dropped without error
    assert db._waiting == {}


async def test_a_soft_write_inside_the_deadband_is_current_and_audited():
    db = make_db()
    audit: list[Any] = []
    db.add_audit_sink(audit.append)
    before = db.read("T:AO")
    after = await db.write("T:AO", 4.6, OPERATOR)
    assert after.value == 4.6 and after.timestamp >= before.timestamp and after is not before
    assert db.read("T:AO") is after
    assert [(r.action, r.new, r.accepted) for r in audit] == [("write", 4.6, True)]


async def test_a_scanned_pv_carries_the_time_of_its_latest_scan():
    db = make_db()
    gauge = MemoryInstrument("gauge", {"pres": 1.0e-6})
    db.attach(gauge)
    db.attach(MemoryInstrument("pusher", {"temp": 4.2}))
    rec = Recorder(db, "G:PRES")
    await db.start()
    try:
        first = await wait_for(lambda: db.read("G:PRES") if db.read("G:PRES").valid else None, what="the first scan")
        await wait_for(lambda: db.read("G:PRES").timestamp > first.timestamp, what="a later scan")
        assert db.read("G:PRES").value == first.value
        assert [u.reading.value for u in rec.value] == [1.0e-6], "the unchanged scans told no monitor"
    finally:
        await db.stop()


async def test_read_fresh_of_a_pushed_unchanged_value_returns_it():
    db = make_db()
    pusher = PushOnly("pusher", {"temp": 4.2})
    db.attach(MemoryInstrument("gauge", {"pres": 1.0e-6}))
    db.attach(pusher)
    await db.start()
    try:
        await db.link("pusher").wait_connected(5.0)
        pusher.push("temp", 4.2)
        before = db.read("P:TEMP")
        task = asyncio.create_task(db.read_fresh("P:TEMP", timeout_s=10.0))
        await wait_for(lambda: db._waiting, what="read_fresh waiting")
        pusher.push("temp", 4.2, before.timestamp + 1)  # the same value again: no monitor wakes
        got = await task
        assert (got.value, got.timestamp) == (4.2, before.timestamp + 1)
        with pytest.raises(DriverTimeout):
            await db.read_fresh("P:TEMP", timeout_s=0.05)
        assert db._waiting == {} or all(f.cancelled() for fs in db._waiting.values() for f in fs)
    finally:
        await db.stop()
