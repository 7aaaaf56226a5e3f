"""Real drivers in a real server: an instrument that stops answering goes INVALID/COMM and
comes back, while the others keep updating."""

from __future__ import annotations

import pytest
from labctl.drivers.registry import fault_injector
from labctl.ioc.types import Severity, Status
from labctl.server.app import Overrides, Server
from labctl.server.site import parse_site

from tests.helpers import wait_for

SITE = """
site: bench
simulations:
  cryo: {model: cryostat}
instruments:
  - name: bridge
    driver: lakeshore372
    simulation: cryo
    scan_s: 0.02
    timeout_s: 0.2
    reconnect_min_s: 0.02
    reconnect_max_s: 0.1
    pvs:
      - {name: "CRYO:MXC:TEMP", type: float64, unit: K, channel: "temperature:6"}
  - name: smu
    driver: keithley2400
    resource: "GPIB0::24::INSTR"
    visa_library: "@sim"
    scan_s: 0.02
    timeout_s: 0.2
    reconnect_min_s: 0.02
    reconnect_max_s: 0.1
    pvs:
      - {name: "SMU:VOLT:SP", type: float64, unit: V, channel: voltage_setpoint, writable: true, drive: [-10, 10]}
      - {name: "SMU:OUT", type: bool, channel: output_enabled, writable: true}
pvs:
  - {name: "SMU:VOLT:SP:MV", type: float64, unit: mV, expr: "v * 1000", inputs: {v: "SMU:VOLT:SP"}}
"""


@pytest.fixture
async def server(tmp_path):
    site = Overrides(no_opcua=True, no_ca=True, no_historian=True, state_dir=str(tmp_path)).apply(parse_site(SITE, "bench.yaml"))
    srv = Server(site, base_dir=tmp_path)
    async with srv:
        await wait_for(lambda: all(srv.db.read(n).valid for n in ("CRYO:MXC:TEMP", "SMU:VOLT:SP", "SMU:OUT")), what="first scans")
        yield srv


async def test_a_dead_instrument_goes_invalid_comm_and_recovers_while_the_others_update(server):
    db = server.db
    faults = fault_injector(db.link("smu").driver)
    assert faults is not None
    faults.stop_answering(wait_s=0)
    await wait_for(lambda: db.read("SMU:VOLT:SP").status is Status.COMM, what="INVALID/COMM")
    for name in ("SMU:VOLT:SP", "SMU:OUT"):
        r = db.read(name)
        assert (r.severity, r.status) == (Severity.INVALID, Status.COMM)
    assert (db.read("SMU:VOLT:SP:MV").severity, db.read("SMU:VOLT:SP:MV").status) == (Severity.INVALID, Status.LINK)
    # the bridge keeps scanning: its timestamps move on
    t0 = db.read("CRYO:MXC:TEMP").timestamp
    await wait_for(lambda: db.read("CRYO:MXC:TEMP").timestamp > t0, what="bridge still updating")
    assert db.read("CRYO:MXC:TEMP").valid
    faults.resume()
    await wait_for(lambda: db.read("SMU:VOLT:SP").valid, what="reconnect")
    assert db.read("SMU:VOLT:SP:MV").valid


async def test_writes_reach_the_simulated_instrument_and_read_back(server):
    from labctl.ioc.types import Identity

    op = Identity("olga", frozenset({"operator"}), "test")
    r = await server.db.write("SMU:VOLT:SP", 2.5, op)
    assert r.value == 2.5 and r.valid
    assert server.db.read("SMU:VOLT:SP:MV").value == pytest.approx(2500.0)
    r = await server.db.write("SMU:OUT", True, op)
    assert r.value is True
