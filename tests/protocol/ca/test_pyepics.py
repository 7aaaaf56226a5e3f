"""Channel Access over the wire with pyepics (EPICS's own client library, libca).

The server runs in the test's event loop; pyepics runs in a subprocess (see
``pyepics_worker.py``). libca reports the user name of the process's uid and the
machine's host name, which a test cannot change without privileges, so the access tests
vary the *rules* around the names libca reports (:data:`ME`, :data:`HOST`).
"""

from __future__ import annotations

import asyncio
import math
import os
import pwd
import socket

import pytest
from labctl.ioc.types import Severity, Status

from tests.protocol.ca.support import GatedDriver, PyEpics, pyepics, serve, site_yaml

#: What libca reports: the user of this uid and this machine's host name.
ME = pwd.getpwuid(os.getuid()).pw_name
HOST = socket.gethostname()

ECA_NORMAL = 1  # status codes as libca hands them to callbacks (code << 3 | severity)
ECA_PUTFAIL = 160

WRITE_ALL = "rules:\n  - {users: ['*'], hosts: ['*'], roles: [operator]}"


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=0, abs_tol=1e-6)


async def test_ctrl_metadata_of_each_type(ports):
    async with serve(site_yaml(*ports, access=WRITE_ALL)) as s, pyepics(s.port) as ca:
        temp = await ca.call("connect", pv="TEST:TEMP")
        assert (temp["type"], temp["count"], temp["read"], temp["write"]) == ("DOUBLE", 1, True, True)
        ctrl = await ca.call("get", pv="TEST:TEMP", form="ctrl")
        assert ctrl["value"] == 10.0
        assert (ctrl["units"], ctrl["precision"]) == ("K", 4)
        assert (ctrl["lower_disp_limit"], ctrl["upper_disp_limit"]) == (0.0, 300.0)
        assert (ctrl["lower_ctrl_limit"], ctrl["upper_ctrl_limit"]) == (0.0, 250.0)  # the drive limits
        assert (ctrl["lower_alarm_limit"], ctrl["lower_warning_limit"]) == (1.0, 5.0)
        assert (ctrl["upper_warning_limit"], ctrl["upper_alarm_limit"]) == (200.0, 250.0)
        assert (ctrl["severity"], ctrl["status"]) == (0, 0)

        count = await ca.call("connect", pv="TEST:COUNT")
        assert (count["type"], count["count"]) == ("LONG", 1)
        ctrl = await ca.call("get", pv="TEST:COUNT", form="ctrl")
        assert (ctrl["value"], ctrl["units"]) == (7, "counts")
        assert (ctrl["lower_disp_limit"], ctrl["upper_disp_limit"], ctrl["upper_ctrl_limit"]) == (0, 1000, 500)
        assert ctrl["upper_warning_limit"] == 400

        mode = await ca.call("connect", pv="TEST:MODE")
        assert mode["type"] == "ENUM"
        ctrl = await ca.call("get", pv="TEST:MODE", form="ctrl")
        assert (ctrl["value"], ctrl["enum_strs"]) == (1, ["OFF", "ON", "AUTO"])
        ctrl = await ca.call("get", pv="TEST:ENABLED", form="ctrl")
        assert (ctrl["value"], ctrl["enum_strs"]) == (0, ["false", "true"])

        label = await ca.call("connect", pv="TEST:LABEL")
        assert label["type"] == "STRING"
        assert (await ca.call("get", pv="TEST:LABEL", form="ctrl"))["value"] == "hello"

        spectrum = await ca.call("connect", pv="TEST:SPECTRUM")
        assert (spectrum["type"], spectrum["count"]) == ("DOUBLE", 8)
        ctrl = await ca.call("get", pv="TEST:SPECTRUM", form="ctrl")
        assert ctrl["value"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
        assert (ctrl["units"], ctrl["precision"], ctrl["upper_disp_limit"]) == ("counts", 2, 100.0)
        assert ctrl["upper_alarm_limit"] == "NaN"  # no alarm limits configured

        ro = await ca.call("connect", pv="TEST:RO")
        assert (ro["read"], ro["write"]) == (True, False)  # read-only PV: no write right even for operators


async def test_time_metadata_comes_from_the_reading(ports):
    async with serve(site_yaml(*ports)) as s, pyepics(s.port) as ca:
        s.db.post("TEST:TEMP", 220.0, timestamp=1_700_000_000.25)  # above HIGH (200): MINOR/HIGH
        await ca.call("connect", pv="TEST:TEMP")
        got = await ca.call("get", pv="TEST:TEMP", form="time")
        assert got["value"] == 220.0
        assert (got["severity"], got["status"]) == (Severity.MINOR, Status.HIGH)
        assert close(got["timestamp"], 1_700_000_000.25)


async def test_enum_and_numbers_as_strings(ports):
    async with serve(site_yaml(*ports)) as s, pyepics(s.port) as ca:
        assert (await ca.call("get", pv="TEST:MODE", string=True))["value"] == "ON"
        assert (await ca.call("get", pv="TEST:ENABLED", string=True))["value"] == "false"
        s.db.post("TEST:MODE", 2)
        assert (await ca.call("get", pv="TEST:MODE", string=True))["value"] == "AUTO"


async def test_record_fields(ports):
    async with serve(site_yaml(*ports, prefix="LAB:")) as s, pyepics(s.port) as ca:
        field = {}
        for name in "DESC EGU PREC HOPR LOPR HIHI HIGH LOW LOLO DRVH DRVL HYST MDEL ADEL RTYP NAME".split():
            field[name] = (await ca.call("get", pv=f"LAB:TEST:TEMP.{name}"))["value"]
        assert field == {
            "DESC": "mixing chamber temperature",
            "EGU": "K",
            "PREC": 4,
            "HOPR": 300.0,
            "LOPR": 0.0,
            "HIHI": 250.0,
            "HIGH": 200.0,
            "LOW": 5.0,
            "LOLO": 1.0,
            "DRVH": 250.0,
            "DRVL": 0.0,
            "HYST": 0.5,
            "MDEL": 0.01,
            "ADEL": 0.5,
            "RTYP": "ao",
            "NAME": "LAB:TEST:TEMP",
        }
        assert (await ca.call("get", pv="LAB:TEST:TEMP.VAL"))["value"] == 10.0
        assert (await ca.call("get", pv="LAB:TEST:TEMP.SEVR", string=True))["value"] == "NO_ALARM"
        assert (await ca.call("get", pv="LAB:TEST:TEMP.STAT", string=True))["value"] == "NO_ALARM"
        assert (await ca.call("get", pv="LAB:TEST:COUNT.HIHI"))["value"] == "NaN"  # not configured
        assert (await ca.call("get", pv="LAB:TEST:MODE.ONST"))["value"] == "ON"
        assert (await ca.call("get", pv="LAB:TEST:MODE.RTYP"))["value"] == "mbbo"
        assert (await ca.call("get", pv="LAB:TEST:ENABLED.ONAM"))["value"] == "true"
        assert (await ca.call("get", pv="LAB:TEST:SPECTRUM.NELM"))["value"] == 8
        assert (await ca.call("get", pv="LAB:TEST:RO.RTYP"))["value"] == "ai"
        desc = await ca.call("connect", pv="LAB:TEST:TEMP.DESC")
        assert (desc["type"], desc["write"]) == ("STRING", False)  # fields are read-only
        # A field the PV's record type lacks is not found (resolved exactly as a search is).
        with pytest.raises(KeyError):
            s.service.context["LAB:TEST:LABEL.EGU"]
        with pytest.raises(KeyError):
            s.service.context["LAB:TEST:TEMP.NOPE"]


async def test_put_callback_completes_when_the_driver_write_finished(ports):
    instrument = """
instruments:
  - name: gate
    driver: test
    resource: TEST::GATE
    scan_s: 3600
    pvs:
      - {name: GATE:SETPOINT, type: float64, unit: V, writable: true, drive: [-5, 5]}
"""
    driver = GatedDriver("gate", {"GATE:SETPOINT": 0.0})
    async with (
        serve(site_yaml(*ports, access=WRITE_ALL, extra=instrument), drivers=[driver]) as s,
        pyepics(s.port) as ca,
    ):
        await s.db.link("gate").wait_connected(5)
        await ca.call("connect", pv="GATE:SETPOINT")
        await ca.call("put_callback", pv="GATE:SETPOINT", value=2.5, tag="slow")
        await asyncio.wait_for(driver.writing.wait(), 10)
        # The driver holds the write: a round trip through the worker shows no completion yet.
        await ca.call("access", pv="GATE:SETPOINT")
        assert not [e for e in _drain(ca) if e["event"] == "put_done"]
        driver.release()
        done = await ca.event(lambda e: e["event"] == "put_done")
        assert (done["tag"], done["status"]) == ("slow", ECA_NORMAL)
        # Completion means the read-back is already served.
        assert (await ca.call("get", pv="GATE:SETPOINT"))["value"] == 2.5
        # The instrument refusing the value fails the put, and the core audits it.
        await ca.call("put_callback", pv="GATE:SETPOINT", value=-1.0, tag="fault")
        done = await ca.event(lambda e: e["event"] == "put_done")
        assert (done["tag"], done["status"]) == ("fault", ECA_PUTFAIL)
        assert [(a.target, a.new, a.accepted, a.user, a.host, a.protocol) for a in s.audit] == [
            ("GATE:SETPOINT", 2.5, True, ME, HOST, "ca"),
            ("GATE:SETPOINT", -1.0, False, ME, HOST, "ca"),
        ]
        assert "rejected the value" in s.audit[-1].reason


def _drain(ca: PyEpics) -> list[dict]:
    out = []
    while not ca.events.empty():
        out.append(ca.events.get_nowait())
    return out


async def test_refused_put_callback_reports_failure_and_is_audited(ports):
    async with serve(site_yaml(*ports, access=WRITE_ALL)) as s, pyepics(s.port) as ca:
        await ca.call("put_callback", pv="TEST:TEMP", value=999.0, tag="high")  # drive limits [0, 250]
        done = await ca.event(lambda e: e["event"] == "put_done")
        assert (done["tag"], done["status"]) == ("high", ECA_PUTFAIL)
        assert s.db.read("TEST:TEMP").value == 10.0
        (record,) = s.audit
        assert (record.target, record.new, record.accepted, record.user, record.protocol) == (
            "TEST:TEMP",
            999.0,
            False,
            ME,
            "ca",
        )
        assert "outside the drive limits" in record.reason
        await ca.call("put_callback", pv="TEST:TEMP", value=42.0, tag="ok")
        done = await ca.event(lambda e: e["event"] == "put_done")
        assert (done["tag"], done["status"]) == ("ok", ECA_NORMAL)
        assert s.db.read("TEST:TEMP").value == 42.0


async def test_puts_of_every_type(ports):
    async with serve(site_yaml(*ports, access=WRITE_ALL)) as s, pyepics(s.port) as ca:
        for pv, value, expected in [
            ("TEST:COUNT", 12, 12),
            ("TEST:MODE", 2, 2),
            ("TEST:ENABLED", 1, True),
            ("TEST:LABEL", "cooldown run 7", "cooldown run 7"),
            ("TEST:SPECTRUM", [8.0, 7, 6, 5, 4, 3, 2, 1], (8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0)),
        ]:
            await ca.call("put_callback", pv=pv, value=value, tag=pv)
            done = await ca.event(lambda e: e["event"] == "put_done")
            assert (done["tag"], done["status"]) == (pv, ECA_NORMAL)
            assert s.db.read(pv).value == expected
        # pyepics' put(wait=True) completes too (it does not look at the status; the callback above does).
        assert (await ca.call("put_wait", pv="TEST:TEMP", value=33.0))["status"] == 1
        assert s.db.read("TEST:TEMP").value == 33.0


async def test_monitor_delivers_each_update(ports):
    async with serve(site_yaml(*ports)) as s, pyepics(s.port) as ca:
        await ca.call("monitor", pv="TEST:TEMP")
        first = await ca.event(lambda e: e["event"] == "monitor")
        assert first["value"] == 10.0
        values = [10.0 + 18.0 * k for k in range(1, 13)]  # crosses HIGH (200), not HIHI (250)
        for k, value in enumerate(values):
            update = s.db.post("TEST:TEMP", value, timestamp=1_700_000_000.0 + k)
            assert update is not None
            got = await ca.event(lambda e: e["event"] == "monitor")
            reading = s.db.read("TEST:TEMP")
            assert got["value"] == value
            assert (got["severity"], got["status"]) == (reading.severity, reading.status)
            assert close(got["timestamp"], reading.timestamp)
        assert s.db.read("TEST:TEMP").severity is Severity.MINOR


async def test_monitor_honours_the_monitor_deadband(ports):
    async with serve(site_yaml(*ports)) as s, pyepics(s.port) as ca:
        await ca.call("monitor", pv="TEST:TEMP")
        await ca.event(lambda e: e["event"] == "monitor")
        assert s.db.post("TEST:TEMP", 10.005) is None  # inside MDEL 0.01: nothing posted
        assert s.db.post("TEST:TEMP", 10.5) is not None
        got = await ca.event(lambda e: e["event"] == "monitor")
        assert got["value"] == 10.5


async def test_instrument_that_stops_answering_turns_invalid_comm(ports):
    async with serve(site_yaml(*ports)) as s, pyepics(s.port) as ca:
        await ca.call("monitor", pv="TEST:TEMP")
        await ca.event(lambda e: e["event"] == "monitor")
        s.db.invalidate(["TEST:TEMP", "TEST:SPECTRUM"], Status.COMM)
        got = await ca.event(lambda e: e["event"] == "monitor")
        assert (got["severity"], got["status"]) == (Severity.INVALID, Status.COMM)
        for pv in ("TEST:TEMP", "TEST:SPECTRUM"):
            now = await ca.call("get", pv=pv, form="time")
            assert (now["severity"], now["status"]) == (Severity.INVALID, Status.COMM)
        assert (await ca.call("get", pv="TEST:TEMP.SEVR", string=True))["value"] == "INVALID"
        assert (await ca.call("get", pv="TEST:TEMP.STAT", string=True))["value"] == "COMM"
        s.db.post("TEST:TEMP", 11.0)  # the instrument answers again
        got = await ca.event(lambda e: e["event"] == "monitor")
        assert (got["value"], got["severity"], got["status"]) == (11.0, 0, 0)


async def test_a_driver_that_stops_answering_turns_its_pvs_invalid_comm(ports):
    instrument = """
instruments:
  - name: gauge
    driver: test
    resource: TEST::GAUGE
    scan_s: 0.05
    reconnect_min_s: 0.05
    reconnect_max_s: 0.05
    pvs:
      - {name: GAUGE:PRESSURE, type: float64, unit: mbar}
"""
    driver = GatedDriver("gauge", {"GAUGE:PRESSURE": 1.0e-6})
    async with serve(site_yaml(*ports, extra=instrument), drivers=[driver]) as s, pyepics(s.port) as ca:
        await ca.call("monitor", pv="GAUGE:PRESSURE")
        await ca.event(lambda e: e["event"] == "monitor" and e["severity"] == Severity.NO_ALARM)
        driver.answering = False
        got = await ca.event(lambda e: e["event"] == "monitor")
        assert (got["severity"], got["status"]) == (Severity.INVALID, Status.COMM)
        driver.answering = True
        driver.values["GAUGE:PRESSURE"] = 2.0e-6
        got = await ca.event(lambda e: e["event"] == "monitor")
        assert (got["value"], got["severity"], got["status"]) == (2.0e-6, 0, 0)


@pytest.mark.parametrize(
    ("users", "hosts", "may_write"),
    [
        ([ME], [HOST], True),
        (["operators"], ["control_room"], True),  # through the groups
        (["someone-else"], [HOST], False),  # the user does not match
        ([ME], ["another-host"], False),  # the host does not match
    ],
)
async def test_access_rules_by_user_and_host(ports, users, hosts, may_write):
    access = f"""
user_groups: {{operators: ["{ME}", bob]}}
host_groups: {{control_room: ["{HOST.upper()}", "cr-*"]}}
rules:
  - {{users: {users}, hosts: {hosts}, roles: [operator]}}
"""
    async with serve(site_yaml(*ports, access=access)) as s, pyepics(s.port) as ca:
        rights = await ca.call("connect", pv="TEST:TEMP")
        assert (rights["read"], rights["write"]) == (True, may_write)
        answer = await ca.request("put_wait", pv="TEST:TEMP", value=20.0)
        if may_write:
            assert answer["ok"] and s.db.read("TEST:TEMP").value == 20.0
            assert [(a.user, a.host, a.accepted) for a in s.audit] == [(ME, HOST, True)]
        else:
            # libca refuses locally (the access rights say read-only); nothing was written.
            assert not answer["ok"] and "Write access denied" in answer["error"]
            assert s.db.read("TEST:TEMP").value == 10.0
        assert (await ca.call("get", pv="TEST:TEMP"))["value"] in (10.0, 20.0)  # reading is always allowed


@pytest.mark.parametrize(("hosts", "may_write"), [(["127.0.0.1"], True), ([HOST], False)])
async def test_check_client_ip_matches_the_address_not_the_reported_name(ports, hosts, may_write):
    access = f"""
check_client_ip: true
rules:
  - {{users: ['*'], hosts: {hosts}, roles: [operator]}}
"""
    async with serve(site_yaml(*ports, access=access)) as s, pyepics(s.port) as ca:
        rights = await ca.call("connect", pv="TEST:TEMP")
        assert rights["write"] is may_write
        if may_write:
            await ca.call("put_wait", pv="TEST:TEMP", value=21.0)
            assert s.audit[-1].host == "127.0.0.1"


async def test_roles_limit_writes_to_their_resources(ports):
    access = f"""
rules:
  - {{users: ["{ME}"], roles: [cryo]}}
"""
    extra = """
roles:
  cryo: {write: [cryostat]}
resources:
  - {name: cryostat, lockable: false}
"""
    pvs = """
pvs:
  - {name: CRYO:SETPOINT, type: float64, writable: true, initial: 1.0, resource: cryostat}
  - {name: MAG:FIELD, type: float64, writable: true, initial: 0.0}
"""
    async with serve(site_yaml(*ports, access=access, extra=extra, pvs=pvs)) as s, pyepics(s.port) as ca:
        assert (await ca.call("connect", pv="CRYO:SETPOINT"))["write"] is True
        assert (await ca.call("connect", pv="MAG:FIELD"))["write"] is False


async def test_access_rights_change_on_open_channels(ports):
    """Rights follow the core's lock check; a refresh pushes changes to connected clients."""

    class Lock:
        holder: str | None = ME

        def check_write(self, identity, pv, resource, now):
            from labctl.ioc.errors import LockedBy

            if identity.user != self.holder:
                raise LockedBy(pv, resource, self.holder or "", None)

    async with serve(site_yaml(*ports, access=WRITE_ALL)) as s, pyepics(s.port) as ca:
        lock = Lock()
        s.db.locks = lock
        assert (await ca.call("connect", pv="TEST:TEMP"))["write"] is True
        _drain(ca)  # the rights reported when the channel connected
        lock.holder = "bob"
        assert await s.service.refresh_access_rights() >= 1
        change = await ca.event(lambda e: e["event"] == "access")
        assert (change["pv"], change["read"], change["write"]) == ("TEST:TEMP", True, False)
        lock.holder = ME
        await s.service.refresh_access_rights(["TEST:TEMP"])
        change = await ca.event(lambda e: e["event"] == "access")
        assert change["write"] is True
        assert await s.service.refresh_access_rights() == 0  # nothing changed since
