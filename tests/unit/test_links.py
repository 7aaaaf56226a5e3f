"""Instrument links and supervision at their edges: drivers that raise the unexpected, read-backs that fail.

Promises tried here (README "Instruments" and "The write path"):

* any exception escaping a driver marks that instrument's PVs INVALID, logs the
  traceback once (however often it recurs), restarts the link with backoff, leaves the
  other instruments running, and the link recovers when the fault stops;
* a write the instrument took whose read-back failed is audited ``write.unconfirmed``
  (not refused), raises :class:`WrittenUnconfirmed`, and leaves the PV INVALID until it
  is read again;
* a :class:`Supervisor` restarts a failing task with backoff and one traceback, or gives
  up and says so; cancellation is never a failure; nothing is "never retrieved".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import pytest
from labctl.ioc.access import WRITE_UNCONFIRMED, AuditRecord
from labctl.ioc.build import build_database
from labctl.ioc.errors import DriverFailed, DriverFault, DriverTimeout, WrittenUnconfirmed
from labctl.ioc.types import Identity, Severity, Status
from labctl.server.site import parse_site

from labctl.backoff import Backoff
from labctl.supervision import Supervisor
from tests.helpers import wait_for
from tests.unit.memdriver import MemoryInstrument

SITE = """
site: t
simulations: {}
instruments:
  - name: smu
    driver: memory
    resource: "MEM::1"
    scan_s: 0.01
    timeout_s: 0.2
    reconnect_min_s: 0.01
    reconnect_max_s: 0.04
    pvs:
      - {name: "SMU:VOLT", type: float64, unit: V, channel: volt}
      - {name: "SMU:VOLT:SP", type: float64, unit: V, channel: volt_sp, writable: true, drive: [0, 10]}
  - name: gauge
    driver: memory
    resource: "MEM::2"
    scan_s: 0.01
    timeout_s: 0.2
    reconnect_min_s: 0.01
    pvs:
      - {name: "VAC:P", type: float64, unit: mbar, channel: p}
"""

OPERATOR = Identity("olga", frozenset({"operator"}), "test", "host1")


class FaultyInstrument(MemoryInstrument):
    """A memory instrument whose driver can be made to raise anything, where a bug would.

    ``read_fault``/``write_fault``/``connect_fault`` are raised by the next calls until
    cleared; ``readback_fault`` is raised by the reads that follow a write (the
    instrument took the value; reading it back fails). Writes return no read-back, so
    the database reads the channel again, as for most SCPI instruments.
    """

    def __init__(self, name: str, values: dict[str, Any]) -> None:
        super().__init__(name, values)
        self.read_fault: BaseException | None = None
        self.write_fault: BaseException | None = None
        self.connect_fault: BaseException | None = None
        self.readback_fault: BaseException | None = None
        self.closes = 0
        self._after_write = False

    async def connect(self) -> None:
        if self.connect_fault is not None:
            raise self.connect_fault
        await super().connect()

    async def read(self, channels: Sequence[str]) -> dict[str, Any]:
        if self._after_write and self.readback_fault is not None:
            self._after_write = False
            raise self.readback_fault
        if self.read_fault is not None:
            raise self.read_fault
        return await super().read(channels)

    async def write(self, channel: str, value: Any) -> Any:
        if self.write_fault is not None:
            raise self.write_fault
        await super().write(channel, value)
        self._after_write = True
        return None

    async def close(self) -> None:
        self.closes += 1


@pytest.fixture
async def running():
    site = parse_site(SITE, "t.yaml")
    db = build_database(site)
    smu = FaultyInstrument("smu", {"volt": 1.0, "volt_sp": 1.0})
    gauge = MemoryInstrument("gauge", {"p": 1e-6})
    for inst in (smu, gauge):
        cfg = next(i for i in site.instruments if i.name == inst.name)
        db.attach(inst, timeout_s=cfg.timeout_s, reconnect_min_s=cfg.reconnect_min_s, reconnect_max_s=cfg.reconnect_max_s)
    await db.start()
    await wait_for(lambda: db.read("SMU:VOLT").valid and db.read("VAC:P").valid, what="first scan")
    yield db, smu, gauge
    await db.stop()


def _tracebacks(caplog: pytest.LogCaptureFixture, exc_type: type[BaseException]) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], exc_type)]


def _causes(caplog: pytest.LogCaptureFixture, exc_type: type[BaseException]) -> list[logging.LogRecord]:
    """Log records whose traceback is ``exc_type`` or a DriverFailed caused by it."""
    out = []
    for r in caplog.records:
        e = r.exc_info[1] if r.exc_info else None
        while e is not None and not isinstance(e, exc_type):
            e = e.__cause__
        if e is not None:
            out.append(r)
    return out


async def test_a_driver_raising_zerodivision_in_read_invalidates_logs_once_and_recovers(running, caplog):
    db, smu, gauge = running
    caplog.set_level(logging.DEBUG, logger="labctl")
    link = db.link("smu")
    failures_before, connects_before = link.failures, link.connects
    smu.read_fault = ZeroDivisionError("float division by zero")
    await wait_for(lambda: not db.read("SMU:VOLT").valid, what="the smu's PVs INVALID")
    for name in ("SMU:VOLT", "SMU:VOLT:SP"):
        r = db.read(name)
        assert (r.severity, r.status) == (Severity.INVALID, Status.READ)
    # It keeps failing at every reconnection: still one traceback, and the link is alive and retrying.
    await wait_for(lambda: link.failures >= failures_before + 3 and link.connects >= connects_before + 3, what="retries")
    assert len(_causes(caplog, ZeroDivisionError)) == 1
    (record,) = _causes(caplog, ZeroDivisionError)
    assert record.levelno == logging.ERROR and isinstance(record.exc_info[1], ZeroDivisionError)  # the original traceback
    assert link.running and smu.closes >= 3  # closed before every new connection
    assert "ZeroDivisionError" in link.last_error
    # The gauge keeps updating meanwhile.
    before = db.read("VAC:P").timestamp
    gauge.values["p"] = 3e-6
    await wait_for(lambda: db.read("VAC:P").value == 3e-6 and db.read("VAC:P").timestamp > before, what="gauge updates")
    assert db.read("VAC:P").valid
    # A write while the link is down fails at once with the reason; nothing reached the instrument.
    with pytest.raises(DriverFault):
        await db.write("SMU:VOLT:SP", 2.0, OPERATOR)
    # The fault stops: the link recovers, with fresh values and no "never retrieved" task.
    smu.read_fault = None
    smu.values["volt"] = 4.0
    await wait_for(lambda: db.read("SMU:VOLT").valid and db.read("SMU:VOLT").value == 4.0, what="recovery")
    assert link.last_error == "" and link.backoff.attempt == 0 and link.running


@pytest.mark.parametrize("fault", [KeyError("VOLT?"), TypeError("unsupported operand"), AssertionError("bad frame")])
async def test_any_exception_from_connect_is_a_failed_link_retried_with_backoff(running, caplog, fault):
    db, smu, _ = running
    caplog.set_level(logging.DEBUG, logger="labctl")
    link = db.link("smu")
    smu.connect_fault = fault
    smu.read_fault = DriverFault("smu", "line noise")  # drop the current connection (an ordinary fault)
    await wait_for(lambda: db.read("SMU:VOLT").status is Status.READ, what="INVALID/READ from the failed connect")
    failures = link.failures
    await wait_for(lambda: link.failures >= failures + 3, what="connect retries")
    assert len(_causes(caplog, type(fault))) == 1 and link.running and not link.connected
    smu.connect_fault = smu.read_fault = None
    await wait_for(lambda: db.read("SMU:VOLT").valid, what="recovery")


async def test_a_driver_returning_no_mapping_is_a_driver_bug(running, caplog):
    db, smu, _ = running
    caplog.set_level(logging.DEBUG, logger="labctl")
    original = FaultyInstrument.read

    async def read_list(self, channels):
        await original(self, channels)
        return [1.0]

    smu.read = read_list.__get__(smu)  # type: ignore[method-assign]
    await wait_for(lambda: db.read("SMU:VOLT").status is Status.READ, what="INVALID/READ")
    assert len([r for r in caplog.records if r.levelno == logging.ERROR and "not a mapping" in r.getMessage()]) == 1
    del smu.read
    await wait_for(lambda: db.read("SMU:VOLT").valid, what="recovery")


async def test_a_driver_bug_in_write_fails_the_write_and_restarts_the_link(running, caplog):
    db, smu, _ = running
    caplog.set_level(logging.DEBUG, logger="labctl")
    audits: list[AuditRecord] = []
    db.add_audit_sink(audits.append)
    link = db.link("smu")
    connects = link.connects
    smu.write_fault = ZeroDivisionError("division by zero")
    with pytest.raises(DriverFailed) as e:
        await db.write("SMU:VOLT:SP", 2.0, OPERATOR)
    assert isinstance(e.value.__cause__, ZeroDivisionError)
    (a,) = audits
    assert (a.action, a.accepted, a.outcome) == ("write", False, "refused")
    await wait_for(lambda: link.connects > connects and db.read("SMU:VOLT").valid, what="the link restarted")
    assert len(_causes(caplog, ZeroDivisionError)) == 1
    smu.write_fault = None
    await db.write("SMU:VOLT:SP", 2.0, OPERATOR)
    assert smu.values["volt_sp"] == 2.0 and audits[-1].outcome == "accepted"


@pytest.mark.parametrize(
    ("fault", "status"),
    [(DriverTimeout("smu", "read volt_sp: no answer"), Status.TIMEOUT), (DriverFault("smu", "garbled answer"), Status.READ)],
)
async def test_a_write_taken_whose_readback_fails_is_unconfirmed_not_refused(running, fault, status):
    db, smu, _ = running
    audits: list[AuditRecord] = []
    db.add_audit_sink(audits.append)
    smu.readback_fault = fault
    with pytest.raises(WrittenUnconfirmed) as e:
        await db.write("SMU:VOLT:SP", 7.5, OPERATOR)
    err = e.value
    assert (err.pv, err.value, err.instrument) == ("SMU:VOLT:SP", 7.5, "smu") and err.cause
    assert err.to_dict()["kind"] == "unconfirmed" and err.to_dict()["fields"]["value"] == 7.5
    assert smu.values["volt_sp"] == 7.5  # the instrument holds the new value
    (a,) = audits
    assert (a.action, a.accepted, a.outcome, a.old, a.new, a.user) == (WRITE_UNCONFIRMED, True, "written-unconfirmed", 1.0, 7.5, "olga")
    assert a.reason
    r = db.read("SMU:VOLT:SP")
    # The value shown is the one before the write, and marked so, unless a scan has already read the new one.
    assert (r.severity, r.status) == (Severity.INVALID, status) or (r.value == 7.5 and r.valid)
    await wait_for(lambda: db.read("SMU:VOLT:SP").value == 7.5 and db.read("SMU:VOLT:SP").valid, what="the next scan")


async def test_a_failed_write_is_still_refused_and_not_unconfirmed(running):
    db, smu, _ = running
    audits: list[AuditRecord] = []
    db.add_audit_sink(audits.append)
    smu.write_fault = DriverTimeout("smu", "write volt_sp: no answer")
    with pytest.raises(DriverTimeout):
        await db.write("SMU:VOLT:SP", 3.0, OPERATOR)
    assert [(a.action, a.outcome) for a in audits] == [("write", "refused")]
    assert str(audits[0]).endswith(")") and "REFUSED" in str(audits[0])


def test_audit_record_outcomes_read_old_records_as_before():
    old = AuditRecord(1.0, "write", "u", "opcua", "h", "PV", 1.0, 2.0)
    assert old.outcome == "accepted" and "accepted" in str(old)
    assert AuditRecord(1.0, "write", "u", "opcua", "h", "PV", accepted=False, reason="x").outcome == "refused"
    unconfirmed = AuditRecord(1.0, WRITE_UNCONFIRMED, "u", "opcua", "h", "PV", 1.0, 2.0, reason="timeout")
    assert unconfirmed.outcome == "written-unconfirmed" and "NOT CONFIRMED" in str(unconfirmed) and "1.0 -> 2.0" in str(unconfirmed)


# ---- the supervisor ----------------------------------------------------------------------------------------


async def test_supervisor_restarts_with_backoff_logs_one_traceback_and_resets_when_healthy(caplog):
    caplog.set_level(logging.DEBUG, logger="labctl")
    runs = 0
    failures: list[BaseException] = []
    healthy = asyncio.Event()
    sup: Supervisor

    async def run() -> None:
        nonlocal runs
        runs += 1
        if runs <= 4:
            raise ZeroDivisionError("division by zero")
        sup.healthy()
        healthy.set()
        await asyncio.Event().wait()

    sup = Supervisor("test task", run, backoff=Backoff(0.001, 0.004), on_failure=failures.append)
    task = sup.start()
    assert task.get_name() == "test task"
    await asyncio.wait_for(healthy.wait(), 5)
    assert runs == 5 and sup.failures == 4 and len(failures) == 4
    assert all(isinstance(f, ZeroDivisionError) for f in failures)
    assert len(_tracebacks(caplog, ZeroDivisionError)) == 1
    assert sup.last_error == "" and sup.backoff.attempt == 0 and sup.running
    await sup.stop()
    assert not sup.running and task.cancelled()
    assert sup.failures == 4  # cancellation is not a failure


async def test_supervisor_without_restart_reports_fatal_once(caplog):
    caplog.set_level(logging.DEBUG, logger="labctl")
    fatal: list[BaseException] = []

    async def run() -> None:
        raise RuntimeError("cannot go on")

    sup = Supervisor("vital task", run, restart=False, on_fatal=fatal.append)
    task = sup.start()
    await asyncio.wait_for(asyncio.shield(task), 5)
    assert [type(e) for e in fatal] == [RuntimeError] and sup.failures == 1 and not sup.running
    assert len(_tracebacks(caplog, RuntimeError)) == 1


async def test_supervisor_survives_a_failing_handler_and_a_task_that_returns_ends(caplog):
    caplog.set_level(logging.DEBUG, logger="labctl")
    runs = 0

    async def run() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise ValueError("first")

    def handler(e: BaseException) -> None:
        raise KeyError("handler bug")

    sup = Supervisor("short task", run, backoff=Backoff(0.001, 0.002), on_failure=handler)
    task = sup.start()
    await asyncio.wait_for(asyncio.shield(task), 5)
    assert runs == 2 and task.exception() is None
    assert len(_tracebacks(caplog, KeyError)) == 1  # the handler's bug, reported, supervision went on
