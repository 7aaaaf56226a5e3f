"""Jobs: submitted procedures, queued by priority, run when their resources are free.

Theory of operation. :class:`JobManager` keeps every job (id, owner, procedure,
parameters, priority, state, log, results). A job's states and their legal transitions
are one table (:data:`TRANSITIONS`): queued -> running -> done | failed | cancelled, and
queued -> cancelled. Whenever something may let a job start (a submission, a job ending,
a lease freed, the queue released), :meth:`JobManager.schedule` walks the queued jobs in
priority-then-arrival order and starts each one for which the arbiter grants *all* its
resources at once (all or nothing, so two jobs never deadlock holding one resource
each). A running job holds its leases as its owner (client ``job:<id>``), renews them
while it runs, and releases them when it ends.

The queue can be *held* (by an interlock): no job starts, and running jobs pause before
their next step until the hold is lifted. Every transition is reported to listeners (the
audit trail) and to the job store (the historian), so jobs survive a restart as records;
a job found running at start-up is marked failed, never silently lost.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from labctl.ioc.access import AuditRecord
from labctl.ioc.arbiter import Arbiter, Lease, LeaseEvent, LockRefused
from labctl.ioc.config.procedures import ProcedureConfig, Step
from labctl.ioc.database import Database
from labctl.ioc.errors import (
    Conflict,
    DriverError,
    InvalidArgument,
    LabctlError,
    NotFound,
    Refused,
    WriteRefused,
)
from labctl.ioc.expr import EvaluationError, Expression
from labctl.ioc.policy import Action, Policy, Target
from labctl.ioc.procedure import bind_params, compile_value, evaluate
from labctl.ioc.types import EventMask, Identity

log = logging.getLogger(__name__)


class JobState(enum.StrEnum):
    """Where a job is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        """Done, failed or cancelled."""
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.FAILED}),
    JobState.RUNNING: frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED}),
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class JobError(LabctlError):
    """A running job failed a step (a wait that timed out, a ramp with nothing to ramp from...)."""


class JobRefused(Refused):
    """A job operation was refused. Subclasses say why (and which kind of refusal)."""

    FIELDS: tuple[str, ...] = ("job", "procedure")

    def __init__(self, reason: str, *, action: str, job: int | None = None, procedure: str | None = None) -> None:
        self.job = job
        self.procedure = procedure
        super().__init__(reason, action=action, target=f"job:{job}" if job is not None else (procedure or ""))


class NoSuchJob(JobRefused, NotFound):
    """No job has that id."""


class NoSuchProcedure(JobRefused, NotFound):
    """No procedure has that name."""


class BadParameters(JobRefused, InvalidArgument):
    """The parameters do not fit the procedure's declaration."""


class JobFinished(JobRefused, Conflict):
    """The job has ended already (done, failed or cancelled)."""

    FIELDS = ("job", "procedure", "state")

    def __init__(self, reason: str, *, action: str, job: int, procedure: str, state: str) -> None:
        self.state = state
        super().__init__(reason, action=action, job=job, procedure=procedure)


@dataclass(frozen=True, slots=True)
class Result:
    """One value a job read."""

    time: float
    pv: str
    value: Any
    severity: int
    status: int
    label: str = ""


@dataclass
class Job:
    """A submitted procedure run."""

    id: int
    procedure: str
    owner: str
    roles: tuple[str, ...]
    params: dict[str, Any]
    priority: int
    resources: tuple[str, ...]
    submitted_at: float
    state: JobState = JobState.QUEUED
    started_at: float | None = None
    ended_at: float | None = None
    paused: bool = False
    error: str = ""
    log: list[tuple[float, str]] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)

    @property
    def identity(self) -> Identity:
        """Who the job acts as: its owner, with the roles they had at submission."""
        return Identity(self.owner, frozenset(self.roles), "job", f"job:{self.id}")

    def summary(self) -> dict[str, Any]:
        """A plain-data view (for protocols and the command line)."""
        return {
            "id": self.id,
            "procedure": self.procedure,
            "owner": self.owner,
            "state": self.state.value,
            "paused": self.paused,
            "priority": self.priority,
            "params": self.params,
            "resources": list(self.resources),
            "submitted_at": self.submitted_at,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "error": self.error,
        }


class JobStore(Protocol):
    """Where jobs are kept across restarts (the historian implements it)."""

    def save_job(self, job: Job) -> None:
        """Record the job's current state (called on every transition and log line)."""
        ...

    def load_jobs(self) -> list[Job]:
        """Every job recorded, oldest first."""
        ...


class MemoryJobStore:
    """Jobs kept in memory only (no historian)."""

    def __init__(self) -> None:
        self.jobs: dict[int, Job] = {}

    def save_job(self, job: Job) -> None:
        """Keep it."""
        self.jobs[job.id] = job

    def load_jobs(self) -> list[Job]:
        """What was kept."""
        return sorted(self.jobs.values(), key=lambda j: j.id)


class JobCancelled(Exception):
    """Raised inside a running job when it is cancelled."""


class JobManager:
    """Runs jobs on a database, with leases from an arbiter."""

    def __init__(
        self,
        db: Database,
        arbiter: Arbiter,
        procedures: Mapping[str, ProcedureConfig],
        *,
        policy: Policy,
        store: JobStore | None = None,
        lease_s: float = 30.0,
    ) -> None:
        self.db = db
        self.arbiter = arbiter
        self.procedures = dict(procedures)
        self.policy = policy
        self.store: JobStore = store or MemoryJobStore()
        self.lease_s = lease_s
        self.jobs: dict[int, Job] = {}
        self._ids = itertools.count(1)
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._cancel_notes: dict[int, str] = {}
        self._scheduling = False
        self._again = False
        self._held: dict[str, str] = {}
        self._resume = asyncio.Event()
        self._resume.set()
        self._listeners: list[Callable[[Job, str], None]] = []
        self._lease_listeners: list[Callable[[list[LeaseEvent]], None]] = []

    # ---- start-up ------------------------------------------------------------------------

    def restore(self) -> list[Job]:
        """Load recorded jobs; a job that was running (or queued) when the server stopped is failed."""
        failed = []
        for job in self.store.load_jobs():
            self.jobs[job.id] = job
            if not job.state.final:
                was = job.state.value
                job.state = JobState.FAILED
                job.error = f"the server stopped while the job was {was}"
                job.ended_at = self.db.clock()
                self._note(job, f"failed: {job.error}")
                failed.append(job)
        self._ids = itertools.count(max(self.jobs, default=0) + 1)
        return failed

    # ---- listeners -----------------------------------------------------------------------

    def on_transition(self, fn: Callable[[Job, str], None]) -> None:
        """``fn(job, what)`` on every state change and log line."""
        self._listeners.append(fn)

    def on_lease_events(self, fn: Callable[[list[LeaseEvent]], None]) -> None:
        """``fn(events)`` for lease events the job manager causes."""
        self._lease_listeners.append(fn)

    def _note(self, job: Job, what: str) -> None:
        self.store.save_job(job)
        for fn in self._listeners:
            try:
                fn(job, what)
            except Exception:  # a listener's bug must not break the job
                log.exception("job listener failed")

    def _lease_events(self, events: list[LeaseEvent]) -> None:
        if events:
            for fn in self._lease_listeners:
                fn(events)

    def _transition(self, job: Job, to: JobState, note: str = "") -> None:
        if to not in TRANSITIONS[job.state]:
            raise JobError(f"job {job.id}: cannot go from {job.state.value} to {to.value}")
        job.state = to
        now = self.db.clock()
        if to is JobState.RUNNING:
            job.started_at = now
        elif to.final:
            job.ended_at = now
        job.log.append((now, f"{to.value}{': ' + note if note else ''}"))
        self.db.audit(AuditRecord.of(now, "job.state", job.identity, f"job:{job.id}", new=to.value, reason=note))
        self._note(job, to.value)

    # ---- commands ------------------------------------------------------------------------

    def submit(self, procedure: str, params: Mapping[str, Any], who: Identity, *, priority: int = 0) -> Job:
        """Queue a job; raise NoSuchProcedure, Forbidden (the policy) or BadParameters, audited once."""
        with self.db.refusals_audited(who, new=priority):
            return self._submit(procedure, params, who, priority)

    def _submit(self, procedure: str, params: Mapping[str, Any], who: Identity, priority: int) -> Job:
        proc = self.procedures.get(procedure)
        if proc is None:
            raise NoSuchProcedure(f"unknown procedure {procedure!r}; procedures are {sorted(self.procedures)}", action=Action.JOB_SUBMIT, procedure=procedure)
        self.policy.decide(who, Action.JOB_SUBMIT, Target(procedure, roles=frozenset(proc.roles)))
        try:
            bound = bind_params(procedure, proc, params)
        except ValueError as e:
            raise BadParameters(str(e), action=Action.JOB_SUBMIT, procedure=procedure) from None
        job = Job(
            id=next(self._ids),
            procedure=procedure,
            owner=who.user,
            roles=tuple(sorted(who.roles)),
            params=bound,
            priority=priority,
            resources=proc.resources,
            submitted_at=self.db.clock(),
        )
        self.jobs[job.id] = job
        job.log.append((job.submitted_at, f"queued by {who.user} with priority {priority}"))
        self.db.audit(AuditRecord.of(job.submitted_at, "job.state", who, f"job:{job.id}", new="queued", reason=procedure))
        self._note(job, "queued")
        self.schedule()
        return job

    def cancel(self, job_id: int, who: Identity) -> Job:
        """Cancel a queued or running job: its owner or an admin (the policy decides); a refusal is audited once."""
        with self.db.refusals_audited(who):
            return self._cancel(job_id, who)

    def _cancel(self, job_id: int, who: Identity) -> Job:
        job = self.get(job_id, Action.JOB_CANCEL)
        self.policy.decide(who, Action.JOB_CANCEL, Target(f"job:{job_id}", owner=job.owner))
        if job.state.final:
            raise JobFinished(f"job {job_id} is already {job.state.value}", action=Action.JOB_CANCEL, job=job_id, procedure=job.procedure, state=job.state.value)
        task = self._tasks.get(job_id)
        if task is not None:
            self._cancel_notes[job_id] = f"by {who.user}"
            task.cancel()
        else:
            self._transition(job, JobState.CANCELLED, f"by {who.user}")
        return job

    def get(self, job_id: int, action: str = Action.JOB_VIEW) -> Job:
        """A job by id (raise NoSuchJob)."""
        try:
            return self.jobs[job_id]
        except KeyError:
            raise NoSuchJob(f"no job {job_id}", action=action, job=job_id) from None

    def view(self, job_id: int, who: Identity) -> Job:
        """A job with its log and results, for ``who`` (its owner or an admin: the policy decides)."""
        with self.db.refusals_audited(who):
            job = self.get(job_id)
            self.policy.decide(who, Action.JOB_VIEW, Target(f"job:{job_id}", owner=job.owner))
        return job

    def list(self, user: str | None = None) -> list[Job]:
        """Jobs (optionally one user's), newest first."""
        return sorted((j for j in self.jobs.values() if user is None or j.owner == user), key=lambda j: -j.id)

    def queued(self) -> list[Job]:
        """Queued jobs in the order they will be considered."""
        return sorted((j for j in self.jobs.values() if j.state is JobState.QUEUED), key=lambda j: (-j.priority, j.id))

    # ---- hold (interlocks) ----------------------------------------------------------------

    def hold(self, source: str, reason: str) -> None:
        """Stop starting jobs and pause running ones at their next step."""
        self._held[source] = reason
        self._resume.clear()
        for job in self.jobs.values():
            if job.state is JobState.RUNNING and not job.paused:
                job.log.append((self.db.clock(), f"queue held by {source}: {reason}"))

    def release_hold(self, source: str) -> None:
        """Lift one hold; when none is left, paused jobs go on and queued ones may start."""
        self._held.pop(source, None)
        if not self._held:
            self._resume.set()
            self.schedule()

    @property
    def held(self) -> dict[str, str]:
        """Active holds: source -> reason."""
        return dict(self._held)

    # ---- scheduling ------------------------------------------------------------------------

    def schedule(self) -> None:
        """Start every queued job whose resources can all be had now, in priority order.

        Re-entrant calls (lease events raised while scheduling ask to schedule again)
        are folded into one more pass of the outer call.
        """
        if self._scheduling:
            self._again = True
            return
        self._scheduling = True
        try:
            self._again = True
            while self._again:
                self._again = False
                self._schedule_once()
        finally:
            self._scheduling = False

    def _schedule_once(self) -> None:
        if self._held:
            return
        now = self.db.clock()
        self._lease_events(self.arbiter.expire(now))
        for job in self.queued():
            leases = self._try_leases(job, now)
            if leases is None:
                continue
            self._transition(job, JobState.RUNNING)
            task = asyncio.get_running_loop().create_task(self._run(job, leases), name=f"job {job.id}")
            task.add_done_callback(lambda t, job=job, leases=leases: self._cancelled_before_start(t, job, leases))
            self._tasks[job.id] = task

    def _try_leases(self, job: Job, now: float) -> list[Lease] | None:
        got: list[Lease] = []
        events: list[LeaseEvent] = []
        for res in job.resources:
            try:
                lease, ev = self.arbiter.request(
                    res, job.identity, now, duration_s=self.lease_s, priority=job.priority, client=f"job:{job.id}", wait=False, job=job.id
                )
            except LockRefused as e:
                events += e.events
                for g in got:
                    events += self.arbiter.release(g.resource, g.token, now)
                self._lease_events(events)
                return None
            assert isinstance(lease, Lease)
            got.append(lease)
            events += ev
        self._lease_events(events)
        return got

    def _cancelled_before_start(self, task: asyncio.Task[None], job: Job, leases: list[Lease]) -> None:
        # A task cancelled before its first step never enters _run's body: finish it here.
        if job.state.final:
            return
        self._transition(job, JobState.CANCELLED, self._cancel_notes.pop(job.id, "server stopping"))
        self._release(leases)
        self._tasks.pop(job.id, None)
        self.schedule()

    def _release(self, leases: list[Lease]) -> None:
        now = self.db.clock()
        events: list[LeaseEvent] = []
        for lease in leases:
            try:
                events += self.arbiter.release(lease.resource, lease.token, now)
            except LockRefused as e:  # broken or lapsed meanwhile
                events += e.events
        self._lease_events(events)

    async def _run(self, job: Job, leases: list[Lease]) -> None:
        renew = asyncio.create_task(self._renew(leases), name=f"job {job.id} leases")
        env = dict(job.params)
        try:
            await self._steps(job, self.procedures[job.procedure].steps, env)
        except asyncio.CancelledError:
            self._transition(job, JobState.CANCELLED, self._cancel_notes.pop(job.id, "server stopping"))
        except (WriteRefused, DriverError, JobError, EvaluationError, TimeoutError, LabctlError) as e:
            job.error = str(e)
            self._transition(job, JobState.FAILED, job.error)
        except Exception as e:  # a bug in a step: fail the job with the traceback logged once
            log.exception("job %d failed unexpectedly", job.id)
            job.error = f"internal error: {e!r}"
            self._transition(job, JobState.FAILED, job.error)
        else:
            self._transition(job, JobState.DONE)
        finally:
            renew.cancel()
            await asyncio.gather(renew, return_exceptions=True)
            self._release(leases)
            self._tasks.pop(job.id, None)
            self.schedule()

    async def _renew(self, leases: list[Lease]) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            now = self.db.clock()
            for lease in leases:
                try:
                    _, ev = self.arbiter.renew(lease.resource, lease.token, now)
                    self._lease_events(ev)
                except LockRefused as e:
                    self._lease_events(e.events)
                    log.warning("job lease on %s was lost", lease.resource)

    async def stop(self) -> None:
        """Cancel running jobs (they end as cancelled) and wait for them."""
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- steps -----------------------------------------------------------------------------

    async def _checkpoint(self, job: Job) -> None:
        if not self._resume.is_set():
            job.paused = True
            self._note(job, "paused")
            await self._resume.wait()
            job.paused = False
            job.log.append((self.db.clock(), "resumed"))
            self._note(job, "resumed")

    async def _steps(self, job: Job, steps: Iterable[Step], env: dict[str, Any]) -> None:
        for step in steps:
            await self._checkpoint(job)
            await self._step(job, step, env)

    async def _step(self, job: Job, step: Step, env: dict[str, Any]) -> None:
        kind = step.kind
        db, who = self.db, job.identity
        if kind == "set":
            s = step.set
            assert s is not None
            value = evaluate(compile_value(s.value, env), env)
            await db.write(s.pv, value, who)
            self._log(job, f"set {s.pv} = {value!r}")
        elif kind == "ramp":
            await self._ramp(job, step, env)
        elif kind == "wait":
            await self._wait(job, step, env)
        elif kind == "read":
            r = step.read
            assert r is not None
            label = r.label.format(**env) if r.label else ""
            for pv in r.pvs:
                rd = db.read(pv)
                job.results.append(Result(rd.timestamp, pv, rd.value, int(rd.severity), int(rd.status), label))
            self._log(job, f"read {', '.join(r.pvs)}{' [' + label + ']' if label else ''}")
        elif kind == "sleep":
            assert step.sleep is not None
            await asyncio.sleep(step.sleep)
        elif kind == "log":
            self._log(job, (step.log or "").format(**env))
        elif kind == "repeat":
            r = step.repeat
            assert r is not None
            values = evaluate(compile_value(r.values, env), env)
            if isinstance(values, (int, float, str)):
                raise JobError(f"repeat over {r.var}: expected a list of values, got {values!r}")
            for v in values:
                await self._steps(job, r.steps, {**env, r.var: v})

    def _log(self, job: Job, line: str) -> None:
        job.log.append((self.db.clock(), line))
        self._note(job, "log")

    async def _ramp(self, job: Job, step: Step, env: dict[str, Any]) -> None:
        r = step.ramp
        assert r is not None
        target = float(evaluate(compile_value(r.to, env), env))
        start = self.db.read(r.pv).value
        if not isinstance(start, (int, float)) or math.isnan(start):
            raise JobError(f"ramp {r.pv}: its current value {start!r} is not a number to ramp from")
        n = max(1, math.ceil(abs(target - start) / (r.rate * r.step_s)))
        self._log(job, f"ramp {r.pv} {start:g} -> {target:g} at {r.rate:g}/s in {n} steps")
        for k in range(1, n + 1):
            await self._checkpoint(job)
            await self.db.write(r.pv, start + (target - start) * k / n, job.identity)
            if k < n:
                await asyncio.sleep(r.step_s)

    async def _wait(self, job: Job, step: Step, env: dict[str, Any]) -> None:
        w = step.wait
        assert w is not None
        expr = Expression(w.until, [*env, *w.inputs])
        names = list(w.inputs.values())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + w.timeout_s
        since: float | None = None
        self._log(job, f"wait until {w.until} (timeout {w.timeout_s:g} s)")
        with self.db.monitor(names, mask=EventMask.VALUE | EventMask.ALARM, initial=False) as mon:
            while True:
                readings = {var: self.db.read(pv) for var, pv in w.inputs.items()}
                ok = all(r.valid for r in readings.values()) and bool(
                    expr.evaluate({**env, **{k: r.value for k, r in readings.items()}})
                )
                now = loop.time()
                if ok:
                    since = now if since is None else since
                    if now - since >= w.hold_s:
                        return
                else:
                    since = None
                if now >= deadline:
                    raise JobError(f"wait until {w.until}: not true after {w.timeout_s:g} s")
                # wake on the next change of an input, the hold time, or the deadline
                wake = deadline if since is None else min(deadline, since + w.hold_s)
                try:
                    async with asyncio.timeout(max(0.0, wake - now)):
                        await mon.get()
                except TimeoutError:
                    pass
                except StopAsyncIteration:
                    raise JobError(f"wait until {w.until}: the database stopped") from None
