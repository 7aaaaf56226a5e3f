"""Reading the archive: raw ranges, last values, downsampled buckets -- alike on every backend.

Theory of operation. Every function takes an open connection and the :class:`Backend`,
and works in integer microseconds; :class:`labctl.server.historian.service.Historian` wraps them
in an async API with float seconds and runs them on worker threads.

* **Raw** reads return :class:`labctl.ioc.types.Reading` s in ``[start, end)``, ordered by time
  (then ``seq``), forward or reverse, at most ``limit`` per page. A page that stops
  early carries an opaque continuation string: the key of its last row, so the next
  page resumes with a keyset condition -- stateless, stable while rows are added, cheap
  at any depth.
* **Last value** (at or before a time) is one index probe per PV: a ``LATERAL`` join on
  PostgreSQL, a prepared probe per PV on SQLite -- never ``DISTINCT ON``, which reads every
  row of every PV.
* **Processed** reads split ``[start, end)`` into buckets ``start + k*interval`` (the last
  one cut at ``end``) and give each the count, min, max, mean, first and last of its valid
  numeric samples (see :mod:`labctl.server.historian.rollup`), as OPC UA's Count, Minimum,
  Maximum, Average, Start and End aggregates do. Rollup cells (60 s) that lie wholly
  inside one bucket are summed from ``sample_rollup``; raw rows are read only for the edges
  and for the cells that straddle a bucket boundary -- none when ``start`` and ``interval``
  are whole minutes, one cell per boundary otherwise. Intervals under 4 minutes that are
  not whole minutes read raw rows only. Raw rows are grouped in SQL (``time_bucket`` on
  TimescaleDB, integer arithmetic elsewhere: the same buckets), each bucket's first and
  last sample found by a primary-key probe, so every backend gives the same numbers; a
  mean may differ between them in the last bits of a double, as their sums add in
  different orders.
* **Held values** (``held=True`` on a processed read; see :class:`labctl.server.archive.Bucket`):
  a value holds until the PV's next sample. The value in force at the read's start is one
  probe (the last sample at or before it, whatever its severity); from there the raw rows
  of the range are walked once, in time order, in Python: each bucket gets the value in
  force at its start, the mean weighted by how long each valid value held, the valid time,
  and its quality (INVALID only where the PV had no valid value in the whole bucket). The
  walk is plain arithmetic over the same rows on every backend, so SQLite, PostgreSQL and
  TimescaleDB give bit-identical held values and time-weighted means. It reads every raw
  row of the range (rollup cells hold no durations): cheap for plots and the last hours,
  about as slow as a raw read for a month of 1 Hz data.
* **Bounds** on a raw read (``bounds=True``, forward, first page): the value in force at
  the start (the last sample before it) comes first, with its own time, so a PV that did
  not change in the range still shows the value it had.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from labctl.ioc.access import AuditRecord
from labctl.ioc.errors import UnknownPV
from labctl.ioc.types import PVType, Reading, Severity, Status
from labctl.server.archive import Bucket, HistorianError
from labctl.server.historian.backend import Backend
from labctl.server.historian.encoding import AGGREGATABLE, from_us, numeric_value, value_decoder
from labctl.server.historian.rollup import INVALID, WIDTHS_S, Aggregate
from labctl.server.historian.schema import alarm_event, audit_event, pv, pv_meta, sample
from labctl.server.historian.timescale import bucket_sql
from sqlalchemy import bindparam, select, text, tuple_
from sqlalchemy.engine import Connection

#: The most buckets one processed read may ask for (per PV).
MAX_BUCKETS = 1_000_000
_CHUNK = 500  # values per IN list (SQLite binds each as a parameter)
_ARRAY_CHUNK = 20_000  # values per array parameter (PostgreSQL)


@dataclass(frozen=True, slots=True)
class Entry:
    """A catalogue entry: the PV's id in the database, its name and type."""

    id: int
    name: str
    type: PVType


@dataclass(frozen=True, slots=True)
class RawPage:
    """One page of a raw read."""

    readings: list[Reading]
    continuation: str | None = None
    """Pass back to get the next page; None when the range is exhausted."""


def catalogue(conn: Connection, names: Iterable[str], cache: dict[str, Entry]) -> list[Entry]:
    """Entries for ``names`` (in order), filling ``cache``; raises UnknownPV for a name never archived."""
    names = list(names)
    missing = [n for n in dict.fromkeys(names) if n not in cache]
    for i in range(0, len(missing), _CHUNK):
        rows = conn.execute(select(pv.c.id, pv.c.name, pv.c.type).where(pv.c.name.in_(missing[i : i + _CHUNK]))).all()
        for r in rows:
            try:
                t = PVType(r.type)
            except ValueError:
                t = PVType.FLOAT64  # catalogued from an old spool without a type: numbers are the common case
            cache[r.name] = Entry(r.id, r.name, t)
    for n in names:
        if n not in cache:
            raise UnknownPV(n)
    return [cache[n] for n in names]


# ---- raw ------------------------------------------------------------------------------------

_RAW_COLS = (sample.c.time_us, sample.c.seq, sample.c.float_val, sample.c.num_val, sample.c.str_val,
             sample.c.array_val, sample.c.severity, sample.c.status)


_SEVERITY = {int(v): v for v in Severity}
_STATUS = {int(v): v for v in Status}


def _reading(entry: Entry, r) -> Reading:
    return _readings(entry, [r])[0]


def _readings(entry: Entry, rows) -> list[Reading]:
    """Readings from rows of :data:`_RAW_COLS` (tuple unpacking and table lookups: the hot loop
    of long raw reads)."""
    decode = value_decoder(entry.type)
    sev, sta = _SEVERITY, _STATUS
    return [
        Reading(decode(f, n, s, a), t / 1_000_000, sev[v], sta[st])
        for t, _seq, f, n, s, a, v, st in rows
    ]


def encode_continuation(time_us: int, seq: int) -> str:
    """The continuation string after the row keyed ``(time_us, seq)``."""
    return f"{time_us}:{seq}"


def decode_continuation(token: str) -> tuple[int, int]:
    """Inverse of :func:`encode_continuation`; HistorianError if it was not made by it."""
    try:
        t, s = token.split(":")
        return int(t), int(s)
    except (ValueError, AttributeError):
        raise HistorianError(f"not a historian continuation point: {token!r}") from None


def read_raw(
    conn: Connection,
    entry: Entry,
    start_us: int,
    end_us: int,
    *,
    limit: int | None = None,
    continuation: str | None = None,
    reverse: bool = False,
    bounds: bool = False,
) -> RawPage:
    """Samples of one PV in ``[start_us, end_us)``; see the module docstring.

    ``bounds``: a forward read's first page starts with the value in force at
    ``start_us`` (the last sample before it), unless a sample lies exactly at ``start_us``.
    """
    if limit is not None and limit <= 0:
        raise HistorianError(f"limit must be positive or None, got {limit}")
    if bounds and not reverse and continuation is None:
        c = sample.c
        r = conn.execute(
            select(*_RAW_COLS).where(c.pv_id == entry.id, c.time_us <= start_us).order_by(c.time_us.desc(), c.seq.desc()).limit(1)
        ).first()
        if r is not None and r.time_us < start_us:  # a sample at the start is in the range: its own bound
            rest = read_raw(conn, entry, start_us, end_us, limit=None if limit is None else max(limit - 1, 1))
            if limit is not None and limit == 1:  # the bound alone fills the page; the body follows
                return RawPage([_reading(entry, r)], _continue_after(r) if rest.readings else None)
            return RawPage([_reading(entry, r), *rest.readings], rest.continuation)
    c = sample.c
    q = select(*_RAW_COLS).where(c.pv_id == entry.id, c.time_us >= start_us, c.time_us < end_us)
    if continuation is not None:
        t, s = decode_continuation(continuation)
        if reverse:
            q = q.where(c.time_us <= t, tuple_(c.time_us, c.seq) < tuple_(t, s))
        else:
            q = q.where(c.time_us >= t, tuple_(c.time_us, c.seq) > tuple_(t, s))
    q = q.order_by(c.time_us.desc(), c.seq.desc()) if reverse else q.order_by(c.time_us, c.seq)
    if limit is not None:
        q = q.limit(limit + 1)
    rows = conn.execute(q).all()
    more = limit is not None and len(rows) > limit
    if more:
        rows = rows[:limit]
    token = encode_continuation(rows[-1].time_us, rows[-1].seq) if more else None
    return RawPage(_readings(entry, rows), token)


def _continue_after(r) -> str:
    """A continuation that resumes a forward read at the range's start (after a bound row before it)."""
    return encode_continuation(r.time_us, r.seq)


# ---- last / next value -------------------------------------------------------------------------


def read_last(conn: Connection, backend: Backend, entries: Sequence[Entry], at_us: int | None) -> dict[int, Reading | None]:
    """The last sample at or before ``at_us`` (None: the newest) of each PV, by PV id."""
    out: dict[int, Reading | None] = {e.id: None for e in entries}
    by_id = {e.id: e for e in entries}
    bound = at_us if at_us is not None else 2**62
    if backend.kind == "postgresql" and len(entries) > 1:
        ids = list(by_id)
        for i in range(0, len(ids), _CHUNK):
            rows = conn.execute(
                text(
                    "SELECT p.id AS pv_id, s.* FROM unnest(CAST(:ids AS integer[])) AS p(id) CROSS JOIN LATERAL ("
                    " SELECT time_us, seq, float_val, num_val, str_val, array_val, severity, status FROM sample"
                    " WHERE pv_id = p.id AND time_us <= :at ORDER BY time_us DESC, seq DESC LIMIT 1) s"
                ),
                {"ids": ids[i : i + _CHUNK], "at": bound},
            ).all()
            for r in rows:
                out[r.pv_id] = _reading(by_id[r.pv_id], tuple(r)[1:])  # after pv_id: the _RAW_COLS
        return out
    c = sample.c
    for e in entries:
        r = conn.execute(
            select(*_RAW_COLS).where(c.pv_id == e.id, c.time_us <= bound).order_by(c.time_us.desc(), c.seq.desc()).limit(1)
        ).first()
        out[e.id] = None if r is None else _reading(e, r)
    return out


def read_next(conn: Connection, entry: Entry, at_us: int) -> Reading | None:
    """The first sample at or after ``at_us`` (an upper bound for a range's end)."""
    c = sample.c
    r = conn.execute(
        select(*_RAW_COLS).where(c.pv_id == entry.id, c.time_us >= at_us).order_by(c.time_us, c.seq).limit(1)
    ).first()
    return None if r is None else _reading(entry, r)


# ---- processed -------------------------------------------------------------------------------------


def _rollup_width_us(start_us: int, interval_us: int) -> int | None:
    """The rollup width to read through, or None to aggregate raw rows only.

    Any width not above the interval gives exact results; it pays when few cells straddle
    bucket boundaries: always when the buckets are cell-aligned, else from 4 cells a bucket.
    """
    for width_s in sorted(WIDTHS_S, reverse=True):
        w = width_s * 1_000_000
        if (interval_us % w == 0 and start_us % w == 0) or interval_us >= 4 * w:
            return w
    return None


def read_processed(
    conn: Connection,
    backend: Backend,
    entries: Sequence[Entry],
    start_us: int,
    end_us: int,
    interval_us: int,
    *,
    use_rollups: bool = True,
    held: bool = False,
) -> dict[int, list[Bucket]]:
    """Buckets of ``interval_us`` over ``[start_us, end_us)`` for each PV, by PV id.

    ``held``: also the held values, time-weighted means and quality of each bucket (see
    the module docstring).
    """
    if interval_us <= 0:
        raise HistorianError(f"the processing interval must be positive, got {interval_us / 1e6:g} s")
    if end_us <= start_us:
        raise HistorianError(f"the end of a processed read must be after its start ({end_us} <= {start_us} us)")
    n = -(-(end_us - start_us) // interval_us)
    if n > MAX_BUCKETS:
        raise HistorianError(f"{n} buckets asked for; at most {MAX_BUCKETS} per read (use a longer interval)")
    for e in entries:
        if e.type not in AGGREGATABLE:
            raise HistorianError(
                f"{e.name} is a {e.type.value} PV; processed history needs a number (float64, int, bool or enum)"
            )
    ids = [e.id for e in entries]
    aggs: dict[tuple[int, int], Aggregate] = {}
    raw_ranges = [(start_us, end_us)]
    width = _rollup_width_us(start_us, interval_us) if use_rollups else None
    if width is not None:
        c_lo = -(-start_us // width) * width  # the whole cells inside [start, end)
        c_hi = (end_us // width) * width
        if c_hi > c_lo:
            _aggregate_cells(conn, backend, ids, c_lo, c_hi, start_us, interval_us, width, aggs)
            # Raw rows for what the clean cells do not cover: the edges, and every cell that
            # straddles a bucket boundary.
            raw_ranges = [(start_us, c_lo)]
            first_k = -(-(c_lo - start_us) // interval_us)
            for k in range(max(first_k, 1), n):
                b = start_us + k * interval_us
                if b >= c_hi:
                    break
                if b % width:
                    cell = b - b % width
                    raw_ranges.append((cell, cell + width))
            raw_ranges.append((c_hi, end_us))
    _aggregate_raw(conn, backend, ids, _coalesce(raw_ranges), start_us, interval_us, aggs)
    out: dict[int, list[Bucket]] = {}
    for pv_id in ids:
        buckets = []
        for k in range(n):
            b0 = start_us + k * interval_us
            b1 = min(b0 + interval_us, end_us)
            a = aggs.get((pv_id, b0))
            if a is None:
                buckets.append(Bucket(from_us(b0), from_us(b1), 0))
            else:
                buckets.append(
                    Bucket(from_us(b0), from_us(b1), a.count, a.min, a.max, a.sum / a.count, a.first, a.last,
                           from_us(a.first_us), from_us(a.last_us))
                )
        out[pv_id] = buckets
    if held:
        for e in entries:
            out[e.id] = [replace(b, **h) for b, h in zip(out[e.id], _held(conn, backend, e, start_us, end_us, interval_us, n), strict=True)]
    return out


def _held(conn: Connection, backend: Backend, entry: Entry, start_us: int, end_us: int, interval_us: int, n: int) -> list[dict]:
    """The held fields of each of ``n`` buckets (see the module docstring): one probe, one ordered walk."""
    c = sample.c
    prior = conn.execute(
        select(c.time_us, c.float_val, c.num_val, c.severity, c.status)
        .where(c.pv_id == entry.id, c.time_us <= start_us)
        .order_by(c.time_us.desc(), c.seq.desc())
        .limit(1)
    ).first()
    rows = conn.execute(
        select(c.time_us, c.float_val, c.num_val, c.severity, c.status)
        .where(c.pv_id == entry.id, c.time_us > start_us, c.time_us < end_us)
        .order_by(c.time_us, c.seq)
    ).all()
    # The state in force: (value or None when not valid, time, severity, status); time None: unknown.
    if prior is None:
        state: tuple = (None, None, None, None)
    else:
        v = numeric_value(prior.float_val, prior.num_val)
        state = (v if prior.severity < INVALID else None, prior.time_us, _SEVERITY[prior.severity], _STATUS[prior.status])
    out: list[dict] = []
    i = 0
    for k in range(n):
        b0 = start_us + k * interval_us
        b1 = min(b0 + interval_us, end_us)
        while i < len(rows) and rows[i].time_us <= b0:  # samples at the boundary are in force from it
            state = _state(rows[i])
            i += 1
        at_start = state
        area = 0.0
        valid_us = 0
        worst: tuple | None = None  # (severity, status) of the worst valid value in force
        t = b0
        while True:
            nxt = rows[i].time_us if i < len(rows) and rows[i].time_us < b1 else b1
            if nxt > t and state[0] is not None:
                area += state[0] * (nxt - t)
                valid_us += nxt - t
                if worst is None or state[2] > worst[0]:
                    worst = (state[2], state[3])
            t = nxt
            if nxt == b1:
                break
            state = _state(rows[i])
            i += 1
        if worst is not None:
            severity, status = worst
        elif at_start[1] is None and state[1] is None:
            severity, status = Severity.INVALID, Status.UDF
        else:
            severity, status = Severity.INVALID, (state[3] if state[3] is not None else at_start[3])
        out.append({
            "held": at_start[0],
            "held_time": None if at_start[1] is None else from_us(at_start[1]),
            "held_severity": at_start[2],
            "held_status": at_start[3],
            "time_mean": area / valid_us if valid_us else None,
            "valid_time": valid_us / 1_000_000,
            "severity": severity,
            "status": status,
        })  # fmt: skip
    return out


def _state(r) -> tuple:
    v = numeric_value(r.float_val, r.num_val)
    return (v if r.severity < INVALID else None, r.time_us, _SEVERITY[r.severity], _STATUS[r.status])


def _coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-empty, with touching ranges joined."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(r for r in ranges if r[1] > r[0]):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _merge(into: dict[tuple[int, int], Aggregate], key: tuple[int, int], agg: Aggregate) -> None:
    old = into.get(key)
    if old is None:
        into[key] = agg
    else:
        old.merge(agg)


def _collect(
    conn: Connection,
    backend: Backend,
    stmt,
    params: dict,
    rollup_width: int | None,
    into: dict[tuple[int, int], Aggregate],
) -> None:
    """Run a summary statement (count, min, max, sum, first and last time per bucket) and
    merge its aggregates into ``into``, probing the first and last sample of each bucket.

    (PostgreSQL's ordered ``array_agg`` could select them in the same statement, but sorting
    every group for six aggregates measured slower than one primary-key probe per bucket.)
    """
    partial: dict[tuple[int, int], tuple] = {}
    for r in conn.execute(stmt, params):
        if r.n:
            partial[(r.pv_id, int(r.b))] = (int(r.n), float(r.lo), float(r.hi), float(r.total), int(r.t0), int(r.t1))
    if not partial:
        return
    keys = {(k[0], p[4]) for k, p in partial.items()} | {(k[0], p[5]) for k, p in partial.items()}
    ends = _first_last(conn, backend, rollup_width, keys)
    for key, (n, lo, hi, total, t0, t1) in partial.items():
        f_us, f_seq, f_val = ends[(key[0], t0)][0]
        l_us, l_seq, l_val = ends[(key[0], t1)][1]
        _merge(into, key, Aggregate(n, lo, hi, total, f_us, f_seq, f_val, l_us, l_seq, l_val))


def _aggregate_cells(
    conn: Connection,
    backend: Backend,
    ids: list[int],
    lo_us: int,
    hi_us: int,
    origin_us: int,
    interval_us: int,
    width_us: int,
    into: dict[tuple[int, int], Aggregate],
) -> None:
    """Merge into ``into`` the rollup cells in ``[lo_us, hi_us)`` that lie inside one bucket each."""
    stmt = text(
        f"SELECT pv_id, {bucket_sql(backend.timescale, 'start_us')} AS b, sum(count) AS n, min(min) AS lo, "
        "max(max) AS hi, sum(sum) AS total, min(start_us) AS t0, max(start_us) AS t1 FROM sample_rollup "
        "WHERE width_s = :ws AND pv_id IN :ids AND start_us >= :lo AND start_us < :hi "
        "AND (start_us - :o) / :w = (start_us + :last - :o) / :w GROUP BY pv_id, b"
    ).bindparams(bindparam("ids", expanding=True))
    for i in range(0, len(ids), _CHUNK):
        params = {"ws": width_us // 1_000_000, "ids": ids[i : i + _CHUNK], "lo": lo_us, "hi": hi_us,
                  "w": interval_us, "o": origin_us, "last": width_us - 1}
        _collect(conn, backend, stmt, params, width_us, into)


#: Raw ranges per statement when reading around straddling cells.
_RANGES = 500


def _aggregate_raw(
    conn: Connection,
    backend: Backend,
    ids: list[int],
    ranges: list[tuple[int, int]],
    origin_us: int,
    interval_us: int,
    into: dict[tuple[int, int], Aggregate],
) -> None:
    """Merge into ``into`` the aggregates per (pv, bucket) of the raw samples in ``ranges``."""
    if not ranges:
        return
    pg = backend.kind == "postgresql"
    value = f"COALESCE(s.float_val, CAST(s.num_val AS {'DOUBLE PRECISION' if pg else 'REAL'})) AS v"
    valid = f"s.pv_id IN :ids AND s.severity < {INVALID}"
    for j in range(0, len(ranges), _RANGES):
        part = ranges[j : j + _RANGES]
        params: dict = {"w": interval_us, "o": origin_us}
        if len(part) == 1:
            inner = f"SELECT s.pv_id, s.time_us, {value} FROM sample s WHERE s.time_us >= :lo AND s.time_us < :hi AND {valid}"
            params.update(lo=part[0][0], hi=part[0][1])
        else:
            values = ", ".join(f"(CAST(:lo{k} AS BIGINT), CAST(:hi{k} AS BIGINT))" for k in range(len(part)))
            for k, (lo, hi) in enumerate(part):
                params[f"lo{k}"], params[f"hi{k}"] = lo, hi
            if pg:
                # One index range scan per range: OFFSET 0 keeps the planner from flattening the
                # LATERAL subquery into a join it may hash (scanning every row), and lets
                # TimescaleDB exclude chunks per range at run time.
                inner = (
                    f"SELECT x.pv_id, x.time_us, x.v FROM (VALUES {values}) AS r CROSS JOIN LATERAL ("
                    f"SELECT s.pv_id, s.time_us, {value} FROM sample s WHERE s.time_us >= r.column1 "
                    f"AND s.time_us < r.column2 AND {valid} OFFSET 0) x"
                )
            else:
                inner = (
                    f"SELECT s.pv_id, s.time_us, {value} FROM (VALUES {values}) AS r "
                    f"JOIN sample s ON s.time_us >= r.column1 AND s.time_us < r.column2 WHERE {valid}"
                )
        stmt = text(
            f"SELECT pv_id, {bucket_sql(backend.timescale, 'time_us')} AS b, count(v) AS n, min(v) AS lo, "
            f"max(v) AS hi, sum(v) AS total, min(time_us) AS t0, max(time_us) AS t1 FROM ({inner}) q "
            "WHERE v IS NOT NULL GROUP BY pv_id, b"
        ).bindparams(bindparam("ids", expanding=True))
        for i in range(0, len(ids), _CHUNK):
            _collect(conn, backend, stmt, {**params, "ids": ids[i : i + _CHUNK]}, None, into)


def _first_last(
    conn: Connection, backend: Backend, rollup_width: int | None, keys: set[tuple[int, int]]
) -> dict[tuple[int, int], tuple[tuple[int, int, float], tuple[int, int, float]]]:
    """For (pv_id, t) pairs: the (time, seq, value) of the first and last valid sample at ``t``
    (raw), or the first and last of the rollup cell starting at ``t``."""
    by_pv: dict[int, list[int]] = {}
    for pv_id, t in keys:
        by_pv.setdefault(pv_id, []).append(t)
    out: dict[tuple[int, int], tuple[tuple[int, int, float], tuple[int, int, float]]] = {}
    real = "DOUBLE PRECISION" if backend.kind == "postgresql" else "REAL"
    pg = backend.kind == "postgresql"
    # PostgreSQL takes the times as one array parameter (no statement text per list length).
    per_statement = _ARRAY_CHUNK if pg else _CHUNK
    if rollup_width is not None:
        among = "= ANY(CAST(:ts AS BIGINT[]))" if pg else "IN :ts"
        stmt = text(
            "SELECT start_us AS at_us, first_us, first_seq, first_val, last_us, last_seq, last_val FROM sample_rollup "
            f"WHERE width_s = :ws AND pv_id = :pv AND start_us {among}"
        )
        if not pg:
            stmt = stmt.bindparams(bindparam("ts", expanding=True))
        for pv_id, ts in by_pv.items():
            for i in range(0, len(ts), per_statement):
                for r in conn.execute(stmt, {"ws": rollup_width // 1_000_000, "pv": pv_id, "ts": ts[i : i + per_statement]}):
                    out[(pv_id, r.at_us)] = ((r.first_us, r.first_seq, r.first_val), (r.last_us, r.last_seq, r.last_val))
        return out
    if pg:
        # One probe of the primary key per time: a LATERAL with an OFFSET 0 fence keeps it a
        # nested loop (and lets TimescaleDB pick the chunk per probe) whatever the statistics.
        stmt = text(
            "SELECT t.at_us, x.seq, x.v FROM unnest(CAST(:ts AS BIGINT[])) AS t(at_us) CROSS JOIN LATERAL ("
            f"SELECT seq, COALESCE(float_val, CAST(num_val AS {real})) AS v FROM sample "
            f"WHERE pv_id = :pv AND time_us = t.at_us AND severity < {INVALID} OFFSET 0) x"
        )
    else:
        stmt = text(
            f"SELECT time_us AS at_us, seq, COALESCE(float_val, CAST(num_val AS {real})) AS v FROM sample "
            f"WHERE pv_id = :pv AND time_us IN :ts AND severity < {INVALID}"
        ).bindparams(bindparam("ts", expanding=True))
    for pv_id, ts in by_pv.items():
        for i in range(0, len(ts), per_statement):
            for r in conn.execute(stmt, {"pv": pv_id, "ts": ts[i : i + per_statement]}):
                if r.v is None:
                    continue
                key = (pv_id, r.at_us)
                row = (r.at_us, r.seq, float(r.v))
                cur = out.get(key)
                if cur is None:
                    out[key] = (row, row)
                else:
                    out[key] = (min(cur[0], row), max(cur[1], row))
    return out


# ---- events and metadata ------------------------------------------------------------------------


def read_audit(
    conn: Connection,
    start_us: int | None,
    end_us: int | None,
    *,
    target: str | None = None,
    user: str | None = None,
    action: str | None = None,
    limit: int | None = None,
) -> list[AuditRecord]:
    """Audit records in ``[start_us, end_us)`` (optionally of one target, user and/or action), oldest first."""
    c = audit_event.c
    q = select(audit_event)
    if start_us is not None:
        q = q.where(c.time_us >= start_us)
    if end_us is not None:
        q = q.where(c.time_us < end_us)
    if target is not None:
        q = q.where(c.target == target)
    if user is not None:
        q = q.where(c.user_name == user)
    if action is not None:
        q = q.where(c.action == action)
    q = q.order_by(c.time_us, c.id)
    if limit is not None:
        q = q.limit(limit)
    return [
        AuditRecord(
            from_us(r.time_us), r.action, r.user_name, r.protocol, r.host, r.target,
            _unjson(r.old_value), _unjson(r.new_value), bool(r.accepted), r.reason, uid=r.uid,
        )
        for r in conn.execute(q)
    ]


def _unjson(text_: str | None):
    if text_ is None:
        return None
    value = json.loads(text_)
    return tuple(value) if isinstance(value, list) else value


def read_alarm_events(conn: Connection, entry: Entry, start_us: int, end_us: int) -> list[tuple[float, Severity, Status]]:
    """Alarm transitions of one PV in ``[start_us, end_us)``: (time, severity, status)."""
    c = alarm_event.c
    rows = conn.execute(
        select(c.time_us, c.severity, c.status)
        .where(c.pv_id == entry.id, c.time_us >= start_us, c.time_us < end_us)
        .order_by(c.time_us, c.seq)
    )
    return [(from_us(r.time_us), Severity(r.severity), Status(r.status)) for r in rows]


def read_metadata_history(conn: Connection, entry: Entry) -> list[tuple[float, Mapping]]:
    """Every recorded version of a PV's metadata: (time it took effect, metadata), oldest first."""
    rows = conn.execute(select(pv_meta.c.time_us, pv_meta.c.meta).where(pv_meta.c.pv_id == entry.id).order_by(pv_meta.c.time_us))
    return [(from_us(r.time_us), json.loads(r.meta)) for r in rows]


def check_range(start_us: int, end_us: int) -> None:
    """Refuse a range that ends before it starts."""
    if end_us < start_us:
        raise HistorianError(
            f"the range ends before it starts ({end_us / 1e6:.6f} < {start_us / 1e6:.6f}); "
            "use reverse=True to read backwards"
        )


__all__ = [
    "Entry",
    "RawPage",
    "catalogue",
    "check_range",
    "decode_continuation",
    "encode_continuation",
    "read_alarm_events",
    "read_audit",
    "read_last",
    "read_metadata_history",
    "read_next",
    "read_processed",
    "read_raw",
]
