"""The process database: posting, subscriptions, the write path, derived PVs, instruments."""

from __future__ import annotations

import asyncio
import math

import pytest
from labctl.ioc.access import AuditRecord
from labctl.ioc.build import build_database
from labctl.ioc.errors import (
    DriverFault,
    Interlocked,
    LockedBy,
    NotWritable,
    OutOfRange,
    PermissionDenied,
    UnknownPV,
    WrongType,
)
from labctl.ioc.types import EventMask, Identity, Severity, Status
from labctl.server.site import parse_site

from tests.helpers import wait_for
from tests.unit.memdriver import MemoryInstrument

SITE = """
site: t
simulations: {}
tables: {cal: {points: [[0, 0], [10, 100]]}}
instruments:
  - name: smu
    driver: memory
    resource: "MEM::1"
    scan_s: 0.01
    timeout_s: 0.2
    reconnect_min_s: 0.01
    reconnect_max_s: 0.05
    pvs:
      - {name: "SMU:VOLT", type: float64, unit: V, channel: volt}
      - {name: "SMU:CURR", type: float64, unit: A, channel: curr}
      - {name: "SMU:VOLT:SP", type: float64, unit: V, channel: volt_sp, writable: true, drive: [0, 10]}
      - {name: "SMU:SLOW", type: float64, channel: slow, scan_s: 0.05}
  - name: gauge
    driver: memory
    resource: "MEM::2"
    scan_s: 0.01
    timeout_s: 0.2
    reconnect_min_s: 0.01
    pvs:
      - {name: "VAC:P", type: float64, unit: mbar, channel: p, alarm: {high: 1.0e-3, hysteresis: 1.0e-4}}
pvs:
  - {name: "SMU:POWER", type: float64, unit: W, expr: "v * i", inputs: {v: "SMU:VOLT", i: "SMU:CURR"}}
  - {name: "SMU:POWER:MW", type: float64, unit: mW, expr: "p * 1000", inputs: {p: "SMU:POWER"}}
  - {name: "CAL:OUT", type: float64, expr: "interp(x, 'cal')", inputs: {x: "LAB:X"}}
  - {name: "LAB:X", type: float64, writable: true, initial: 1.0, alarm: {hihi: 50}}
  - {name: "LAB:MODE", type: enum, states: [IDLE, RUN], writable: true, initial: IDLE}
"""

OPERATOR = Identity("olga", frozenset({"operator"}), "test", "host1")
VIEWER = Identity("vic", frozenset({"viewer"}), "test", "host1")


@pytest.fixture
def db():
    return build_database(parse_site(SITE, "t.yaml"))


@pytest.fixture
async def running(db):
    smu = MemoryInstrument("smu", {"volt": 1.0, "curr": 0.5, "volt_sp": 1.0, "slow": 3.0})
    gauge = MemoryInstrument("gauge", {"p": 1e-6})
    for inst in (smu, gauge):
        cfg = next(i for i in parse_site(SITE).instruments if i.name == inst.name)
        db.attach(inst, timeout_s=cfg.timeout_s, reconnect_min_s=cfg.reconnect_min_s, reconnect_max_s=cfg.reconnect_max_s)
    await db.start()
    await wait_for(lambda: db.read("SMU:VOLT").valid and db.read("VAC:P").valid, what="first scan")
    yield db, smu, gauge
    await db.stop()


def test_pvs_start_undefined_and_soft_pvs_take_their_initial_value(db):
    r = db.read("SMU:VOLT")
    assert (r.severity, r.status) == (Severity.INVALID, Status.UDF)
    assert db.read("LAB:X").value == 1.0 and db.read("LAB:X").valid
    assert db.read("LAB:MODE").value == 0
    assert db.read("CAL:OUT").value == pytest.approx(10.0)
    assert db.read("SMU:POWER").severity is Severity.INVALID  # inputs undefined
    with pytest.raises(UnknownPV, match="no PV named 'NOPE'"):
        db.read("NOPE")


async def test_scan_batches_per_instrument_and_period(running):
    db, smu, _ = running
    await wait_for(lambda: ("slow",) in smu.batches)
    fast = [b for b in smu.batches if "volt" in b]
    assert fast and all(set(b) == {"volt", "curr", "volt_sp"} for b in fast)  # one call fills three PVs


async def test_derived_pvs_follow_their_inputs_and_chain(running):
    db, smu, _ = running
    await wait_for(lambda: db.read("SMU:POWER").valid)
    assert db.read("SMU:POWER").value == pytest.approx(0.5)
    smu.values["curr"] = 2.0
    await wait_for(lambda: db.read("SMU:POWER:MW").value == pytest.approx(2000.0))


async def test_lost_instrument_goes_invalid_comm_and_recovers_while_others_run(running):
    db, smu, gauge = running
    smu.stop_answering()
    await wait_for(lambda: db.read("SMU:VOLT").status is Status.COMM, timeout=5)
    for name in ("SMU:VOLT", "SMU:CURR", "SMU:VOLT:SP", "SMU:SLOW"):
        assert (db.read(name).severity, db.read(name).status) == (Severity.INVALID, Status.COMM)
    assert (db.read("SMU:POWER").severity, db.read("SMU:POWER").status) == (Severity.INVALID, Status.LINK)
    # the gauge keeps updating meanwhile
    before = db.read("VAC:P").timestamp
    gauge.values["p"] = 2e-6
    await wait_for(lambda: db.read("VAC:P").value == 2e-6 and db.read("VAC:P").timestamp > before)
    assert db.read("VAC:P").valid
    # writes to the dead instrument fail quickly with the reason
    with pytest.raises(DriverFault, match="not connected"):
        await db.write("SMU:VOLT:SP", 2.0, OPERATOR)
    smu.resume()
    await wait_for(lambda: db.read("SMU:VOLT").valid, timeout=5)
    assert db.link("smu").connects >= 2
    await wait_for(lambda: db.read("SMU:POWER").valid)


async def test_driver_push_posts_immediately(running):
    db, smu, _ = running
    smu.push("slow", 42.0, 1234.5)
    r = db.read("SMU:SLOW")
    assert (r.value, r.timestamp) == (42.0, 1234.5)


async def test_write_path_accepts_and_reads_back(running):
    db, smu, _ = running
    audits: list[AuditRecord] = []
    db.add_audit_sink(audits.append)
    r = await db.write("SMU:VOLT:SP", 5, OPERATOR)
    assert r.value == 5.0 and smu.values["volt_sp"] == 5.0
    (a,) = audits
    assert (a.action, a.user, a.host, a.protocol, a.target, a.old, a.new, a.accepted) == (
        "write", "olga", "host1", "test", "SMU:VOLT:SP", 1.0, 5.0, True
    )


async def test_refusals_are_typed_audited_and_never_reach_the_instrument(running):
    db, smu, _ = running
    audits: list[AuditRecord] = []
    db.add_audit_sink(audits.append)
    cases = [
        ("SMU:VOLT", 1.0, OPERATOR, NotWritable, "read-only"),
        ("SMU:VOLT:SP", 1.0, VIEWER, PermissionDenied, "user 'vic' may not write resource 'smu'"),
        ("SMU:VOLT:SP", 11.0, OPERATOR, OutOfRange, "outside the drive limits [0.0, 10.0]"),
        ("SMU:VOLT:SP", "2", OPERATOR, WrongType, "expected a number"),
        ("SMU:VOLT:SP", math.nan, OPERATOR, WrongType, "nan"),
        ("LAB:MODE", "PAUSE", OPERATOR, WrongType, "not one of the states"),
    ]
    for name, value, who, err, words in cases:
        with pytest.raises(err, match=None) as e:
            await db.write(name, value, who)
        assert words in str(e.value) and str(e.value).startswith(f"{name}: write refused: ")
    assert smu.values["volt_sp"] == 1.0
    assert [a.accepted for a in audits] == [False] * len(cases)
    assert all(a.reason for a in audits)


async def test_check_order_roles_before_locks_before_values_before_interlocks(db):
    calls = []

    class Locks:
        def check_write(self, who, pv, resource, now):
            calls.append("lock")
            if who.user == "bob":
                raise LockedBy(pv, resource, "alice", now + 60)

    class Interlocks:
        def check_write(self, who, pv, resource, value):
            calls.append("interlock")
            raise Interlocked(pv, "mxc-warm", "mixing chamber above 50 mK")

    db.locks, db.interlocks = Locks(), Interlocks()
    with pytest.raises(PermissionDenied):
        await db.write("LAB:X", 2.0, VIEWER)
    assert calls == []
    with pytest.raises(LockedBy, match="locked by alice until"):
        await db.write("LAB:X", 2.0, Identity("bob", frozenset({"operator"})))
    with pytest.raises(WrongType):
        await db.write("LAB:X", "x", OPERATOR)
    assert calls == ["lock", "lock"]
    with pytest.raises(Interlocked, match="interlock 'mxc-warm' is tripped"):
        await db.write("LAB:X", 2.0, OPERATOR)
    assert calls == ["lock", "lock", "lock", "interlock"]
    assert db.read("LAB:X").value == 1.0


async def test_driver_failure_on_write_is_audited_and_raised(running):
    db, smu, _ = running
    audits: list[AuditRecord] = []
    db.add_audit_sink(audits.append)
    smu.refuse.add("volt_sp")
    with pytest.raises(DriverFault, match="instrument refused"):
        await db.write("SMU:VOLT:SP", 3.0, OPERATOR)
    assert not audits[-1].accepted and "instrument refused" in audits[-1].reason


async def test_alarm_severity_comes_with_the_reading(running):
    db, _, gauge = running
    gauge.values["p"] = 2e-3
    await wait_for(lambda: db.read("VAC:P").status is Status.HIGH)
    assert db.read("VAC:P").severity is Severity.MINOR
    gauge.values["p"] = 0.95e-3  # inside the limit but within the hysteresis
    await wait_for(lambda: db.read("VAC:P").value == 0.95e-3)
    assert db.read("VAC:P").status is Status.HIGH
    gauge.values["p"] = 0.5e-3
    await wait_for(lambda: db.read("VAC:P").status is Status.NO_ALARM)


async def test_callbacks_see_masks_and_a_failing_callback_does_not_stop_others(db):
    got = []

    def broken(update):
        raise RuntimeError("consumer bug")

    db.subscribe(broken)
    db.subscribe(got.append, names=["LAB:X"], mask=EventMask.ALARM)
    await db.write("LAB:X", 2.0, OPERATOR)
    assert got == []  # no alarm change
    await db.write("LAB:X", 60.0, OPERATOR)
    assert [u.reading.severity for u in got] == [Severity.MAJOR]


async def test_a_slow_monitor_loses_intermediate_values_and_never_delays_a_fast_one(db):
    slow = db.monitor(["LAB:X"], initial=False)
    fast = db.monitor(["LAB:X"], initial=False)
    seen_fast = []

    async def consume_fast():
        async for u in fast:
            seen_fast.append(u.reading.value)
            if u.reading.value == 99.0:
                return

    task = asyncio.create_task(consume_fast())
    for i in range(100):
        await db.write("LAB:X", float(i), OPERATOR)
        await asyncio.sleep(0)  # let the fast consumer run; the slow one never does
    await asyncio.wait_for(task, 5)
    assert seen_fast == [float(i) for i in range(100)]  # every value, in order
    assert slow.pending() == 1 and slow.dropped == 99  # only the latest is kept
    assert (await slow.get()).reading.value == 99.0
    slow.close()
    fast.close()


async def test_monitor_starts_with_current_values_and_ends_on_close(db):
    mon = db.monitor(["LAB:X", "LAB:MODE"])
    first = [await mon.get(), await mon.get()]
    assert {u.name for u in first} == {"LAB:X", "LAB:MODE"}
    mon.close()
    with pytest.raises(StopAsyncIteration):
        await mon.get()


def test_monitor_and_subscribe_refuse_unknown_names(db):
    with pytest.raises(UnknownPV):
        db.monitor(["NOPE"])
    with pytest.raises(UnknownPV):
        db.subscribe(print, names=["NOPE"])


def test_derived_cycles_are_refused():
    site = parse_site(
        """
site: t
pvs:
  - {name: "A", type: float64, expr: "b + 1", inputs: {b: "B"}}
  - {name: "B", type: float64, expr: "a + 1", inputs: {a: "A"}}
""",
        "c.yaml",
    )
    from labctl.ioc.errors import ConfigError

    with pytest.raises(ConfigError, match="cycle: A -> B -> A|cycle: B -> A -> B"):
        build_database(site, source="c.yaml")
