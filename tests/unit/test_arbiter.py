"""Arbiter rules with a fake clock: leases, priority-then-arrival queue, expiry, break."""

from __future__ import annotations

import pytest
from labctl.ioc.arbiter import (
    Arbiter,
    BadLease,
    Lease,
    LockHeld,
    NoLease,
    NoSuchResource,
    NotLockable,
    Waiter,
)
from labctl.ioc.config.access import ResourceConfig
from labctl.ioc.errors import LockedBy
from labctl.ioc.types import SYSTEM, Identity


def who(name: str, *roles: str) -> Identity:
    return Identity(name, frozenset(roles or {"operator"}))


ALICE, BOB, CAROL, DAN = who("alice"), who("bob"), who("carol"), who("dan")


@pytest.fixture
def arb():
    return Arbiter(
        [ResourceConfig(name="cryostat", max_lease_s=600), ResourceConfig(name="table", lockable=False)]
    )


def test_grant_then_queue_by_priority_then_arrival(arb):
    lease, ev = arb.request("cryostat", ALICE, 0.0, duration_s=60)
    assert isinstance(lease, Lease) and [e.kind for e in ev] == ["granted"]
    b, _ = arb.request("cryostat", BOB, 1.0, duration_s=60, priority=1)
    c, _ = arb.request("cryostat", CAROL, 2.0, duration_s=60, priority=5)
    d, _ = arb.request("cryostat", DAN, 3.0, duration_s=60, priority=1)
    assert all(isinstance(x, Waiter) for x in (b, c, d))
    assert [w.user for w in arb.queue("cryostat")] == ["carol", "bob", "dan"]
    order = []
    t = 10.0
    for _ in range(3):
        ev = arb.release("cryostat", arb.holder("cryostat").token, t)
        order.append(next(e.user for e in ev if e.kind == "granted"))
        t += 1
    assert order == ["carol", "bob", "dan"]


def test_a_lease_that_is_not_renewed_lapses_and_passes_on(arb):
    lease, _ = arb.request("cryostat", ALICE, 0.0, duration_s=30)
    arb.request("cryostat", BOB, 1.0, duration_s=30)
    assert arb.expire(29.9) == []
    ev = arb.expire(30.0)
    assert [(e.kind, e.user) for e in ev] == [("expired", "alice"), ("granted", "bob")]
    assert arb.holder("cryostat").user == "bob"
    assert arb.holder("cryostat").expires_at == 60.0
    with pytest.raises(NoLease, match="no lease with that token"):
        arb.renew("cryostat", lease.token, 31.0)


def test_renewal_extends_from_now(arb):
    lease, _ = arb.request("cryostat", ALICE, 0.0, duration_s=30)
    renewed, ev = arb.renew("cryostat", lease.token, 20.0)
    assert renewed.expires_at == 50.0 and [e.kind for e in ev] == ["renewed"]
    again, _ = arb.request("cryostat", ALICE, 25.0, duration_s=10)  # asking again renews too
    assert again.token == lease.token and again.expires_at == 35.0


def test_only_the_holder_writes_a_lockable_resource(arb):
    with pytest.raises(LockedBy, match="take its lock before writing"):
        arb.check_write(ALICE, "CRYO:HTR", "cryostat", 0.0)
    arb.request("cryostat", ALICE, 0.0, duration_s=60)
    arb.check_write(ALICE, "CRYO:HTR", "cryostat", 1.0)
    with pytest.raises(LockedBy) as e:
        arb.check_write(BOB, "CRYO:HTR", "cryostat", 1.0)
    assert (e.value.owner, e.value.until) == ("alice", 60.0)
    assert "locked by alice until" in str(e.value)
    arb.check_write(BOB, "TABLE:X", "table", 1.0)  # not lockable
    arb.check_write(SYSTEM, "CRYO:HTR", "cryostat", 1.0)  # interlocks act regardless
    with pytest.raises(LockedBy):  # a lapsed lease no longer entitles
        arb.check_write(ALICE, "CRYO:HTR", "cryostat", 60.0)


def test_break_hands_over_and_names_the_breaker(arb):
    arb.request("cryostat", ALICE, 0.0, duration_s=60)
    arb.request("cryostat", BOB, 1.0, duration_s=60)
    ev = arb.break_lock("cryostat", who("root", "admin"), 5.0, "alice went home")
    assert [(e.kind, e.user, e.by) for e in ev] == [("broken", "alice", "root"), ("granted", "bob", "")]
    assert ev[0].reason == "alice went home"


def test_no_wait_raises_with_the_holder(arb):
    arb.request("cryostat", ALICE, 0.0, duration_s=60)
    with pytest.raises(LockHeld) as e:
        arb.request("cryostat", BOB, 1.0, duration_s=60, wait=False)
    assert (e.value.kind, e.value.owner, e.value.resource, e.value.action) == ("conflict", "alice", "cryostat", "lock.request")


def test_a_refused_call_still_hands_on_leases_that_lapsed(arb):
    """Events of leases that lapsed before a refusal travel on the refusal (nothing goes unannounced)."""
    lease, _ = arb.request("cryostat", ALICE, 0.0, duration_s=10)
    arb.request("cryostat", BOB, 1.0, duration_s=60)
    with pytest.raises(NoLease) as e:
        arb.renew("cryostat", "not-a-token", 20.0)
    assert [(ev.kind, ev.user) for ev in e.value.events] == [("expired", "alice"), ("granted", "bob")]
    assert arb.holder("cryostat").user == "bob"


def test_withdraw_a_request_and_release_by_user(arb):
    arb.request("cryostat", ALICE, 0.0, duration_s=60)
    w, _ = arb.request("cryostat", BOB, 1.0, duration_s=60)
    assert [e.kind for e in arb.release("cryostat", w.token, 2.0)] == ["withdrawn"]
    assert arb.queue("cryostat") == []
    assert [e.kind for e in arb.release_user("cryostat", "alice", 3.0)] == ["released"]
    with pytest.raises(NoLease, match="holds no lease"):
        arb.release_user("cryostat", "alice", 4.0)


def test_bad_requests(arb):
    with pytest.raises(NoSuchResource, match="unknown resource 'magnet'"):
        arb.request("magnet", ALICE, 0.0, duration_s=1)
    with pytest.raises(NotLockable, match="not lockable"):
        arb.request("table", ALICE, 0.0, duration_s=1)
    with pytest.raises(BadLease, match="positive"):
        arb.request("cryostat", ALICE, 0.0, duration_s=0)
    lease, _ = arb.request("cryostat", ALICE, 0.0, duration_s=10_000)
    assert lease.duration_s == 600  # capped at the resource's max_lease_s
    assert arb.next_expiry() == 600


# ---- a lease is held by a client, shared only by its token (issue 17, item 5) -------------------------


def session(name: str, client: str) -> Identity:
    return Identity(name, frozenset({"operator"}), "opcua", client=client)


def test_only_the_holding_client_writes_another_session_of_the_user_is_refused(arb):
    first, second = session("alice", "opcua:session-1@a"), session("alice", "opcua:session-2@b")
    lease, _ = arb.request("cryostat", first, 0.0, duration_s=60)
    assert lease.client == "opcua:session-1@a"  # the asking session by default
    arb.check_write(first, "CRYO:HTR", "cryostat", 1.0)
    with pytest.raises(LockedBy) as e:
        arb.check_write(second, "CRYO:HTR", "cryostat", 1.0)
    assert (e.value.owner, e.value.client, e.value.until) == ("alice", "opcua:session-1@a", 60.0)
    assert arb.holds(first, "cryostat", 1.0) and not arb.holds(second, "cryostat", 1.0)
    with pytest.raises(LockHeld) as held:
        arb.request("cryostat", second, 1.0, duration_s=60, wait=False)
    assert held.value.client == "opcua:session-1@a"


def test_a_token_shares_a_lease_with_another_session_of_its_user_until_the_lease_ends(arb):
    first, second = session("alice", "s1"), session("alice", "s2")
    lease, _ = arb.request("cryostat", first, 0.0, duration_s=60)
    shared, ev = arb.share(lease.token, second, 1.0)
    assert shared.shared == {"s2"} and [(e.kind, e.client) for e in ev] == [("shared", "s2")]
    assert arb.share(lease.token, second, 2.0)[1] == [] and arb.share(lease.token, first, 2.0)[1] == []  # nothing new
    arb.check_write(second, "CRYO:HTR", "cryostat", 2.0)
    arb.renew("cryostat", lease.token, 30.0)
    arb.check_write(second, "CRYO:HTR", "cryostat", 31.0)  # a renewal keeps the binding
    arb.release("cryostat", lease.token, 32.0)
    arb.request("cryostat", first, 33.0, duration_s=60)
    with pytest.raises(LockedBy):  # a new lease, a new token: the binding went with the old one
        arb.check_write(second, "CRYO:HTR", "cryostat", 34.0)


def test_a_token_is_not_shared_with_another_user_an_internal_actor_or_from_a_job(arb):
    from labctl.ioc.arbiter import LeaseNotShared
    from labctl.ioc.types import internal_identity

    lease, _ = arb.request("cryostat", session("alice", "s1"), 0.0, duration_s=60)
    for other in (session("bob", "s2"), internal_identity("interlock:x")):
        with pytest.raises(LeaseNotShared):
            arb.share(lease.token, other, 1.0)
    with pytest.raises(NoLease):
        arb.share("0" * 32, session("alice", "s2"), 1.0)
    with pytest.raises(NoLease):  # the lease of another resource than the one named
        arb.share(lease.token, session("alice", "s2"), 1.0, resource="table")
    arb.release("cryostat", lease.token, 2.0)
    job = Identity("alice", frozenset({"operator"}), "job", "job:4", client="job:4")
    job_lease, _ = arb.request("cryostat", job, 3.0, duration_s=60, job=4)
    with pytest.raises(LeaseNotShared):  # the job's owner's console never writes under the job's lease
        arb.share(job_lease.token, session("alice", "s1"), 4.0)
    with pytest.raises(LockedBy):
        arb.check_write(session("alice", "s1"), "CRYO:HTR", "cryostat", 4.0)


@pytest.mark.parametrize("priority", [1001, -1001, 10**308, 2**31, True, 1.5])
def test_priorities_outside_the_documented_range_are_refused(arb, priority):
    with pytest.raises(BadLease) as e:
        arb.request("cryostat", ALICE, 0.0, duration_s=60, priority=priority)
    assert (e.value.kind, e.value.action) == ("invalid", "lock.request")
    assert arb.holder("cryostat") is None
