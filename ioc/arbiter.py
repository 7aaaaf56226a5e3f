"""The arbiter's rules: resources, leases, a priority wait queue. Pure: no clock, no I/O.

A lock on a resource is a **lease**: owner, priority, token, expiry. The holder renews
it; a lease that is not renewed lapses at its expiry (a crashed client never holds a
lock forever) and the next waiter gets it. Waiters are ordered by priority (higher
first), then by arrival. An admin may break a lease; the holder learns of it through the
``broken`` event. Each call takes ``now`` and returns the :class:`LeaseEvent` list it
caused, so the async shell (a timer task calling :meth:`Arbiter.expire`, the protocol
adapters) publishes, audits and notifies without this module knowing how.

The arbiter is also the write path's lock check (:class:`labctl.ioc.access.LockCheck`): on a
lockable resource only the holder may write, and a refusal names holder and expiry.

A refused call raises a :class:`LockRefused` of the fitting kind (:class:`NoSuchResource`,
:class:`NotLockable`, :class:`BadLease`, :class:`LockHeld`, :class:`NoLease`). Leases that
lapsed before the refusal are still freed and handed on by that call: their events travel
on the exception (:attr:`LockRefused.events`), so the shell publishes them on the refusing
path too and no lapse or grant goes unannounced (``tests/unit/test_arbiter_stateful.py``
checks this over random operation sequences).

A lease (or queued request) records whether an internal actor holds it
(``Identity.internal``, set only by code): ownership is the user name *and* that flag, so a
Channel Access client reporting the internal actors' user name never writes under, renews
or releases their leases. Internal actors pass the write path's lock check.

A lease is held by a **client**, not a name: the session that took it (``Identity.client``:
an OPC UA session, a CA circuit, a job ``job:<id>``). Only that client writes under it;
another session of the same user -- a second OPC UA session, a CA client reporting the
same name, the console of a job's owner -- is refused with :class:`LockedBy` naming the
holding client. A lease is shared only explicitly: :meth:`Arbiter.share` binds another
client of the *same user* to the lease whose token it presents (the ``shared`` event,
audited); the binding ends with the lease (a renewal keeps it). A job's lease is never
shared: nothing but the job writes while it runs.

Priorities are integers within :data:`MIN_PRIORITY` .. :data:`MAX_PRIORITY` on every
protocol (:func:`check_priority`); anything else is refused as :class:`BadLease`.
"""

from __future__ import annotations

import itertools
import math
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from labctl.ioc.config.access import ResourceConfig
from labctl.ioc.errors import Conflict, Forbidden, InvalidArgument, LockedBy, NotFound, Refused, utc_clock
from labctl.ioc.pv import PVInfo
from labctl.ioc.types import Identity, PVType

EventKind = Literal["granted", "renewed", "released", "expired", "broken", "queued", "withdrawn", "shared"]

#: The lowest and highest lock (and job) priority a client may ask for; higher is served first.
MIN_PRIORITY = -1000
MAX_PRIORITY = 1000


class LockRefused(Refused):
    """A lock operation was refused. Subclasses say why (and which kind of refusal)."""

    FIELDS: tuple[str, ...] = ("resource",)

    def __init__(self, reason: str, *, resource: str, action: str) -> None:
        self.resource = resource
        self.events: list[LeaseEvent] = []
        """Lease events the refused call caused before it refused (lapsed leases, grants to waiters)."""
        super().__init__(reason, action=action, target=resource)


class NoSuchResource(LockRefused, NotFound):
    """No resource has that name."""


class NotLockable(LockRefused, InvalidArgument):
    """The resource has no lock (anyone with the role writes it)."""


class BadLease(LockRefused, InvalidArgument):
    """A lease's duration (or priority) is not acceptable."""


class LockHeld(LockRefused, Conflict):
    """Someone else holds (or waits first for) the lock, and the caller would not wait."""

    FIELDS = ("resource", "owner", "until", "job", "client")

    def __init__(self, resource: str, owner: str, until: float | None, job: int | None, *, action: str, client: str = "") -> None:
        self.owner = owner
        self.until = until
        self.job = job
        self.client = client
        who = owner + (f" (job {job})" if job is not None else "")
        when = f" until {utc_clock(until)}" if until is not None else ""
        by = f", held by client {client}" if client else ""
        super().__init__(f"resource {resource!r} is locked by {who}{when}{by}", resource=resource, action=action)


class NoLease(LockRefused, Conflict):
    """No lease (or queued request) matches: a wrong or lapsed token, nothing held, not locked."""


class LeaseNotShared(LockRefused, Forbidden):
    """A lease is shared only between clients of its holder's user (and never with or by an internal actor)."""


def check_priority(priority: object, *, resource: str, action: str) -> int:
    """``priority`` as an int within :data:`MIN_PRIORITY` .. :data:`MAX_PRIORITY`, else :class:`BadLease`."""
    if isinstance(priority, bool) or not isinstance(priority, int) or not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        shown = repr(priority) if not isinstance(priority, int) or abs(priority) < 10**12 else f"an integer of about {int(priority.bit_length() * 0.30103) + 1} digits"
        raise BadLease(f"priority must be an integer from {MIN_PRIORITY} to {MAX_PRIORITY}, got {shown}", resource=resource, action=action)
    return priority


def _with(err: LockRefused, events: list[LeaseEvent]) -> LockRefused:
    err.events = events
    return err


@dataclass(frozen=True, slots=True)
class Lease:
    """A granted lock."""

    resource: str
    user: str
    client: str
    """Who, more precisely: an OPC UA session, a CA host, a job (``job:42``)."""
    priority: int
    token: str
    granted_at: float
    expires_at: float
    duration_s: float
    job: int | None = None
    internal: bool = False
    """Held by one of the server's own actors (a client that reports the same user name is not its holder)."""
    shared: frozenset[str] = frozenset()
    """Other clients of the same user that were handed the token (:meth:`Arbiter.share`) and write under it."""

    def writes(self, who: Identity) -> bool:
        """Whether ``who`` writes under this lease: its holder's user and kind, from its client or one it was shared with."""
        return _owned_by(self, who.user, who.internal) and (who.client == self.client or who.client in self.shared)

    def remaining(self, now: float) -> float:
        """Seconds until the lease lapses (never negative)."""
        return max(0.0, self.expires_at - now)


@dataclass(frozen=True, slots=True)
class Waiter:
    """A queued lock request."""

    resource: str
    user: str
    client: str
    priority: int
    token: str
    requested_at: float
    duration_s: float
    seq: int
    job: int | None = None
    internal: bool = False

    def sort_key(self) -> tuple[int, int]:
        """Higher priority first, then first come first served."""
        return (-self.priority, self.seq)


@dataclass(frozen=True, slots=True)
class LeaseEvent:
    """Something that happened to a resource's lock."""

    kind: EventKind
    resource: str
    user: str
    client: str
    token: str
    time: float
    expires_at: float | None = None
    by: str = ""
    """Who caused it, when not the owner (an admin's break)."""
    reason: str = ""


@dataclass
class _ResourceState:
    config: ResourceConfig
    lease: Lease | None = None
    waiters: list[Waiter] = field(default_factory=list)


class Arbiter:
    """Leases and wait queues for the site's resources."""

    def __init__(self, resources: Iterable[ResourceConfig], *, min_lease_s: float = 1.0) -> None:
        self._res = {r.name: _ResourceState(r) for r in resources}
        self._seq = itertools.count()
        self.min_lease_s = min_lease_s

    # ---- queries -----------------------------------------------------------------------

    @property
    def resources(self) -> Mapping[str, ResourceConfig]:
        """Every resource's configuration."""
        return {k: v.config for k, v in self._res.items()}

    def holder(self, resource: str) -> Lease | None:
        """The current lease of a resource, if any."""
        return self._state(resource).lease

    def queue(self, resource: str) -> list[Waiter]:
        """The waiters of a resource in the order they will be served."""
        return list(self._state(resource).waiters)

    def lockable(self, resource: str) -> bool:
        """Whether writes to the resource need its lock (unknown resources are not lockable)."""
        st = self._res.get(resource)
        return st is not None and st.config.lockable

    def lease_by_token(self, token: str) -> Lease | None:
        """The lease with this token, wherever it is."""
        for st in self._res.values():
            if st.lease is not None and secrets.compare_digest(st.lease.token, token):
                return st.lease
        return None

    def _state(self, resource: str, action: str = "lock.request") -> _ResourceState:
        try:
            return self._res[resource]
        except KeyError:
            raise NoSuchResource(f"unknown resource {resource!r}; resources are {sorted(self._res)}", resource=resource, action=action) from None

    # ---- the write path's check ------------------------------------------------------------

    def check_write(self, identity: Identity, pv: str, resource: str, now: float) -> None:
        """Raise LockedBy unless ``identity`` may write ``resource`` (its client holds the lease or was handed it, or it is not lockable).

        The check is by client (``identity.client``), not by name: another session of the
        holder's user is refused like anyone else, with the holding client named.
        """
        if identity.internal or not self.lockable(resource):
            return  # the server's own actors (an interlock driving a safe value) act regardless of locks
        lease = self._res[resource].lease
        if lease is None or lease.expires_at <= now:
            raise LockedBy(pv, resource, "", None)
        if not lease.writes(identity):
            raise LockedBy(pv, resource, lease.user, lease.expires_at, lease.job, lease.client)

    def holds(self, identity: Identity, resource: str, now: float) -> bool:
        """Whether ``identity`` (its client, or one the lease was shared with) holds a live lease on ``resource``."""
        st = self._res.get(resource)
        return bool(st and st.lease and st.lease.writes(identity) and st.lease.expires_at > now)

    # ---- commands ------------------------------------------------------------------------

    def request(
        self,
        resource: str,
        who: Identity,
        now: float,
        *,
        duration_s: float,
        priority: int = 0,
        client: str | None = None,
        wait: bool = True,
        job: int | None = None,
        exclusive: bool = False,
    ) -> tuple[Lease | Waiter, list[LeaseEvent]]:
        """Ask for a resource's lock for ``client`` (default: ``who.client``, the session asking).

        Returns the lease if granted now, else the queued waiter (``wait=True``). A holder
        asking again renews (or, ``exclusive``, is refused: Part 100's InitLock). Raises for an unknown or unlockable resource or a
        bad duration or priority (:class:`NoSuchResource`, :class:`NotLockable`, :class:`BadLease`), and
        :class:`LockHeld` when held by someone else and ``wait`` is false.
        """
        client = who.client if client is None else client
        st = self._state(resource)
        if not st.config.lockable:
            raise NotLockable(f"resource {resource!r} is not lockable", resource=resource, action="lock.request")
        duration = self._duration(st, duration_s, "lock.request")
        priority = check_priority(priority, resource=resource, action="lock.request")
        events = self.expire(now)
        lease = st.lease
        if lease is not None and _owned_by(lease, who.user, who.internal) and lease.client == client and not exclusive:
            renewed, ev = self._renew(st, now, duration)
            return renewed, events + ev
        for w in st.waiters:
            if _owned_by(w, who.user, who.internal) and w.client == client:
                return w, events
        if lease is None and not st.waiters:
            granted = self._grant(st, who, client, priority, duration, now, job)
            return granted, [*events, self._event("granted", granted, now)]
        if not wait:
            holder = lease or st.waiters[0]
            raise _with(LockHeld(resource, holder.user, lease.expires_at if lease else None, holder.job, action="lock.request", client=holder.client), events)
        waiter = Waiter(resource, who.user, client, priority, _token(), now, duration, next(self._seq), job, who.internal)
        st.waiters.append(waiter)
        st.waiters.sort(key=Waiter.sort_key)
        events.append(LeaseEvent("queued", resource, who.user, client, waiter.token, now))
        return waiter, events

    def renew(self, resource: str, token: str, now: float, duration_s: float | None = None) -> tuple[Lease, list[LeaseEvent]]:
        """Extend a lease by its duration (or a new one) from now. Raises :class:`NoLease` if not held with ``token``."""
        st = self._state(resource, "lock.renew")
        events = self.expire(now)
        lease = st.lease
        if lease is None or not secrets.compare_digest(lease.token, token):
            raise _with(NoLease("no lease with that token (it may have lapsed or been broken)", resource=resource, action="lock.renew"), events)
        try:
            duration = self._duration(st, duration_s if duration_s is not None else lease.duration_s, "lock.renew")
        except LockRefused as e:
            raise _with(e, events) from None
        renewed, ev = self._renew(st, now, duration)
        return renewed, events + ev

    def release(self, resource: str, token: str, now: float) -> list[LeaseEvent]:
        """Give up a lease, or withdraw a queued request, by token."""
        st = self._state(resource, "lock.release")
        events = self.expire(now)
        lease = st.lease
        if lease is not None and secrets.compare_digest(lease.token, token):
            st.lease = None
            events.append(self._event("released", lease, now))
            return events + self._promote(st, now)
        for w in st.waiters:
            if secrets.compare_digest(w.token, token):
                st.waiters.remove(w)
                return [*events, LeaseEvent("withdrawn", resource, w.user, w.client, w.token, now)]
        raise _with(NoLease("no lease or request with that token", resource=resource, action="lock.release"), events)

    def share(self, token: str, who: Identity, now: float, resource: str | None = None) -> tuple[Lease, list[LeaseEvent]]:
        """Let ``who``'s client write under the live lease with ``token`` (on ``resource``, if given).

        Only a client of the lease's own user may be handed it, and never a job's lease
        (:class:`LeaseNotShared` otherwise); a wrong or lapsed token is :class:`NoLease`. Sharing again, or with the
        holding client itself, changes nothing and emits no event.
        """
        action = "lock.share"
        target = resource or ""
        if resource is not None:
            self._state(resource, action)
        events = self.expire(now)
        st = next((st for st in self._res.values() if st.lease is not None and secrets.compare_digest(st.lease.token, token)), None)
        if st is None or (resource is not None and st.config.name != resource):
            raise _with(NoLease("no lease with that token (it may have lapsed, been released or broken)", resource=target, action=action), events)
        lease = st.lease
        assert lease is not None
        if not _owned_by(lease, who.user, who.internal) or who.internal:
            raise _with(LeaseNotShared(f"a lease is shared only between sessions of its holder {lease.user}", resource=st.config.name, action=action), events)
        if lease.job is not None:
            raise _with(LeaseNotShared(f"the lease of job {lease.job} is the job's alone", resource=st.config.name, action=action), events)
        if who.client == lease.client or who.client in lease.shared:
            return lease, events
        st.lease = replace(lease, shared=lease.shared | {who.client})
        return st.lease, [*events, LeaseEvent("shared", lease.resource, lease.user, who.client, lease.token, now, lease.expires_at, reason=f"shared by {lease.client}")]

    def token_of(self, resource: str, user: str, client: str, *, internal: bool = False) -> str | None:
        """The token of ``client``'s lease (or queued request) on ``resource``, or None."""
        st = self._res.get(resource)
        if st is None:
            return None
        if st.lease is not None and _owned_by(st.lease, user, internal) and st.lease.client == client:
            return st.lease.token
        return next((w.token for w in st.waiters if _owned_by(w, user, internal) and w.client == client), None)

    def release_user(self, resource: str, user: str, now: float, client: str | None = None, *, internal: bool = False) -> list[LeaseEvent]:
        """Release ``user``'s lease or request on a resource (protocols that carry no token, like CA).

        ``internal``: the caller is one of the server's own actors; a client reporting the
        same user name never releases an internal actor's lease, nor the other way round.
        """
        st = self._state(resource, "lock.release")
        events = self.expire(now)
        lease = st.lease
        if lease is not None and _owned_by(lease, user, internal) and (client is None or lease.client == client):
            return events + self.release(resource, lease.token, now)
        for w in st.waiters:
            if _owned_by(w, user, internal) and (client is None or w.client == client):
                return events + self.release(resource, w.token, now)
        raise _with(NoLease(f"{user} holds no lease and waits for none", resource=resource, action="lock.release"), events)

    def break_lock(self, resource: str, who: Identity, now: float, reason: str = "") -> list[LeaseEvent]:
        """Take a lease away from its holder (the caller checks who may). The next waiter gets it."""
        st = self._state(resource, "lock.break")
        events = self.expire(now)
        lease = st.lease
        if lease is None:
            raise _with(NoLease("the resource is not locked", resource=resource, action="lock.break"), events)
        st.lease = None
        events.append(self._event("broken", lease, now, by=who.user, reason=reason))
        return events + self._promote(st, now)

    def expire(self, now: float) -> list[LeaseEvent]:
        """Free every lapsed lease and hand each to its next waiter."""
        events: list[LeaseEvent] = []
        for st in self._res.values():
            lease = st.lease
            if lease is not None and lease.expires_at <= now:
                st.lease = None
                events.append(self._event("expired", lease, now))
                events += self._promote(st, now)
        return events

    def next_expiry(self) -> float | None:
        """When the next lease lapses (for the timer task), or None."""
        times = [st.lease.expires_at for st in self._res.values() if st.lease is not None]
        return min(times, default=None)

    # ---- internals -----------------------------------------------------------------------

    def _duration(self, st: _ResourceState, duration_s: float, action: str) -> float:
        if not (duration_s > 0 and math.isfinite(duration_s)):
            raise BadLease(f"lease duration must be a positive number of seconds, got {duration_s}", resource=st.config.name, action=action)
        return min(max(duration_s, self.min_lease_s), st.config.max_lease_s)

    def _grant(self, st, who: Identity, client, priority, duration, now, job) -> Lease:
        st.lease = Lease(st.config.name, who.user, client, priority, _token(), now, now + duration, duration, job, who.internal)
        return st.lease

    def _renew(self, st: _ResourceState, now: float, duration: float) -> tuple[Lease, list[LeaseEvent]]:
        assert st.lease is not None
        st.lease = replace(st.lease, expires_at=now + duration, duration_s=duration)
        return st.lease, [self._event("renewed", st.lease, now)]

    def _promote(self, st: _ResourceState, now: float) -> list[LeaseEvent]:
        if st.lease is not None or not st.waiters:
            return []
        w = st.waiters.pop(0)
        st.lease = Lease(w.resource, w.user, w.client, w.priority, w.token, now, now + w.duration_s, w.duration_s, w.job, w.internal)
        return [self._event("granted", st.lease, now)]

    @staticmethod
    def _event(kind: EventKind, lease: Lease, now: float, by: str = "", reason: str = "") -> LeaseEvent:
        return LeaseEvent(kind, lease.resource, lease.user, lease.client, lease.token, now, lease.expires_at, by, reason)


def _owned_by(held: Lease | Waiter, user: str, internal: bool) -> bool:
    """Whether a lease (or request) is ``user``'s: the same name *and* the same kind (internal actor or client)."""
    return held.user == user and held.internal == internal


def _token() -> str:
    return secrets.token_hex(16)


def lock_pv_names(resource: str) -> dict[str, str]:
    """Names of a resource's lock-state PVs: owner, expiry, queue length."""
    base = f"ARB:{resource.upper()}"
    return {"owner": f"{base}:OWNER", "expires": f"{base}:EXPIRES", "queue": f"{base}:QUEUE"}


def lock_pv_infos(resource: ResourceConfig) -> list[PVInfo]:
    """Descriptions of a lockable resource's lock-state PVs (read-only, kept by the server)."""
    names = lock_pv_names(resource.name)
    return [
        PVInfo(names["owner"], PVType.STRING, "arbiter", f"{resource.name} lock holder (user)"[:40], initial=""),
        PVInfo(names["expires"], PVType.FLOAT64, "arbiter", f"{resource.name} lock expiry (UNIX s, 0: free)"[:40], unit="s", precision=3, initial=0.0),
        PVInfo(names["queue"], PVType.INT, "arbiter", f"{resource.name} lock requests waiting"[:40], unit="req", precision=0, initial=0),
    ]
