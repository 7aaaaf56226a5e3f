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


# ---- safe values hold while engaged (issue 16, item 1) -----------------------------------------------

HELD_SITE = """
site: t
resources: [{name: cryostat, lockable: false}, {name: magnet, lockable: false}]
instruments:
  - name: htr
    driver: memory
    resource: "MEM::1"
    scan_s: 0.01
    timeout_s: 0.5
    lock_resource: cryostat
    pvs:
      - {name: "HTR:RANGE", type: enum, channel: range, writable: true, states: ["Off", "Low", "High"]}
      - {name: "HTR:OUT", type: float64, channel: out, writable: true, drive: [0, 100]}
      - {name: "HTR:SETP", type: float64, channel: setp, writable: true, drive: [0, 1]}
pvs:
  - {name: "MXC:T", type: float64, writable: true, initial: 0.01}
  - {name: "MAG:SP", type: float64, writable: true, initial: 1.0, resource: magnet}
interlocks:
  - name: mxc_warm
    pv: "MXC:T"
    trip: 0.05
    resume: 0.03
    reset: manual
    actions:
      refuse_writes: [magnet]
      set:
        - {pv: "HTR:RANGE", value: "Off"}
        - {pv: "HTR:OUT", value: 0}
"""

ADMIN = Identity("ada", frozenset({"admin"}), "opcua", "console")
JOB = Identity("olga", frozenset({"operator"}), "job", "job:7")  # a job acts as its owner


@pytest.fixture
async def held(caplog):
    from labctl.ioc.types import SYSTEM

    from tests.unit.memdriver import MemoryInstrument

    site = parse_site(HELD_SITE, "t.yaml")
    db = build_database(site)
    inst = MemoryInstrument("htr", {"range": 2, "out": 40.0, "setp": 0.1})
    db.attach(inst, timeout_s=0.5, reconnect_min_s=0.01, reconnect_max_s=0.05)
    mgr = InterlockManager(db, site.interlocks, policy=db.policy)
    db.interlocks = mgr
    audits = []
    db.add_audit_sink(audits.append)
    await db.start()
    await wait_for(lambda: db.read("HTR:RANGE").valid and db.read("HTR:OUT").valid, what="first scan")
    mgr.start()
    await db.write("MXC:T", 0.08, SYSTEM)
    await wait_for(lambda: inst.values["range"] == 0 and inst.values["out"] == 0.0, what="safe values driven")
    yield db, mgr, inst, audits
    await mgr.stop()
    await db.stop()


def refusals(audits, target):
    return [a for a in audits if a.target == target and not a.accepted]


async def test_held_safe_pvs_refuse_other_values_from_everyone(held):
    from labctl.ioc.types import SYSTEM

    db, mgr, inst, audits = held
    assert mgr.state("mxc_warm") == "TRIPPED"
    for who in (OP, ADMIN, JOB, SYSTEM):  # operators, admins, jobs and the server's other actors alike
        mark = len(refusals(audits, "HTR:RANGE"))
        with pytest.raises(Interlocked) as e:
            await db.write("HTR:RANGE", "High", who)
        assert (e.value.kind, e.value.pv, e.value.interlock) == ("conflict", "HTR:RANGE", "mxc_warm")
        assert e.value.to_dict()["fields"] == {"pv": "HTR:RANGE", "interlock": "mxc_warm"}
        new = refusals(audits, "HTR:RANGE")[mark:]
        assert [(a.action, a.user) for a in new] == [("write", who.user)]  # audited once
    with pytest.raises(Interlocked):
        await db.write("HTR:OUT", 10.0, ADMIN)
    assert inst.values == {"range": 0, "out": 0.0, "setp": 0.1}
    # the safe value itself passes (a job's cleanup that turns the heater off must not fail), as 0 or "Off"
    await db.write("HTR:RANGE", "Off", OP)
    await db.write("HTR:RANGE", 0, JOB)
    await db.write("HTR:OUT", 0, OP)
    await db.write("HTR:SETP", 0.2, OP)  # not a safe PV, resource not refused: writable
    # a refused resource takes nothing from users, but the server's own actors still act
    with pytest.raises(Interlocked) as e:
        await db.write("MAG:SP", 2.0, ADMIN)
    assert e.value.interlock == "mxc_warm"
    await db.write("MAG:SP", 2.0, SYSTEM)


async def test_engaged_until_reset_then_writable(held):
    db, mgr, inst, _ = held
    await db.write("MXC:T", 0.01, OP)
    assert mgr.state("mxc_warm") == "RESET_NEEDED"
    with pytest.raises(Interlocked):  # cleared but not reset: still held
        await db.write("HTR:RANGE", "Low", OP)
    mgr.reset("mxc_warm", EXPERT)
    await db.write("HTR:RANGE", "Low", OP)
    assert inst.values["range"] == 1 and mgr.holding("HTR:RANGE") == []


async def test_a_value_the_instrument_reports_otherwise_is_reasserted_logged_and_audited(held, caplog):
    db, mgr, inst, audits = held
    assert mgr.holding("HTR:RANGE") == [("mxc_warm", 0)]
    inst.values["range"] = 2  # someone at the front panel
    await wait_for(lambda: any(a.action == "interlock.reassert" for a in audits), what="re-assertion")
    await wait_for(lambda: inst.values["range"] == 0 and db.read("HTR:RANGE").value == 0, what="safe again")
    (rec,) = [a for a in audits if a.action == "interlock.reassert"]
    assert (rec.target, rec.user, rec.host, rec.old, rec.new) == ("HTR:RANGE", "labctl", "interlock:mxc_warm", 2, 0)
    writes = [a for a in audits if a.action == "write" and a.target == "HTR:RANGE" and a.host == "interlock:mxc_warm"]
    assert len(writes) == 2 and all(a.accepted for a in writes)  # the trip's, and the re-assertion's
    assert [r for r in caplog.records if r.levelname == "WARNING" and "safe value again" in r.getMessage()]
    # an instrument that keeps reporting another value is written again, at most once per REASSERT_MIN_S
    inst.values["out"] = 55.0
    await wait_for(lambda: sum(a.action == "interlock.reassert" and a.target == "HTR:OUT" for a in audits) == 1, what="re-assert out")
    await wait_for(lambda: inst.values["out"] == 0.0, what="out safe again")


async def test_an_invalid_reading_is_not_reasserted_and_the_link_returning_is(held):
    db, mgr, inst, audits = held
    inst.stop_answering()
    await wait_for(lambda: not db.read("HTR:RANGE").valid, what="link lost")
    assert not [a for a in audits if a.action == "interlock.reassert"]
    inst.values["range"] = 1
    inst.resume()
    await wait_for(lambda: inst.values["range"] == 0 and db.read("HTR:RANGE").value == 0 and db.read("HTR:RANGE").valid, what="safe again")
    assert [a.target for a in audits if a.action == "interlock.reassert"] == ["HTR:RANGE"]


def test_definitions_that_cannot_hold_are_errors_and_writable_safe_pvs_warnings():
    from labctl.ioc.errors import LabctlError
    from labctl.ioc.interlocks import definition_problems

    text = HELD_SITE.replace(
        "      - {name: \"HTR:SETP\"",
        "      - {name: \"HTR:RANGE:RAW\", type: int, channel: range, writable: true}\n"
        "      - {name: \"HTR:READ\", type: float64, channel: setp}\n"
        "      - {name: \"HTR:SETP\"",
    ).replace(
        '        - {pv: "HTR:OUT", value: 0}',
        '        - {pv: "HTR:OUT", value: 0, hold: false}\n'
        '        - {pv: "HTR:SETP", value: 0.1, hold: false, why_writable: "the loop may be retuned during a trip"}',
    )
    site = parse_site(text, "t.yaml")
    db = build_database(site)
    found = definition_problems(site.interlocks, db.info, db.infos())
    assert [(p, level) for p, _, level in found] == [
        (("interlocks", 0, "actions", "set", 0), "warning"),  # HTR:RANGE:RAW writes the same channel, resource not refused
        (("interlocks", 0, "actions", "set", 1), "warning"),  # HTR:OUT hold: false, no reason
    ]
    assert "HTR:RANGE:RAW" in found[0][1] and "HTR:OUT" in found[1][1]
    refusing = parse_site(text.replace("refuse_writes: [magnet]", "refuse_writes: [cryostat]"), "t.yaml")
    assert [p for p, _, _ in definition_problems(refusing.interlocks, db.info, db.infos())] == [("interlocks", 0, "actions", "set", 1)]

    bad = parse_site(
        HELD_SITE.replace('{pv: "HTR:OUT", value: 0}', '{pv: "HTR:OUT", value: 500}').replace(
            '{pv: "HTR:RANGE", value: "Off"}', '{pv: "HTR:RANGE", value: "Of"}'
        ).replace("  - {name: \"MAG:SP\"", "  - {name: \"MXC:RO\", type: float64, initial: 0}\n  - {name: \"MAG:SP\"")
        + '        - {pv: "MXC:RO", value: 0}\n',
        "t.yaml",
    )
    db = build_database(bad)
    found = definition_problems(bad.interlocks, db.info, db.infos())
    assert [(p[-2:], level) for p, _, level in found] == [((0, "value"), "error"), ((1, "value"), "error"), ((2, "pv"), "error")]
    with pytest.raises(LabctlError, match=r"interlocks\[0\]\.actions\.set\[1\]\.value: HTR:OUT does not take the safe value 500"):
        InterlockManager(db, bad.interlocks, policy=db.policy)


def test_site_file_refuses_two_safe_values_for_one_pv_and_misplaced_why_writable():
    from labctl.ioc.errors import ConfigError

    text = HELD_SITE.replace(
        '        - {pv: "HTR:OUT", value: 0}',
        '        - {pv: "HTR:OUT", value: 0, why_writable: "x"}\n        - {pv: "HTR:RANGE", value: "Low"}',
    )
    with pytest.raises(ConfigError) as e:
        parse_site(text, "t.yaml")
    assert len(e.value.problems) == 2
    assert "interlocks[0].actions.set[1].why_writable" in e.value.problems[0] or "interlocks[0].actions.set[1].why_writable" in e.value.problems[1]
    assert any("HTR:RANGE has two safe values" in p for p in e.value.problems)
