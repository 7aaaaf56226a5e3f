"""Locks over OPC UA: Part 100 LockingServices, RequestLock with priorities, rights that follow the lock.

One whole server (control layer and OPC UA service) runs for the module; each test works
on its own resource. Plain asyncua clients play generic OPC UA clients (by browse path
and standard BrowseNames only), the labctl client library plays labctl users, and one
client runs in a subprocess so that it can crash.
"""

from __future__ import annotations

import asyncio
import sys
import textwrap

import pytest
from asyncua import ua
from labctl.clients.errors import LockUnavailable, LockWaitTimeout, PutConflict
from labctl.ioc.types import Identity

from tests.helpers import wait_for
from tests.protocol.opcua.control_support import (  # noqa: F401 -- fixtures
    NAMESPACE,
    SITE,
    USERS,
    b,
    call,
    call_diagnosed,
    d,
    i32,
    indexes,
    module_loop_leak_check,
    module_server,
    open_session_fixture,
    open_ua_fixture,
    refusal,
    s,
)
from tests.protocol.opcua.test_node_opcua import finish, run_interop

pytestmark = pytest.mark.asyncio(loop_scope="module")

BODY = """
resources:
  - {name: cryostat, description: "dilution fridge", max_lease_s: 600}
  - {name: magnet}
  - {name: sample}
  - {name: stage}
  - {name: pump}
  - {name: valve}
  - {name: laser}
  - {name: oven}
  - {name: bench, lockable: false}
pvs:
  - {name: "CRYO:SP", type: float64, unit: K, writable: true, initial: 0.1, drive: [0, 1], resource: cryostat}
  - {name: "CRYO:TEMP", type: float64, initial: 0.01, resource: cryostat}
  - {name: "MAG:FIELD", type: float64, writable: true, initial: 0.0, resource: magnet}
  - {name: "SAMPLE:ANGLE", type: float64, writable: true, initial: 0.0, resource: sample}
  - {name: "BENCH:V", type: float64, writable: true, initial: 0.0, resource: bench}
"""

served = module_server(BODY)

WRITE = ua.AccessLevel.CurrentWrite.mask
ADMIN = Identity("root", frozenset({"admin"}), "test")


async def lock_node(client, resource: str):
    """The resource's Lock object, found by browse path with standard BrowseNames."""
    idx, di = await indexes(client)
    return await client.nodes.objects.get_child([f"{idx}:{SITE}", f"{idx}:Resources", f"{idx}:{resource}", f"{di}:Lock"])


async def values(client, lock) -> dict[str, object]:
    """Locked, LockingClient, LockingUser, RemainingLockTime of a Lock object."""
    _, di = await indexes(client)
    out = {}
    for name in ("Locked", "LockingClient", "LockingUser", "RemainingLockTime"):
        out[name] = await (await lock.get_child(f"{di}:{name}")).read_value()
    return out


async def user_access(client, pv: str) -> int:
    idx, _ = await indexes(client)
    dv = await client.get_node(ua.NodeId(pv, idx)).read_attribute(ua.AttributeIds.UserAccessLevel)
    return dv.Value.Value


# ---- Part 100 from a generic client ---------------------------------------------------------------------


async def test_part100_init_renew_exit_from_a_plain_client_by_browse_path(served, open_ua):
    alice, bob = await open_ua(served.url, "alice"), await open_ua(served.url, "bob")
    _, di = await indexes(alice)
    lock = await lock_node(alice, "cryostat")
    assert await lock.read_type_definition() == ua.NodeId(6388, di)  # DI LockingServicesType
    assert (await alice.get_node(ua.NodeId(6388, di)).read_browse_name()) == ua.QualifiedName("LockingServicesType", di)
    assert (await values(alice, lock))["Locked"] is False

    assert await lock.call_method(f"{di}:InitLock", s("calibrating the thermometer")) == 0
    state = await values(alice, lock)
    assert state["Locked"] is True and state["LockingUser"] == "alice"
    assert state["LockingClient"].startswith("opcua:session-") and state["LockingClient"].endswith("@127.0.0.1")
    assert 0 < state["RemainingLockTime"] <= 60_000  # ms, computed when read
    lease = served.control.arbiter.holder("cryostat")
    assert (lease.user, lease.client, lease.duration_s) == ("alice", state["LockingClient"], 60.0)

    # Another client: InitLock is rejected (E_AlreadyLocked), RenewLock and ExitLock are not its to call.
    # Each refusal answers Good with its status output, and is audited once, under the policy's action.
    bobs = await lock_node(bob, "cryostat")
    mark = served.mark()
    assert await bobs.call_method(f"{di}:InitLock", s("")) == -1
    assert "alice" in await refusal(bob)  # the sentence, for a person browsing with a generic client
    res, held = await call_diagnosed(bob, "Resources/cryostat/Lock", "InitLock", s(""))  # the refusal as data, if asked for
    assert res.StatusCode.is_good() and [v.Value for v in res.OutputArguments] == [-1]
    assert (held["kind"], held["error"], held["action"], held["target"]) == ("conflict", "LockHeld", "lock.request", "cryostat")
    assert (held["fields"]["owner"], held["fields"]["until"]) == ("alice", lease.expires_at)
    assert await bobs.call_method(f"{di}:RenewLock") == -1
    res, none = await call_diagnosed(bob, "Resources/cryostat/Lock", "ExitLock")
    assert res.StatusCode.is_good() and [v.Value for v in res.OutputArguments] == [-1]
    assert (none["kind"], none["error"], none["action"], none["target"]) == ("conflict", "NoLease", "lock.release", "cryostat")
    assert served.control.arbiter.holder("cryostat").token == lease.token
    assert served.refusals(mark) == [
        ("lock.request", "bob", "cryostat"), ("lock.request", "bob", "cryostat"), ("lock.renew", "bob", "cryostat"),
        ("lock.release", "bob", "cryostat"),
    ]  # fmt: skip

    # Alice renews (the lease restarts from now) and exits.
    assert await lock.call_method(f"{di}:RenewLock") == 0
    assert served.control.arbiter.holder("cryostat").expires_at >= lease.expires_at
    assert await lock.call_method(f"{di}:ExitLock") == 0
    assert (await values(alice, lock))["Locked"] is False
    mark = served.mark()
    res, none = await call_diagnosed(alice, "Resources/cryostat/Lock", "ExitLock")
    assert res.StatusCode.is_good() and [v.Value for v in res.OutputArguments] == [-1]  # E_NotLocked
    assert (none["error"], none["action"]) == ("NoLease", "lock.release")
    assert "cryostat" in await refusal(alice)
    assert served.refusals(mark) == [("lock.release", "alice", "cryostat")]
    accepted = [(r.action, r.user) for r in served.audit if r.action.startswith("lock.") and r.target == "cryostat" and r.accepted]
    assert accepted == [("lock.grant", "alice"), ("lock.renew", "alice"), ("lock.release", "alice")]


async def test_the_types_method_called_on_an_instance_and_modelling_rules(served, open_ua):
    alice = await open_ua(served.url, "alice")
    _, di = await indexes(alice)
    lock = await lock_node(alice, "cryostat")
    # Part 100 lets instances share the type's methods: calling ns=DI;i=6393 on the instance works too.
    assert await lock.call_method(ua.NodeId(6393, di), s("shared method")) == 0
    assert served.control.arbiter.holder("cryostat").user == "alice"
    assert await lock.call_method(ua.NodeId(6398, di)) == 0
    rule = await alice.get_node(ua.NodeId(6393, di)).get_referenced_nodes(ua.ObjectIds.HasModellingRule)
    assert [n.nodeid for n in rule] == [ua.NodeId(ua.ObjectIds.ModellingRule_Mandatory)]
    capability = await alice.nodes.server.get_child(["0:ServerCapabilities", f"{di}:MaxInactiveLockTime"])
    assert await capability.read_value() == 60_000.0


async def test_refusals_of_lock_calls(served, open_ua):
    vic, alice = await open_ua(served.url, "vic"), await open_ua(served.url, "alice")
    _, di = await indexes(vic)
    lock = await lock_node(vic, "cryostat")
    mark = served.mark()
    res, denied = await call_diagnosed(vic, "Resources/cryostat/Lock", "InitLock", s(""))
    assert res.StatusCode.value == ua.StatusCodes.BadUserAccessDenied  # permission: Bad, not a status output
    assert (denied["kind"], denied["action"], denied["target"]) == ("forbidden", "lock.request", "cryostat")
    assert denied["fields"] == {"user": "vic", "needs": "a role that may write 'cryostat'"}
    assert "cryostat" in await refusal(vic)
    with pytest.raises(ua.UaStatusCodeError) as generic:  # a generic client sees the Bad status
        await lock.call_method(f"{di}:InitLock", s(""))
    assert generic.value.code == ua.StatusCodes.BadUserAccessDenied
    assert served.refusals(mark) == [("lock.request", "vic", "cryostat")] * 2

    mark = served.mark()
    res, bad = await call_diagnosed(alice, "Resources/cryostat/Lock", "RequestLock", d(-1), i32(0), b(False))
    assert res.StatusCode.value == ua.StatusCodes.BadInvalidArgument
    assert (bad["kind"], bad["error"], bad["action"], bad["target"]) == ("invalid", "BadLease", "lock.request", "cryostat")
    # Wrong arguments are refused by the adapter, before the core: audited all the same.
    res, mistyped = await call_diagnosed(alice, "Resources/cryostat/Lock", "RequestLock", s("60"), i32(0), b(False))
    assert res.StatusCode.value == ua.StatusCodes.BadInvalidArgument
    assert [r.value for r in res.InputArgumentResults] == [ua.StatusCodes.BadTypeMismatch, 0, 0]
    assert (mistyped["kind"], mistyped["action"], mistyped["target"]) == ("invalid", "lock.request", "cryostat")
    assert "DurationS" in mistyped["message"]
    res, missing = await call_diagnosed(alice, "Resources/cryostat/Lock", "RequestLock", d(60))
    assert res.StatusCode.value == ua.StatusCodes.BadArgumentsMissing
    assert (missing["kind"], missing["action"]) == ("invalid", "lock.request")
    assert "DurationS, Priority, Wait" in await refusal(alice)
    assert served.refusals(mark) == [
        ("lock.request", "alice", "cryostat"), ("lock.request", "alice", "cryostat"), ("lock.request", "alice", "cryostat"),
    ]  # fmt: skip
    assert served.control.arbiter.holder("cryostat") is None


# ---- rights that follow the lock --------------------------------------------------------------------------


async def test_user_access_level_flips_with_the_lock(served, open_ua, open_session):
    bob_ua, alice_ua, vic_ua = [await open_ua(served.url, u) for u in ("bob", "alice", "vic")]
    assert not await user_access(bob_ua, "MAG:FIELD") & WRITE  # lockable and not held: nobody writes
    bob = await open_session(served.url, "bob")
    assert not (await bob.info("MAG:FIELD")).user_writable

    lease = await bob.lock("magnet", duration_s=60)
    assert await user_access(bob.client, "MAG:FIELD") & WRITE  # the holding session writes
    assert not await user_access(bob_ua, "MAG:FIELD") & WRITE  # bob's other session: a lock is held by a session, not a name
    (await call(bob_ua, "Control", "UseLease", s(lease.token))).StatusCode.check()  # ...until it is handed the token
    assert await user_access(bob_ua, "MAG:FIELD") & WRITE
    assert not await user_access(alice_ua, "MAG:FIELD") & WRITE
    assert not await user_access(vic_ua, "MAG:FIELD") & WRITE
    await bob.put("MAG:FIELD", 1.5)
    await bob.unlock("magnet", lease.token)
    assert not await user_access(bob_ua, "MAG:FIELD") & WRITE
    # A resource that is not lockable: the roles alone decide.
    assert await user_access(alice_ua, "BENCH:V") & WRITE
    assert not await user_access(vic_ua, "BENCH:V") & WRITE


async def test_a_refused_write_names_holder_and_expiry(served, open_ua, open_session):
    alice = await open_session(served.url, "alice")
    lease = await alice.lock("sample", duration_s=120)
    bob_ua = await open_ua(served.url, "bob")
    idx, _ = await indexes(bob_ua)
    mark = served.mark()
    with pytest.raises(ua.UaStatusCodeError) as raised:
        await bob_ua.get_node(ua.NodeId("SAMPLE:ANGLE", idx)).write_value(ua.DataValue(ua.Variant(0.5, ua.VariantType.Double)))
    assert raised.value.code == ua.StatusCodes.BadLocked
    assert "alice" in await refusal(bob_ua, "LastWriteRefusal")  # a generic client's only channel: the sentence
    bob = await open_session(served.url, "bob")
    with pytest.raises(PutConflict) as refused:
        await bob.put("SAMPLE:ANGLE", 0.5)
    assert (refused.value.status, refused.value.kind, refused.value.error, refused.value.action) == ("BadLocked", "conflict", "LockedBy", "write")
    assert refused.value.fields == {"pv": "SAMPLE:ANGLE", "resource": "sample", "owner": "alice", "until": lease.expires_at, "job": None, "client": served.control.arbiter.holder("sample").client}
    (first, second) = served.records("write", target="SAMPLE:ANGLE", accepted=False)
    assert (first.user, first.protocol, second.user) == ("bob", "opcua", "bob")
    # Asking for the lock without waiting: BadLocked with the same who and until when.
    with pytest.raises(LockUnavailable) as unavailable:
        await bob.lock("sample", duration_s=10)
    held = unavailable.value
    assert (held.status, held.kind, held.error, held.action, held.target) == ("BadLocked", "conflict", "LockHeld", "lock.request", "sample")
    assert (held.fields["owner"], held.fields["until"]) == ("alice", lease.expires_at)
    assert served.refusals(mark) == [("write", "bob", "SAMPLE:ANGLE"), ("write", "bob", "SAMPLE:ANGLE"), ("lock.request", "bob", "sample")]
    await alice.unlock("sample", lease.token)
    assert served.db.read("SAMPLE:ANGLE").value == 0.0


# ---- queueing -----------------------------------------------------------------------------------------------


async def test_racing_users_get_the_lock_in_priority_then_arrival_order(served, open_ua, open_session):
    arbiter = served.control.arbiter
    # A real race: two requests at once; one is granted, the other waits.
    bob_ua, carol_ua = await open_ua(served.url, "bob"), await open_ua(served.url, "carol")
    first, second = await asyncio.gather(
        call(bob_ua, "Resources/stage/Lock", "RequestLock", d(60), i32(0), b(True)),
        call(carol_ua, "Resources/stage/Lock", "RequestLock", d(60), i32(0), b(True)),
    )
    statuses = sorted([first.OutputArguments[0].Value, second.OutputArguments[0].Value])
    assert statuses == [0, 1]  # one granted, one queued
    holder, waiter = arbiter.holder("stage"), arbiter.queue("stage")[0]
    assert {holder.user, waiter.user} == {"bob", "carol"}
    for client in (bob_ua, carol_ua):
        assert (await call(client, "Resources/stage/Lock", "ReleaseLease", s(""))).StatusCode.is_good()
    assert arbiter.holder("stage") is None and not arbiter.queue("stage")

    # Waiters queue by priority, then arrival.
    alice = await open_session(served.url, "alice")
    lease = await alice.lock("stage", duration_s=60)
    order: list[str] = []

    async def wait_and_release(user: str, priority: int) -> None:
        session = await open_session(served.url, user)
        got = await session.lock("stage", duration_s=60, priority=priority, wait=True, timeout_s=30)
        assert arbiter.holder("stage").token == got.token
        order.append(user)
        await session.unlock("stage", got.token)

    tasks = []
    for user, priority in (("bob", 0), ("carol", 5), ("dave", 5)):
        tasks.append(asyncio.create_task(wait_and_release(user, priority)))
        await wait_for(lambda user=user: any(w.user == user for w in arbiter.queue("stage")), what=f"{user} queued")
    assert [(w.user, w.priority) for w in arbiter.queue("stage")] == [("carol", 5), ("dave", 5), ("bob", 0)]
    locks = {lk.resource: lk for lk in await alice.locks()}
    assert locks["stage"].owner == "alice" and locks["stage"].queue == [("carol", 5), ("dave", 5), ("bob", 0)]
    assert served.db.read("ARB:STAGE:QUEUE").value == 3
    await alice.unlock("stage", lease.token)
    await asyncio.gather(*tasks)
    assert order == ["carol", "dave", "bob"]
    grants = [r.new for r in served.records("lock.grant", target="stage")]
    assert grants[-4:] == ["alice", "carol", "dave", "bob"]


async def test_a_wait_that_times_out_withdraws_the_request(served, open_session):
    alice, bob = await open_session(served.url, "alice"), await open_session(served.url, "bob")
    lease = await alice.lock("stage", duration_s=60)
    with pytest.raises(LockWaitTimeout, match="not granted within 0.3 s"):
        await bob.lock("stage", wait=True, timeout_s=0.3)
    assert served.control.arbiter.queue("stage") == []
    assert served.records("lock.withdraw", target="stage", new="bob")
    await alice.unlock("stage", lease.token)


# ---- holders that go away ----------------------------------------------------------------------------------

CRASHING_CLIENT = textwrap.dedent(
    """
    import asyncio, sys
    from asyncua import Client, ua

    async def main():
        url, user, password, site = sys.argv[1:5]
        client = Client(url)
        client.set_user(user)
        client.set_password(password)
        await client.connect()
        idx = await client.get_namespace_index(f"urn:labctl:{site}")
        req = ua.CallMethodRequest()
        req.ObjectId = ua.NodeId(f"/{site}/Resources/pump/Lock", idx)
        req.MethodId = ua.NodeId(f"/{site}/Resources/pump/Lock/RequestLock", idx)
        req.InputArguments = [ua.Variant(3.0, ua.VariantType.Double), ua.Variant(0, ua.VariantType.Int32), ua.Variant(False, ua.VariantType.Boolean)]
        (res,) = await client.uaclient.call([req])
        res.StatusCode.check()
        print("locked", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


async def test_a_holder_that_disappears_loses_the_lock_when_its_lease_lapses(served, open_session):
    arbiter = served.control.arbiter
    bob = await open_session(served.url, "bob")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHING_CLIENT, served.url, "alice", USERS["alice"][1], SITE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line == b"locked\n", (await proc.stderr.read()).decode()
        waiting = asyncio.create_task(bob.lock("pump", duration_s=60, wait=True, timeout_s=30))
    finally:
        proc.kill()  # the holder crashes (a 3 s lease): its connection drops, nobody renews
        await proc.wait()
    lease = await waiting  # bob gets it once alice's lease has lapsed
    assert arbiter.holder("pump").token == lease.token
    # Lost with the lease, not released when the connection dropped.
    assert [r.action for r in served.audit if r.target == "pump" and r.user == "alice"] == ["lock.grant", "lock.expire"]
    iserver = served.server.service("opcua").ua_server.iserver
    await wait_for(lambda: not any(s.identity.user == "alice" for s in iserver._external_sessions.values()), what="session gone")
    await bob.unlock("pump", lease.token)


async def test_a_session_that_closes_releases_its_lock_and_withdraws_its_requests(served, open_ua):
    arbiter = served.control.arbiter
    alice, bob = await open_ua(served.url, "alice"), await open_ua(served.url, "bob")
    assert (await call(alice, "Resources/oven/Lock", "RequestLock", d(600), i32(0), b(False))).StatusCode.is_good()
    assert (await call(bob, "Resources/oven/Lock", "RequestLock", d(600), i32(0), b(True))).OutputArguments[0].Value == 1
    carol = await open_ua(served.url, "carol")
    assert (await call(carol, "Resources/oven/Lock", "RequestLock", d(600), i32(0), b(True))).OutputArguments[0].Value == 1
    await bob.disconnect()  # bob gives up his place
    await wait_for(lambda: [w.user for w in arbiter.queue("oven")] == ["carol"], what="bob withdrawn")
    await alice.disconnect()  # alice's clean close releases: carol's turn, at once
    await wait_for(lambda: arbiter.holder("oven") is not None and arbiter.holder("oven").user == "carol", what="carol's turn")
    assert served.records("lock.release", target="oven", new="alice")
    assert not served.records("lock.expire", target="oven")
    assert (await call(carol, "Resources/oven/Lock", "ExitLock")).OutputArguments[0].Value == 0


# ---- admins break locks ---------------------------------------------------------------------------------------


class Notifications:
    """An asyncua subscription handler keeping every event and data change (as ``(node, value)``)."""

    def __init__(self) -> None:
        self.items: list = []
        self._changed = asyncio.Event()

    def event_notification(self, event) -> None:
        self.items.append(event)
        self._changed.set()

    def datachange_notification(self, node, value, data) -> None:
        self.items.append((node, value))
        self._changed.set()

    async def seen(self, predicate, timeout: float = 10.0):
        """The first notification so far (or to come) matching ``predicate``."""
        async with asyncio.timeout(timeout):
            while True:
                for item in self.items:
                    if predicate(item):
                        return item
                self._changed.clear()
                await self._changed.wait()


async def test_an_admin_break_is_audited_and_the_holder_is_told(served, open_ua):
    alice, bob, root = [await open_ua(served.url, u) for u in ("alice", "bob", "root")]
    idx, di = await indexes(alice)
    lock = await lock_node(alice, "valve")
    assert await lock.call_method(f"{di}:InitLock", s("opening the valve")) == 0
    # Alice watches the lease events and her lock's variables.
    seen = Notifications()
    sub = await alice.create_subscription(50, seen)
    lease_type = alice.get_node(ua.NodeId(f"/{SITE}/types/LeaseEventType", idx))
    await sub.subscribe_events(alice.nodes.server, lease_type)
    locked = await lock.get_child(f"{di}:Locked")
    await sub.subscribe_data_change(locked)
    await seen.seen(lambda item: isinstance(item, tuple) and item[1] is True)

    bobs = await lock_node(bob, "valve")
    mark = served.mark()
    with pytest.raises(ua.UaStatusCodeError) as refused:  # operators may not break locks
        await bobs.call_method(f"{di}:BreakLock")
    assert refused.value.code == ua.StatusCodes.BadUserAccessDenied
    assert "valve" in await refusal(bob)
    res, denied = await call_diagnosed(bob, "Resources/valve/Lock", "BreakLock")
    assert res.StatusCode.value == ua.StatusCodes.BadUserAccessDenied
    assert (denied["kind"], denied["action"], denied["target"]) == ("forbidden", "lock.break", "valve")
    assert denied["fields"] == {"user": "bob", "needs": "the admin role"}
    assert served.refusals(mark) == [("lock.break", "bob", "valve")] * 2
    roots = await lock_node(root, "valve")
    assert await roots.call_method(f"{di}:BreakLock") == 0

    event = await seen.seen(lambda item: not isinstance(item, tuple) and item.Kind == "broken")
    assert (event.Resource, event.User, event.By, event.SourceName) == ("valve", "alice", "root", "valve")
    assert event.Message.Text == "valve: lock of alice broken by root (BreakLock over OPC UA by root)"
    await seen.seen(lambda item: isinstance(item, tuple) and item[1] is False)
    assert await lock.call_method(f"{di}:RenewLock") == -1  # alice learns it is gone
    breaks = [(r.user, r.reason) for r in served.audit if r.action == "lock.break" and r.target == "valve" and r.accepted]
    assert breaks == [("root", "BreakLock over OPC UA by root")]
    res, gone = await call_diagnosed(root, "Resources/valve/Lock", "BreakLock")
    assert res.StatusCode.is_good() and [v.Value for v in res.OutputArguments] == [-1]  # E_NotLocked: nothing left to break
    assert (gone["kind"], gone["error"], gone["action"]) == ("conflict", "NoLease", "lock.break")
    assert served.refusals(mark) == [
        ("lock.break", "bob", "valve"), ("lock.break", "bob", "valve"), ("lock.renew", "alice", "valve"), ("lock.break", "root", "valve"),
    ]  # fmt: skip
    await sub.delete()


# ---- holding a lock from the client library --------------------------------------------------------------------


async def test_hold_lock_renews_and_releases(served, open_session):
    alice = await open_session(served.url, "alice")
    async with alice.hold_lock("laser", 1.5) as held:  # renewed every 0.5 s
        first = held.lease
        await wait_for(lambda: len(served.records("lock.renew", target="laser")) >= 2, what="two renewals")
        assert held.lease.token == first.token and held.lease.expires_at > first.expires_at
        assert held.lost is None
        assert {lk.resource: lk.owner for lk in await alice.locks()}["laser"] == "alice"
    assert served.control.arbiter.holder("laser") is None
    assert served.records("lock.release", target="laser", new="alice")


async def test_hold_lock_notices_a_broken_lock(served, open_session):
    alice = await open_session(served.url, "alice")
    async with alice.hold_lock("laser", 1.5) as held:
        served.control.break_lock("laser", ADMIN, "maintenance")
        await wait_for(lambda: held.lost is not None, what="the loss noticed")
        assert "no lease with that token" in held.lost
    assert served.control.arbiter.holder("laser") is None


@pytest.mark.node
async def test_an_independent_stack_locks_by_browse_path_and_standard_names(served, tmp_path):
    """node-opcua, knowing nothing of labctl: Objects/<site>/Resources/cryostat/DI:Lock, InitLock, write, ExitLock."""
    run = await run_interop(tmp_path, {
        "url": served.url, "user": "alice", "password": USERS["alice"][1], "path": [SITE, "soft", "CRYO:SP"],
        "lock": [SITE, "Resources", "cryostat"], "write": 0.5, "changes": 0,
    })  # fmt: skip
    try:
        await run.expect("connected")
        read = await run.expect("read")
        assert read["userAccessLevel"] & WRITE == 0  # lockable, not held
        assert (await run.expect("lock")) == {"event": "lock", "status": "Good", "initLockStatus": 0}
        locked = await run.expect("locked")
        assert (locked["locked"], locked["lockingUser"]) == (True, "alice") and locked["userAccessLevel"] & WRITE
        assert (await run.expect("write"))["status"] == "Good"
        assert (await run.expect("readback"))["value"] == 0.5
        assert (await run.expect("unlocked")) == {"event": "unlocked", "status": "Good", "exitLockStatus": 0}
        await run.expect("subscribed")
        await run.expect("change")
        await run.expect("done")
        await finish(run)
    finally:
        if run.proc.returncode is None:
            run.proc.kill()
            await run.proc.wait()
    assert [r.action for r in served.audit if r.target == "cryostat" and r.user == "alice"][-2:] == ["lock.grant", "lock.release"]

