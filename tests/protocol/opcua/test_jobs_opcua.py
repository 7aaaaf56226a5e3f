"""Jobs and the audit trail over OPC UA: submit, queue by priority, per-user results, cancel, audit.

One whole server runs for the module; users are labctl client sessions (asyncua clients)
and, where the wire format itself is the point, plain asyncua calls.
"""

from __future__ import annotations

import json
import time

import pytest
from asyncua import ua
from labctl.clients.errors import AccessDenied, CommandConflict, CommandInvalid, CommandNotFound, PutConflict
from labctl.ioc.jobs import JobState
from labctl.ioc.types import Identity

from tests.helpers import wait_for
from tests.protocol.opcua.control_support import (  # noqa: F401 -- fixtures
    b,
    call,
    call_diagnosed,
    call_json,
    d,
    i32,
    i64,
    module_loop_leak_check,
    module_server,
    open_session_fixture,
    open_ua_fixture,
    refusal,
    s,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

BODY = """
resources:
  - {name: cryostat}
pvs:
  - {name: "CRYO:SP", type: float64, writable: true, initial: 0.1, drive: [0, 1], resource: cryostat}
  - {name: "CRYO:TEMP", type: float64, initial: 0.01, resource: cryostat}
  - {name: "LAB:GATE", type: bool, writable: true, initial: false}
procedures:
  hold:
    description: "wait for the gate, then read and set"
    resources: [cryostat]
    params:
      tag: {type: string, default: "", description: "a label for the reading"}
    steps:
      - wait: {until: "g", inputs: {g: "LAB:GATE"}, timeout_s: 60}
      - read: {pvs: ["CRYO:TEMP"], label: "{tag}"}
  measure:
    description: "set the setpoint and read back"
    resources: [cryostat]
    params:
      sp: {type: float64, min: 0, max: 1, description: "setpoint"}
    steps:
      - set: {pv: "CRYO:SP", value: "=sp"}
      - read: {pvs: ["CRYO:SP"], label: "sp={sp}"}
  admin_only:
    roles: [admin]
    steps:
      - log: "hello"
"""

served = module_server(BODY)

ROOT = Identity("root", frozenset({"admin"}), "test")


async def test_jobs_on_one_resource_run_in_priority_order_with_results_per_user(served, open_session):
    alice, bob, carol, root = [await open_session(served.url, u) for u in ("alice", "bob", "carol", "root")]
    jobs = served.control.jobs
    served.db.post("LAB:GATE", False)
    first = await alice.submit("hold", {"tag": "alice's"})
    await wait_for(lambda: jobs.get(first).state is JobState.RUNNING, what="alice's job running")
    assert served.control.arbiter.holder("cryostat").client == f"job:{first}"
    low = await bob.submit("measure", {"sp": "0.2"}, priority=0)  # strings convert, as from a command line
    high = await carol.submit("measure", {"sp": 0.7}, priority=5)
    assert [(j.id, j.state) for j in await bob.jobs()][:3] == [(high, "queued"), (low, "queued"), (first, "running")]

    served.db.post("LAB:GATE", True)  # alice's job goes on; then carol's (priority 5), then bob's
    await wait_for(lambda: all(jobs.get(i).state.final for i in (first, low, high)), timeout=20, what="jobs done")
    done = {i: jobs.get(i) for i in (first, low, high)}
    assert all(j.state is JobState.DONE for j in done.values())
    assert done[first].ended_at <= done[high].started_at and done[high].ended_at <= done[low].started_at

    # Each user's results under their own job id...
    mine = await carol.job(high)
    assert (mine.owner, mine.state, mine.params, mine.resources) == ("carol", "done", {"sp": 0.7}, ["cryostat"])
    assert [(pv, value, sev, status, label) for _, pv, value, sev, status, label in mine.results] == [
        ("CRYO:SP", 0.7, "NO_ALARM", "NO_ALARM", "sp=0.7")
    ]
    assert [line for _, line in mine.log][-3:] == ["set CRYO:SP = 0.7", "read CRYO:SP [sp=0.7]", "done"]
    assert [r[1:3] for r in (await bob.job(low)).results] == [("CRYO:SP", 0.2)]
    # ...readable by their owner and admins only.
    mark = served.mark()
    with pytest.raises(AccessDenied) as denied:
        await bob.job(high)
    assert (denied.value.status, denied.value.kind, denied.value.action, denied.value.target) == (
        "BadUserAccessDenied", "forbidden", "job.view", f"job:{high}",
    )  # fmt: skip
    assert denied.value.fields["user"] == "bob" and "carol" in denied.value.fields["needs"]
    assert served.refusals(mark) == [("job.view", "bob", f"job:{high}")]
    assert (await root.job(high)).results == mine.results
    assert [j.id for j in await bob.jobs(mine=True)] == [low]
    assert {j.owner for j in await bob.jobs()} >= {"alice", "bob", "carol"}


async def test_only_owners_and_admins_cancel(served, open_session):
    bob, carol, root = [await open_session(served.url, u) for u in ("bob", "carol", "root")]
    jobs = served.control.jobs
    served.db.post("LAB:GATE", False)
    running = await bob.submit("hold", {})
    try:
        await wait_for(lambda: jobs.get(running).state is JobState.RUNNING, what="bob's job running")
        queued = await bob.submit("measure", {"sp": 0.3})
        mark = served.mark()
        with pytest.raises(AccessDenied) as denied:
            await carol.cancel(running)
        assert (denied.value.status, denied.value.kind, denied.value.action, denied.value.target) == (
            "BadUserAccessDenied", "forbidden", "job.cancel", f"job:{running}",
        )  # fmt: skip
        assert denied.value.fields["user"] == "carol" and "bob" in denied.value.fields["needs"]
        assert jobs.get(running).state is JobState.RUNNING
        await bob.cancel(queued)
        assert jobs.get(queued).state is JobState.CANCELLED
        with pytest.raises(CommandConflict) as again:
            await bob.cancel(queued)
        assert (again.value.status, again.value.error, again.value.action) == ("BadInvalidState", "JobFinished", "job.cancel")
        assert again.value.fields == {"job": queued, "procedure": "measure", "state": "cancelled"}
        await root.cancel(running)  # admins cancel anyone's
        await wait_for(lambda: jobs.get(running).state is JobState.CANCELLED, what="cancelled")
        await wait_for(lambda: served.control.arbiter.holder("cryostat") is None, what="the job's lease released")
        with pytest.raises(CommandNotFound) as unknown:
            await bob.cancel(9999)
        assert (unknown.value.status, unknown.value.error, unknown.value.target) == ("BadInvalidArgument", "NoSuchJob", "job:9999")
        assert served.refusals(mark) == [
            ("job.cancel", "carol", f"job:{running}"), ("job.cancel", "bob", f"job:{queued}"), ("job.cancel", "bob", "job:9999"),
        ]  # fmt: skip
        transitions = [(r.user, r.new, r.reason) for r in served.records("job.state", target=f"job:{running}")]
        assert transitions[-1] == ("bob", "cancelled", "by root")
    finally:  # never leave the job waiting for the gate (and holding the cryostat) for the next test
        if not jobs.get(running).state.final:
            served.control.cancel_job(running, ROOT)
            await wait_for(lambda: jobs.get(running).state.final, what="bob's job ended")


async def test_submit_refusals_and_procedures(served, open_session, open_ua):
    bob, vic = await open_session(served.url, "bob"), await open_session(served.url, "vic")
    mark = served.mark()
    with pytest.raises(CommandNotFound) as unknown:
        await bob.submit("nope", {})
    assert (unknown.value.status, unknown.value.error, unknown.value.action, unknown.value.target) == (
        "BadInvalidArgument", "NoSuchProcedure", "job.submit", "nope",
    )  # fmt: skip
    with pytest.raises(CommandInvalid) as bad:
        await bob.submit("measure", {"sp": 2})
    assert (bad.value.status, bad.value.error, bad.value.fields["procedure"]) == ("BadInvalidArgument", "BadParameters", "measure")
    assert "'sp'" in bad.value.reason  # which parameter: the sentence says
    with pytest.raises(AccessDenied) as admins:
        await bob.submit("admin_only", {})
    assert (admins.value.action, admins.value.target, admins.value.fields) == (
        "job.submit", "admin_only", {"user": "bob", "needs": "one of the roles ['admin']"},
    )  # fmt: skip
    with pytest.raises(AccessDenied) as viewer:
        await vic.submit("measure", {"sp": 0.1})
    assert (viewer.value.action, viewer.value.target, viewer.value.fields["user"]) == ("job.submit", "measure", "vic")
    assert served.refusals(mark) == [
        ("job.submit", "bob", "nope"), ("job.submit", "bob", "measure"), ("job.submit", "bob", "admin_only"), ("job.submit", "vic", "measure"),
    ]  # fmt: skip

    procs = {p.name: p for p in await bob.procedures()}
    assert procs["measure"].resources == ["cryostat"]
    assert procs["measure"].params == {"sp": {"type": "float64", "default": None, "description": "setpoint", "min": 0.0, "max": 1.0}}
    assert procs["hold"].description == "wait for the gate, then read and set"

    raw = await open_ua(served.url, "bob")
    mark = served.mark()
    res, listed_params = await call_diagnosed(raw, "Control", "SubmitTask", s("measure"), s("[1, 2]"), i32(0))
    assert res.StatusCode.value == ua.StatusCodes.BadInvalidArgument
    assert (listed_params["kind"], listed_params["action"], listed_params["target"]) == ("invalid", "job.submit", "measure")
    assert "ParamsJson" in await refusal(raw)
    assert served.refusals(mark) == [("job.submit", "bob", "measure")]
    res = await call(raw, "Control", "SubmitTask", s("measure"), s('{"sp": 0.4}'), i32(1))
    assert res.StatusCode.is_good() and res.OutputArguments[0].VariantType == ua.VariantType.Int64
    job_id = res.OutputArguments[0].Value
    (listed,) = [j for j in await call_json(raw, "ListJobs", b(True)) if j["id"] == job_id]
    assert set(listed) == {"id", "procedure", "owner", "state", "paused", "priority", "params", "resources", "submitted_at", "started_at", "ended_at", "error", "phase", "waiting", "waiting_reason", "server"}  # fmt: skip
    await wait_for(lambda: served.control.jobs.get(job_id).state.final, what="job done")
    detail = await call_json(raw, "GetJob", i64(job_id))
    assert detail["results"][0] == {"time": detail["results"][0]["time"], "pv": "CRYO:SP", "value": 0.4, "severity": "NO_ALARM", "status": "NO_ALARM", "label": "sp=0.4"}  # fmt: skip
    assert detail["log"][-1][1] == "done"


async def test_audit_lists_writes_locks_and_jobs_with_filters(served, open_session, open_ua):
    since = time.time()
    alice, bob = await open_session(served.url, "alice"), await open_session(served.url, "bob")
    lease = await alice.lock("cryostat", duration_s=60)
    await alice.put("CRYO:SP", 0.25)
    with pytest.raises(PutConflict) as locked:
        await bob.put("CRYO:SP", 0.5)
    assert (locked.value.error, locked.value.fields["owner"], locked.value.fields["until"]) == ("LockedBy", "alice", lease.expires_at)
    await alice.unlock("cryostat", lease.token)

    records = await bob.audit(since)
    assert set(records[0]) == {"time", "action", "user", "protocol", "host", "target", "old", "new", "accepted", "reason"}
    trail = [(r["action"], r["user"], r["target"], r["accepted"]) for r in records if r["action"] != "login"]
    assert trail == [
        ("lock.grant", "alice", "cryostat", True),
        ("write", "alice", "CRYO:SP", True),
        ("write", "bob", "CRYO:SP", False),
        ("lock.release", "alice", "cryostat", True),
    ]
    refused = [r for r in records if not r["accepted"]][0]
    assert "alice" in refused["reason"] and (refused["old"], refused["new"]) == (0.25, 0.5)
    assert [r["action"] for r in await bob.audit(since, user="bob") if r["action"] != "login"] == ["write"]
    assert [r["user"] for r in await bob.audit(since, pv="CRYO:SP")] == ["alice", "bob"]
    assert await bob.audit(time.time() + 3600) == []

    anonymous = await open_ua(served.url)
    mark = served.mark()
    res, denied = await call_diagnosed(anonymous, "Control", "ListAudit", d(since), s(""), s(""))
    assert res.StatusCode.value == ua.StatusCodes.BadUserAccessDenied
    assert (denied["kind"], denied["action"], denied["fields"]) == ("forbidden", "audit.read", {"user": "anonymous", "needs": "a role: log in"})
    assert "audit" in await refusal(anonymous)
    assert served.refusals(mark) == [("audit.read", "anonymous", "audit")]
    assert json.loads((await call(anonymous, "Control", "ListLocks")).OutputArguments[0].Value)[0]["resource"] == "cryostat"
