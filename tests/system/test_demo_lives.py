"""The demo site (config/demo.yaml) lives: readings move as real ones do, read-backs follow setpoints.

The demo's simulated sensors have seeded noise, a slow drift and the pulse-tube ripple
(drivers/cryostat.py: the cryostat and the magnet on its 4 K plate, read by the Lake
Shore 372, the TPG and the Lake Shore 336), its supply a load (drivers/powersupply.py),
its source-meter a sample (drivers/sourcemeter.py). While the source-meter's output is
off it measures nothing: its readings are INVALID/DISABLE, as a disabled EPICS record's,
over Channel Access (caproto's client) and OPC UA (labctl's own client) alike. Each test
waits for what it expects with a timeout.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from caproto import ChannelType
from labctl.clients.session import connect as labctl_connect
from labctl.ioc.types import Identity, Severity, Status
from labctl.server.app import Overrides, Server

from tests.helpers import free_port, free_tcp_udp_port, wait_for
from tests.protocol.ca.support import client, connect

DEMO = Path(__file__).resolve().parents[2] / "config" / "demo.yaml"
OPERATOR = Identity("operator", frozenset({"operator"}), "test", client="demo-test")
#: The source-meter's measured PVs, and the power computed from them.
SMU_READINGS = ("SMU1:VOLT", "SMU1:CURR", "SMU1:POWER")


@pytest.fixture
async def demo(tmp_path: Path) -> AsyncIterator[Server]:
    server = Server.from_file(DEMO, Overrides(opcua_host="127.0.0.1", opcua_port=0, no_ca=True, state_dir=str(tmp_path / "var")))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def demo_ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Server]:
    """The demo with Channel Access on a free port too; caproto's clients in this process point at it."""
    ca_port = free_tcp_udp_port()
    monkeypatch.setenv("EPICS_CA_SERVER_PORT", str(ca_port))
    overrides = Overrides(
        opcua_host="127.0.0.1", opcua_port=0, ca_port=ca_port, ca_beacon_port=free_port(socket.SOCK_DGRAM),
        ca_interfaces=["127.0.0.1"], state_dir=str(tmp_path / "var"),
    )  # fmt: skip
    server = Server.from_file(DEMO, overrides)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def temperatures(server: Server) -> list[str]:
    return [i.name for i in server.db.infos() if i.unit in ("K", "mK", "C") and not i.writable]


def alarm(server: Server, name: str) -> tuple[Severity, Status]:
    r = server.db.read(name)
    return r.severity, r.status


def valid(server: Server, name: str) -> float | None:
    r = server.db.read(name)
    return r.value if r.severity is not Severity.INVALID and isinstance(r.value, float) else None


async def test_every_temperature_and_pressure_changes_within_5_s(demo):
    names = temperatures(demo) + ["CRYO:IVC:PRES", "CRYO:OVC:PRES"]
    assert {"CRYO:50K:TEMP", "CRYO:4K:TEMP", "CRYO:STILL:TEMP", "CRYO:MXC:TEMP", "PSU:TEMP", "MAG:TEMP:A", "MAG:TEMP:B"} <= set(names)
    first: dict[str, float] = {}
    await wait_for(lambda: all(valid(demo, n) is not None for n in names), timeout=10, what="a first reading of each")
    first = {n: valid(demo, n) for n in names}
    await wait_for(lambda: all(valid(demo, n) != first[n] for n in names), timeout=5, what=f"a change of each of {names}")


async def test_the_calibrated_temperature_agrees_with_the_bridge(demo):
    await wait_for(lambda: valid(demo, "CRYO:MXC:TEMP:CAL") is not None and valid(demo, "CRYO:MXC:TEMP") is not None, timeout=10)
    t, cal = valid(demo, "CRYO:MXC:TEMP"), valid(demo, "CRYO:MXC:TEMP:CAL")
    assert t is not None and cal is not None
    assert cal == pytest.approx(t, rel=0.02)  # 10 mK both, within the noise of two separate readings


async def test_the_supply_voltage_follows_its_setpoint(demo):
    await wait_for(lambda: valid(demo, "PSU:VOLT") is not None, timeout=10)
    await demo.db.write("PSU:VOLT:SP", 12.0, OPERATOR)
    await wait_for(lambda: abs((valid(demo, "PSU:VOLT") or 0.0) - 12.0) < 0.05, timeout=10, what="PSU:VOLT near 12 V")
    await demo.db.write("PSU:OUT", False, OPERATOR)
    await wait_for(lambda: abs(valid(demo, "PSU:VOLT") or 1.0) < 0.01, timeout=10, what="PSU:VOLT near 0 with the output off")


async def test_the_magnet_sits_on_the_cryostat_4k_plate(demo):
    await wait_for(lambda: all(valid(demo, n) is not None for n in ("MAG:TEMP:A", "MAG:TEMP:B", "CRYO:4K:TEMP", "CRYO:50K:TEMP")), timeout=10)
    assert valid(demo, "MAG:TEMP:A") == pytest.approx(valid(demo, "CRYO:4K:TEMP"), rel=0.05)  # the coil, on the 4 K plate
    assert valid(demo, "MAG:TEMP:B") == pytest.approx(valid(demo, "CRYO:50K:TEMP"), rel=0.05)  # its leads, sunk on the 50 K plate
    assert alarm(demo, "MAG:TEMP:A") == (Severity.NO_ALARM, Status.NO_ALARM)


async def test_the_source_meter_measures_what_it_sources(demo):
    # output off: no measurement, so no value to trust -- INVALID/DISABLE, the power too, not NaN
    await wait_for(lambda: all(alarm(demo, n) == (Severity.INVALID, Status.DISABLE) for n in SMU_READINGS), timeout=10, what="disabled readings")
    assert [demo.db.read(n).value for n in SMU_READINGS] == [0.0, 0.0, 0.0]  # never measured: zero, as a record never processed
    demo.control.request_lock("smu1", OPERATOR, duration_s=120, client="demo-test")
    await demo.db.write("SMU1:OUT", True, OPERATOR)
    await demo.db.write("SMU1:VOLT:SP", 0.5, OPERATOR)
    await wait_for(lambda: abs((valid(demo, "SMU1:VOLT") or 0.0) - 0.5) < 0.005, timeout=10, what="SMU1:VOLT near 0.5 V")
    await wait_for(lambda: abs((valid(demo, "SMU1:CURR") or 0.0) - 5e-5) < 1e-6, timeout=10, what="50 uA through 10 kOhm")
    await demo.db.write("SMU1:VOLT:SP", 1.0, OPERATOR)
    await wait_for(lambda: abs((valid(demo, "SMU1:VOLT") or 0.0) - 1.0) < 0.01, timeout=10, what="SMU1:VOLT near 1 V")
    await wait_for(lambda: abs((valid(demo, "SMU1:POWER") or 0.0) - 1e-4) < 2e-6, timeout=10, what="0.1 mW into the sample")
    # and the readings follow the source: the sample's ripple moves them from scan to scan
    first = valid(demo, "SMU1:CURR")
    await wait_for(lambda: valid(demo, "SMU1:CURR") not in (None, first), timeout=5, what="a new SMU1:CURR")
    # output off again: the last measurement stays, flagged INVALID/DISABLE
    await demo.db.write("SMU1:OUT", False, OPERATOR)
    await wait_for(lambda: all(alarm(demo, n) == (Severity.INVALID, Status.DISABLE) for n in SMU_READINGS), timeout=10, what="disabled again")
    assert demo.db.read("SMU1:VOLT").value == pytest.approx(1.0, rel=0.01)


async def test_a_disabled_reading_over_channel_access_and_labctl_get(demo_ca):
    """caget and ``labctl get`` of SMU1:VOLT/CURR/POWER: INVALID/DISABLE with the output off, good with it on."""
    url = demo_ca.service("opcua").url  # type: ignore[attr-defined]
    await wait_for(lambda: all(alarm(demo_ca, n) == (Severity.INVALID, Status.DISABLE) for n in SMU_READINGS), timeout=10)
    async with client(demo_ca.service("ca").port, lambda port: None, user="viewer", host="lab-pc") as ctx:  # type: ignore[attr-defined]
        pvs = {n: await connect(ctx, n) for n in SMU_READINGS}

        async def ca_alarms() -> dict[str, tuple[float, Severity, Status]]:
            out = {}
            for n, pv in pvs.items():
                md = (await pv.read(data_type=ChannelType.TIME_DOUBLE))
                out[n] = (float(md.data[0]), Severity(md.metadata.severity), Status(md.metadata.status))
            return out

        got = await ca_alarms()
        assert got == {n: (0.0, Severity.INVALID, Status.DISABLE) for n in SMU_READINGS}
        async with await labctl_connect(url, security="None", timeout_s=10) as s:
            for n in SMU_READINGS:
                r = (await s.get(n)).reading  # what `labctl get` shows: no value, BadOutOfService as INVALID/DISABLE
                assert (r.value, r.severity, r.status) == (None, Severity.INVALID, Status.DISABLE), n

            demo_ca.control.request_lock("smu1", OPERATOR, duration_s=120, client="demo-test")
            await demo_ca.db.write("SMU1:VOLT:SP", 0.8, OPERATOR)  # 80 uA, within the compliance
            await demo_ca.db.write("SMU1:OUT", True, OPERATOR)
            await wait_for(lambda: all(demo_ca.db.read(n).valid for n in SMU_READINGS), timeout=10, what="measurements")

            async def ca_good() -> bool:
                return all(sev is Severity.NO_ALARM for _, sev, _ in (await ca_alarms()).values())

            await wait_for(ca_good, timeout=10, what="good readings over CA")
            volts, _, _ = (await ca_alarms())["SMU1:VOLT"]
            assert volts == pytest.approx(0.8, rel=0.01)
            r = (await s.get("SMU1:CURR")).reading
            assert r.severity is Severity.NO_ALARM and r.value == pytest.approx(8e-5, rel=0.01)


async def test_monitor_with_a_count_ends(demo):
    url = demo.service("opcua").url  # type: ignore[attr-defined]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "labctl", "monitor", "CRYO:MXC:TEMP", "--count", "5", "--url", url, "--security", "None",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "LABCTL_USER": ""},
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    lines = [line for line in out.decode().splitlines() if "CRYO:MXC:TEMP" in line]
    assert len(lines) == 5
