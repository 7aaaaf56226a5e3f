"""The control layer of a running server: arbiter, jobs, interlocks and alarms.

The rules live in ``ioc`` (:mod:`labctl.ioc.arbiter`, :mod:`labctl.ioc.jobs`, :mod:`labctl.ioc.interlocks`,
:mod:`labctl.ioc.alarms`); this service is their async shell on one server:

* the arbiter becomes the database's lock check; a timer frees lapsed leases; every lease
  event is audited and published on the resource's lock PVs (``ARB:<RES>:OWNER``...);
* the job manager runs submitted procedures, held by interlocks; an interlock that trips
  on a running job's resources ends that job (failed, after its cleanup steps); jobs a
  crash interrupted have their cleanup run once their resources can be locked. With a
  store that serves a site (the historian on PostgreSQL) job ids come from it, unique in
  the site, and the other servers' jobs are mirrored from it, so they can be listed and
  read here;
* the interlock manager becomes the database's interlock check;
* the alarm service (:class:`labctl.server.alarms.AlarmService`) turns severities into
  alarm states, keeps the summary PVs, sends rate-limited notifications, and lets
  authorised people acknowledge and shelve.

Protocol adapters reach all of it through ``server.control`` (one object, no globals).

The audit trail is listed (:meth:`ControlService.read_audit`) from the historian when
the server runs one (it archives every record), else -- or while its database is away --
from :attr:`ControlService.audit_log`, a bounded ring of the most recent
:data:`AUDIT_RING` records kept in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from labctl.ioc.access import AuditRecord
from labctl.ioc.arbiter import Arbiter, Lease, LeaseEvent, LockRefused, Waiter, check_priority, lock_pv_names
from labctl.ioc.errors import LabctlError
from labctl.ioc.interlocks import InterlockManager
from labctl.ioc.jobs import Job, JobManager
from labctl.ioc.policy import Action, Target
from labctl.ioc.types import Identity
from labctl.server.alarms import AlarmService
from labctl.server.siteinfo import default_server_name

from labctl.backoff import Backoff
from labctl.supervision import supervise

if TYPE_CHECKING:
    from labctl.server.app import Server

log = logging.getLogger("labctl.control")

#: How many recent audit records :attr:`ControlService.audit_log` keeps for listing.
AUDIT_RING = 20_000


AUDITED_LEASE_EVENTS = {"granted": "lock.grant", "renewed": "lock.renew", "released": "lock.release",
                        "expired": "lock.expire", "broken": "lock.break", "queued": "lock.queue", "withdrawn": "lock.withdraw", "shared": "lock.share"}  # fmt: skip


class ControlService:
    """Arbiter, jobs, interlocks and alarms of one server."""

    name = "control"

    def __init__(self, server: Server) -> None:
        self.server = server
        db = self.db = server.db
        site = server.site
        self.arbiter = Arbiter(site.resources)
        self.jobs = JobManager(db, self.arbiter, site.procedures, policy=db.policy, server=site.server.name or default_server_name())
        self.site_jobs: Any = None
        """The mirror of the site's other servers' jobs, while it runs."""
        self.interlocks = InterlockManager(db, site.interlocks, policy=db.policy, queue=self.jobs)
        self.alarms = AlarmService(server)
        self._lease_listeners: list[Callable[[list[LeaseEvent]], None]] = []
        self._lease_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.jobs.on_lease_events(self.lease_events)
        db.locks = self.arbiter
        db.interlocks = self.interlocks
        self.audit_log: deque[AuditRecord] = deque(maxlen=AUDIT_RING)
        db.add_audit_sink(self.audit_log.append)
        self.audit_store: Any = None
        """The historian, when the audit trail is listed from it."""

    def use_store(self, store: Any) -> None:
        """Keep jobs and alarms in a store (the historian) so they survive a restart; list the audit trail from it."""
        self.jobs.store = store  # type: ignore[assignment]
        if callable(getattr(store, "next_job_id", None)):
            self.jobs.ids = store
        self.alarms.store = store
        if callable(getattr(store, "read_audit", None)):
            self.audit_store = store

    async def start(self) -> None:
        """Restore records, publish lock states, start watching."""
        for job in self.jobs.restore():
            log.warning("job %d (%s of %s): %s; marked failed", job.id, job.procedure, job.owner, job.error)
        for res in self.arbiter.resources:
            if self.arbiter.lockable(res):
                self._publish_lock(res)
        self.interlocks.on_transition(self._interlock_transition)
        self.interlocks.start()
        self.alarms.start()
        # Supervised: a bug here is logged once and the timer restarts, so leases keep lapsing.
        self._lease_task = supervise("lease expiry", self._expire_leases, backoff=Backoff(0.1, 5.0)).task
        self.jobs.schedule()  # cleanups a crash left undone start as soon as their resources are free
        watch = getattr(self.jobs.store, "watch_site_jobs", None)
        if callable(watch):
            self.site_jobs = watch(self.jobs, self.server.site.server.directory.jobs_refresh_s)
            if self.site_jobs is not None:
                await self.site_jobs.start()

    async def stop(self) -> None:
        """Stop jobs (they end cancelled after their cleanup steps, bounded in time), then timers and watchers.

        Jobs go first, while the lease timer still runs and the instruments are still
        connected (the server stops the database after this service), so their cleanup
        can write.
        """
        if self.site_jobs is not None:
            await self.site_jobs.stop()
            self.site_jobs = None
        await self.jobs.stop()
        if self._lease_task is not None:
            self._lease_task.cancel()
            await asyncio.gather(self._lease_task, return_exceptions=True)
        await self.interlocks.stop()
        await self.alarms.stop()

    def endpoints(self) -> list[str]:
        """None: the control layer is reached through the protocols."""
        return []

    def _interlock_transition(self, t: Any) -> None:
        """A new trip ends the running jobs on what the interlock protects (its safe PVs' and refused resources)."""
        if t.new != "TRIPPED" or t.old == "CLEARING":
            return
        rule = self.interlocks.rules.get(t.name)
        if rule is None:
            return
        actions = rule.cfg.actions
        resources = set(actions.refuse_writes)
        for sv in actions.set:
            if sv.pv in self.db:
                resources.add(self.db.info(sv.pv).resource)
        for job in self.jobs.interrupt(f"interlock:{t.name}", t.reason, resources):
            log.warning("job %d (%s of %s) stopped: interlock %s tripped", job.id, job.procedure, job.owner, t.name)

    # ---- leases --------------------------------------------------------------------------------------

    def on_lease_events(self, fn: Callable[[list[LeaseEvent]], None]) -> None:
        """``fn(events)`` after every batch of lease events (protocols push access rights)."""
        self._lease_listeners.append(fn)

    def lease_events(self, events: list[LeaseEvent]) -> None:
        """Audit, publish and fan out lease events (the arbiter is pure: callers hand them here)."""
        if not events:
            return
        touched = set()
        for ev in events:
            action = AUDITED_LEASE_EVENTS[ev.kind]
            who = ev.by or ev.user
            self.db.audit(
                AuditRecord(ev.time, action, who, "arbiter", ev.client, ev.resource, new=ev.user, reason=ev.reason or ev.kind)
            )
            touched.add(ev.resource)
        for res in touched:
            self._publish_lock(res)
        for fn in self._lease_listeners:
            try:
                fn(events)
            except Exception:  # an adapter's bug must not break the arbiter
                log.exception("lease listener failed")
        self.jobs.schedule()
        self._wake.set()

    def _publish_lock(self, resource: str) -> None:
        names = lock_pv_names(resource)
        lease = self.arbiter.holder(resource)
        self.db.post(names["owner"], lease.user if lease else "")
        self.db.post(names["expires"], lease.expires_at if lease else 0.0)
        self.db.post(names["queue"], len(self.arbiter.queue(resource)))

    async def _expire_leases(self) -> None:
        while True:
            self.lease_events(self.arbiter.expire(self.db.clock()))
            nxt = self.arbiter.next_expiry()
            delay = 5.0 if nxt is None else max(0.0, nxt - self.db.clock()) + 1e-3
            self._wake.clear()
            try:  # asyncio.timeout, not wait_for: no task per wait, and a cancellation is never swallowed
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass

    # ---- lock commands (protocols call these with the caller's identity) --------------------------------
    #
    # Each command: the policy decides (permission before state), then the arbiter; a refusal
    # is audited once, by the core, and the lease events the refused call caused (leases that
    # lapsed meanwhile) are published all the same.

    @contextlib.contextmanager
    def _lock_command(self, who: Identity, action: Action, resource: str) -> Iterator[None]:
        with self.db.refusals_audited(who):
            self.db.policy.decide(who, action, Target(resource, resource=resource))
            try:
                yield
            except LockRefused as e:
                self.lease_events(e.events)
                raise

    def request_lock(
        self, resource: str, who: Identity, *, duration_s: float, priority: int = 0, client: str | None = None, wait: bool = True, exclusive: bool = False
    ) -> Lease | Waiter:
        """Take (or queue for) a resource's lock for the caller's client (``who.client`` unless ``client`` is given).

        ``exclusive``: refuse a holder asking again, as Part 100's InitLock.
        """
        with self._lock_command(who, Action.LOCK_REQUEST, resource):
            got, events = self.arbiter.request(
                resource, who, self.db.clock(), duration_s=duration_s, priority=priority, client=client, wait=wait, exclusive=exclusive
            )
        self.lease_events(events)
        return got

    def renew_lock(self, resource: str, token: str | None, who: Identity, duration_s: float | None = None, *, client: str = "") -> Lease:
        """Renew a lease by token (None: the lease ``client`` holds, for protocols that carry no token)."""
        with self._lock_command(who, Action.LOCK_RENEW, resource):
            if token is None:
                token = self.arbiter.token_of(resource, who.user, client, internal=who.internal) or ""
            lease, events = self.arbiter.renew(resource, token, self.db.clock(), duration_s)
        self.lease_events(events)
        return lease

    def release_lock(self, resource: str, token: str | None, who: Identity, client: str | None = None) -> None:
        """Release a lease (by token, or the caller's own when the protocol carries none)."""
        now = self.db.clock()
        with self._lock_command(who, Action.LOCK_RELEASE, resource):
            events = self.arbiter.release(resource, token, now) if token else self.arbiter.release_user(resource, who.user, now, client, internal=who.internal)
        self.lease_events(events)

    def use_lease(self, token: str, who: Identity, resource: str | None = None) -> Lease:
        """Let the caller's client (``who.client``) write under the lease with ``token``: a lease handed to another session of its user.

        The policy decides first (the caller must be allowed to take locks on the lease's
        resource); a wrong token, or a lease of another user, is refused and audited once.
        The sharing itself is a ``lock.share`` lease event (audited, published).
        """
        now = self.db.clock()
        lease = self.arbiter.lease_by_token(token) if token else None
        target = resource or (lease.resource if lease is not None else "")
        with self._lock_command(who, Action.LOCK_REQUEST, target):
            lease, events = self.arbiter.share(token, who, now, resource)
        self.lease_events(events)
        return lease

    def break_lock(self, resource: str, who: Identity, reason: str = "") -> None:
        """Break someone's lease (the policy: admins); audited, the holder is told through the events."""
        with self._lock_command(who, Action.LOCK_BREAK, resource):
            events = self.arbiter.break_lock(resource, who, self.db.clock(), reason)
        self.lease_events(events)

    # ---- jobs (protocols call these with the caller's identity) -------------------------------------------

    def submit_job(self, procedure: str, params: dict[str, Any], who: Identity, *, priority: int = 0) -> Job:
        """Submit a job; a refusal is audited once, by the core."""
        with self.db.refusals_audited(who, new=priority):
            check_priority(priority, resource=procedure, action="job.submit")  # a job's lock requests take its priority
            return self.jobs.submit(procedure, params, who, priority=priority)

    def cancel_job(self, job_id: int, who: Identity) -> Job:
        """Cancel a job (its owner or an admin); a refusal is audited once, by the core."""
        with self.db.refusals_audited(who):
            return self.jobs.cancel(job_id, who)

    # ---- interlocks ----------------------------------------------------------------------------------------

    def reset_interlock(self, name: str, who: Identity) -> None:
        """Reset an interlock waiting for it (its reset roles or an admin); a refusal is audited once, by the core."""
        with self.db.refusals_audited(who):
            self.interlocks.reset(name, who)

    # ---- reading jobs and the audit trail (protocols call these with the caller's identity) ------------

    def job_detail(self, job_id: int, who: Identity) -> Job:
        """A job with its log and results: its owner's and admins' to read (the policy decides)."""
        with self.db.refusals_audited(who):
            return self.jobs.view(job_id, who)

    async def read_audit(
        self, who: Identity, since: float, *, user: str | None = None, target: str | None = None, limit: int = 5000
    ) -> list[AuditRecord]:
        """Audit records since ``since`` (UNIX s), optionally of one user and one target, oldest first, the last ``limit``.

        From the historian when there is one (what it received so far is flushed first),
        else from the in-memory ring. Any logged-in user may list them; anonymous
        sessions (no role) may not.
        """
        with self.db.refusals_audited(who):
            self.db.policy.decide(who, Action.AUDIT_READ, Target("audit"))
        store = self.audit_store
        if store is not None:
            try:
                await store.flush()
                records = await store.read_audit(since, None, target=target, user=user)
                return records[-limit:]
            except LabctlError as e:  # the historian's database is away: the ring still has the recent past
                log.warning("audit listing from the historian failed (%s); listing the last %d records kept in memory", e, AUDIT_RING)
        return self.audit_records(who, since, user=user, target=target, limit=limit)

    def audit_records(
        self, who: Identity, since: float, *, user: str | None = None, target: str | None = None, limit: int = 5000
    ) -> list[AuditRecord]:
        """Audit records kept in memory since ``since`` (UNIX s), optionally of one user and one target, oldest first, the last ``limit``."""
        with self.db.refusals_audited(who):
            self.db.policy.decide(who, Action.AUDIT_READ, Target("audit"))
        out = [
            r
            for r in self.audit_log
            if r.time >= since and (user is None or r.user == user) and (target is None or r.target == target)
        ]
        return out[-limit:] if limit > 0 else out
