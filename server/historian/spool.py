"""Store-and-forward: batches the database could not take wait on disk, oldest first.

Theory of operation. While the historian's database is unreachable, each batch the
ingest thread would have written becomes one *segment* file under
``<state_dir>/spool/``. A segment is written to a temporary name, fsync'ed and renamed,
so it is either complete or absent -- a crash never leaves half a batch. Its name carries
a sequence number (the back-fill order) and its sample and event counts, so a restarted
server knows what is spooled without reading it::

    spool/000000000042-5000s-3e.json

When the database returns, segments are inserted oldest first, each in one transaction,
and a segment is deleted only *after* its transaction committed. A crash between the two
replays the segment on the next start; that is harmless because every row has a unique
key in the database (samples and alarm events ``(pv_id, time_us, seq)``, audit records
a ``uid`` made at capture) and is inserted ``ON CONFLICT DO NOTHING``. So a spooled
sample reaches the database exactly once, in time order, across restarts of labctl.

The spool is bounded (``historian.spool_max_mb``). When a new segment would not fit, the
policy is **keep the newest**: the oldest spooled *samples* are dropped first (their
segment is rewritten without them), so the archive ends up with one gap at the start of a
long outage and stays continuous up to the moment the database returns. Alarm and audit
events (and the control layer's job and alarm-state records) are kept as long as samples
can be dropped instead, and are dropped (oldest
first) only when the spool holds nothing else. Nothing goes silently: every drop is
counted (:attr:`Spool.dropped_samples`, :attr:`Spool.dropped_events`) and logged -- a
WARNING when the spool fills, a summary at most every minute while it stays full, and a
total when it has drained.

A segment the database refuses for a reason other than being away (a bug, bad data) is
moved to ``spool/rejected/`` with a ``.reason`` file, never retried forever and never
deleted: it is logged as an ERROR and counted in :attr:`Spool.rejected_segments`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labctl.server.historian.encoding import utc_text

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(\d{12})-(\d+)s-(\d+)e\.json$")
_FORMAT = "labctl-historian-spool"
#: Version 2 added the control records (jobs, alarm states); version 1 segments still read.
_VERSION = 2
_READABLE = frozenset({1, 2})
_RECORD_KEYS = ("jobs", "job_logs", "job_results", "alarm_states")
#: Seconds between summary log lines while the spool stays full.
SUMMARY_EVERY_S = 60.0


@dataclass
class Batch:
    """Rows captured from the database, ready to be written (or spooled).

    ``samples``: ``(name, time_us, seq, float_val, num_val, str_val, array_val, severity,
    status, received_us)``; ``alarms``: ``(name, time_us, seq, severity, status)``;
    ``audits``: ``(uid, time_us, action, user, protocol, host, target, old_json, new_json,
    accepted, reason)``; ``types``: the PV type (``PVType`` value) of every PV named.
    Control records (see :mod:`labctl.server.historian.records`): ``jobs`` (one row per saved job
    state), ``job_logs``, ``job_results`` and ``alarm_states``.
    """

    samples: list[tuple] = field(default_factory=list)
    alarms: list[tuple] = field(default_factory=list)
    audits: list[tuple] = field(default_factory=list)
    types: dict[str, str] = field(default_factory=dict)
    jobs: list[tuple] = field(default_factory=list)
    job_logs: list[tuple] = field(default_factory=list)
    job_results: list[tuple] = field(default_factory=list)
    alarm_states: list[tuple] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.samples or self.alarms or self.audits or self.records)

    @property
    def records(self) -> int:
        """Job and alarm-state rows."""
        return len(self.jobs) + len(self.job_logs) + len(self.job_results) + len(self.alarm_states)

    @property
    def events(self) -> int:
        """Alarm, audit, job and alarm-state rows (everything but samples)."""
        return len(self.alarms) + len(self.audits) + self.records

    def extend(self, other: Batch) -> None:
        """Append ``other``'s rows (it is later in time)."""
        self.samples.extend(other.samples)
        self.alarms.extend(other.alarms)
        self.audits.extend(other.audits)
        self.types.update(other.types)
        self.jobs.extend(other.jobs)
        self.job_logs.extend(other.job_logs)
        self.job_results.extend(other.job_results)
        self.alarm_states.extend(other.alarm_states)

    def encode(self) -> bytes:
        """The segment file content (JSON)."""
        doc = {
            "format": _FORMAT,
            "version": _VERSION,
            "types": self.types,
            "samples": self.samples,
            "alarms": self.alarms,
            "audits": self.audits,
        }
        for key in _RECORD_KEYS:
            rows = getattr(self, key)
            if rows:
                doc[key] = rows
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes, source: str = "segment") -> Batch:
        """Parse a segment file's content."""
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
            raise ValueError(f"{source}: not a labctl historian spool segment")
        if doc.get("version") not in _READABLE:
            raise ValueError(f"{source}: spool format version {doc.get('version')} is not one of {sorted(_READABLE)}")
        samples = [
            (r[0], r[1], r[2], r[3], r[4], r[5], None if r[6] is None else tuple(r[6]), r[7], r[8], r[9])
            for r in doc["samples"]
        ]
        batch = cls(samples, [tuple(r) for r in doc["alarms"]], [tuple(r) for r in doc["audits"]], dict(doc["types"]))
        for key in _RECORD_KEYS:
            getattr(batch, key).extend(tuple(r) for r in doc.get(key, ()))
        return batch


@dataclass(frozen=True)
class Segment:
    """One spooled batch on disk."""

    path: Path
    seq: int
    size: int
    samples: int
    events: int


class Spool:
    """A bounded on-disk queue of batches (see the module docstring). Used by one thread."""

    def __init__(self, directory: Path | str, max_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.dropped_samples = 0
        """Samples dropped to keep the spool within its bound (since this process started)."""
        self.dropped_events = 0
        """Alarm/audit events dropped because the spool held nothing else to drop."""
        self.rejected_segments = 0
        """Segments moved to ``rejected/`` because the database refused them."""
        self._episode_dropped = 0
        self._last_summary = 0.0
        self._summary_pending = 0
        self.directory.mkdir(parents=True, exist_ok=True)
        for tmp in self.directory.glob(".*.tmp"):  # a write cut short by a crash: never renamed, never counted
            tmp.unlink(missing_ok=True)
        self._segments: list[Segment] = []
        for p in self.directory.iterdir():
            m = _NAME.match(p.name)
            if m:
                self._segments.append(Segment(p, int(m[1]), p.stat().st_size, int(m[2]), int(m[3])))
        self._segments.sort(key=lambda s: s.seq)
        self._next = self._segments[-1].seq + 1 if self._segments else 1
        self._bytes = sum(s.size for s in self._segments)
        self._samples = sum(s.samples for s in self._segments)
        self._events = sum(s.events for s in self._segments)

    # ---- state ----------------------------------------------------------------------

    @property
    def empty(self) -> bool:
        """Nothing is spooled."""
        return not self._segments

    @property
    def bytes(self) -> int:
        """Bytes spooled."""
        return self._bytes

    @property
    def segments(self) -> int:
        """Segments spooled."""
        return len(self._segments)

    @property
    def samples(self) -> int:
        """Samples spooled."""
        return self._samples

    @property
    def events(self) -> int:
        """Alarm and audit events spooled."""
        return self._events

    # ---- writing ----------------------------------------------------------------------

    def append(self, batch: Batch) -> Segment:
        """Spool ``batch`` as the newest segment, first dropping the oldest samples if it would not fit.

        Raises:
            OSError: the segment could not be written (disk full, permissions).
        """
        data = batch.encode()
        self._make_room(len(data))
        seg = self._write(self._next, data, len(batch.samples), batch.events)
        self._next += 1
        self._add(seg)
        return seg

    def _write(self, seq: int, data: bytes, samples: int, events: int) -> Segment:
        path = self.directory / f"{seq:012d}-{samples}s-{events}e.json"
        tmp = self.directory / f".{path.name}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.directory)
        return Segment(path, seq, len(data), samples, events)

    def _make_room(self, incoming: int) -> None:
        if self._bytes + incoming <= self.max_bytes:
            return
        dropped: list[tuple] = []
        for seg in list(self._segments):
            if self._bytes + incoming <= self.max_bytes:
                break
            if seg.samples == 0:
                continue
            batch = self.read(seg)
            dropped.extend(batch.samples)
            batch.samples, batch.types = [], {}
            at = self._segments.index(seg)
            self._forget(seg)
            if batch:  # its events stay, in the segment's place
                kept = self._write(seg.seq, batch.encode(), 0, batch.events)
                self._add(kept, at=at)
        if dropped:
            self._log_dropped(dropped)
        while self._segments and self._bytes + incoming > self.max_bytes:
            seg = self._segments[0]
            self._forget(seg)
            self.dropped_events += seg.events
            log.error(
                "historian spool %s: full of alarm/audit events only; dropped the oldest %d events (%s) "
                "to make room -- the database has been away a long time; restore it or raise historian.spool_max_mb",
                self.directory, seg.events, seg.path.name,
            )
        if self._bytes + incoming > self.max_bytes:
            log.error(
                "historian spool %s: one batch of %d bytes is larger than the whole spool (%d bytes); "
                "spooling it anyway -- raise historian.spool_max_mb or lower historian.batch_size",
                self.directory, incoming, self.max_bytes,
            )

    def _log_dropped(self, rows: list[tuple]) -> None:
        n = len(rows)
        self.dropped_samples += n
        first = self._episode_dropped == 0
        self._episode_dropped += n
        now = time.monotonic()
        if first:
            t0 = min(r[1] for r in rows)
            t1 = max(r[1] for r in rows)
            log.warning(
                "historian spool %s is full (%.3g MB): dropping the oldest spooled samples to keep the newest "
                "(%d samples of %d PVs from %s to %s so far); raise historian.spool_max_mb to keep more",
                self.directory, self.max_bytes / 1e6, n, len({r[0] for r in rows}), utc_text(t0), utc_text(t1),
            )
            self._last_summary = now
        else:
            self._summary_pending += n
            if now - self._last_summary >= SUMMARY_EVERY_S:
                log.warning(
                    "historian spool %s still full: dropped %d more of the oldest samples (%d since it filled)",
                    self.directory, self._summary_pending, self._episode_dropped,
                )
                self._summary_pending = 0
                self._last_summary = now

    # ---- reading ----------------------------------------------------------------------

    def all(self) -> list[Segment]:
        """Every spooled segment, oldest first."""
        return list(self._segments)

    def oldest(self, max_samples: int) -> list[Segment]:
        """The oldest segments, together holding at most ``max_samples`` samples (at least one segment)."""
        out: list[Segment] = []
        total = 0
        for seg in self._segments:
            if out and total + seg.samples > max_samples:
                break
            out.append(seg)
            total += seg.samples
        return out

    def read(self, seg: Segment) -> Batch:
        """The batch stored in ``seg``."""
        return Batch.decode(seg.path.read_bytes(), str(seg.path))

    def remove(self, segments: list[Segment]) -> None:
        """Delete segments whose rows are committed to the database."""
        for seg in segments:
            self._forget(seg)
        if not self._segments and self._episode_dropped:
            log.warning(
                "historian spool %s drained; %d samples were dropped while it was full (the oldest ones)",
                self.directory, self._episode_dropped,
            )
            self._episode_dropped = 0
            self._summary_pending = 0

    def quarantine(self, seg: Segment, reason: str) -> Path:
        """Move a segment the database refused to ``rejected/``, with the reason beside it."""
        target_dir = self.directory / "rejected"
        target_dir.mkdir(exist_ok=True)
        target = target_dir / seg.path.name
        os.replace(seg.path, target)
        target.with_suffix(".reason").write_text(reason + "\n")
        self._forget(seg, unlink=False)
        self.rejected_segments += 1
        log.error(
            "historian: the database refused spooled batch %s (%d samples, %d events): %s; moved to %s for inspection",
            seg.path.name, seg.samples, seg.events, reason, target,
        )
        return target

    def quarantine_batch(self, batch: Batch, reason: str) -> Path:
        """Write a batch the database refused straight to ``rejected/`` (see :meth:`quarantine`)."""
        seg = self._write(self._next, batch.encode(), len(batch.samples), batch.events)
        self._next += 1
        self._add(seg)
        return self.quarantine(seg, reason)

    def _add(self, seg: Segment, at: int | None = None) -> None:
        if at is None:
            self._segments.append(seg)
        else:
            self._segments.insert(at, seg)
        self._bytes += seg.size
        self._samples += seg.samples
        self._events += seg.events

    def _forget(self, seg: Segment, unlink: bool = True) -> None:
        self._segments.remove(seg)
        self._bytes -= seg.size
        self._samples -= seg.samples
        self._events -= seg.events
        if unlink:
            seg.path.unlink(missing_ok=True)

    def stats(self) -> dict[str, Any]:
        """Counters for status displays and tests."""
        return {
            "spool_segments": self.segments,
            "spool_bytes": self.bytes,
            "spool_samples": self.samples,
            "spool_dropped_samples": self.dropped_samples,
            "spool_dropped_events": self.dropped_events,
            "spool_rejected_segments": self.rejected_segments,
        }


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
