"""Jobs on a real database and arbiter: priority order, per-user results, cancel rights, holds, restart."""

from __future__ import annotations

import asyncio

import pytest
from labctl.ioc.arbiter import Arbiter
from labctl.ioc.build import build_database
from labctl.ioc.errors import Forbidden
from labctl.ioc.jobs import BadParameters, JobManager, JobState, MemoryJobStore, NoSuchProcedure
from labctl.ioc.types import Identity
from labctl.server.site import parse_site

from tests.helpers import wait_for

SITE = """
site: t
resources:
  - {name: cryostat}
pvs:
  - {name: "CRYO:SP", type: float64, writable: true, initial: 0.0, resource: cryostat, drive: [0, 10]}
  - {name: "CRYO:T", type: float64, writable: true, initial: 0.0, resource: cryostat}
  - {name: "LAB:GATE", type: bool, writable: true, initial: false}
procedures:
  sweep:
    resources: [cryostat]
    params:
      points: {type: "float64[]", default: [1, 2, 3]}
      tag: {type: string, default: run}
    steps:
      - repeat:
          var: sp
          values: "=points"
          steps:
            - set: {pv: "CRYO:SP", value: "=sp * 2"}
            - read: {pvs: ["CRYO:SP"], label: "{tag}-{sp}"}
      - log: "done with {tag}"
  gated:
    resources: [cryostat]
    steps:
      - wait: {until: "g", inputs: {g: "LAB:GATE"}, timeout_s: 30}
      - set: {pv: "CRYO:SP", value: 5}
  ramp:
    resources: [cryostat]
    params: {to: {type: float64, min: 0, max: 10}}
    steps:
      - ramp: {pv: "CRYO:SP", to: "=to", rate: 1000, step_s: 0.001}
  impatient:
    steps:
      - wait: {until: "g", inputs: {g: "LAB:GATE"}, timeout_s: 0.05}
  bad_write:
    resources: [cryostat]
    steps:
      - set: {pv: "CRYO:SP", value: 99}
"""

ALICE = Identity("alice", frozenset({"operator"}))
BOB = Identity("bob", frozenset({"operator"}))
ROOT = Identity("root", frozenset({"admin"}))
VIEWER = Identity("vic", frozenset({"viewer"}))


@pytest.fixture
async def env():
    site = parse_site(SITE, "t.yaml")
    db = build_database(site)
    arb = Arbiter(site.resources)
    db.locks = arb
    store = MemoryJobStore()
    jm = JobManager(db, arb, site.procedures, policy=db.policy, store=store)
    yield db, arb, jm, store
    await jm.stop()


async def done(jm, job, timeout=5):
    await wait_for(lambda: job.state.final, timeout=timeout, what=f"job {job.id} to end")
    return job


async def test_a_job_runs_its_steps_and_keeps_results_under_its_id(env):
    db, arb, jm, _ = env
    job = jm.submit("sweep", {"points": "1,2.5"}, ALICE)
    await done(jm, job)
    assert job.state is JobState.DONE, job.error
    assert [(r.pv, r.value, r.label) for r in job.results] == [("CRYO:SP", 2.0, "run-1.0"), ("CRYO:SP", 5.0, "run-2.5")]
    assert any("done with run" in line for _, line in job.log)
    assert arb.holder("cryostat") is None  # released at the end
    assert jm.get(job.id) is job and jm.list("alice") == [job] and jm.list("bob") == []


async def test_jobs_needing_one_resource_run_one_after_another_in_priority_order(env):
    db, arb, jm, _ = env
    first = jm.submit("gated", {}, ALICE)  # holds the cryostat until the gate opens
    await wait_for(lambda: first.state is JobState.RUNNING)
    low = jm.submit("sweep", {"tag": "low"}, ALICE, priority=1)
    high = jm.submit("sweep", {"tag": "high"}, BOB, priority=5)
    assert [j.id for j in jm.queued()] == [high.id, low.id]
    await db.write("LAB:GATE", True, ALICE)
    await done(jm, first)
    await done(jm, low)
    await done(jm, high)
    assert high.started_at >= first.ended_at and low.started_at >= high.ended_at
    assert {r.label for r in high.results} == {"high-1.0", "high-2.0", "high-3.0"}
    assert {r.label for r in low.results} == {"low-1.0", "low-2.0", "low-3.0"}


async def test_only_the_owner_or_an_admin_cancels(env):
    db, arb, jm, _ = env
    running = jm.submit("gated", {}, ALICE)
    queued = jm.submit("sweep", {}, ALICE)
    await wait_for(lambda: running.state is JobState.RUNNING)
    with pytest.raises(Forbidden) as e:
        jm.cancel(queued.id, BOB)
    assert (e.value.action, e.value.target, e.value.user) == ("job.cancel", f"job:{queued.id}", "bob")
    jm.cancel(queued.id, ALICE)
    assert queued.state is JobState.CANCELLED
    jm.cancel(running.id, ROOT)
    await done(jm, running)
    assert running.state is JobState.CANCELLED and "root" in running.log[-1][1]
    assert arb.holder("cryostat") is None


async def test_submission_checks(env):
    _, _, jm, _ = env
    with pytest.raises(NoSuchProcedure, match="unknown procedure 'nope'"):
        jm.submit("nope", {}, ALICE)
    with pytest.raises(Forbidden, match="may not submit"):
        jm.submit("sweep", {}, VIEWER)
    with pytest.raises(BadParameters, match="no parameter 'colour'"):
        jm.submit("sweep", {"colour": 1}, ALICE)
    with pytest.raises(BadParameters, match="needs parameter 'to'"):
        jm.submit("ramp", {}, ALICE)
    with pytest.raises(BadParameters, match="above its maximum 10"):
        jm.submit("ramp", {"to": 11}, ALICE)


async def test_failures_end_the_job_with_the_reason(env):
    db, arb, jm, _ = env
    j1 = jm.submit("bad_write", {}, ALICE)
    await done(jm, j1)
    assert j1.state is JobState.FAILED and "outside the drive limits" in j1.error
    j2 = jm.submit("impatient", {}, ALICE)
    await done(jm, j2)
    assert j2.state is JobState.FAILED and "not true after" in j2.error


async def test_ramp_reaches_its_target_through_the_write_path(env):
    db, _, jm, _ = env
    writes = []
    db.add_audit_sink(lambda a: writes.append(a.new) if a.action == "write" and a.target == "CRYO:SP" else None)
    job = jm.submit("ramp", {"to": 4}, ALICE)
    await done(jm, job)
    assert job.state is JobState.DONE, job.error
    assert db.read("CRYO:SP").value == 4.0
    assert writes == sorted(writes) and len(writes) >= 4


async def test_a_hold_pauses_running_jobs_and_keeps_queued_ones_waiting(env):
    db, _, jm, _ = env
    jm.hold("interlock:warm", "mixing chamber too warm")
    queued = jm.submit("sweep", {}, ALICE)
    await asyncio.sleep(0)
    assert queued.state is JobState.QUEUED
    jm.release_hold("interlock:warm")
    await done(jm, queued)
    running = jm.submit("gated", {}, ALICE)
    await wait_for(lambda: running.state is JobState.RUNNING)
    jm.hold("interlock:warm", "again")
    await db.write("LAB:GATE", True, ALICE)
    await wait_for(lambda: running.paused)
    assert db.read("CRYO:SP").value != 5.0  # paused before its next step
    jm.release_hold("interlock:warm")
    await done(jm, running)
    assert running.state is JobState.DONE and db.read("CRYO:SP").value == 5.0


async def test_jobs_survive_a_restart_as_records_and_running_ones_fail(env):
    db, arb, jm, store = env
    finished = jm.submit("sweep", {}, ALICE)
    await done(jm, finished)
    running = jm.submit("gated", {}, ALICE)
    await wait_for(lambda: running.state is JobState.RUNNING)
    # a "crash": a new manager over the same store, the old one never finished its job
    snapshot = MemoryJobStore()
    for j in store.load_jobs():
        snapshot.save_job(j.__class__(**{**j.__dict__}))
    jm2 = JobManager(db, Arbiter([]), {}, policy=db.policy, store=snapshot)
    failed = jm2.restore()
    assert [j.id for j in failed] == [running.id]
    assert jm2.get(running.id).state is JobState.FAILED and "stopped while the job was running" in jm2.get(running.id).error
    assert jm2.get(finished.id).state is JobState.DONE and jm2.get(finished.id).results
    assert jm2.submit.__self__ is jm2
