"""The system monitor end to end: a simulated cryostat warms up and the server protects it.

A real Server (database, Lake Shore 372 and TPG drivers on the cryostat plant, control
layer) with fast plant time constants, so a warm-up takes about a second.
"""

from __future__ import annotations

import pytest
from labctl.ioc.errors import Forbidden
from labctl.ioc.interlocks import state_pv
from labctl.ioc.jobs import JobState
from labctl.ioc.types import Identity, Severity, Status
from labctl.server.app import Overrides, Server

from tests.helpers import wait_for
from tests.sites import FAST_CRYOSTAT

SITE = """
site: fridge
server: {state_dir: "STATE"}
resources: [{name: cryostat}]
""" + FAST_CRYOSTAT + """pvs:
  - {name: "LAB:GATE", type: bool, writable: true, initial: false}
procedures:
  hold_cryostat:
    resources: [cryostat]
    steps:
      - wait: {until: "g", inputs: {g: "LAB:GATE"}, timeout_s: 60}
      - log: "gate open"
      - set: {pv: "CRYO:STILL:HTR", value: 10}
  quick:
    resources: [cryostat]
    steps:
      - read: {pvs: ["CRYO:MXC:TEMP"]}
interlocks:
  - name: mxc_warm
    pv: "CRYO:MXC:TEMP"
    warn: 0.04
    trip: 0.05
    resume: 0.03
    for_s: 0.3
    reset: manual
    actions:
      hold_queue: true
      set:
        - {pv: "CRYO:MXC:HTR:RANGE", value: 0}
        - {pv: "CRYO:STILL:HTR", value: 0}
"""

OP = Identity("olga", frozenset({"operator"}), "test", client="console")  # her console: it holds the lock it takes
EXPERT = Identity("erin", frozenset({"expert"}), "test")
VIEWER = Identity("vic", frozenset({"viewer"}), "test")


@pytest.fixture
async def server(tmp_path):
    from labctl.server.site import parse_site

    site = parse_site(SITE.replace("STATE", str(tmp_path / "var")), "fridge.yaml")
    site = Overrides(no_opcua=True, no_ca=True, no_historian=True).apply(site)
    srv = Server(site, base_dir=tmp_path)
    audits = []
    srv.db.add_audit_sink(audits.append)
    srv.audits = audits
    async with srv:
        await wait_for(lambda: srv.db.read("CRYO:MXC:TEMP").valid, what="first reading")
        yield srv


async def test_warm_up_trips_the_interlock_and_cooling_plus_reset_resumes(server):
    db, control, plant = server.db, server.control, server.plants["cryo"]
    ctl = control
    # an operator holds the cryostat with a running job; another job waits behind it
    lease = ctl.request_lock("cryostat", OP, duration_s=60, client="console")
    await db.write("CRYO:STILL:HTR", 20.0, OP)
    await db.write("CRYO:MXC:HTR:RANGE", 3, OP)
    ctl.release_lock("cryostat", lease.token, OP)
    running = ctl.jobs.submit("hold_cryostat", {}, OP)
    await wait_for(lambda: running.state is JobState.RUNNING)
    queued = ctl.jobs.submit("quick", {}, OP)
    assert queued.state is JobState.QUEUED

    plant.stop_compressor()
    # the alarm rises with the right severity...
    await wait_for(lambda: db.read("CRYO:MXC:TEMP").status in (Status.HIGH, Status.HIHI), timeout=10, what="HIGH alarm")
    await wait_for(lambda: db.read("CRYO:MXC:TEMP").severity is Severity.MAJOR, timeout=10, what="HIHI alarm")
    alarm = ctl.alarms.table.get("CRYO:MXC:TEMP")
    assert alarm.active and alarm.unacknowledged and alarm.guidance == "check the compressor"
    assert db.read("ALARM:HIGHEST").value >= int(Severity.MAJOR)
    # ...the interlock trips after its delay and drives the heaters to zero
    await wait_for(lambda: ctl.interlocks.state("mxc_warm") == "TRIPPED", timeout=10, what="trip")
    await wait_for(lambda: db.read("CRYO:STILL:HTR").value == 0.0 and db.read("CRYO:MXC:HTR:RANGE").value == 0, what="heaters off")
    assert db.read(state_pv("mxc_warm")).value == 3
    # the job running on the cryostat is stopped (failed, by the interlock); the queued one is held by it
    await wait_for(lambda: running.state is JobState.FAILED, what="running job stopped")
    assert running.summary()["error"].startswith("stopped by interlock:mxc_warm")
    assert queued.state is JobState.QUEUED and queued.waiting is not None
    assert (queued.waiting["kind"], queued.waiting["interlock"]) == ("interlock", "mxc_warm")
    await db.write("LAB:GATE", True, OP)
    assert db.read("CRYO:STILL:HTR").value == 0.0
    trips = [a for a in server.audits if a.action == "interlock.trip"]
    assert [(a.target, a.user) for a in trips] == [("mxc_warm", "labctl")]
    assert any(a.action == "write" and a.target == "CRYO:STILL:HTR" and a.user == "labctl" for a in server.audits)

    # cooling again: the interlock waits for a reset; a viewer cannot acknowledge
    plant.start_compressor()
    await wait_for(lambda: ctl.interlocks.state("mxc_warm") == "RESET_NEEDED", timeout=10, what="cleared")
    assert queued.state is JobState.QUEUED
    mark = len(server.audits)
    with pytest.raises(Forbidden) as denied:
        ctl.alarms.acknowledge("CRYO:MXC:TEMP", VIEWER)
    assert (denied.value.kind, denied.value.action, denied.value.target) == ("forbidden", "alarm.ack", "CRYO:MXC:TEMP")
    assert denied.value.fields() == {"user": VIEWER.user, "needs": "a role that may acknowledge alarms"}
    refusals = [(a.action, a.user, a.target) for a in server.audits[mark:] if not a.accepted]
    assert refusals == [("alarm.ack", VIEWER.user, "CRYO:MXC:TEMP")]  # audited once, by the core
    assert ctl.alarms.table.get("CRYO:MXC:TEMP").unacknowledged
    ctl.alarms.acknowledge("CRYO:MXC:TEMP", OP, "compressor restarted")
    ctl.interlocks.reset("mxc_warm", EXPERT)
    await wait_for(lambda: queued.state.final, timeout=10, what="the held job to run")
    assert running.state is JobState.FAILED and queued.state is JobState.DONE
    assert db.read("CRYO:STILL:HTR").value == 0.0  # the stopped job never went on to its heater step
    assert not ctl.alarms.table.get("CRYO:MXC:TEMP").active
    actions = [a.action for a in server.audits]
    for expected in ("interlock.trip", "alarm.ack", "interlock.reset", "interlock.release", "lock.grant", "job.state"):
        assert expected in actions, expected


async def test_a_latched_alarm_stays_until_acknowledged(server):
    db, ctl, plant = server.db, server.control, server.plants["cryo"]
    plant.stop_compressor()
    await wait_for(lambda: db.read("CRYO:MXC:TEMP").severity >= Severity.MINOR, timeout=10)
    plant.start_compressor()
    await wait_for(lambda: db.read("CRYO:MXC:TEMP").severity is Severity.NO_ALARM, timeout=10, what="recovery")
    a = ctl.alarms.table.get("CRYO:MXC:TEMP")
    assert a.active and a.current is Severity.NO_ALARM  # still latched
    unacked = "ALARM:UNACKED:" + a.latched.name
    before = db.read(unacked).value
    assert before >= 1
    ctl.alarms.acknowledge("CRYO:MXC:TEMP", OP)
    assert not ctl.alarms.table.get("CRYO:MXC:TEMP").active
    assert db.read(unacked).value == before - 1
