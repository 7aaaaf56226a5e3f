"""A lock is held by a client, not a name; inputs are bounded before the core (issue 17, items 5 and 6), over OPC UA.

* Two sessions of one user: only the one that took the lease writes; the other is refused
  with LockedBy naming the holding session, until it is handed the token
  (``Control/UseLease``, or ``Session.put(..., lease=token)``), audited as ``lock.share``.
  A token is shared only between sessions of its user.
* A job's lease is the job's: its owner's console is refused while it runs.
* Lock priorities outside -1000..1000, and SubmitTask with ``settle_s = 10**400``, 10 000
  nested brackets or ``setpoints=[NaN]``, are refused BadInvalidArgument with a typed
  InvalidArgument as data, nothing reaches the instrument, and no traceback is logged.
"""

from __future__ import annotations

import logging

import pytest
from asyncua import ua
from labctl.clients.errors import AccessDenied, CommandConflict, PutConflict

from tests.helpers import wait_for
from tests.protocol.opcua.control_support import (  # noqa: F401 -- fixtures
    call_diagnosed,
    d,
    i32,
    module_loop_leak_check,
    module_server,
    open_session_fixture,
    open_ua_fixture,
    s,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

BODY = """
resources:
  - {name: cryostat}
pvs:
  - {name: "CRYO:SP", type: float64, writable: true, initial: 0.1, drive: [0, 1], resource: cryostat}
  - {name: "CRYO:RANGE", type: float64, writable: true, initial: 0.0, resource: cryostat}
  - {name: "LAB:GATE", type: bool, writable: true, initial: false}
procedures:
  hold:
    resources: [cryostat]
    steps:
      - wait: {until: "g", inputs: {g: "LAB:GATE"}, timeout_s: 60}
  heater_sweep:
    resources: [cryostat]
    params:
      setpoints: {type: "float64[]", description: "setpoints"}
      settle_s: {type: float64, default: 0, min: 0, max: 3600}
    steps:
      - set: {pv: "CRYO:RANGE", value: 1.0}
      - repeat:
          var: sp
          values: "=setpoints"
          steps:
            - set: {pv: "CRYO:SP", value: "=sp"}
            - sleep: "=settle_s"
    cleanup:
      - set: {pv: "CRYO:RANGE", value: 0.0}
"""

served = module_server(BODY)


@pytest.fixture
def no_tracebacks(caplog):
    caplog.set_level(logging.INFO)
    yield
    assert not [r for r in caplog.records if r.exc_info and r.name.startswith("labctl")], "a traceback was logged"


async def test_another_session_of_the_same_user_is_refused_until_handed_the_token(served, open_session, no_tracebacks):
    first, second = await open_session(served.url, "alice"), await open_session(served.url, "alice")
    lease = await first.lock("cryostat", duration_s=60)
    try:
        holder = served.control.arbiter.holder("cryostat")
        assert holder.client.startswith("opcua:session-")
        await first.put("CRYO:SP", 0.2)
        with pytest.raises(PutConflict) as refused:
            await second.put("CRYO:SP", 0.3)
        assert (refused.value.error, refused.value.fields["owner"], refused.value.fields["client"]) == ("LockedBy", "alice", holder.client)
        assert served.db.read("CRYO:SP").value == 0.2

        mark = len(served.audit)
        await second.put("CRYO:SP", 0.3, lease=lease.token)  # handed the token: binds it, then writes
        assert served.db.read("CRYO:SP").value == 0.3
        (shared,) = served.records("lock.share", target="cryostat")[-1:]
        assert (shared.user, shared.accepted) == ("alice", True) and shared.host != holder.client
        await second.put("CRYO:SP", 0.4, lease=lease.token)  # bound once per session
        assert len(served.records("lock.share")) == len([r for r in served.audit[:mark] if r.action == "lock.share"]) + 1
        await first.renew("cryostat", lease.token, 60)
        await second.put("CRYO:SP", 0.5)  # a renewal keeps the binding
    finally:
        await first.unlock("cryostat", lease.token)
    lease2 = await first.lock("cryostat", duration_s=60)
    try:  # a new lease: the old binding went with the old one
        with pytest.raises(PutConflict):
            await second.put("CRYO:SP", 0.6)
    finally:
        await first.unlock("cryostat", lease2.token)


async def test_a_token_is_shared_only_with_sessions_of_its_user(served, open_session, open_ua, no_tracebacks):
    alice, bob = await open_session(served.url, "alice"), await open_session(served.url, "bob")
    lease = await alice.lock("cryostat", duration_s=60)
    try:
        with pytest.raises(AccessDenied) as refused:
            await bob.put("CRYO:SP", 0.3, lease=lease.token)
        assert (refused.value.kind, refused.value.error) == ("forbidden", "LeaseNotShared")
        with pytest.raises(CommandConflict) as wrong:
            await alice.use_lease("0" * 32)
        assert wrong.value.error == "NoLease"
        # A plain OPC UA client calls the method itself; a wrong token's refusal comes as data.
        ua_client = await open_ua(served.url, "alice")
        res, refusal = await call_diagnosed(ua_client, "Control", "UseLease", s("nope"))
        assert res.StatusCode.value == ua.StatusCodes.BadInvalidState and refusal["error"] == "NoLease"
        res, _ = await call_diagnosed(ua_client, "Control", "UseLease", s(lease.token))
        assert res.StatusCode.is_good() and [v.Value for v in res.OutputArguments] == ["cryostat", lease.expires_at]
    finally:
        await alice.unlock("cryostat", lease.token)


async def test_a_jobs_lease_is_the_jobs_not_its_owners_console(served, open_session, no_tracebacks):
    alice = await open_session(served.url, "alice")
    served.db.post("LAB:GATE", False)
    job_id = await alice.submit("hold", {})
    await wait_for(lambda: served.control.jobs.jobs[job_id].state.value == "running", timeout=10, what="the job running")
    holder = served.control.arbiter.holder("cryostat")
    assert (holder.user, holder.client, holder.job) == ("alice", f"job:{job_id}", job_id)
    with pytest.raises(PutConflict) as refused:
        await alice.put("CRYO:SP", 0.7)
    assert (refused.value.fields["client"], refused.value.fields["job"]) == (f"job:{job_id}", job_id)
    with pytest.raises(AccessDenied):  # the job's token is not the console's to take either
        await alice.use_lease(holder.token)
    served.db.post("LAB:GATE", True)
    await wait_for(lambda: served.control.jobs.jobs[job_id].state.value == "done", timeout=10, what="the job done")


# ---- inputs bounded before the core ---------------------------------------------------------------------


@pytest.mark.parametrize("priority", [1001, -1001, 2**31 - 1, -(2**31)])
async def test_lock_priorities_out_of_range_are_refused(served, open_ua, priority, no_tracebacks):
    client = await open_ua(served.url, "alice")
    res, refusal = await call_diagnosed(client, "Resources/cryostat/Lock", "RequestLock", d(60), i32(priority), ua.Variant(False, ua.VariantType.Boolean))
    assert res.StatusCode.value == ua.StatusCodes.BadInvalidArgument
    assert (refusal["kind"], refusal["error"], refusal["action"]) == ("invalid", "BadLease", "lock.request")
    assert served.control.arbiter.holder("cryostat") is None
    res, refusal = await call_diagnosed(client, "Control", "SubmitTask", s("hold"), s("{}"), i32(priority))
    assert res.StatusCode.value == ua.StatusCodes.BadInvalidArgument and refusal["kind"] == "invalid"


NESTED = "[" * 10_000 + "]" * 10_000


@pytest.mark.parametrize(
    "params",
    [
        '{"setpoints": [0.1], "settle_s": ' + "1" + "0" * 400 + "}",  # 10**400
        '{"setpoints": [0.1], "settle_s": 1e400}',
        '{"setpoints": ' + NESTED + "}",
        NESTED,
        '{"setpoints": [NaN]}',
        '{"setpoints": [0.1, Infinity]}',
        '{"setpoints": [[0.1]]}',
        '{"setpoints": [0.1], "settle_s": "soon"}',
        '{"setpoints": [' + ",".join(["0.1"] * 1001) + "]}",
    ],
    ids=["int-10e400", "float-1e400", "nested-param", "nested-whole", "nan", "infinity", "nested-list", "string", "too-many"],
)
async def test_bad_procedure_parameters_are_refused_before_anything_moves(served, open_ua, params, no_tracebacks):
    client = await open_ua(served.url, "alice")
    jobs_before = len(served.control.jobs.jobs)
    mark = served.mark()
    res, refusal = await call_diagnosed(client, "Control", "SubmitTask", s("heater_sweep"), s(params), i32(0))
    assert res.StatusCode.value == ua.StatusCodes.BadInvalidArgument
    assert (refusal["kind"], refusal["action"], refusal["target"]) == ("invalid", "job.submit", "heater_sweep")
    assert refusal["message"]
    assert len(served.control.jobs.jobs) == jobs_before  # no job, so nothing touched the heater range
    assert served.db.read("CRYO:RANGE").value == 0.0
    assert served.refusals(mark) == [("job.submit", "alice", "heater_sweep")]  # audited once
