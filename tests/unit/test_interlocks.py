"""Interlocks on a real database: grace periods, hysteresis, actions, manual reset, audit."""

from __future__ import annotations

import pytest
from labctl.ioc.build import build_database
from labctl.ioc.config.interlocks import InterlockConfig
from labctl.ioc.errors import Forbidden, Interlocked
from labctl.ioc.interlocks import InterlockManager, InterlockRule, NotResettable, state_pv
from labctl.ioc.types import Identity, Reading, Severity, Status
from labctl.server.site import parse_site

from tests.helpers import wait_for

SITE = """
site: t
resources: [{name: cryostat}]
pvs:
  - {name: "MXC:T", type: float64, writable: true, initial: 0.01}
  - {name: "MXC:HTR", type: float64, writable: true, initial: 50.0, resource: cryostat}
  - {name: "IVC:P", type: float64, writable: true, initial: 1.0e-6}
interlocks:
  - name: mxc_warm
    pv: "MXC:T"
    warn: 0.04
    trip: 0.05
    resume: 0.03
    for_s: 0.2
    reset: manual
    actions:
      hold_queue: true
      refuse_writes: [cryostat]
      set: [{pv: "MXC:HTR", value: 0}]
  - name: ivc_bad
    condition: "p > 1e-3"
    inputs: {p: "IVC:P"}
"""

OP = Identity("olga", frozenset({"operator"}))
EXPERT = Identity("erin", frozenset({"expert"}))


class Queue:
    def __init__(self):
        self.holds = {}

    def hold(self, source, reason):
        self.holds[source] = reason

    def release_hold(self, source):
        self.holds.pop(source, None)


@pytest.fixture
async def env():
    site = parse_site(SITE, "t.yaml")
    db = build_database(site)
    q = Queue()
    mgr = InterlockManager(db, site.interlocks, policy=db.policy, queue=q)
    db.interlocks = mgr
    audits = []
    db.add_audit_sink(audits.append)
    mgr.start()
    yield db, mgr, q, audits
    await mgr.stop()


def level_rule(**kw):
    cfg = dict(name="x", pv="T", warn=4.0, trip=5.0, resume=3.0, for_s=10.0, clear_for_s=5.0)
    cfg.update(kw)
    return InterlockRule(InterlockConfig(**cfg))


def rd(v, valid=True):
    return {"T": Reading(v, 0.0, Severity.NO_ALARM if valid else Severity.INVALID, Status.NO_ALARM if valid else Status.COMM)}


def test_rule_hovering_at_the_limit_does_not_flap():
    rule = level_rule()
    states = []
    t = 0.0
    for v in [4.5, 5.1, 4.9, 5.1, 4.9] * 4:  # hovering around trip: never 10 s beyond it
        t += 1
        rule.evaluate(rd(v), t)
        states.append(rule.state)
    assert "TRIPPED" not in states and set(states) <= {"WARN", "PENDING"}
    for _ in range(11):  # now it stays beyond for the grace period
        t += 1
        rule.evaluate(rd(5.2), t)
    assert rule.state == "TRIPPED"
    for v in [4.0, 3.5, 3.1]:  # below trip but not below resume: still tripped
        t += 1
        rule.evaluate(rd(v), t)
        assert rule.state == "TRIPPED"
    t += 1
    rule.evaluate(rd(2.9), t)
    assert rule.state == "CLEARING"
    t += 2
    rule.evaluate(rd(3.2), t)  # back above resume: release interrupted
    assert rule.state == "TRIPPED"
    rule.evaluate(rd(2.0), t + 1)
    rule.evaluate(rd(2.0), t + 6)
    assert rule.state == "OK"


def test_rule_invalid_input_trips_and_below_direction():
    rule = level_rule(for_s=0.0)
    rule.evaluate(rd(0.0, valid=False), 1.0)
    assert rule.state == "TRIPPED" and "INVALID" in rule.reason
    low = level_rule(direction="below", warn=2.0, trip=1.0, resume=3.0, for_s=0.0, clear_for_s=0.0)
    low.evaluate(rd(0.5), 1.0)
    assert low.state == "TRIPPED"
    low.evaluate(rd(3.5), 2.0)
    assert low.state == "OK"


def test_config_refuses_mixed_or_misordered_forms():
    with pytest.raises(ValueError, match="either 'pv'"):
        InterlockConfig(name="x")
    with pytest.raises(ValueError, match="safe side"):
        InterlockConfig(name="x", pv="T", trip=5.0, resume=6.0)
    with pytest.raises(ValueError, match="level form"):
        InterlockConfig(name="x", condition="a", inputs={"a": "T"}, trip=3.0)


async def test_trip_after_grace_drives_safe_value_holds_queue_refuses_writes_and_audits(env):
    db, mgr, q, audits = env
    await db.write("MXC:T", 0.045, OP)
    assert mgr.state("mxc_warm") == "WARN" and db.read(state_pv("mxc_warm")).severity is Severity.MINOR
    await db.write("MXC:T", 0.08, OP)
    assert mgr.state("mxc_warm") == "PENDING"
    await wait_for(lambda: mgr.state("mxc_warm") == "TRIPPED", timeout=5, what="trip after the grace period")
    await wait_for(lambda: db.read("MXC:HTR").value == 0.0, what="heater off")
    assert "interlock:mxc_warm" in q.holds
    assert db.read(state_pv("mxc_warm")).value == 3 and db.read(state_pv("mxc_warm")).severity is Severity.MAJOR
    with pytest.raises(Interlocked, match="interlock 'mxc_warm' is tripped: MXC:T = 0.08 > 0.05"):
        await db.write("MXC:HTR", 10.0, OP)
    assert [a.action for a in audits if a.action.startswith("interlock")] == ["interlock.trip"]
    # cooling: released only below resume, and then only by an authorised reset
    await db.write("MXC:T", 0.04, OP)
    assert mgr.state("mxc_warm") == "TRIPPED"
    await db.write("MXC:T", 0.02, OP)
    assert mgr.state("mxc_warm") == "RESET_NEEDED" and "interlock:mxc_warm" in q.holds
    with pytest.raises(Forbidden, match="may not reset"):
        mgr.reset("mxc_warm", OP)
    mgr.reset("mxc_warm", EXPERT)
    assert mgr.state("mxc_warm") == "OK" and q.holds == {}
    await db.write("MXC:HTR", 10.0, OP)
    actions = [(a.action, a.user, a.accepted) for a in audits if a.action.startswith("interlock")]
    assert actions == [
        ("interlock.trip", "labctl", True),
        ("interlock.reset", "olga", False),
        ("interlock.reset", "erin", True),
        ("interlock.release", "labctl", True),
    ]


async def test_reset_before_clearing_is_refused(env):
    db, mgr, _, _ = env
    await db.write("IVC:P", 1.0, OP)
    assert mgr.state("ivc_bad") == "TRIPPED"
    with pytest.raises(NotResettable, match="not tripped"):
        mgr.reset("mxc_warm", EXPERT)
    await db.write("IVC:P", 1e-6, OP)
    assert mgr.state("ivc_bad") == "OK"  # auto reset
