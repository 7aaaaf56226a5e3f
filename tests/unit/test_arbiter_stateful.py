"""Lease events are never lost (issue 16, item 6): a Hypothesis state machine over the arbiter and
the control layer that publishes its events.

Random sequences of request, renew, release and break -- by several owners, on several
sessions, at several priorities, with good, stale and bogus tokens, good and bad durations,
on lockable, unlockable and unknown resources -- interleaved with clock steps that let
leases lapse with and without the expiry timer firing. After every step:

* the published lock PVs (``ARB:<RES>:OWNER``, ``:EXPIRES``, ``:QUEUE``) equal the arbiter's state;
* replaying the audit trail's lease records (grant, release, expire, break, queue,
  withdraw) gives the arbiter's holder and queue: no grant or expiry went unaudited,
  also on the path that raised;
* every refusal raised left exactly one audit record;
* the write access a Channel Access client would be shown, refreshed on each batch of lease
  events (as the CA adapter does), equals what the database decides now.

The control layer runs on a real :class:`~labctl.server.app.Server` (no protocols, no
historian) with a fake clock.
"""

from __future__ import annotations

import math
from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from labctl.ioc.arbiter import Lease, LockRefused, Waiter, lock_pv_names
from labctl.ioc.errors import Forbidden, Refused
from labctl.ioc.types import Identity
from labctl.server.app import Overrides, Server
from labctl.server.site import parse_site

SITE = parse_site(
    """
site: arb
resources:
  - {name: cryostat, max_lease_s: 10}
  - {name: magnet}
  - {name: psu, lockable: false}
pvs:
  - {name: "LAB:CRYO", type: float64, writable: true, initial: 0, resource: cryostat}
  - {name: "LAB:MAG", type: float64, writable: true, initial: 0, resource: magnet}
  - {name: "LAB:PSU", type: float64, writable: true, initial: 0, resource: psu}
""",
    "arb.yaml",
)
SITE = Overrides(no_opcua=True, no_ca=True, no_historian=True).apply(SITE)

LOCKABLE = ("cryostat", "magnet")
PV_OF = {"cryostat": "LAB:CRYO", "magnet": "LAB:MAG"}
OWNERS = {
    "alice": Identity("alice", frozenset({"operator"}), "opcua"),
    "bob": Identity("bob", frozenset({"operator"}), "ca", "ws1"),
    "carol": Identity("carol", frozenset({"operator"}), "opcua"),
    "ada": Identity("ada", frozenset({"admin"}), "opcua"),
    "vic": Identity("vic", frozenset({"viewer"}), "opcua"),
}
LEASE_ACTIONS = {"lock.grant", "lock.renew", "lock.release", "lock.expire", "lock.break", "lock.queue", "lock.withdraw"}

owners = st.sampled_from(sorted(OWNERS))
clients = st.sampled_from(["s1", "s2"])
resources = st.sampled_from([*LOCKABLE, *LOCKABLE, "psu", "nope"])
durations = st.one_of(st.sampled_from([0.5, 1.0, 2.0, 5.0, 30.0]), st.sampled_from([0.0, -1.0, math.nan, math.inf]))


class LeaseMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1_000.0
        self.server = Server(SITE)
        self.db = self.server.db
        self.db.clock = lambda: self.now
        self.control = self.server.control
        self.audits = []
        self.db.add_audit_sink(self.audits.append)
        self.refusals = 0
        self.tokens: list[tuple[str, str]] = []  # (resource, token) ever handed out
        self.rights: dict[tuple[str, str], bool] = {}
        self.control.on_lease_events(self._refresh_rights)
        self._refresh_rights([])

    def _refresh_rights(self, events) -> None:  # what the CA adapter does on each batch of lease events
        for name, who in OWNERS.items():
            for res, pv in PV_OF.items():
                self.rights[(name, res)] = self.db.may_write(pv, who)

    def _call(self, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except Refused as e:
            assert isinstance(e, (LockRefused, Forbidden)), e
            self.refusals += 1
            return None

    # ---- operations --------------------------------------------------------------------------------

    @rule(who=owners, client=clients, res=resources, priority=st.integers(0, 3), duration=durations, wait=st.booleans())
    def request(self, who, client, res, priority, duration, wait):
        got = self._call(self.control.request_lock, res, OWNERS[who], duration_s=duration, priority=priority, client=client, wait=wait)
        if got is not None:
            assert isinstance(got, (Lease, Waiter))
            self.tokens.append((res, got.token))

    @rule(who=owners, client=clients, data=st.data(), duration=st.one_of(st.none(), durations), by_session=st.booleans())
    def renew(self, who, client, data, duration, by_session):
        if by_session or not self.tokens:  # the session's own lease, as protocols without a token renew
            res = data.draw(resources)
            self._call(self.control.renew_lock, res, None, OWNERS[who], duration, client=client)
        else:
            res, token = data.draw(st.sampled_from(self.tokens))
            self._call(self.control.renew_lock, res, token, OWNERS[who], duration, client=client)

    @rule(who=owners, client=clients, data=st.data(), by_name=st.booleans())
    def release(self, who, client, data, by_name):
        if by_name or not self.tokens:  # CA: by user and session
            self._call(self.control.release_lock, data.draw(resources), None, OWNERS[who], client)
        else:
            res, token = data.draw(st.sampled_from([*self.tokens, ("cryostat", "bogus")]))
            self._call(self.control.release_lock, res, token, OWNERS[who])

    @rule(who=st.sampled_from(["ada", "alice"]), res=resources)
    def break_lock(self, who, res):
        self._call(self.control.break_lock, res, OWNERS[who], "test")

    @rule(dt=st.sampled_from([0.1, 0.5, 1.0, 2.0, 5.0, 11.0]))
    def advance(self, dt):
        """Time passes; the expiry timer has not fired yet (a refused call may be the first to notice)."""
        self.now += dt

    @rule()
    def timer(self):
        """The expiry timer fires (the control layer's timer task runs this)."""
        self.control.lease_events(self.control.arbiter.expire(self.now))

    # ---- invariants -------------------------------------------------------------------------------

    @invariant()
    def published_lock_pvs_equal_the_arbiter(self):
        arb = self.control.arbiter
        for res in LOCKABLE:
            names = lock_pv_names(res)
            lease = arb.holder(res)
            assert self.db.read(names["owner"]).value == (lease.user if lease else "")
            assert self.db.read(names["expires"]).value == (lease.expires_at if lease else 0.0)
            assert self.db.read(names["queue"]).value == len(arb.queue(res))

    @invariant()
    def the_audit_trail_replays_to_the_arbiter(self):
        holder: dict[str, tuple[str, str] | None] = dict.fromkeys(LOCKABLE)
        queue: dict[str, Counter] = {r: Counter() for r in LOCKABLE}
        for a in self.audits:
            if a.action not in LEASE_ACTIONS or not a.accepted:
                continue
            who = (a.new, a.host)
            if a.action == "lock.grant":
                assert holder[a.target] is None, f"granted while held: {a}"
                holder[a.target] = who
                if queue[a.target][who]:
                    queue[a.target][who] -= 1
            elif a.action in ("lock.release", "lock.expire", "lock.break"):
                assert holder[a.target] == who, f"{a} but the trail says {holder[a.target]}"
                holder[a.target] = None
            elif a.action == "lock.queue":
                queue[a.target][who] += 1
            elif a.action == "lock.withdraw":
                assert queue[a.target][who] > 0
                queue[a.target][who] -= 1
        arb = self.control.arbiter
        for res in LOCKABLE:
            lease = arb.holder(res)
            assert holder[res] == ((lease.user, lease.client) if lease else None)
            assert +queue[res] == Counter((w.user, w.client) for w in arb.queue(res))

    @invariant()
    def every_refusal_has_one_audit_record(self):
        assert sum(not a.accepted for a in self.audits) == self.refusals

    @invariant()
    def access_rights_follow_the_leases(self):
        nxt = self.control.arbiter.next_expiry()
        if nxt is not None and nxt <= self.now:
            return  # a lease lapsed and nothing has looked yet: the timer is due (it is a rule of its own)
        for name, who in OWNERS.items():
            for res, pv in PV_OF.items():
                assert self.rights[(name, res)] == self.db.may_write(pv, who), (name, res)


LeaseMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestLeaseEvents = LeaseMachine.TestCase
