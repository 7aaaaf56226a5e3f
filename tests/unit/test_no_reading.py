"""A channel with no reading (switched off): INVALID/DISABLE, the last value kept, derived PVs following."""

from __future__ import annotations

import math

import pytest
from labctl.ioc.build import build_database
from labctl.ioc.driver import NoReading, disabled
from labctl.ioc.types import EventMask, Reading, Severity, Status
from labctl.server.site import parse_site

from tests.helpers import wait_for
from tests.unit.memdriver import MemoryInstrument

SITE = """
site: t
instruments:
  - name: smu
    driver: memory
    resource: "MEM::1"
    scan_s: 0.01
    pvs:
      - {name: "SMU:VOLT", type: float64, unit: V, channel: volt, alarm: {high: 5.0}}
      - {name: "SMU:CURR", type: float64, unit: A, channel: curr}
      - {name: "SMU:OUT", type: bool, channel: out}
pvs:
  - {name: "SMU:POWER", type: float64, unit: W, expr: "v * i", inputs: {v: "SMU:VOLT", i: "SMU:CURR"}}
  - {name: "SMU:POWER:MW", type: float64, unit: mW, expr: "p * 1000", inputs: {p: "SMU:POWER"}}
  - {name: "LAB:X", type: float64, writable: true, initial: 2.0}
  - {name: "LAB:Y", type: float64, expr: "x + v", inputs: {x: "LAB:X", v: "SMU:VOLT"}}
"""

OFF = disabled("output off")


@pytest.fixture
def db():
    return build_database(parse_site(SITE, "t.yaml"))


def state(db, name: str) -> tuple[object, Severity, Status]:
    r = db.read(name)
    return r.value, r.severity, r.status


INVALID_DISABLE = (Severity.INVALID, Status.DISABLE)


def test_no_reading_needs_a_reason_status():
    assert disabled("output off") == NoReading(Status.DISABLE, "output off")
    with pytest.raises(ValueError, match="NO_ALARM"):
        NoReading(Status.NO_ALARM)


def test_a_pv_that_never_had_a_value_shows_zero_not_nan(db):
    assert db.read("SMU:VOLT").status is Status.UDF and math.isnan(db.read("SMU:VOLT").value)
    db.post("SMU:VOLT", OFF, 10.0)
    assert db.read("SMU:VOLT") == Reading(0.0, 10.0, Severity.INVALID, Status.DISABLE)


def test_the_last_value_is_kept_and_alarm_limits_do_not_apply(db):
    db.post("SMU:VOLT", 6.0, 1.0)
    assert (db.read("SMU:VOLT").severity, db.read("SMU:VOLT").status) == (Severity.MINOR, Status.HIGH)
    update = db.post("SMU:VOLT", OFF, 2.0)
    assert update is not None and update.mask & EventMask.ALARM  # monitors hear of it
    assert db.read("SMU:VOLT") == Reading(6.0, 2.0, Severity.INVALID, Status.DISABLE)
    # the next scan while off: a new time stamp, nothing for monitors
    assert db.post("SMU:VOLT", OFF, 3.0) is None
    assert db.read("SMU:VOLT") == Reading(6.0, 3.0, Severity.INVALID, Status.DISABLE)
    # switched on again: a measurement, with its limit alarm
    db.post("SMU:VOLT", 1.0, 4.0)
    assert db.read("SMU:VOLT") == Reading(1.0, 4.0)


def test_other_statuses_say_why(db):
    db.post("SMU:CURR", 1e-3, 1.0)
    db.post("SMU:CURR", NoReading(Status.READ, "sensor error"), 2.0)
    assert db.read("SMU:CURR") == Reading(1e-3, 2.0, Severity.INVALID, Status.READ)


def test_derived_pvs_of_a_disabled_input_are_disabled(db):
    db.post("SMU:VOLT", 2.0, 1.0)
    db.post("SMU:CURR", 0.5, 1.0)
    assert db.read("SMU:POWER").value == 1.0 and db.read("SMU:POWER:MW").value == 1000.0
    db.post("SMU:VOLT", OFF, 2.0)
    # MSS-like: the status goes through (switched off, not a failed link), the last value stays
    assert state(db, "SMU:POWER") == (1.0, *INVALID_DISABLE)
    assert state(db, "SMU:POWER:MW") == (1000.0, *INVALID_DISABLE)
    assert state(db, "LAB:Y") == (4.0, *INVALID_DISABLE)
    db.post("SMU:VOLT", 4.0, 3.0)
    assert state(db, "SMU:POWER") == (2.0, Severity.NO_ALARM, Status.NO_ALARM)
    assert state(db, "SMU:POWER:MW") == (2000.0, Severity.NO_ALARM, Status.NO_ALARM)


def test_a_derived_pv_never_computed_shows_zero_once_its_inputs_are_disabled(db):
    db.post("SMU:VOLT", OFF, 1.0)
    assert db.read("SMU:POWER").status is Status.UDF  # SMU:CURR was never read: undefined first
    db.post("SMU:CURR", OFF, 1.0)
    assert state(db, "SMU:POWER") == (0.0, *INVALID_DISABLE)
    assert state(db, "SMU:POWER:MW") == (0.0, *INVALID_DISABLE)


def test_a_failed_input_outranks_a_disabled_one(db):
    db.post("SMU:VOLT", 2.0, 1.0)
    db.post("SMU:CURR", 0.5, 1.0)
    db.post("SMU:VOLT", OFF, 2.0)
    db.invalidate(["SMU:CURR"], Status.COMM, 3.0)
    assert state(db, "SMU:POWER")[1:] == (Severity.INVALID, Status.LINK)


async def test_a_scanned_channel_switched_off_and_on(db):
    smu = MemoryInstrument("smu", {"volt": OFF, "curr": OFF, "out": False})
    db.attach(smu)
    await db.start()
    try:
        await wait_for(lambda: db.read("SMU:VOLT").status is Status.DISABLE and db.read("SMU:POWER").status is Status.DISABLE)
        assert db.read("SMU:VOLT").value == 0.0 and db.read("SMU:POWER").value == 0.0
        assert db.read("SMU:OUT") == Reading(False, db.read("SMU:OUT").timestamp)  # the channel that reads stays valid
        smu.values.update(volt=1.0, curr=1e-4, out=True)
        await wait_for(lambda: db.read("SMU:POWER").valid, what="the power computed again")
        assert db.read("SMU:POWER").value == pytest.approx(1e-4)
        smu.values.update(volt=OFF, curr=OFF, out=False)
        await wait_for(lambda: db.read("SMU:POWER").status is Status.DISABLE, what="the power disabled again")
        assert (db.read("SMU:VOLT").value, db.read("SMU:CURR").value) == (1.0, 1e-4)  # the last measurement, flagged
    finally:
        await db.stop()
