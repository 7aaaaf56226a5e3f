"""The historian service: archive every PV change, answer history queries.

Theory of operation. :class:`Historian` joins the parts of this package around one
process database:

* ``start()`` opens the backend named by ``historian.url`` (``{state_dir}`` replaced),
  opens the spool under ``<state_dir>/spool/`` (a previous run's leftovers included), and,
  on a worker thread, connects, creates or upgrades the schema (idempotent, versioned)
  and registers the PV catalogue. A database that is away is not an error -- the
  historian starts, spools, and back-fills when it returns; a database that refuses the
  schema is (:class:`~labctl.server.historian.errors.HistorianError`). It then subscribes ONCE
  to the database with ``EventMask.LOG`` (the archive deadband; alarm changes carry that
  bit too), adds itself as an audit sink, records every PV's current reading as a
  baseline, and starts the ingest thread (:mod:`labctl.server.historian.ingest`).
* It is also the control layer's store (``server.control.use_store(historian)``): jobs
  with their logs and results, and alarm states, are captured on the loop and written by
  the same ingest thread (:mod:`labctl.server.historian.records`). ``start()`` reads the saved
  records (and those still in the spool) before any other service starts, so
  :meth:`Historian.load_jobs` and :meth:`Historian.load_alarms` answer at once. In a
  PostgreSQL database it restores only this server's jobs (``server_name``), hands out
  job ids unique in the site (:meth:`Historian.next_job_id`,
  :mod:`labctl.server.historian.jobids`), and mirrors the other servers' jobs into the job
  manager (:meth:`Historian.watch_site_jobs`, :mod:`labctl.server.historian.sitejobs`).
* ``stop()`` unsubscribes and waits for the ingest thread to write -- or spool --
  everything it was given.
* The query API (``read_raw``, ``read_last``, ``read_processed`` and their ``_many``
  forms, ``read_audit``...) runs :mod:`labctl.server.historian.query` on a small thread pool, so
  the event loop never waits on the database. Times are UNIX seconds (floats) or aware
  datetimes; ranges are half-open ``[start, end)``. Queries see what is committed: call
  :meth:`Historian.flush` first to include updates of the last ``batch_age_s``, and
  expect samples still in the spool to be missing while the database is away
  (:class:`~labctl.server.historian.errors.HistorianUnavailable`).

Other services reach it as ``server.service("historian")``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from labctl.ioc.access import AuditRecord
from labctl.ioc.alarms import Alarm, AlarmEvent
from labctl.ioc.database import Database
from labctl.ioc.jobs import Job, JobIdsUnavailable, JobManager
from labctl.ioc.policy import Action
from labctl.ioc.subscription import Callback
from labctl.ioc.types import EventMask, Reading, Update
from labctl.server.archive import Bucket, HistorianError, HistorianUnavailable
from labctl.server.historian import jobids, query, records
from labctl.server.historian.backend import Backend, is_unreachable, open_backend, short
from labctl.server.historian.config import HistorianConfig
from labctl.server.historian.encoding import to_us
from labctl.server.historian.ingest import Ingestor, now_us
from labctl.server.historian.query import Entry, RawPage
from labctl.server.historian.sitejobs import SiteJobs
from labctl.server.historian.spool import Spool
from labctl.server.siteinfo import default_server_name
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

if TYPE_CHECKING:
    from labctl.server.app import Server

log = logging.getLogger(__name__)

_ALARM = int(EventMask.ALARM)

T = TypeVar("T")
Time = float | dt.datetime
"""UNIX seconds, or an aware datetime."""

#: Threads answering queries (each holds at most one database connection).
QUERY_THREADS = 4


class Historian:
    """Archives one :class:`~labctl.ioc.database.Database` and answers history queries."""

    name = "historian"

    def __init__(self, db: Database, config: HistorianConfig, state_dir: Path | str, *, server_name: str = "") -> None:
        self.db = db
        self.config = config
        self.state_dir = Path(state_dir)
        self.server_name = server_name
        """This server's name in a site: recorded in its jobs, whose ids it reserves."""
        self.url = config.url.replace("{state_dir}", str(self.state_dir))
        self.backend: Backend | None = None
        self.ingestor: Ingestor | None = None
        self._subscription: Callback | None = None
        self._accepting = False
        self._queries: ThreadPoolExecutor | None = None
        self._entries: dict[str, Entry] = {}
        self._records = records.Records()
        self._capture = records.RecordCapture(server_name)
        self._dropped_records = 0
        self._job_ids: jobids.JobIds | None = None
        self._reserving: asyncio.Task[None] | None = None
        self._reserve_failed = False

    # ---- Service --------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the archive (see the module docstring); return once archiving."""
        if self.ingestor is not None:
            raise HistorianError("the historian is already started")
        backend = open_backend(self.url)
        spool = Spool(self.state_dir / "spool", int(self.config.spool_max_mb * 1_000_000))
        if not spool.empty:
            log.info("historian: %d samples in %d spool segments from an earlier run will be back-filled",
                     spool.samples, spool.segments)
        ingestor = Ingestor(
            backend,
            spool,
            self.db.infos(),
            batch_size=self.config.batch_size,
            batch_age_s=self.config.batch_age_s,
            retention_days=self.config.retention_days,
        )
        try:
            up = await asyncio.to_thread(ingestor.connect)
        except BaseException:
            backend.dispose()
            raise
        try:
            self._records, self._job_ids = await asyncio.to_thread(self._load_records, backend, spool, up)
        except BaseException:
            backend.dispose()
            raise
        self.backend, self.ingestor = backend, ingestor
        self._queries = ThreadPoolExecutor(QUERY_THREADS, thread_name_prefix="historian-query")
        # Subscribe and take the baseline in one step of the loop: no update falls between.
        self._subscription = self.db.subscribe(self._on_update, mask=EventMask.LOG)
        self._accepting = True
        self.db.add_audit_sink(self._on_audit)
        for name in self.db.names():
            ingestor.put(name, self.db.read(name))
        ingestor.start()

    async def stop(self) -> None:
        """Stop archiving; everything received is written or spooled first."""
        if self.ingestor is None:
            return
        self._accepting = False
        if self._reserving is not None:
            await asyncio.gather(self._reserving, return_exceptions=True)  # a reservation in flight is recorded
            self._reserving = None
        self.db.remove_audit_sink(self._on_audit)
        if self._subscription is not None:
            self.db.unsubscribe(self._subscription)
            self._subscription = None
        await asyncio.to_thread(self.ingestor.stop)
        assert self._queries is not None and self.backend is not None
        await asyncio.to_thread(self._queries.shutdown, True)  # let running queries finish, off the loop
        self._queries = None
        self.backend.dispose()
        self.ingestor = None

    def _load_records(self, backend: Backend, spool: Spool, up: bool) -> tuple[records.Records, jobids.JobIds | None]:
        """Saved jobs and alarm states: the database's, then the spool's over them; the job ids (a worker thread).

        In PostgreSQL only this server's jobs (jobs archived before jobs named their server
        are adopted first), and the block of job ids to go on with.
        """
        rec = records.Records()
        site = backend.kind == "postgresql"
        ids = jobids.JobIds(self.state_dir, backend.display_url, self.server_name) if site else None
        block: jobids.Block | None = None
        archived: int | None = None
        if up:
            try:
                with backend.engine.begin() as conn:
                    if site:
                        adopted = records.adopt_jobs(conn, self.server_name)
                        if adopted:
                            log.info("historian: %d jobs archived before jobs named their server are now server %r's",
                                     adopted, self.server_name)
                        rec = records.load(conn, self.server_name)
                        block = jobids.newest_block(conn, self.server_name)
                        archived = jobids.highest_id(conn, block) if block is not None else None
                    else:
                        rec = records.load(conn)
            except Exception as e:
                if not is_unreachable(e):
                    raise HistorianError(f"historian database {backend.display_url}: cannot read job and alarm records: {short(e)}") from e
                up = False
        for seg in spool.all():
            if seg.events:
                try:
                    rec.apply(spool.read(seg))
                except (OSError, ValueError) as e:  # the back-fill quarantines it later
                    log.warning("historian: cannot read spooled records from %s: %s", seg.path.name, e)
        if ids is None:
            if not up:
                log.warning("historian: database %s unreachable at start: jobs and alarm states of earlier runs are "
                            "restored only from the spool", backend.display_url)
            return rec, None
        if up:
            ids.restore(block, archived, rec.jobs)
            if ids.left == 0:
                try:
                    with backend.engine.begin() as conn:
                        ids.add_block(jobids.reserve_block(conn, self.server_name, now_us()))
                except Exception as e:
                    if not is_unreachable(e):
                        raise
                    log.warning("historian: cannot reserve job ids in %s (%s); jobs can be submitted once it is back",
                                backend.display_url, short(e))
        elif ids.restore_offline(rec.jobs):
            log.warning("historian: database %s unreachable at start: jobs and alarm states of earlier runs are restored "
                        "only from the spool; new jobs go on with ids %d-%d", backend.display_url, ids.next, ids.block.last)  # type: ignore[union-attr]
        else:
            log.warning("historian: database %s unreachable at start: jobs and alarm states of earlier runs are restored "
                        "only from the spool, and jobs can be submitted once the database is back (it hands out their ids)",
                        backend.display_url)
        return rec, ids

    def endpoints(self) -> list[str]:
        """The archive's URL (password hidden) and backend."""
        if self.backend is None:
            try:
                shown = make_url(self.url).render_as_string(hide_password=True)
            except ArgumentError:
                shown = "(malformed URL)"
            return [f"historian {shown} (not started)"]
        return [f"historian {self.backend.display_url} ({self.backend.describe()})"]

    # ---- ingest -----------------------------------------------------------------------------

    def _on_update(self, update: Update) -> None:
        # Inline on the loop for every archived update: queue it and return.
        alarm = int.__and__(update.mask, _ALARM) != 0  # int's operator: IntFlag's costs a microsecond
        self.ingestor.put(update.name, update.reading, alarm)  # type: ignore[union-attr]

    def _on_audit(self, record: AuditRecord) -> None:
        if self._accepting and self.ingestor is not None:
            self.ingestor.put_audit(record)

    def archive_audit(self, record: AuditRecord) -> None:
        """Queue an audit record that did not come through the database's sinks (the audit journal's replay).

        Idempotent by the record's ``uid``: a record already archived is not archived twice.
        """
        self._on_audit(record)

    # ---- the control layer's store -------------------------------------------------------------

    def save_job(self, job: Job) -> None:
        """Record a job's state, new log lines and new results (:class:`labctl.ioc.jobs.JobStore`; never blocks)."""
        if not self._accepting or self.ingestor is None:
            self._lost_record(f"job {job.id} ({job.state.value})")
            return
        row, logs, results = self._capture.job(job, now_us())
        put = self.ingestor.put_record
        put("jobs", row)
        for r in logs:
            put("job_logs", r)
        for r in results:
            put("job_results", r)

    def load_jobs(self) -> list[Job]:
        """Every job recorded before this start, oldest first, with logs and results (:class:`labctl.ioc.jobs.JobStore`)."""
        jobs = self._records.job_list()
        for job in jobs:
            self._capture.mark(job)
        return jobs

    def next_job_id(self) -> int | None:
        """A new job id unique in the site (:class:`labctl.ioc.jobs.JobIdSource`); None with SQLite (one server's).

        Never waits: the next block of ids is reserved in the background when this one runs low.

        Raises:
            JobIdsUnavailable: no block of ids could be reserved yet (the database has been
                away since this server started for the first time).
        """
        ids = self._job_ids
        if ids is None:
            return None
        job_id = ids.take()
        if ids.wants_block:
            self._reserve_ids()
        if job_id is None:
            raise JobIdsUnavailable(
                f"no job id can be handed out: the site database {self.backend.display_url if self.backend else self.url} "
                "that hands them out has been unreachable since this server started; submit again once it is back",
                action=Action.JOB_SUBMIT,
            )
        return job_id

    def _reserve_ids(self) -> None:
        if self._reserving is not None or not self._accepting:
            return
        self._reserving = asyncio.get_running_loop().create_task(self._reserve(), name="historian job ids")

    async def _reserve(self) -> None:
        try:
            block = await self._run(lambda conn: self._reserve_in(conn))
        except HistorianError as e:  # away: tried again at the next submission
            if not self._reserve_failed:
                log.warning("historian: cannot reserve job ids now: %s", e)
            self._reserve_failed = True
        except Exception:  # a bug: logged once here, at the boundary; the next submission tries again
            log.exception("historian: reserving job ids failed")
        else:
            self._reserve_failed = False
            assert self._job_ids is not None
            self._job_ids.add_block(block)
            log.info("historian: job ids %d-%d reserved for server %r", block.first, block.last, self.server_name)
        finally:
            self._reserving = None

    def _reserve_in(self, conn: Any) -> jobids.Block:
        block = jobids.reserve_block(conn, self.server_name, now_us())
        conn.commit()
        return block

    def watch_site_jobs(self, jobs: JobManager, refresh_s: float) -> SiteJobs | None:
        """A mirror of the site's other servers' jobs in ``jobs`` (not started); None with SQLite (one server's)."""
        if self.backend is None or self.backend.kind != "postgresql":
            return None
        return SiteJobs(self, jobs, refresh_s)

    def save_alarm(self, event: AlarmEvent) -> None:
        """Record the alarm state an alarm event leaves (never blocks)."""
        if not self._accepting or self.ingestor is None:
            self._lost_record(f"alarm state of {event.alarm.source}")
            return
        self.ingestor.put_record("alarm_states", records.RecordCapture.alarm(event.alarm, now_us()))

    def load_alarms(self) -> list[Alarm]:
        """Every alarm state recorded before this start."""
        return self._records.alarm_list()

    def _lost_record(self, what: str) -> None:
        self._dropped_records += 1
        if self._dropped_records == 1 or self._dropped_records % 100 == 0:
            log.warning("historian: %s not recorded: the historian is not running (%d records so far)", what, self._dropped_records)

    async def flush(self) -> bool:
        """Wait until every update received so far is in the database or the spool.

        Returns True when it is all in the database and nothing is left in the spool.
        """
        if self.ingestor is None:
            raise HistorianError("the historian is not running")
        return await asyncio.wrap_future(self.ingestor.flush())

    def stats(self) -> dict[str, Any]:
        """Ingest and spool counters (received, written, spooled, back-filled, dropped...)."""
        if self.ingestor is None:
            return {"running": False}
        return {"running": True, **self.ingestor.stats()}

    # ---- queries ----------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._queries is None or self.backend is None:
            raise HistorianError("the historian is not running")
        backend = self.backend

        def work() -> T:
            try:
                with backend.engine.connect() as conn:
                    return fn(conn, *args, **kwargs)
            except HistorianError:
                raise
            except Exception as e:
                if is_unreachable(e):
                    spooled = self.ingestor.spool.samples if self.ingestor else 0
                    raise HistorianUnavailable(
                        f"historian database {backend.display_url} unreachable ({short(e)}); "
                        f"{spooled} samples are spooled until it returns"
                    ) from None
                raise

        return await asyncio.get_running_loop().run_in_executor(self._queries, work)

    def _lookup(self, conn, names: Iterable[str]) -> list[Entry]:
        return query.catalogue(conn, names, self._entries)

    async def read_raw(
        self,
        name: str,
        start: Time,
        end: Time,
        *,
        limit: int | None = None,
        continuation: str | None = None,
        reverse: bool = False,
        bounds: bool = False,
    ) -> RawPage:
        """Archived readings of ``name`` in ``[start, end)``, oldest first (newest first if ``reverse``).

        At most ``limit`` per call; if more remain, the page's ``continuation`` is passed
        back (with the same other arguments) for the next page. ``bounds``: a forward
        read starts with the value in force at ``start`` (the last reading before it, with
        its own time), so a PV that did not change in the range still shows its value.
        """
        s, e = to_us(start), to_us(end)
        query.check_range(s, e)

        def fn(conn):
            (entry,) = self._lookup(conn, [name])
            return query.read_raw(conn, entry, s, e, limit=limit, continuation=continuation, reverse=reverse, bounds=bounds)

        return await self._run(fn)

    async def read_raw_many(
        self, names: Sequence[str], start: Time, end: Time, *, limit: int | None = None
    ) -> dict[str, RawPage]:
        """:meth:`read_raw` for several PVs (``limit`` per PV), by name."""
        s, e = to_us(start), to_us(end)
        query.check_range(s, e)

        def fn(conn):
            return {entry.name: query.read_raw(conn, entry, s, e, limit=limit) for entry in self._lookup(conn, names)}

        return await self._run(fn)

    async def read_last(self, name: str, at: Time | None = None) -> Reading | None:
        """The last archived reading of ``name`` at or before ``at`` (default: the newest); None if none."""
        return (await self.read_last_many([name], at))[name]

    async def read_last_many(self, names: Sequence[str], at: Time | None = None) -> dict[str, Reading | None]:
        """:meth:`read_last` for several PVs in one round trip, by name."""
        at_us = None if at is None else to_us(at)

        def fn(conn):
            entries = self._lookup(conn, names)
            by_id = query.read_last(conn, self.backend, entries, at_us)
            return {e.name: by_id[e.id] for e in entries}

        return await self._run(fn)

    async def read_next(self, name: str, at: Time) -> Reading | None:
        """The first archived reading of ``name`` at or after ``at``; None if none."""
        at_us = to_us(at)

        def fn(conn):
            (entry,) = self._lookup(conn, [name])
            return query.read_next(conn, entry, at_us)

        return await self._run(fn)

    async def read_processed(self, name: str, start: Time, end: Time, interval_s: float, *, held: bool = False) -> list[Bucket]:
        """Aggregates of ``name`` per ``interval_s`` over ``[start, end)``: count, min, max, mean, first, last.

        ``held``: also the value in force at each bucket's start, the time-weighted mean
        and the bucket's quality (:class:`labctl.server.archive.Bucket`; reads the raw rows).
        """
        return (await self.read_processed_many([name], start, end, interval_s, held=held))[name]

    async def read_processed_many(
        self, names: Sequence[str], start: Time, end: Time, interval_s: float, *, use_rollups: bool = True, held: bool = False
    ) -> dict[str, list[Bucket]]:
        """:meth:`read_processed` for several PVs, by name.

        ``use_rollups=False`` forces aggregation from raw rows (the results are the same;
        tests compare the two paths).
        """
        if not (isinstance(interval_s, (int, float)) and math.isfinite(interval_s) and interval_s > 0):
            raise HistorianError(f"the processing interval must be a positive number of seconds, got {interval_s!r}")
        s, e, w = to_us(start), to_us(end), round(interval_s * 1_000_000)

        def fn(conn):
            entries = self._lookup(conn, names)
            by_id = query.read_processed(conn, self.backend, entries, s, e, w, use_rollups=use_rollups, held=held)
            return {entry.name: by_id[entry.id] for entry in entries}

        return await self._run(fn)

    async def read_audit(
        self,
        start: Time | None = None,
        end: Time | None = None,
        *,
        target: str | None = None,
        user: str | None = None,
        action: str | None = None,
        limit: int | None = None,
    ) -> list[AuditRecord]:
        """Archived audit records in ``[start, end)``, oldest first.

        Optionally only those of one ``target`` (a PV, resource, ``job:<id>``...), one
        ``user``, or one ``action`` (``write``, ``lock.grant``...); the filters combine.
        """
        s = None if start is None else to_us(start)
        e = None if end is None else to_us(end)
        fn = functools.partial(query.read_audit, target=target, user=user, action=action, limit=limit)
        return await self._run(fn, s, e)

    async def read_job(self, job_id: int) -> Job | None:
        """An archived job with its log and results (None if no job has that id)."""
        return await self._run(records.read_job, job_id)

    async def read_jobs(self, *, owner: str | None = None, limit: int | None = None, server: str | None = None) -> list[Job]:
        """Archived jobs (of one owner, of one server of the site), newest first, without logs and results."""
        return await self._run(functools.partial(records.read_jobs, owner=owner, limit=limit, server=server))

    async def read_alarm_events(self, name: str, start: Time, end: Time) -> list[tuple[float, Any, Any]]:
        """Alarm transitions of ``name`` in ``[start, end)``: (time, severity, status), oldest first."""
        s, e = to_us(start), to_us(end)

        def fn(conn):
            (entry,) = self._lookup(conn, [name])
            return query.read_alarm_events(conn, entry, s, e)

        return await self._run(fn)

    async def read_metadata_history(self, name: str) -> list[tuple[float, Any]]:
        """Every recorded version of ``name``'s metadata, as (time it took effect, metadata dict)."""

        def fn(conn):
            (entry,) = self._lookup(conn, [name])
            return query.read_metadata_history(conn, entry)

        return await self._run(fn)


class HistorianService(Historian):
    """The historian as a :class:`labctl.server.app.Service` of a :class:`labctl.server.app.Server`."""

    storage = True
    """Stopped after the instruments and every other service, so their last states are archived."""

    def __init__(self, server: Server) -> None:
        name = server.site.server.name or default_server_name()
        super().__init__(server.db, server.site.historian, server.state_dir, server_name=name)
