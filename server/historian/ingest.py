"""Ingest: from database updates to committed rows, off the event loop, never losing one.

Theory of operation.

*On the event loop* the historian's one subscription (``EventMask.LOG``: updates that
passed the archive deadband, which include every alarm-state change) calls
:meth:`Ingestor.put`. That turns the update into a plain tuple (:class:`Capture`) and
appends it to a ``collections.deque`` -- a few microseconds, no I/O, no lock (deque
appends and pops are atomic), so archiving never slows a scan or a protocol server.
When the deque reaches ``batch_size`` rows the worker is woken.

*On the worker thread* (one per historian) a cycle runs at least every ``batch_age_s``:
it takes everything queued, writes it as one batch in one transaction, and then, if the
spool holds batches from an outage and the database is reachable, back-fills some of
them. Writing a batch means:

1. PV names -> catalogue ids (PVs only known from an old spool are catalogued first);
2. samples: PostgreSQL gets them by ``COPY ... FROM STDIN (FORMAT BINARY)`` straight
   into ``sample``; should that hit an existing key (only a replay can), the batch goes
   through a temporary staging table and ``INSERT ... ON CONFLICT DO NOTHING``. SQLite
   gets an ``executemany`` of ``INSERT ... ON CONFLICT DO NOTHING``;
3. the rollup cells of the new samples (see :mod:`labctl.server.historian.rollup`), exactly;
4. alarm transitions and audit records, ``ON CONFLICT DO NOTHING``;
5. control records -- job states, job log lines and results, alarm states -- as
   :mod:`labctl.server.historian.records` describes (upserts of the newest state, idempotent
   inserts of the rest).

The database state is a small machine: **up** (batches go to the database while the
spool is empty), **down** (every batch goes to the spool; reconnection is tried with
backoff from 0.5 s to 5 s). While the spool is not empty new batches are appended to it
too, so the database receives every PV's samples in time order. A batch the database
refuses for another reason than being away is quarantined by the spool (see
:mod:`labctl.server.historian.spool`). On reconnection the schema is checked/upgraded and the
catalogue registered again, because the database may be a new one.

:meth:`Ingestor.flush` returns a future that resolves once everything queued before it is
in the database or the spool (``True``: in the database and the spool is empty).
:meth:`Ingestor.stop` runs a last cycle: nothing queued is lost on a clean stop; what the
database cannot take stays in the spool for the next start.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

from labctl.ioc.access import AuditRecord
from labctl.ioc.pv import PVInfo
from labctl.ioc.types import PVType, Reading
from labctl.server.archive import HistorianError
from labctl.server.historian import records, rollup, timescale
from labctl.server.historian.backend import Backend, is_unreachable, short
from labctl.server.historian.catalogue import ensure_pvs, register_catalogue
from labctl.server.historian.encoding import encode_value, pack_array, utc_text
from labctl.server.historian.schema import (
    SAMPLE_COLUMNS,
    alarm_event,
    audit_event,
    ensure_schema,
    insert,
    pv,
    sample,
    sample_rollup,
)
from labctl.server.historian.spool import Batch, Spool
from sqlalchemy import delete, select, text
from sqlalchemy.engine import Connection

from labctl.backoff import Backoff

log = logging.getLogger(__name__)

#: Reconnection backoff (seconds): first wait, and the longest.
RETRY_MIN_S = 0.5
RETRY_MAX_S = 5.0
#: How often retention runs (seconds) when ``retention_days`` is set.
RETENTION_EVERY_S = 3600.0
#: Samples back-filled per cycle (in units of batch_size) before queued live rows are taken again.
BACKFILL_BATCHES_PER_CYCLE = 20
#: Spool segments merged into one back-fill transaction (in units of batch_size samples).
BACKFILL_MERGE_BATCHES = 4

_PG_SAMPLE_TYPES = ["int4", "int8", "int2", "float8", "int8", "text", "float8[]", "int2", "int2", "int8", "int8"]
_DOWN = "down"


def now_us() -> int:
    """Wall-clock time in integer microseconds."""
    return time.time_ns() // 1000


class Capture:
    """Turns updates and audit records into row tuples; runs on the event loop, so it is cheap."""

    def __init__(self, infos: Iterable[PVInfo]) -> None:
        self.types: dict[str, PVType] = {i.name: i.type for i in infos}
        self._last: dict[str, tuple[int, int]] = {}

    def sample(self, name: str, reading: Reading, received_us: int) -> tuple:
        """A sample row; ``seq`` counts updates of one PV within the same microsecond."""
        t = round(reading.timestamp * 1_000_000)
        last = self._last.get(name)
        seq = last[1] + 1 if last is not None and last[0] == t else 0
        self._last[name] = (t, seq)
        f, n, s, a = encode_value(self.types[name], reading.value)
        return (name, t, seq, f, n, s, a, int(reading.severity), int(reading.status), received_us)

    @staticmethod
    def alarm(row: tuple) -> tuple:
        """The alarm-transition row of a sample row."""
        return (row[0], row[1], row[2], row[7], row[8])

    @staticmethod
    def audit(record: AuditRecord) -> tuple:
        """An audit row keyed by the record's ``uid`` (a fresh one if it has none), which makes replays no-ops."""
        return (
            record.uid or uuid.uuid4().hex,
            round(record.time * 1_000_000),
            record.action,
            record.user,
            record.protocol,
            record.host,
            record.target,
            _json(record.old),
            _json(record.new),
            bool(record.accepted),
            record.reason,
        )


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, default=repr)


# ---- writing one batch --------------------------------------------------------------------


@dataclass
class WriteResult:
    """What one batch did to the database."""

    inserted: int
    duplicates: int
    new_ids: dict[str, int] = field(default_factory=dict)


def write_batch(conn: Connection, backend: Backend, ids: dict[str, int], batch: Batch, *, replay: bool) -> WriteResult:
    """Write ``batch`` in the caller's transaction (see the module docstring)."""
    kind = backend.kind
    stamp = now_us()
    names = {r[0] for r in batch.samples} | {r[0] for r in batch.alarms}
    missing = {n: batch.types.get(n, "") for n in names if n not in ids}
    new_ids = ensure_pvs(conn, kind, missing, stamp) if missing else {}
    lookup = {**ids, **new_ids} if new_ids else ids
    rows = [(lookup[r[0]], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], stamp) for r in batch.samples]
    inserted = 0
    if rows:
        inserted = _insert_pg(conn, rows, replay) if kind == "postgresql" else _insert_sqlite(conn, rows)
        rollup.maintain(conn, kind, rollup.valid_numeric(rows), exact=inserted == len(rows))
    if batch.alarms:
        conn.execute(
            insert(kind, alarm_event).on_conflict_do_nothing(),
            [{"pv_id": lookup[a[0]], "time_us": a[1], "seq": a[2], "severity": a[3], "status": a[4]} for a in batch.alarms],
        )
    if batch.audits:
        keys = ("uid", "time_us", "action", "user_name", "protocol", "host", "target", "old_value", "new_value", "accepted", "reason")
        conn.execute(
            insert(kind, audit_event).on_conflict_do_nothing(index_elements=["uid"]),
            [{**dict(zip(keys, a, strict=True)), "inserted_us": stamp} for a in batch.audits],
        )
    if batch.records:
        records.write(conn, kind, batch.jobs, batch.job_logs, batch.job_results, batch.alarm_states)
    return WriteResult(inserted, len(rows) - inserted, new_ids)


_COLS = ", ".join(SAMPLE_COLUMNS)


def _insert_sqlite(conn: Connection, rows: list[tuple]) -> int:
    rows = [r if r[6] is None else (*r[:6], pack_array(r[6]), *r[7:]) for r in rows]
    marks = ", ".join("?" * len(SAMPLE_COLUMNS))
    result = conn.exec_driver_sql(f"INSERT INTO sample ({_COLS}) VALUES ({marks}) ON CONFLICT DO NOTHING", rows)
    return result.rowcount


def _copy(conn: Connection, table: str, rows: list[tuple]) -> None:
    raw = conn.connection.driver_connection
    with raw.cursor() as cur, cur.copy(f"COPY {table} ({_COLS}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(_PG_SAMPLE_TYPES)
        for r in rows:
            copy.write_row(r)


def _insert_pg(conn: Connection, rows: list[tuple], replay: bool) -> int:
    import psycopg  # the postgres extra; only a PostgreSQL historian gets here

    rows = [r if r[6] is None else (*r[:6], list(r[6]), *r[7:]) for r in rows]
    if not replay:
        nested = conn.begin_nested()
        try:
            _copy(conn, "sample", rows)
        except psycopg.errors.UniqueViolation:
            nested.rollback()  # some rows are archived already: go the idempotent way
        else:
            nested.commit()
            return len(rows)
    conn.execute(text("CREATE TEMP TABLE IF NOT EXISTS labctl_staging (LIKE sample INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"))
    conn.execute(text("TRUNCATE labctl_staging"))
    _copy(conn, "labctl_staging", rows)
    result = conn.execute(text(f"INSERT INTO sample ({_COLS}) SELECT {_COLS} FROM labctl_staging ON CONFLICT DO NOTHING"))
    return result.rowcount


def apply_retention(conn: Connection, backend: Backend, cutoff_us: int) -> None:
    """Delete samples and rollup cells older than ``cutoff_us`` (events are kept)."""
    if backend.timescale.enabled:
        if not timescale.retention_by_policy(backend.timescale):
            timescale.drop_chunks(conn, cutoff_us)
    else:
        # Per PV, so each delete is a range of the primary key rather than a full scan.
        for pv_id in conn.execute(select(pv.c.id)).scalars():
            conn.execute(delete(sample).where(sample.c.pv_id == pv_id, sample.c.time_us < cutoff_us))
    conn.execute(delete(sample_rollup).where(sample_rollup.c.start_us < cutoff_us - max(rollup.WIDTHS_S) * 1_000_000))


# ---- the worker -------------------------------------------------------------------------------


class Ingestor:
    """Queues rows on the loop and writes them from one worker thread (see the module docstring)."""

    def __init__(
        self,
        backend: Backend,
        spool: Spool,
        infos: Iterable[PVInfo],
        *,
        batch_size: int,
        batch_age_s: float,
        retention_days: float | None = None,
        max_pending: int | None = None,
    ) -> None:
        self.backend = backend
        self.spool = spool
        self.infos = list(infos)
        self.capture = Capture(self.infos)
        self.batch_size = batch_size
        self.batch_age_s = batch_age_s
        self.retention_days = retention_days
        self.max_pending = max_pending or max(100 * batch_size, 100_000)
        self._samples: deque[tuple] = deque()
        self._alarms: deque[tuple] = deque()
        self._audits: deque[tuple] = deque()
        self._records: deque[tuple[str, tuple]] = deque()
        self._flushes: deque[Future[bool]] = deque()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._ids: dict[str, int] = {}
        self._up = False
        self._backoff = Backoff(RETRY_MIN_S, RETRY_MAX_S)
        self._retry_at = 0.0
        self._next_retention = 0.0
        self._last_error = ""
        self._last_loss_log = 0.0
        self._backfilling = False
        self._prepared = False
        # counters (written by one thread, read by any: ints under the GIL)
        self.received = 0
        self.written = 0
        self.duplicates = 0
        self.spooled = 0
        self.backfilled = 0
        self.lost = 0
        self.overflowed = 0
        self.outages = 0
        self._backfill_started = (0.0, 0)

    # ---- loop side -------------------------------------------------------------------

    def put(self, name: str, reading: Reading, alarm: bool = False) -> None:
        """Queue one update (the subscription callback; never blocks)."""
        if len(self._samples) >= self.max_pending:
            try:
                self._samples.popleft()  # keep the newest, as the spool does
            except IndexError:  # the worker took them all meanwhile
                pass
            else:
                self._lose(1)
        row = self.capture.sample(name, reading, now_us())
        self._samples.append(row)
        if alarm:
            self._alarms.append(Capture.alarm(row))
        self.received += 1
        if len(self._samples) >= self.batch_size and not self._wake.is_set():
            self._wake.set()

    def put_audit(self, record: AuditRecord) -> None:
        """Queue one audit record (the audit sink; never blocks)."""
        self._audits.append(Capture.audit(record))

    def put_record(self, kind: str, row: tuple) -> None:
        """Queue one control record (never blocks); ``kind`` names its :class:`Batch` list
        (``jobs``, ``job_logs``, ``job_results``, ``alarm_states``)."""
        self._records.append((kind, row))

    def flush(self) -> Future[bool]:
        """A future resolved once everything queued so far is in the database or the spool.

        Its result is True when everything is in the database (the spool is empty).
        """
        fut: Future[bool] = Future()
        if self._thread is None or not self._thread.is_alive():
            fut.set_result(self._up and self.spool.empty and not self._samples)
            return fut
        self._flushes.append(fut)
        self._wake.set()
        return fut

    def _lose(self, n: int) -> None:
        self.overflowed += n
        now = time.monotonic()
        if now - self._last_loss_log > 60:
            self._last_loss_log = now
            log.error(
                "historian: %d samples lost so far: the ingest thread is %d rows behind (the database is slow "
                "or hangs); the oldest queued updates are being dropped", self.overflowed, len(self._samples),
            )

    @property
    def up(self) -> bool:
        """The database took the last batch (or the last reconnection succeeded)."""
        return self._up

    @property
    def pending(self) -> int:
        """Rows queued on the loop side, not yet taken by the worker."""
        return len(self._samples) + len(self._alarms) + len(self._audits) + len(self._records)

    def stats(self) -> dict[str, Any]:
        """Counters for status displays and tests."""
        return {
            "database_up": self._up,
            "received": self.received,
            "written": self.written,
            "duplicates": self.duplicates,
            "spooled": self.spooled,
            "backfilled": self.backfilled,
            "lost": self.lost + self.overflowed,
            "outages": self.outages,
            "pending": self.pending,
            "last_error": self._last_error,
            **self.spool.stats(),
        }

    # ---- lifecycle (called from the loop through a thread) ------------------------------

    def connect(self) -> bool:
        """First connection, before the worker starts: True if the database is reachable.

        Raises:
            HistorianError: the database is reachable but refuses the schema (too new,
                no privilege to create tables...): a configuration problem, not an outage.
        """
        try:
            self._prepare()
        except HistorianError:
            raise
        except Exception as e:
            if not is_unreachable(e):
                raise HistorianError(
                    f"historian database {self.backend.display_url}: cannot prepare the schema: {short(e)}"
                ) from e
            self._last_error = short(e)
            self.outages += 1
            self._retry_at = time.monotonic() + self._backoff.next()
            log.warning(
                "historian database %s unreachable (%s); archiving to the spool %s until it is back",
                self.backend.display_url, self._last_error, self.spool.directory,
            )
            return False
        return True

    def start(self) -> None:
        """Start the worker thread."""
        self._thread = threading.Thread(target=self._run, name="historian-ingest", daemon=True)
        self._wake.set()  # the first cycle at once: baselines, back-fill of an earlier spool, retention
        self._thread.start()

    def stop(self) -> None:
        """Write (or spool) everything queued and end the worker. Blocks: call from a thread."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    # ---- worker ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            if not (self._up and not self.spool.empty) and not self._stopping.is_set():
                self._wake.wait(self.batch_age_s)
            self._wake.clear()
            stopping = self._stopping.is_set()
            flushes = []
            while self._flushes:
                flushes.append(self._flushes.popleft())
            try:
                batch = self._drain()
                if batch:
                    self._store(batch)
                if not self._up and not stopping and time.monotonic() >= self._retry_at:
                    self._reconnect()
                if self._up and not self.spool.empty:
                    self._backfill(self.batch_size * BACKFILL_BATCHES_PER_CYCLE)
                if self._up and self.retention_days and time.monotonic() >= self._next_retention:
                    self._retention()
            except Exception:  # the boundary for bugs: report once, keep archiving
                log.exception("historian ingest: unexpected error")
            done = self._up and self.spool.empty
            for fut in flushes:
                try:
                    fut.set_result(done)
                except InvalidStateError:  # its waiter was cancelled meanwhile
                    pass
            if stopping:
                break

    def _drain(self) -> Batch:
        batch = Batch()
        for q, out in ((self._samples, batch.samples), (self._alarms, batch.alarms), (self._audits, batch.audits)):
            for _ in range(len(q)):  # only what is there now; the loop may keep appending
                out.append(q.popleft())
        for _ in range(len(self._records)):
            kind, row = self._records.popleft()
            getattr(batch, kind).append(row)
        return batch

    def _with_types(self, batch: Batch) -> Batch:
        types = self.capture.types
        batch.types.update({n: types[n].value for n in {r[0] for r in batch.samples} if n in types})
        return batch

    def _store(self, batch: Batch) -> None:
        if self._up and self.spool.empty:
            outcome = self._write(batch, replay=False)
            if outcome is None:
                return
            if outcome != _DOWN:
                self.spool.quarantine_batch(self._with_types(batch), outcome)
                return
        try:
            self.spool.append(self._with_types(batch))
            self.spooled += len(batch.samples)
        except OSError as e:
            self.lost += len(batch.samples)
            log.error(
                "historian: cannot write the spool %s (%s): %d samples and %d events of this batch are lost",
                self.spool.directory, e, len(batch.samples), batch.events,
            )

    def _write(self, batch: Batch, *, replay: bool) -> str | None:
        """None when committed; ``_DOWN`` when the database is away; else why it refused the batch."""
        try:
            with self.backend.engine.begin() as conn:
                result = write_batch(conn, self.backend, self._ids, batch, replay=replay)
        except Exception as e:
            if is_unreachable(e):
                self._mark_down(e)
                return _DOWN
            log.debug("historian batch refused", exc_info=True)
            return f"{type(e).__name__}: {short(e)}"
        self._ids.update(result.new_ids)
        self.written += result.inserted
        self.duplicates += result.duplicates
        return None

    def _mark_down(self, e: BaseException) -> None:
        self._last_error = short(e)
        if self._up:
            self.outages += 1
            log.warning(
                "historian database %s unreachable (%s); archiving to the spool %s until it is back",
                self.backend.display_url, self._last_error, self.spool.directory,
            )
        self._up = False
        self._backoff.reset()
        self._retry_at = time.monotonic() + self._backoff.next()
        self.backend.engine.dispose()  # drop pooled connections to the server that went away

    def _reconnect(self) -> None:
        try:
            self._prepare()
        except Exception as e:
            message = short(e)
            if not is_unreachable(e) and message != self._last_error:
                log.error("historian database %s: cannot prepare the schema: %s; will retry", self.backend.display_url, message)
            self._last_error = message
            self._retry_at = time.monotonic() + self._backoff.next()
            return
        spooled = self.spool.samples
        log.info(
            "historian database %s reachable again%s",
            self.backend.display_url, f"; back-filling {spooled} spooled samples" if not self.spool.empty else "",
        )

    def _prepare(self) -> None:
        stamp = now_us()
        backend = self.backend
        # Two transactions: the schema's holds the advisory lock that serialises several
        # servers' migrations; registering this server's PVs does not need it (names that
        # exist are skipped, and a site's servers register disjoint sets), so the servers of
        # a site starting at once no longer register their catalogues one after another.
        with backend.engine.begin() as conn:
            if backend.kind == "postgresql":
                backend.timescale = timescale.detect(conn)
            found, version = ensure_schema(conn, backend.kind, stamp)
            if backend.kind == "postgresql":
                timescale.configure(conn, backend.timescale, self.retention_days, announce=not self._prepared)
        with backend.engine.begin() as conn:
            ids = register_catalogue(conn, backend.kind, self.infos, stamp)
        if found != version:
            log.info(
                "historian: %s schema version %d in %s (%s)",
                "created" if found == 0 else f"upgraded from version {found} to", version,
                backend.display_url, backend.describe(),
            )
        self._ids = ids
        self._up = True
        self._prepared = True
        self._backoff.reset()
        self._last_error = ""

    def _backfill(self, budget: int) -> None:
        done = 0
        while self._up and not self.spool.empty and done < budget:
            if not self._backfilling:
                self._backfilling = True
                self._backfill_started = (time.monotonic(), self.spool.samples)
            segments = self.spool.oldest(self.batch_size * BACKFILL_MERGE_BATCHES)
            batch = Batch()
            readable = []
            for seg in segments:
                try:
                    batch.extend(self.spool.read(seg))
                    readable.append(seg)
                except (OSError, ValueError) as e:
                    self.spool.quarantine(seg, f"unreadable segment: {e}")
            if not readable:
                continue
            outcome = self._write(batch, replay=True)
            if outcome is None:
                self.spool.remove(readable)
                self.backfilled += len(batch.samples)
                done += len(batch.samples)
            elif outcome == _DOWN:
                return
            elif len(readable) > 1:
                # Find the segment the database refuses: write them one at a time.
                for seg in readable:
                    one = self._write(self.spool.read(seg), replay=True)
                    if one is None:
                        self.spool.remove([seg])
                        self.backfilled += seg.samples
                    elif one == _DOWN:
                        return
                    else:
                        self.spool.quarantine(seg, one)
            else:
                self.spool.quarantine(readable[0], outcome)
        if self.spool.empty and self._backfilling:
            self._backfilling = False
            started, count = self._backfill_started
            log.info(
                "historian: back-fill complete (%d spooled samples in %.1f s)", count, time.monotonic() - started
            )

    def _retention(self) -> None:
        assert self.retention_days is not None
        cutoff = now_us() - round(self.retention_days * 86_400e6)
        try:
            with self.backend.engine.begin() as conn:
                apply_retention(conn, self.backend, cutoff)
        except Exception as e:
            if is_unreachable(e):
                self._mark_down(e)
                return
            log.error("historian: retention (dropping samples before %s) failed: %s", utc_text(cutoff), short(e))
        self._next_retention = time.monotonic() + RETENTION_EVERY_S
