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

**Why a job waits.** Each pass of the scheduler records on every queued job what holds it
(:attr:`Job.waiting`, data: ``{"kind": "lock", "resource", "owner", "until", "job"}``,
``{"kind": "interlock", "interlock", "reason"}`` or ``{"kind": "hold", "source",
"reason"}``), and a sentence for people (:func:`waiting_reason`); a running job paused by a
hold says the same. Both travel in :meth:`Job.summary`.

**Cleanup always runs.** A procedure's ``cleanup`` steps (a ``finally`` block) run however
its steps end: done, failed, cancelled (by a user, by an interlock that trips on the job's
resources: :meth:`JobManager.interrupt`), or stopped by the server's shutdown
(:meth:`JobManager.stop` waits for them, bounded by ``cleanup_timeout_s``, before the
drivers close). The job keeps its leases and stays ``running`` (:attr:`Job.phase`
``cleanup``) until its cleanup is over, then takes its final state, so the record says how
it ended. A cleanup step that fails is logged and the next one still runs; one that meets
an instrument that is away is retried with backoff until the cleanup's time is up;
cleanup never pauses for a held queue. The log marks the cleanup's progress
(:data:`CLEANUP_PENDING`, :data:`CLEANUP_STARTED`, :data:`CLEANUP_DONE`,
:data:`CLEANUP_INCOMPLETE`, :data:`CLEANUP_INTERRUPTED`), and those marks are what a
restart goes by: a job found running at start-up (the server died: kill -9, power) is
marked failed, and if its cleanup had not finished and its procedure does not opt out
(``cleanup_after_crash: false``), its cleanup runs as soon as its resources can be
locked (and is retried at the next start should that one be interrupted too).

**Fresh readings.** A ``read`` step, the start of a ``wait`` and of a ``ramp`` read through
:meth:`~labctl.ioc.database.Database.read_fresh`: a value the instrument produced after
the step began (after the preceding ``set`` took effect), with its own timestamp, never
the last scan from before the write.

The queue can be *held* (by an interlock): no job starts, and running jobs pause before
their next step until the hold is lifted. Every transition is reported to listeners (the
audit trail) and to the job store (the historian), so jobs survive a restart as records;
a job found queued at start-up is marked failed, never silently lost.

**A site of several servers.** Each job names the server that runs it (:attr:`Job.server`),
and its id comes from an id source (:class:`JobIdSource`: the historian, which hands out
ids unique in the site's database) or, without one, from a count above the highest id
restored. A server restores only its own jobs. Jobs of the site's other servers are kept
beside its own as read-only records (:meth:`JobManager.set_others`, refreshed by the server
from the shared database), so listing and viewing show every job of the site, while a
cancel of another server's job is refused (:class:`JobElsewhere`): it runs there.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from labctl.ioc.access import AuditRecord
from labctl.ioc.arbiter import Arbiter, Lease, LeaseEvent, LockHeld, LockRefused
from labctl.ioc.config.procedures import ProcedureConfig, Step
from labctl.ioc.database import Database
from labctl.ioc.errors import (
    Conflict,
    DriverError,
    InvalidArgument,
    LabctlError,
    NotFound,
    Refused,
    Unavailable,
    WriteRefused,
    utc_clock,
)
from labctl.ioc.expr import EvaluationError, Expression
from labctl.ioc.policy import Action, Policy, Target
from labctl.ioc.procedure import bind_params, compile_value, evaluate
from labctl.ioc.types import EventMask, Identity

from labctl.backoff import Backoff

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


class CleaningUp(JobRefused, Conflict):
    """The job is running its cleanup steps, which cannot be cancelled (they leave the apparatus safe)."""

    FIELDS = ("job", "procedure", "state", "phase")

    def __init__(self, reason: str, *, action: str, job: int, procedure: str) -> None:
        self.state = JobState.RUNNING.value
        self.phase = "cleanup"
        super().__init__(reason, action=action, job=job, procedure=procedure)


class JobElsewhere(JobRefused, Conflict):
    """The job belongs to another server of the site: it is cancelled there."""

    FIELDS = ("job", "procedure", "server")

    def __init__(self, reason: str, *, action: str, job: int, procedure: str, server: str) -> None:
        self.server = server
        super().__init__(reason, action=action, job=job, procedure=procedure)


class JobIdsUnavailable(JobRefused, Unavailable):
    """No job id can be handed out now (the site's database, which hands them out, is away)."""


class JobFinished(JobRefused, Conflict):
    """The job has ended already (done, failed or cancelled)."""

    FIELDS = ("job", "procedure", "state")

    def __init__(self, reason: str, *, action: str, job: int, procedure: str, state: str) -> None:
        self.state = state
        super().__init__(reason, action=action, job=job, procedure=procedure)


#: Log lines that mark a job's cleanup; a restart goes by the last of them (see the module's docstring).
CLEANUP_PENDING = "cleanup: pending"
CLEANUP_STARTED = "cleanup: started"
CLEANUP_DONE = "cleanup: done"
CLEANUP_INCOMPLETE = "cleanup: incomplete"
CLEANUP_INTERRUPTED = "cleanup: interrupted"
_CLEANUP_MARKS = (CLEANUP_PENDING, CLEANUP_STARTED, CLEANUP_DONE, CLEANUP_INCOMPLETE, CLEANUP_INTERRUPTED)


def cleanup_mark(log_lines: Iterable[tuple[float, str]]) -> str | None:
    """The last cleanup mark in a job's log (None: its cleanup never started)."""
    last = None
    for _, line in log_lines:
        for mark in _CLEANUP_MARKS:
            if line.startswith(mark) and line[len(mark) : len(mark) + 1] in ("", " ", ":"):
                last = mark
    return last


def waiting_reason(waiting: Mapping[str, Any] | None) -> str:
    """What holds a job, as a person reads it (``waiting for lock cryostat held by operator``)."""
    if not waiting:
        return ""
    kind = waiting.get("kind")
    if kind == "lock":
        res, owner = waiting.get("resource", ""), waiting.get("owner", "")
        if not owner:
            return f"waiting for lock {res}: {waiting.get('reason', 'not granted')}"
        who = owner + (f" (job {waiting['job']})" if waiting.get("job") is not None else "")
        if waiting.get("until") is None:
            return f"waiting for lock {res}: {who} is first in its queue"
        return f"waiting for lock {res} held by {who} until {utc_clock(waiting['until'])}"
    if kind == "interlock":
        why = f": {waiting['reason']}" if waiting.get("reason") else ""
        return f"held by interlock {waiting.get('interlock', '')}{why}"
    why = f": {waiting['reason']}" if waiting.get("reason") else ""
    return f"queue held by {waiting.get('source', '')}{why}"


def _hold_waiting(source: str, reason: str) -> dict[str, Any]:
    kind, _, name = source.partition(":")
    if kind == "interlock" and name:
        return {"kind": "interlock", "interlock": name, "reason": reason}
    return {"kind": "hold", "source": source, "reason": reason}


def _lock_waiting(e: LockRefused) -> dict[str, Any]:
    if isinstance(e, LockHeld):
        return {"kind": "lock", "resource": e.resource, "owner": e.owner, "until": e.until, "job": e.job}
    return {"kind": "lock", "resource": e.resource, "owner": "", "until": None, "job": None, "reason": e.reason}


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
    phase: str = ""
    """While running: ``steps`` or ``cleanup``; a failed job whose cleanup runs after a restart: ``cleanup``."""
    waiting: dict[str, Any] | None = None
    """What holds the job (queued, or running and paused), as data; None when nothing does."""
    server: str = ""
    """The server of the site that runs the job ("" when it does not matter: a lone server)."""

    @property
    def identity(self) -> Identity:
        """Who the job acts as: its owner, with the roles they had at submission."""
        return Identity(self.owner, frozenset(self.roles), "job", f"job:{self.id}", client=f"job:{self.id}")

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
            "phase": self.phase,
            "waiting": dict(self.waiting) if self.waiting else None,
            "waiting_reason": waiting_reason(self.waiting),
            "server": self.server,
        }


class JobStore(Protocol):
    """Where jobs are kept across restarts (the historian implements it)."""

    def save_job(self, job: Job) -> None:
        """Record the job's current state (called on every transition and log line)."""
        ...

    def load_jobs(self) -> list[Job]:
        """Every job recorded, oldest first."""
        ...


class JobIdSource(Protocol):
    """Where new job ids come from when they must be unique beyond one server (the historian of a site)."""

    def next_job_id(self) -> int | None:
        """A new job id; None: number the job locally (a store of one server).

        Raises:
            JobIdsUnavailable: no id can be handed out now.
        """
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
        server: str = "",
        ids: JobIdSource | None = None,
    ) -> None:
        self.db = db
        self.arbiter = arbiter
        self.procedures = dict(procedures)
        self.policy = policy
        self.store: JobStore = store or MemoryJobStore()
        self.lease_s = lease_s
        self.server = server
        """This server's name, recorded in each job it submits."""
        self.ids: JobIdSource | None = ids
        """Where new ids come from (None: counted above the highest id restored)."""
        self.jobs: dict[int, Job] = {}
        """This server's jobs, by id."""
        self.others: dict[int, Job] = {}
        """Jobs of the site's other servers, by id: read-only records (:meth:`set_others`)."""
        self._ids = itertools.count(1)
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._end_notes: dict[int, tuple[JobState, str]] = {}
        """How a job whose task is cancelled ends: (state, why)."""
        self._recovering: list[Job] = []
        """Failed jobs whose cleanup still has to run (after a crash), waiting for their resources."""
        self._scheduling = False
        self._again = False
        self._held: dict[str, str] = {}
        self._resume = asyncio.Event()
        self._resume.set()
        self._listeners: list[Callable[[Job, str], None]] = []
        self._lease_listeners: list[Callable[[list[LeaseEvent]], None]] = []

    # ---- start-up ------------------------------------------------------------------------

    def restore(self) -> list[Job]:
        """Load recorded jobs; a job that was running (or queued) when the server stopped is failed.

        A job that had run and whose cleanup had not finished gets its cleanup run as soon as
        :meth:`schedule` can lock its resources (unless its procedure says
        ``cleanup_after_crash: false``). Returns the jobs marked failed now.
        """
        failed = []
        for job in self.store.load_jobs():
            self.jobs[job.id] = job
            self.others.pop(job.id, None)
            job.server = job.server or self.server  # recorded before jobs named their server
            job.phase, job.waiting = "", None  # nothing runs or waits yet in this process
            proc = self.procedures.get(job.procedure)
            ran = job.state is JobState.RUNNING
            if not job.state.final:
                was = job.state.value
                job.state = JobState.FAILED
                job.error = f"the server stopped while the job was {was}"
                job.ended_at = self.db.clock()
                job.paused = False
                job.log.append((job.ended_at, f"failed: {job.error}"))
                self._note(job, f"failed: {job.error}")
                failed.append(job)
            mark = cleanup_mark(job.log)
            pending = (ran and mark is None) or mark in (CLEANUP_PENDING, CLEANUP_STARTED, CLEANUP_INTERRUPTED)
            if not pending or proc is None or not proc.cleanup:
                continue
            if not proc.cleanup_after_crash:
                if mark != CLEANUP_INCOMPLETE:
                    self._log(job, f"{CLEANUP_INCOMPLETE}: not run after the restart (the procedure says cleanup_after_crash: false)")
                continue
            if mark != CLEANUP_PENDING:
                self._log(job, f"{CLEANUP_PENDING}: runs once the job's resources can be locked")
            job.phase = "cleanup"
            self._recovering.append(job)
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
            id=self._new_id(),
            server=self.server,
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

    def _new_id(self) -> int:
        job_id = self.ids.next_job_id() if self.ids is not None else None
        if job_id is None:
            job_id = next(self._ids)
        if job_id in self.jobs or job_id in self.others:  # an id source must never repeat one: a bug, not a refusal
            raise JobError(f"job id {job_id} is taken already")
        return job_id

    def set_others(self, jobs: Mapping[int, Job]) -> None:
        """Replace the records of the site's other servers' jobs (read-only here; this server's own are ignored)."""
        self.others = {i: j for i, j in jobs.items() if i not in self.jobs}

    def cancel(self, job_id: int, who: Identity) -> Job:
        """Cancel a queued or running job: its owner or an admin (the policy decides); a refusal is audited once."""
        with self.db.refusals_audited(who):
            return self._cancel(job_id, who)

    def _cancel(self, job_id: int, who: Identity) -> Job:
        job = self.get(job_id, Action.JOB_CANCEL)
        self.policy.decide(who, Action.JOB_CANCEL, Target(f"job:{job_id}", owner=job.owner))
        if job_id not in self.jobs:
            raise JobElsewhere(
                f"job {job_id} runs on server {job.server!r} of the site; cancel it through that server",
                action=Action.JOB_CANCEL, job=job_id, procedure=job.procedure, server=job.server,
            )  # fmt: skip
        if job.state.final:
            raise JobFinished(f"job {job_id} is already {job.state.value}", action=Action.JOB_CANCEL, job=job_id, procedure=job.procedure, state=job.state.value)
        if job.phase == "cleanup":
            raise CleaningUp(f"job {job_id} is running its cleanup steps, which cannot be cancelled", action=Action.JOB_CANCEL, job=job_id, procedure=job.procedure)
        task = self._tasks.get(job_id)
        if task is not None:
            self._end_notes[job_id] = (JobState.CANCELLED, f"by {who.user}")
            task.cancel()
        else:
            self._transition(job, JobState.CANCELLED, f"by {who.user}")
        return job

    def get(self, job_id: int, action: str = Action.JOB_VIEW) -> Job:
        """A job by id, this server's or another's of the site (raise NoSuchJob)."""
        job = self.jobs.get(job_id) or self.others.get(job_id)
        if job is None:
            raise NoSuchJob(f"no job {job_id}", action=action, job=job_id)
        return job

    def view(self, job_id: int, who: Identity) -> Job:
        """A job with its log and results, for ``who`` (its owner or an admin: the policy decides)."""
        with self.db.refusals_audited(who):
            job = self.get(job_id)
            self.policy.decide(who, Action.JOB_VIEW, Target(f"job:{job_id}", owner=job.owner))
        return job

    def list(self, user: str | None = None) -> list[Job]:
        """Jobs of the site -- this server's and the others' -- (optionally one user's), newest first."""
        everyone = itertools.chain(self.jobs.values(), (j for i, j in self.others.items() if i not in self.jobs))
        return sorted((j for j in everyone if user is None or j.owner == user), key=lambda j: -j.id)

    def queued(self) -> list[Job]:
        """Queued jobs in the order they will be considered."""
        return sorted((j for j in self.jobs.values() if j.state is JobState.QUEUED), key=lambda j: (-j.priority, j.id))

    # ---- hold (interlocks) ----------------------------------------------------------------

    def hold(self, source: str, reason: str) -> None:
        """Stop starting jobs and pause running ones at their next step (their cleanup never pauses)."""
        self._held[source] = reason
        self._resume.clear()
        for job in self.jobs.values():
            if job.state is JobState.RUNNING and job.phase == "steps" and not job.paused:
                job.log.append((self.db.clock(), f"queue held by {source}: {reason}"))
        self.schedule()

    def release_hold(self, source: str) -> None:
        """Lift one hold; when none is left, paused jobs go on and queued ones may start."""
        self._held.pop(source, None)
        if not self._held:
            self._resume.set()
        self.schedule()

    def interrupt(self, source: str, reason: str, resources: Iterable[str]) -> list[Job]:
        """End the running jobs that hold any of ``resources`` (an interlock tripped on them): failed, after their cleanup.

        Jobs already in their cleanup go on with it. Returns the jobs interrupted.
        """
        wanted = set(resources)
        out = []
        for job_id, task in list(self._tasks.items()):
            job = self.jobs[job_id]
            if job.state is JobState.RUNNING and job.phase == "steps" and wanted & set(job.resources) and job_id not in self._end_notes:
                self._end_notes[job_id] = (JobState.FAILED, f"stopped by {source}: {reason}" if reason else f"stopped by {source}")
                task.cancel()
                out.append(job)
        return out

    def _hold_waiting(self) -> dict[str, Any] | None:
        if not self._held:
            return None
        source = min(self._held, key=lambda s: (not s.startswith("interlock:"), s))
        return _hold_waiting(source, self._held[source])

    def _set_waiting(self, job: Job, waiting: dict[str, Any] | None) -> None:
        if job.waiting != waiting:
            job.waiting = waiting
            self._note(job, "waiting")

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
        now = self.db.clock()
        self._lease_events(self.arbiter.expire(now))
        # Cleanups left by a crash first, and never held: they make the apparatus safe.
        for job in list(self._recovering):
            got = self._try_leases(job, now)
            if isinstance(got, dict):
                self._set_waiting(job, got)
                continue
            self._recovering.remove(job)
            self._set_waiting(job, None)
            task = asyncio.get_running_loop().create_task(self._recover(job, got), name=f"job {job.id} cleanup")
            self._tasks[job.id] = task
        for job in self.jobs.values():
            if job.state is JobState.RUNNING and job.phase == "steps":
                self._set_waiting(job, self._hold_waiting() if job.paused else None)
        hold = self._hold_waiting()
        for job in self.queued():
            if hold is not None:
                self._set_waiting(job, hold)
                continue
            got = self._try_leases(job, now)
            if isinstance(got, dict):
                self._set_waiting(job, got)
                continue
            job.waiting = None
            job.phase = "steps"
            self._transition(job, JobState.RUNNING)
            task = asyncio.get_running_loop().create_task(self._run(job, got), name=f"job {job.id}")
            task.add_done_callback(lambda t, job=job, leases=got: self._cancelled_before_start(t, job, leases))
            self._tasks[job.id] = task

    def _try_leases(self, job: Job, now: float) -> list[Lease] | dict[str, Any]:
        """All the job's leases, or (none taken) what holds it as :attr:`Job.waiting` data."""
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
                return _lock_waiting(e)
            assert isinstance(lease, Lease)
            got.append(lease)
            events += ev
        self._lease_events(events)
        return got

    def _cancelled_before_start(self, task: asyncio.Task[None], job: Job, leases: list[Lease]) -> None:
        # A task cancelled before its first step never enters _run's body: finish it here.
        if job.state.final:
            return
        state, note = self._end_notes.pop(job.id, (JobState.CANCELLED, "server stopping"))
        job.phase = ""
        if state is JobState.FAILED:
            job.error = note
        self._transition(job, state, note)
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
        proc = self.procedures[job.procedure]
        env = dict(job.params)
        state, note = JobState.DONE, ""
        cut = False
        try:
            try:
                await self._steps(job, proc.steps, env)
            except asyncio.CancelledError:
                state, note = self._end_notes.pop(job.id, (JobState.CANCELLED, "server stopping"))
                _uncancel()
            except (WriteRefused, DriverError, JobError, EvaluationError, TimeoutError, LabctlError) as e:
                state, note = JobState.FAILED, str(e)
            except Exception as e:  # a bug in a step: fail the job with the traceback logged once
                log.exception("job %d failed unexpectedly", job.id)
                state, note = JobState.FAILED, f"internal error: {e!r}"
            if proc.cleanup:
                cut = not await self._cleanup(job, proc.cleanup, proc.cleanup_timeout_s, env, f"the job is ending {state.value}" + (f": {note}" if note else ""))
        finally:
            # End and free the resources in one step (no await between): a job seen ended holds
            # nothing, and the next job starts after it ended.
            renew.cancel()
            job.phase = ""
            job.paused = False
            job.waiting = None
            if state is JobState.FAILED:
                job.error = note
            self._transition(job, state, note)
            self._release(leases)
            self._tasks.pop(job.id, None)
            self.schedule()
            await asyncio.gather(renew, return_exceptions=True)
        if cut:
            raise asyncio.CancelledError

    async def _recover(self, job: Job, leases: list[Lease]) -> None:
        """Run the cleanup a crash left undone (the job is failed already)."""
        renew = asyncio.create_task(self._renew(leases), name=f"job {job.id} leases")
        proc = self.procedures[job.procedure]
        try:
            await self._cleanup(job, proc.cleanup, proc.cleanup_timeout_s, dict(job.params), "after a restart: the server stopped while the job ran")
        finally:
            renew.cancel()
            self._release(leases)
            job.phase = ""
            self._note(job, "log")
            self._tasks.pop(job.id, None)
            self.schedule()
            await asyncio.gather(renew, return_exceptions=True)

    async def _cleanup(self, job: Job, steps: tuple[Step, ...], timeout_s: float, env: dict[str, Any], why: str) -> bool:
        """Run cleanup steps, each one whatever the others did; False if a cancellation cut them short.

        A step refused or failed is logged and the next one runs; a step that meets an
        instrument that is away (DriverError) is tried again with backoff until ``timeout_s``
        runs out (after a restart the instruments connect while the cleanup starts).
        """
        job.phase = "cleanup"
        job.paused = False
        job.waiting = None
        self._log(job, f"{CLEANUP_STARTED} ({why})")
        failed: list[str] = []
        try:
            async with asyncio.timeout(timeout_s):
                for i, step in enumerate(steps, start=1):
                    error = await self._cleanup_step(job, step, env)
                    if error:
                        failed.append(f"step {i} ({step.kind})")
                        self._log(job, f"cleanup step {i} ({step.kind}) failed: {error}")
        except TimeoutError:
            log.error("job %d: cleanup did not finish within %g s", job.id, timeout_s)
            self._log(job, f"{CLEANUP_INCOMPLETE}: not finished within {timeout_s:g} s")
            return True
        except asyncio.CancelledError:
            log.error("job %d: cleanup interrupted (the server is stopping); it runs again at the next start", job.id)
            self._log(job, f"{CLEANUP_INTERRUPTED}: the server stopped before it finished; it runs again at the next start")
            return False
        if failed:
            log.warning("job %d: cleanup %s failed", job.id, ", ".join(failed))
            self._log(job, f"{CLEANUP_INCOMPLETE}: {', '.join(failed)} failed")
        else:
            self._log(job, CLEANUP_DONE)
        return True

    def _link_of(self, step: Step) -> Any:
        """The instrument link a set or ramp step writes through (None for soft PVs and other steps)."""
        target = step.set or step.ramp
        if target is None or target.pv not in self.db:
            return None
        instrument = self.db.info(target.pv).instrument
        return self.db.links.get(instrument) if instrument else None

    async def _cleanup_step(self, job: Job, step: Step, env: dict[str, Any]) -> str:
        """Run one cleanup step; the error that ended it ('' if none). DriverErrors are retried (the caller bounds the time)."""
        backoff = Backoff(0.2, 2.0)
        while True:
            try:
                await self._step(job, step, env, cleanup=True)
                return ""
            except DriverError as e:
                delay = backoff.next()
                if backoff.attempt == 1:
                    self._log(job, f"cleanup {step.kind}: {e}; retrying")
                link = self._link_of(step)
                if link is not None and not link.connected:  # not a write to refuse again and again: wait for it
                    with contextlib.suppress(TimeoutError):
                        await link.wait_connected(3600.0)  # the cleanup's own timeout bounds this
                else:
                    await asyncio.sleep(delay)
            except (WriteRefused, JobError, EvaluationError, TimeoutError, LabctlError) as e:
                return str(e)
            except Exception as e:  # a bug in a step: the other cleanup steps still run
                log.exception("job %d: cleanup step failed unexpectedly", job.id)
                return f"internal error: {e!r}"

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
        """Stop running jobs: they end cancelled ("server stopping") after their cleanup, which this waits for.

        The wait is bounded by the longest ``cleanup_timeout_s`` of the jobs running; a
        cleanup still running then is cut short, and marked to run again at the next start.
        """
        tasks = dict(self._tasks)
        bound = 0.0
        for job_id, task in tasks.items():
            job = self.jobs[job_id]
            proc = self.procedures.get(job.procedure)
            bound = max(bound, proc.cleanup_timeout_s if proc is not None and proc.cleanup else 0.0)
            if job.phase != "cleanup":
                self._end_notes.setdefault(job_id, (JobState.CANCELLED, "server stopping"))
                task.cancel()
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks.values(), timeout=bound + 1.0)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)

    # ---- steps -----------------------------------------------------------------------------

    async def _checkpoint(self, job: Job, cleanup: bool = False) -> None:
        if cleanup or self._resume.is_set():
            return
        job.paused = True
        job.waiting = self._hold_waiting()
        self._note(job, "paused")
        try:
            await self._resume.wait()
        finally:
            job.paused = False
            job.waiting = None
        job.log.append((self.db.clock(), "resumed"))
        self._note(job, "resumed")

    async def _steps(self, job: Job, steps: Iterable[Step], env: dict[str, Any], cleanup: bool = False) -> None:
        for step in steps:
            await self._checkpoint(job, cleanup)
            await self._step(job, step, env, cleanup)

    async def _step(self, job: Job, step: Step, env: dict[str, Any], cleanup: bool = False) -> None:
        kind = step.kind
        db, who = self.db, job.identity
        if kind == "set":
            s = step.set
            assert s is not None
            value = evaluate(compile_value(s.value, env), env)
            await db.write(s.pv, value, who)
            self._log(job, f"set {s.pv} = {value!r}")
        elif kind == "ramp":
            await self._ramp(job, step, env, cleanup)
        elif kind == "wait":
            await self._wait(job, step, env)
        elif kind == "read":
            r = step.read
            assert r is not None
            label = r.label.format(**env) if r.label else ""
            for pv in r.pvs:
                rd = await db.read_fresh(pv)
                job.results.append(Result(rd.timestamp, pv, rd.value, int(rd.severity), int(rd.status), label))
            self._log(job, f"read {', '.join(r.pvs)}{' [' + label + ']' if label else ''}")
        elif kind == "sleep":
            seconds = evaluate(compile_value(step.sleep, env), env)
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds < math.inf:
                raise JobError(f"sleep: expected seconds >= 0, got {seconds!r}")
            await asyncio.sleep(seconds)
        elif kind == "log":
            self._log(job, (step.log or "").format(**env))
        elif kind == "repeat":
            r = step.repeat
            assert r is not None
            values = evaluate(compile_value(r.values, env), env)
            if isinstance(values, (int, float, str)):
                raise JobError(f"repeat over {r.var}: expected a list of values, got {values!r}")
            for v in values:
                await self._steps(job, r.steps, {**env, r.var: v}, cleanup)

    def _log(self, job: Job, line: str) -> None:
        job.log.append((self.db.clock(), line))
        self._note(job, "log")

    async def _ramp(self, job: Job, step: Step, env: dict[str, Any], cleanup: bool = False) -> None:
        r = step.ramp
        assert r is not None
        target = float(evaluate(compile_value(r.to, env), env))
        start = (await self.db.read_fresh(r.pv)).value
        if not isinstance(start, (int, float)) or math.isnan(start):
            raise JobError(f"ramp {r.pv}: its current value {start!r} is not a number to ramp from")
        n = max(1, math.ceil(abs(target - start) / (r.rate * r.step_s)))
        self._log(job, f"ramp {r.pv} {start:g} -> {target:g} at {r.rate:g}/s in {n} steps")
        for k in range(1, n + 1):
            await self._checkpoint(job, cleanup)
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
            # The first look is a fresh reading of each input (never the scan before a preceding
            # set); later ones are the scans and pushes the monitor wakes for.
            readings = {var: await self.db.read_fresh(pv) for var, pv in w.inputs.items()}
            while True:
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
                readings = {var: self.db.read(pv) for var, pv in w.inputs.items()}


def _uncancel() -> None:
    """Take back the cancellation just caught, so the cleanup that follows can await (and time out) normally."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
