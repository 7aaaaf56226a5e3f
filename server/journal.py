"""The audit journal: an audit record is on disk before the write it records is acknowledged.

Theory of operation. The historian archives audit records from an in-memory queue that its
ingest thread writes every ``historian.batch_age_s``; a ``kill -9`` loses what that queue
held. So every audit record also goes to this journal, an append-only file under
``<state_dir>/journal/``, and :meth:`labctl.ioc.database.Database.write` awaits the record's
fsync before it returns (the core sees only the :class:`labctl.ioc.access.AuditJournal`
protocol: ``append(record)`` returns an awaitable that resolves once the record is durable).

*On the event loop* :meth:`AuditJournal.append` serializes the record to one JSON line and
queues it with an ``asyncio`` future: no I/O. Every audit record of every action is
appended (lock grants, refusals, logins too), but only the write path waits for its future.

*On the journal thread* (one per journal) records are written by **group commit**: the
thread takes everything queued, writes it with one ``write`` and one ``fdatasync``, and
resolves the futures of the batch in one callback on the loop. Records queued while an
fsync runs form the next batch, so N concurrent writers cost about one fsync, not N. An
optional batching window (``window_s``, 0 by default) waits that long after the first
record of a batch for more; on this machine an fsync takes ~0.2 ms, so the window would add
latency to every lone write for no gain (``docs/decisions/audit-journal.md`` has the
figures). A failed fsync fails the futures of its batch (the write path then answers
"unavailable" rather than "accepted") and marks the journal :attr:`~AuditJournal.healthy`
False, so writes are refused before they reach an instrument until a later batch succeeds.

*Segments and truncation.* The journal is a sequence of segment files
``audit-<seq>.jsonl``. Every :data:`TRUNCATE_EVERY_S`, or once a segment exceeds
:data:`SEGMENT_MAX_BYTES`, the thread closes the current segment and opens the next
(:meth:`AuditJournal.rotate`); once the historian reports everything it was handed so far
in its database or its (fsynced) spool (:meth:`labctl.server.historian.Historian.flush`),
the closed segments are deleted. Every record in them had been handed to the historian
before the segment closed, because the database gives a record to the journal and to its
audit sinks in the same step of the loop.

*At start*, segments left by an earlier run (a crash, a kill -9, a stop with the historian
already gone) are read and every record is handed to the historian again; records carry
the ``uid`` the database gave them, which is the audit table's unique key, so a record
the historian already had is a no-op (``ON CONFLICT DO NOTHING``). A torn last line (a
record whose write was cut by the crash, so never acknowledged) is skipped. The segments
are deleted once the historian has flushed them.

The journal runs only beside the historian (it is the historian's audit trail that it
makes durable); without one, audit records go to the log only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labctl.ioc.access import AuditRecord

from labctl.supervision import Supervisor, supervise

if TYPE_CHECKING:
    from labctl.server.app import Server
    from labctl.server.historian.service import Historian

log = logging.getLogger(__name__)

#: Seconds between rotations of the current segment (then truncation once the historian has it).
TRUNCATE_EVERY_S = 5.0
#: A segment larger than this is rotated at once.
SEGMENT_MAX_BYTES = 8_000_000
#: The default batching window (seconds): 0, group commit forms batches while an fsync runs.
WINDOW_S = 0.0

_NAME = re.compile(r"^audit-(\d{12})\.jsonl$")
_KEYS = ("uid", "time", "action", "user", "protocol", "host", "target", "old", "new", "accepted", "reason")


def encode(record: AuditRecord) -> bytes:
    """One journal line for ``record`` (values JSON can not hold are kept as their ``repr``)."""
    return (
        json.dumps(
            [record.uid, record.time, record.action, record.user, record.protocol, record.host, record.target,
             record.old, record.new, record.accepted, record.reason],
            default=repr, separators=(",", ":"),
        ) + "\n"
    ).encode()  # fmt: skip


def decode(line: bytes) -> AuditRecord:
    """The record of one journal line (lists come back as tuples, as the historian returns them).

    Raises:
        ValueError: the line is not a journal record (a torn write).
    """
    fields = json.loads(line)
    if not isinstance(fields, list) or len(fields) != len(_KEYS):
        raise ValueError("not a journal record")
    uid, t, action, user, protocol, host, target, old, new, accepted, reason = fields
    return AuditRecord(
        float(t), action, user, protocol, host, target, _tuple(old), _tuple(new), bool(accepted), reason, uid=uid
    )


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


class AuditJournal:
    """An append-only, fsync'ed audit journal in one directory (see the module docstring)."""

    def __init__(self, directory: Path | str, *, window_s: float = WINDOW_S, segment_max_bytes: int = SEGMENT_MAX_BYTES) -> None:
        self.directory = Path(directory)
        self.window_s = window_s
        self.segment_max_bytes = segment_max_bytes
        self.healthy = True
        """False after a failed write or fsync, until a later batch succeeds (writes are refused meanwhile)."""
        self._cond = threading.Condition()
        self._queue: list[tuple[bytes, asyncio.Future[None]]] = []
        self._rotations: list[Callable[[list[Path]], None]] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd: int | None = None
        self._seq = 0
        self._size = 0
        self._closed: list[Path] = []
        # counters (written by the thread, read by anyone)
        self.records = 0
        self.batches = 0
        self.fsyncs_failed = 0

    # ---- lifecycle -----------------------------------------------------------------------

    def leftovers(self) -> list[tuple[Path, list[AuditRecord]]]:
        """Segments an earlier run left, oldest first, with their records (torn lines skipped). Blocking."""
        out = []
        for path in self._segments():
            records = []
            lines = path.read_bytes().split(b"\n")
            for i, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    records.append(decode(line))
                except (ValueError, TypeError) as e:
                    # Only the last line can be torn (written when the process died, never acknowledged).
                    level = logging.DEBUG if i >= len(lines) - 2 else logging.WARNING
                    log.log(level, "audit journal %s line %d unreadable (%s); skipped", path.name, i + 1, e)
            out.append((path, records))
        return out

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        """Open a new segment after any existing one and start the thread. Blocking."""
        self.directory.mkdir(parents=True, exist_ok=True)
        existing = self._segments()
        self._seq = int(_NAME.match(existing[-1].name).group(1)) if existing else 0  # type: ignore[union-attr]
        self._open_next()
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="audit-journal", daemon=True)
        self._thread.start()

    def close(self) -> list[Path]:
        """Write what is queued, stop the thread, close the segment; return every segment closed so far. Blocking."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._fd is not None:
            os.close(self._fd)
            self._closed.append(self._path(self._seq))
            self._fd = None
        closed, self._closed = self._closed, []
        return closed

    # ---- the loop side -------------------------------------------------------------------

    def append(self, record: AuditRecord) -> asyncio.Future[None]:
        """Queue ``record``; the future resolves once it is on disk (or fails with the OSError that kept it off)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        line = encode(record)
        with self._cond:
            if self._stopping or self._thread is None:
                fut.set_exception(OSError("the audit journal is closed"))
                fut.exception()  # retrieved (see _settle)
                return fut
            self._queue.append((line, fut))
            if len(self._queue) == 1:
                self._cond.notify()
        return fut

    async def rotate(self) -> list[Path]:
        """Close the current segment, open the next; return the segments closed since the last call."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[Path]] = loop.create_future()

        def deliver(paths: list[Path]) -> None:
            loop.call_soon_threadsafe(_settle_value, done, paths)

        with self._cond:
            if self._thread is None or self._stopping:
                return []
            self._rotations.append(deliver)
            self._cond.notify()
        return await done

    @property
    def size(self) -> int:
        """Bytes in the current segment."""
        return self._size

    # ---- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._rotations and not self._stopping:
                    self._cond.wait()
                stopping = self._stopping
            if self.window_s > 0 and not stopping:
                time.sleep(self.window_s)  # the batching window: more records join this batch
            with self._cond:
                batch, self._queue = self._queue, []
                rotations, self._rotations = self._rotations, []
            if batch:
                self._commit(batch)
            if rotations or self._size >= self.segment_max_bytes:
                closed = self._rotate()
                for deliver in rotations:
                    deliver(closed)
            if stopping:
                with self._cond:
                    if not self._queue:
                        return

    def _commit(self, batch: list[tuple[bytes, asyncio.Future[None]]]) -> None:
        data = b"".join(line for line, _ in batch)
        error: OSError | None = None
        try:
            if self._fd is None:
                self._open_next()
            assert self._fd is not None
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fdatasync(self._fd)
            self._size += len(data)
        except OSError as e:
            error = e
            self.fsyncs_failed += 1
            if self.healthy:
                log.error("audit journal %s: cannot write (%s); writes are refused until it can", self.directory, e)
            self.healthy = False
            self._drop_fd()  # a segment that failed an fsync is not trusted: the next batch opens another
        else:
            if not self.healthy:
                log.warning("audit journal %s: writing again", self.directory)
            self.healthy = True
            self.records += len(batch)
            self.batches += 1
        assert self._loop is not None
        futures = [f for _, f in batch]
        try:
            self._loop.call_soon_threadsafe(_settle, futures, error)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    def _rotate(self) -> list[Path]:
        if self._fd is not None and self._size > 0:
            self._drop_fd()
            try:
                self._open_next()
            except OSError as e:
                log.error("audit journal %s: cannot open a new segment (%s)", self.directory, e)
        closed, self._closed = self._closed, []
        return closed

    def _drop_fd(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._closed.append(self._path(self._seq))
            self._fd = None

    def _open_next(self) -> None:
        self._seq += 1
        self._fd = os.open(self._path(self._seq), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = 0
        _fsync_dir(self.directory)  # the new name survives a crash too

    def _path(self, seq: int) -> Path:
        return self.directory / f"audit-{seq:012d}.jsonl"

    def _segments(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if _NAME.match(p.name))


def _settle(futures: list[asyncio.Future[None]], error: OSError | None) -> None:
    for fut in futures:
        if fut.done():  # its waiter was cancelled
            continue
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)
            fut.exception()  # retrieved: only the write path awaits these; the others must not log "never retrieved"


def _settle_value(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(paths: list[Path]) -> None:
    """Delete journal segments (the historian has their records)."""
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


class AuditJournalService:
    """The journal as a :class:`labctl.server.app.Service`: replays leftovers, then journals every audit record."""

    name = "journal"
    storage = True
    """Stopped after the protocols and the instruments (their last records are journaled), before the historian."""

    def __init__(self, server: Server, historian: Historian, *, window_s: float = WINDOW_S) -> None:
        self.db = server.db
        self.historian = historian
        self.journal = AuditJournal(Path(server.state_dir) / "journal", window_s=window_s)
        self._truncator: Supervisor | None = None

    async def start(self) -> None:
        """Hand an earlier run's records to the historian, open the journal, attach it to the database."""
        leftovers = await asyncio.to_thread(self.journal.leftovers)
        if leftovers:
            count = sum(len(r) for _, r in leftovers)
            log.info("audit journal: %d records in %d segments from an earlier run handed to the historian", count, len(leftovers))
            for _, records in leftovers:
                for record in records:
                    self.historian.archive_audit(record)
            await self.historian.flush()
            await asyncio.to_thread(remove, [p for p, _ in leftovers])
        await asyncio.to_thread(self.journal.open, asyncio.get_running_loop())
        self.db.journal = self.journal
        self._truncator = supervise("audit journal truncation", self._truncate_periodically)

    async def stop(self) -> None:
        """Detach, write what is queued, and delete the segments once the historian has them."""
        if self.db.journal is self.journal:
            self.db.journal = None
        if self._truncator is not None:
            await self._truncator.stop()
            self._truncator = None
        closed = await asyncio.to_thread(self.journal.close)
        await self._truncate(closed)

    async def _truncate_periodically(self) -> None:
        while True:
            await asyncio.sleep(TRUNCATE_EVERY_S)
            await self._truncate(await self.journal.rotate())

    async def _truncate(self, closed: list[Path]) -> None:
        if not closed:
            return
        if self.historian.ingestor is None:  # the historian is gone: keep them for the next start
            return
        await self.historian.flush()  # in its database or its spool, both durable
        await asyncio.to_thread(remove, closed)

    def endpoints(self) -> list[str]:
        """Nothing to connect to (the journal's directory is listed in the banner of the historian's state dir)."""
        return []

    def stats(self) -> dict[str, Any]:
        """Counters for status displays and tests."""
        j = self.journal
        return {"records": j.records, "batches": j.batches, "fsyncs_failed": j.fsyncs_failed, "healthy": j.healthy}
