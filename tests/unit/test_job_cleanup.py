"""Jobs at their edges: cleanup however a job ends (and after a crash), fresh readings, why a job waits.

A real database with an in-memory instrument (a resistor: the measured current follows
the setpoint) scanned slowly, so a ``read`` that returned the last scan would return the
value from before the ``set``; a real arbiter; jobs in a memory store, restored by a
second manager as after a kill -9.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from labctl.ioc.arbiter import Arbiter
from labctl.ioc.build import build_database
from labctl.ioc.jobs import (
    CLEANUP_DONE,
    CLEANUP_INCOMPLETE,
    CLEANUP_INTERRUPTED,
    CleaningUp,
    JobManager,
    JobState,
    MemoryJobStore,
    cleanup_mark,
)
from labctl.ioc.procedure import procedure_warnings, unused_params
from labctl.ioc.types import Identity
from labctl.server.site import parse_site

from tests.helpers import wait_for
from tests.unit.memdriver import MemoryInstrument

SITE = """
site: t
resources:
  - {name: rig}
  - {name: other}
instruments:
  - name: smu
    driver: memory
    resource: "MEM::1"
    scan_s: 3600
    timeout_s: 0.5
    reconnect_min_s: 0.01
    reconnect_max_s: 0.05
    lock_resource: rig
    pvs:
      - {name: "SMU:SP", type: float64, channel: sp, writable: true, drive: [0, 10]}
      - {name: "SMU:CURR", type: float64, channel: curr}
      - {name: "SMU:OUT", type: bool, channel: out, writable: true}
pvs:
  - {name: "RIG:GATE", type: bool, writable: true, initial: false, resource: other}
  - {name: "RIG:POWER", type: float64, expr: "i * 2", inputs: {i: "SMU:CURR"}}
procedures:
  iv:
    resources: [rig]
    params: {points: {type: "float64[]", default: [1, 2, 3]}}
    steps:
      - set: {pv: "SMU:OUT", value: true}
      - repeat:
          var: v
          values: "=points"
          steps:
            - set: {pv: "SMU:SP", value: "=v"}
            - read: {pvs: ["SMU:CURR", "RIG:POWER"], label: "{v}"}
    cleanup:
      - set: {pv: "SMU:OUT", value: false}
      - set: {pv: "SMU:SP", value: 0}
  long:
    resources: [rig]
    steps:
      - set: {pv: "SMU:OUT", value: true}
      - wait: {until: "g", inputs: {g: "RIG:GATE"}, timeout_s: 600}
    cleanup:
      - set: {pv: "SMU:OUT", value: false}
  failing:
    resources: [rig]
    steps:
      - set: {pv: "SMU:OUT", value: true}
      - set: {pv: "SMU:SP", value: 99}
    cleanup:
      - set: {pv: "SMU:SP", value: 99}
      - set: {pv: "SMU:OUT", value: false}
  no_recovery:
    resources: [rig]
    cleanup_after_crash: false
    steps:
      - set: {pv: "SMU:OUT", value: true}
      - wait: {until: "g", inputs: {g: "RIG:GATE"}, timeout_s: 600}
    cleanup:
      - set: {pv: "SMU:OUT", value: false}
  slow_cleanup:
    resources: [rig]
    cleanup_timeout_s: 0.2
    steps:
      - set: {pv: "SMU:OUT", value: true}
      - wait: {until: "g", inputs: {g: "RIG:GATE"}, timeout_s: 600}
    cleanup:
      - wait: {until: "g", inputs: {g: "RIG:GATE"}, timeout_s: 600}
      - set: {pv: "SMU:OUT", value: false}
  settle:
    resources: [rig]
    params:
      settle_s: {type: float64, default: 0}
      unused: {type: float64, default: 1}
    steps:
      - sleep: "=settle_s"
"""

ALICE = Identity("alice", frozenset({"operator"}), "test", "console")
ROOT = Identity("root", frozenset({"admin"}), "test", "console")


class Resistor(MemoryInstrument):
    """The measured current is the setpoint over 1 kOhm, while the output is on (0 when off)."""

    async def read(self, channels: Sequence[str]) -> dict[str, Any]:
        self.values["curr"] = self.values["sp"] / 1000.0 if self.values["out"] else 0.0
        return await super().read(channels)


class Rig:
    def __init__(self) -> None:
        self.site = parse_site(SITE, "t.yaml")
        self.db = build_database(self.site)
        self.arbiter = Arbiter(self.site.resources)
        self.db.locks = self.arbiter
        self.smu = Resistor("smu", {"sp": 0.0, "curr": 0.0, "out": False})
        self.db.attach(self.smu, timeout_s=0.5, reconnect_min_s=0.01, reconnect_max_s=0.05)
        self.store = MemoryJobStore()
        self.jm = self.manager()

    def manager(self) -> JobManager:
        return JobManager(self.db, self.arbiter, self.site.procedures, policy=self.db.policy, store=self.store)

    async def start(self) -> None:
        await self.db.start()
        await self.db.link("smu").wait_connected(5)
        await wait_for(lambda: self.db.read("SMU:CURR").valid, what="first scan")


@pytest.fixture
async def rig():
    r = Rig()
    await r.start()
    yield r
    await r.jm.stop()
    await r.db.stop()


async def ended(job, timeout=5):
    await wait_for(lambda: job.state.final, timeout=timeout, what=f"job {job.id} to end")
    return job


async def test_a_read_after_a_set_is_a_fresh_reading_that_follows_the_setpoint(rig):
    job = await ended(rig.jm.submit("iv", {"points": [1, 2, 3]}, ALICE))
    assert job.state is JobState.DONE, job.error
    currents = [r for r in job.results if r.pv == "SMU:CURR"]
    powers = [r for r in job.results if r.pv == "RIG:POWER"]
    assert [r.value for r in currents] == pytest.approx([0.001, 0.002, 0.003])
    assert [r.value for r in powers] == pytest.approx([0.002, 0.004, 0.006])  # a derived PV reads its inputs fresh
    assert all(b.time >= a.time for a, b in zip(currents, currents[1:], strict=False))
    set_times = [t for t, line in job.log if line.startswith("set SMU:SP")][:3]  # the cleanup sets it too
    assert all(r.time >= t for r, t in zip(currents, set_times, strict=True))  # each reading is newer than its set


async def test_cleanup_runs_when_a_job_is_done_and_the_record_says_so(rig):
    job = await ended(rig.jm.submit("iv", {}, ALICE))
    assert job.state is JobState.DONE and rig.smu.values["out"] is False and rig.smu.values["sp"] == 0
    assert cleanup_mark(job.log) == CLEANUP_DONE
    assert job.phase == "" and rig.arbiter.holder("rig") is None


async def test_cancel_runs_the_cleanup_then_ends_cancelled_and_cleanup_cannot_be_cancelled(rig):
    job = rig.jm.submit("long", {}, ALICE)
    await wait_for(lambda: rig.smu.values["out"] is True, what="output on")
    rig.jm.cancel(job.id, ALICE)
    await ended(job)
    assert job.state is JobState.CANCELLED and rig.smu.values["out"] is False
    assert cleanup_mark(job.log) == CLEANUP_DONE
    assert job.log[-1][1] == "cancelled: by alice"


async def test_a_second_cancel_during_the_cleanup_is_refused_as_a_conflict(rig):
    job = rig.jm.submit("slow_cleanup", {}, ALICE)
    await wait_for(lambda: rig.smu.values["out"] is True, what="output on")
    rig.jm.cancel(job.id, ALICE)
    await wait_for(lambda: job.phase == "cleanup", what="cleanup")
    with pytest.raises(CleaningUp) as e:
        rig.jm.cancel(job.id, ROOT)
    assert e.value.to_dict()["kind"] == "conflict" and e.value.phase == "cleanup"
    await ended(job)
    assert job.state is JobState.CANCELLED and cleanup_mark(job.log) == CLEANUP_INCOMPLETE  # its cleanup timed out


async def test_a_failed_step_and_a_failed_cleanup_step_still_leave_the_output_off(rig):
    job = await ended(rig.jm.submit("failing", {}, ALICE))
    assert job.state is JobState.FAILED and "SMU:SP" in job.error
    assert rig.smu.values["out"] is False  # the cleanup's second step ran after its first was refused
    assert cleanup_mark(job.log) == CLEANUP_INCOMPLETE
    assert any(line.startswith("cleanup step 1 (set) failed") for _, line in job.log)


async def test_an_interrupt_on_the_jobs_resources_fails_it_after_its_cleanup(rig):
    job = rig.jm.submit("long", {}, ALICE)
    other = rig.jm.submit("settle", {}, ROOT)  # queued behind it on the same resource
    await wait_for(lambda: rig.smu.values["out"] is True, what="output on")
    assert rig.jm.interrupt("interlock:warm", "too warm", {"other"}) == []
    assert rig.jm.interrupt("interlock:warm", "too warm", {"rig"}) == [job]
    await ended(job)
    assert job.state is JobState.FAILED and job.error == "stopped by interlock:warm: too warm"
    assert rig.smu.values["out"] is False
    await ended(other)


async def test_shutdown_runs_the_cleanup_of_running_jobs(rig):
    job = rig.jm.submit("long", {}, ALICE)
    await wait_for(lambda: rig.smu.values["out"] is True, what="output on")
    await rig.jm.stop()
    assert job.state is JobState.CANCELLED and job.log[-1][1] == "cancelled: server stopping"
    assert rig.smu.values["out"] is False and cleanup_mark(job.log) == CLEANUP_DONE


async def next_start(record, out: bool) -> Rig:
    """The next start of the server on the same store: new database, arbiter and manager; the instrument kept its state."""
    after = Rig()
    after.smu.values["out"] = out
    after.store.jobs[record.id] = record
    await after.start()
    return after


async def test_a_shutdown_that_cuts_a_cleanup_short_leaves_it_for_the_next_start(rig):
    job = rig.jm.submit("slow_cleanup", {}, ALICE)
    await wait_for(lambda: rig.smu.values["out"] is True, what="output on")
    rig.jm.procedures["slow_cleanup"] = rig.jm.procedures["slow_cleanup"].model_copy(update={"cleanup_timeout_s": 600})
    stopping = asyncio.create_task(rig.jm.stop())
    await wait_for(lambda: job.phase == "cleanup", what="cleanup")
    rig.jm._tasks[job.id].cancel()  # the shutdown's bound ran out
    await stopping
    assert job.state is JobState.CANCELLED and cleanup_mark(job.log) == CLEANUP_INTERRUPTED
    assert rig.smu.values["out"] is True
    after = await next_start(_copy(job), out=True)
    try:
        after.jm.restore()
        restored = after.jm.jobs[job.id]
        assert restored.phase == "cleanup" and restored.state is JobState.CANCELLED
        after.db.post("RIG:GATE", True)
        after.jm.schedule()
        await wait_for(lambda: cleanup_mark(restored.log) == CLEANUP_DONE, what="the cleanup after the restart")
        assert after.smu.values["out"] is False and restored.phase == ""
    finally:
        await after.jm.stop()
        await after.db.stop()


async def test_after_a_crash_the_job_is_failed_and_its_cleanup_runs_once_its_resources_are_free(rig):
    job = rig.jm.submit("long", {}, ALICE)
    await wait_for(lambda: rig.smu.values["out"] is True, what="output on")
    after = await next_start(_copy(job), out=True)  # kill -9: the store's last word is "running"
    try:
        held, _ = after.arbiter.request("rig", ROOT, after.db.clock(), duration_s=60, client="console")
        failed = after.jm.restore()
        restored = after.jm.jobs[job.id]
        assert [j.id for j in failed] == [job.id]
        assert restored.state is JobState.FAILED and "stopped while the job was running" in restored.error
        after.jm.schedule()
        assert restored.waiting == {"kind": "lock", "resource": "rig", "owner": "root", "until": held.expires_at, "job": None}
        assert restored.summary()["waiting_reason"].startswith("waiting for lock rig held by root")
        assert after.smu.values["out"] is True
        after.arbiter.release("rig", held.token, after.db.clock())
        after.jm.schedule()
        await wait_for(lambda: cleanup_mark(restored.log) == CLEANUP_DONE, what="the cleanup after the restart")
        assert after.smu.values["out"] is False
        assert restored.state is JobState.FAILED and restored.waiting is None  # how it ended stays on the record
        assert after.arbiter.holder("rig") is None
    finally:
        await after.jm.stop()
        await after.db.stop()


def _copy(job):
    return replace(job, log=list(job.log), results=list(job.results))


async def test_a_procedure_may_opt_out_of_its_cleanup_after_a_crash(rig):
    job = rig.jm.submit("no_recovery", {}, ALICE)
    await wait_for(lambda: rig.smu.values["out"] is True, what="output on")
    rig.store.jobs[job.id] = _copy(job)
    again = rig.manager()
    again.restore()
    restored = again.jobs[job.id]
    assert restored.state is JobState.FAILED and cleanup_mark(restored.log) == CLEANUP_INCOMPLETE
    assert restored.phase == ""


async def test_a_queued_job_says_what_holds_it(rig):
    lease, _ = rig.arbiter.request("rig", ALICE, rig.db.clock(), duration_s=60, client="console")
    job = rig.jm.submit("iv", {}, ALICE)  # the owner's own console lease holds its job
    assert job.state is JobState.QUEUED
    summary = job.summary()
    assert summary["waiting"] == {"kind": "lock", "resource": "rig", "owner": "alice", "until": lease.expires_at, "job": None}
    assert summary["waiting_reason"].startswith("waiting for lock rig held by alice")
    rig.jm.hold("interlock:warm", "T > 0.05 K")
    assert job.summary()["waiting"] == {"kind": "interlock", "interlock": "warm", "reason": "T > 0.05 K"}
    assert job.summary()["waiting_reason"] == "held by interlock warm: T > 0.05 K"
    rig.jm.hold("maintenance", "")
    rig.jm.release_hold("interlock:warm")
    assert job.summary()["waiting"] == {"kind": "hold", "source": "maintenance", "reason": ""}
    rig.jm.release_hold("maintenance")
    assert job.summary()["waiting"]["kind"] == "lock"
    rig.arbiter.release("rig", lease.token, rig.db.clock())
    rig.jm.schedule()
    await ended(job)
    assert job.waiting is None and job.summary()["waiting_reason"] == ""


async def test_a_paused_running_job_says_what_holds_it_and_its_cleanup_never_pauses(rig):
    job = rig.jm.submit("iv", {"points": [1, 2, 3, 4, 5, 6]}, ALICE)
    rig.jm.hold("interlock:warm", "too warm")
    await wait_for(lambda: job.paused, what="paused")
    assert job.summary()["waiting"]["interlock"] == "warm"
    rig.jm.cancel(job.id, ALICE)
    await ended(job)  # the cleanup ran although the queue is held
    assert rig.smu.values["out"] is False and not job.paused and job.waiting is None
    rig.jm.release_hold("interlock:warm")


def test_unused_parameters_are_listed():
    site = parse_site(SITE, "t.yaml")
    assert unused_params(site.procedures["settle"]) == ["unused"]
    assert unused_params(site.procedures["iv"]) == []
    assert procedure_warnings(site.procedures) == [
        "procedures.settle.params.unused: parameter 'unused' is used by no step (the submitter's value would be ignored)"
    ]


@settings(max_examples=40, deadline=None)
@given(names=st.lists(st.sampled_from(["a", "b", "c", "d"]), unique=True, max_size=4), uses=st.sets(st.sampled_from(["a", "b", "c", "d"])))
def test_a_parameter_is_unused_exactly_when_no_step_names_it(names, uses):
    params = "\n".join(f"      {n}: {{type: float64, default: 1}}" for n in names) or "      {}"
    steps = "\n".join(f'      - log: "{{{u}}}"' for u in sorted(uses & set(names))) or "      - sleep: 0"
    site = parse_site(f"site: t\nprocedures:\n  p:\n    params:\n{params}\n    steps:\n{steps}\n", "t.yaml")
    assert unused_params(site.procedures["p"]) == [n for n in names if n not in uses]
