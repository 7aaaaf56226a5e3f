"""The demo site (config/demo.yaml) lives: readings move as real ones do, read-backs follow setpoints.

The demo's simulated sensors have seeded noise, a slow drift and the pulse-tube ripple
(drivers/cryostat.py), its supply a load (drivers/powersupply.py), its source-meter a
sample (drivers/sourcemeter.py). Each test waits for what it expects with a timeout.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from labctl.ioc.types import Identity, Severity
from labctl.server.app import Overrides, Server

from tests.helpers import wait_for

DEMO = Path(__file__).resolve().parents[2] / "config" / "demo.yaml"
OPERATOR = Identity("operator", frozenset({"operator"}), "test", client="demo-test")
#: The magnet controller is answered by pyvisa-sim's static tables (see config/demo.yaml).
STATIC = ("MAG:",)


@pytest.fixture
async def demo(tmp_path: Path) -> AsyncIterator[Server]:
    server = Server.from_file(DEMO, Overrides(opcua_host="127.0.0.1", opcua_port=0, no_ca=True, state_dir=str(tmp_path / "var")))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def temperatures(server: Server) -> list[str]:
    return [i.name for i in server.db.infos() if i.unit in ("K", "mK", "C") and not i.writable and not i.name.startswith(STATIC)]


def valid(server: Server, name: str) -> float | None:
    r = server.db.read(name)
    return r.value if r.severity is not Severity.INVALID and isinstance(r.value, float) else None


async def test_every_temperature_and_pressure_changes_within_5_s(demo):
    names = temperatures(demo) + ["CRYO:IVC:PRES", "CRYO:OVC:PRES"]
    assert {"CRYO:50K:TEMP", "CRYO:4K:TEMP", "CRYO:STILL:TEMP", "CRYO:MXC:TEMP", "PSU:TEMP"} <= set(names)
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


async def test_the_source_meter_measures_what_it_sources(demo):
    demo.control.request_lock("smu1", OPERATOR, duration_s=120, client="demo-test")
    await demo.db.write("SMU1:OUT", True, OPERATOR)
    await demo.db.write("SMU1:VOLT:SP", 0.5, OPERATOR)
    await wait_for(lambda: abs((valid(demo, "SMU1:VOLT") or 0.0) - 0.5) < 0.005, timeout=10, what="SMU1:VOLT near 0.5 V")
    await wait_for(lambda: abs((valid(demo, "SMU1:CURR") or 0.0) - 5e-5) < 1e-6, timeout=10, what="50 uA through 10 kOhm")
    await demo.db.write("SMU1:VOLT:SP", 1.0, OPERATOR)
    await wait_for(lambda: abs((valid(demo, "SMU1:VOLT") or 0.0) - 1.0) < 0.01, timeout=10, what="SMU1:VOLT near 1 V")


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
