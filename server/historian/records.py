"""Control records in the archive: jobs (with their logs and results) and alarm states.

Theory of operation. The control layer (:mod:`labctl.server.control`) keeps jobs and alarm
states in a store so they survive a restart (:class:`labctl.ioc.jobs.JobStore`; the alarm
service's ``save_alarm``/``load_alarms``). The historian is that store. Its records
travel the same way as samples: captured on the event loop as plain tuples
(:class:`RecordCapture`, cheap), queued, written by the ingest thread in the batch's
transaction (:func:`write`), spooled while the database is away.

* **Jobs** change often (every state change and log line calls ``save_job``), so a job is
  three kinds of rows: its current state in ``job`` (an upsert; the batch keeps only the
  newest state of each job), and its log lines and results in ``job_log`` and
  ``job_result``, append-only and keyed ``(job_id, n)``. The capture remembers how many
  lines and results of each job it has sent, so a save sends only the new ones -- a long
  job is never rewritten whole. A job row is updated only by a row with the same
  submission time, and log lines and results are written only under the job they were
  captured from (their rows carry its submission time until written): should a job id
  ever be reused (a start without the database, see below), the archived job is neither
  overwritten nor extended. Each job row names the server that runs it (``server``, the
  last column, so a row spooled by an older labctl is a prefix and is completed here).
* **Alarm states** are one row per source in ``alarm_state``, upserted with the newest
  state of each source in a batch.

At start the historian reads the records (:func:`load`) -- in a site's PostgreSQL
database only this server's jobs, after adopting jobs archived before jobs named their
server (:func:`adopt_jobs`); a SQLite archive belongs to one server, so all of them -- and
then lays over them the records still waiting in the spool (:meth:`Records.apply`),
oldest first, so a restart during an outage restores what the control layer last saved.
Other servers' jobs are read with :func:`read_job`, :func:`read_jobs` and
:func:`read_site_jobs` (the site's job mirror, :mod:`labctl.server.historian.sitejobs`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from labctl.ioc.alarms import Alarm
from labctl.ioc.jobs import Job, JobState, Result
from labctl.ioc.types import Severity, Status
from labctl.server.historian.schema import alarm_state, insert, job, job_log, job_result
from sqlalchemy import select, update
from sqlalchemy.engine import Connection

log = logging.getLogger(__name__)

JOB_COLUMNS = tuple(c.name for c in job.columns)
"""``job`` columns in the order of a job row tuple."""
JOB_LOG_COLUMNS = tuple(c.name for c in job_log.columns)
JOB_RESULT_COLUMNS = tuple(c.name for c in job_result.columns)
ALARM_COLUMNS = tuple(c.name for c in alarm_state.columns)
_CHUNK = 500  # ids per IN list


def _us(t: float | None) -> int | None:
    return None if t is None else round(t * 1_000_000)


def _s(us: int | None) -> float | None:
    return None if us is None else us / 1_000_000


def _json(value: Any) -> str:
    return json.dumps(value, default=repr)


def _unjson(text: str | None) -> Any:
    if text is None:
        return None
    value = json.loads(text)
    return tuple(value) if isinstance(value, list) else value


# ---- capture (on the event loop) ----------------------------------------------------------------


class RecordCapture:
    """Turns jobs and alarm events into row tuples, sending each log line and result once."""

    def __init__(self, server: str = "") -> None:
        self.server = server
        """The server's name, for jobs that do not name theirs."""
        self._sent: dict[int, tuple[int, int]] = {}

    def mark(self, j: Job) -> None:
        """Note that ``j``'s log and results so far are archived already (a restored job)."""
        self._sent[j.id] = (len(j.log), len(j.results))

    def job(self, j: Job, now_us: int) -> tuple[tuple, list[tuple], list[tuple]]:
        """The job row, and the log and result rows not sent before (each with the job's
        submission time appended, see :func:`write`)."""
        n_log, n_res = self._sent.get(j.id, (0, 0))
        if n_log > len(j.log) or n_res > len(j.results):  # not append-only after all: send it all again
            n_log, n_res = 0, 0
        submitted = _us(j.submitted_at)
        logs = [(j.id, n, _us(t), line, submitted) for n, (t, line) in enumerate(j.log[n_log:], start=n_log)]
        results = [
            (j.id, n, _us(r.time), r.pv, _json(r.value), int(r.severity), int(r.status), r.label, submitted)
            for n, r in enumerate(j.results[n_res:], start=n_res)
        ]
        self._sent[j.id] = (len(j.log), len(j.results))
        row = (
            j.id, j.procedure, j.owner, _json(list(j.roles)), _json(j.params), j.priority, _json(list(j.resources)),
            j.state.value, bool(j.paused), _us(j.submitted_at), _us(j.started_at), _us(j.ended_at), j.error, now_us,
            j.server or self.server,
        )  # fmt: skip
        return row, logs, results

    @staticmethod
    def alarm(a: Alarm, now_us: int) -> tuple:
        """The alarm-state row of an alarm."""
        return (
            a.source, int(a.current), int(a.status), int(a.latched), bool(a.acked), _json(a.value), _us(a.since),
            a.message, _us(a.shelved_until), a.shelved_by, a.shelve_reason, now_us,
        )  # fmt: skip


# ---- writing (on the ingest thread, in the batch's transaction) ------------------------------------


def complete_job_row(row: Iterable[Any]) -> tuple:
    """A job row with every column: one spooled by a labctl before jobs named their server gets ``server`` ""."""
    row = tuple(row)
    return row + ("",) * (len(JOB_COLUMNS) - len(row))


def _newest(rows: Iterable[tuple]) -> list[tuple]:
    """The last row of each key (the first column), in order of first appearance."""
    out: dict[Any, tuple] = {}
    for r in rows:
        out[r[0]] = r
    return list(out.values())


def write(conn: Connection, kind: str, jobs: list[tuple], logs: list[tuple], results: list[tuple], alarms: list[tuple]) -> None:
    """Write control records in the caller's transaction; every statement is idempotent."""
    if jobs:
        stmt = insert(kind, job)
        stmt = stmt.on_conflict_do_update(
            index_elements=["id"],
            set_={c: stmt.excluded[c] for c in JOB_COLUMNS if c not in ("id", "submitted_us")},
            where=job.c.submitted_us == stmt.excluded.submitted_us,  # never another job that reused the id
        )
        conn.execute(stmt, [dict(zip(JOB_COLUMNS, complete_job_row(r), strict=True)) for r in _newest(jobs)])
    if logs or results:
        # Only under the job they came from (its row was queued before them, so it is written).
        ids = sorted({r[0] for r in logs} | {r[0] for r in results})
        owner: dict[int, int] = {}
        for i in range(0, len(ids), _CHUNK):
            rows = conn.execute(select(job.c.id, job.c.submitted_us).where(job.c.id.in_(ids[i : i + _CHUNK])))
            owner.update({r.id: r.submitted_us for r in rows})
        logs = [r[:4] for r in logs if owner.get(r[0]) == r[4]]
        results = [r[:8] for r in results if owner.get(r[0]) == r[8]]
    if logs:
        conn.execute(
            insert(kind, job_log).on_conflict_do_nothing(), [dict(zip(JOB_LOG_COLUMNS, r, strict=True)) for r in logs]
        )
    if results:
        conn.execute(
            insert(kind, job_result).on_conflict_do_nothing(),
            [dict(zip(JOB_RESULT_COLUMNS, r, strict=True)) for r in results],
        )
    if alarms:
        stmt = insert(kind, alarm_state)
        stmt = stmt.on_conflict_do_update(
            index_elements=["source"], set_={c: stmt.excluded[c] for c in ALARM_COLUMNS if c != "source"}
        )
        conn.execute(stmt, [dict(zip(ALARM_COLUMNS, r, strict=True)) for r in _newest(alarms)])


# ---- reading ------------------------------------------------------------------------------------------


@dataclass
class Records:
    """Job and alarm-state rows by key, as read at start (and overlaid with the spool's)."""

    jobs: dict[int, tuple] = field(default_factory=dict)
    logs: dict[int, dict[int, tuple]] = field(default_factory=dict)
    results: dict[int, dict[int, tuple]] = field(default_factory=dict)
    alarms: dict[str, tuple] = field(default_factory=dict)

    def add(self, jobs: Iterable[tuple], logs: Iterable[tuple], results: Iterable[tuple], alarms: Iterable[tuple]) -> None:
        """Lay rows over these (later rows win, as in the database)."""
        for r in jobs:
            r = complete_job_row(r)
            old = self.jobs.get(r[0])
            if old is None or old[9] == r[9]:  # same submission time: the same job (see write())
                self.jobs[r[0]] = r
        for r in logs:  # spooled rows carry their job's submission time (see write())
            if len(r) == 4 or self._same_job(r[0], r[4]):
                self.logs.setdefault(r[0], {}).setdefault(r[1], tuple(r[:4]))
        for r in results:
            if len(r) == 8 or self._same_job(r[0], r[8]):
                self.results.setdefault(r[0], {}).setdefault(r[1], tuple(r[:8]))
        for r in alarms:
            self.alarms[r[0]] = tuple(r)

    def _same_job(self, job_id: int, submitted_us: int) -> bool:
        row = self.jobs.get(job_id)
        return row is not None and row[9] == submitted_us

    def apply(self, batch: Any) -> None:
        """Lay a spooled :class:`~labctl.server.historian.spool.Batch`'s records over these."""
        self.add(batch.jobs, batch.job_logs, batch.job_results, batch.alarm_states)

    def job_list(self) -> list[Job]:
        """Every job, oldest first, with its log and results."""
        out = []
        for job_id in sorted(self.jobs):
            j = job_of(self.jobs[job_id], self.logs.get(job_id, {}).values(), self.results.get(job_id, {}).values())
            if j is not None:
                out.append(j)
        return out

    def alarm_list(self) -> list[Alarm]:
        """Every saved alarm state."""
        return [a for a in (alarm_of(r) for r in self.alarms.values()) if a is not None]


def job_of(row: tuple, logs: Iterable[tuple] = (), results: Iterable[tuple] = ()) -> Job | None:
    """A :class:`~labctl.ioc.jobs.Job` from its rows (None, logged, for a state this labctl does not know)."""
    r = dict(zip(JOB_COLUMNS, row, strict=True))
    try:
        state = JobState(r["state"])
    except ValueError:
        log.error("historian: job %s has state %r, which this labctl does not know; not restored", r["id"], r["state"])
        return None
    return Job(
        server=r["server"] or "",
        id=int(r["id"]),
        procedure=r["procedure"],
        owner=r["owner"],
        roles=tuple(json.loads(r["roles"])),
        params=json.loads(r["params"]),
        priority=int(r["priority"]),
        resources=tuple(json.loads(r["resources"])),
        submitted_at=_s(r["submitted_us"]),  # type: ignore[arg-type]
        state=state,
        started_at=_s(r["started_us"]),
        ended_at=_s(r["ended_us"]),
        paused=bool(r["paused"]),
        error=r["error"] or "",
        log=[(t / 1_000_000, line) for _, _, t, line in sorted(logs, key=lambda x: x[1])],
        results=[
            Result(t / 1_000_000, pv, _unjson(value), int(sev), int(sta), label or "")
            for _, _, t, pv, value, sev, sta, label in sorted(results, key=lambda x: x[1])
        ],
    )


def alarm_of(row: tuple) -> Alarm | None:
    """An :class:`~labctl.ioc.alarms.Alarm` from its row (None, logged, for codes this labctl does not know)."""
    r = dict(zip(ALARM_COLUMNS, row, strict=True))
    try:
        current, latched, status = Severity(r["current"]), Severity(r["latched"]), Status(r["status"])
    except ValueError:
        log.error("historian: the saved alarm state of %s has unknown codes; not restored", r["source"])
        return None
    return Alarm(
        source=r["source"],
        current=current,
        status=status,
        latched=latched,
        acked=bool(r["acked"]),
        value=_unjson(r["value"]),
        since=r["since_us"] / 1_000_000,
        message=r["message"] or "",
        shelved_until=_s(r["shelved_until_us"]),
        shelved_by=r["shelved_by"] or "",
        shelve_reason=r["shelve_reason"] or "",
    )


def adopt_jobs(conn: Connection, server: str) -> int:
    """Make jobs archived before jobs named their server (``server`` "") this server's; how many.

    Before version 3 of the schema one server of a database ran jobs, so the first server
    to start after the upgrade takes them (row locks serialise two starting at once).
    """
    if not server:
        return 0
    return conn.execute(update(job).where(job.c.server == "").values(server=server)).rowcount or 0


def load(conn: Connection, server: str | None = None) -> Records:
    """Jobs (with log and results) and every alarm state in the database: all jobs, or only ``server``'s."""
    rec = Records()
    jobs_q, logs_q, results_q = select(job), select(job_log), select(job_result)
    if server is not None:
        mine = select(job.c.id).where(job.c.server == server)
        jobs_q = jobs_q.where(job.c.server == server)
        logs_q = logs_q.where(job_log.c.job_id.in_(mine))
        results_q = results_q.where(job_result.c.job_id.in_(mine))
    rec.add(
        conn.execute(jobs_q.order_by(job.c.id)).all(),
        conn.execute(logs_q.order_by(job_log.c.job_id, job_log.c.n)).all(),
        conn.execute(results_q.order_by(job_result.c.job_id, job_result.c.n)).all(),
        conn.execute(select(alarm_state)).all(),
    )
    return rec


def read_job(conn: Connection, job_id: int) -> Job | None:
    """One job with its log and results, or None."""
    row = conn.execute(select(job).where(job.c.id == job_id)).first()
    if row is None:
        return None
    logs = conn.execute(select(job_log).where(job_log.c.job_id == job_id).order_by(job_log.c.n)).all()
    results = conn.execute(select(job_result).where(job_result.c.job_id == job_id).order_by(job_result.c.n)).all()
    return job_of(tuple(row), [tuple(r) for r in logs], [tuple(r) for r in results])


def read_jobs(conn: Connection, owner: str | None = None, limit: int | None = None, server: str | None = None) -> list[Job]:
    """Jobs (of one owner, of one server), newest first, without their logs and results."""
    q = select(job)
    if owner is not None:
        q = q.where(job.c.owner == owner)
    if server is not None:
        q = q.where(job.c.server == server)
    q = q.order_by(job.c.id.desc())
    if limit is not None:
        q = q.limit(limit)
    return [j for j in (job_of(tuple(r)) for r in conn.execute(q)) if j is not None]
