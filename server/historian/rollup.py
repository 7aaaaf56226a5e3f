"""Aggregates of samples, and the pre-computed rollup cells that keep long reads fast.

Theory of operation. An :class:`Aggregate` summarises the *valid numeric* samples of one
PV in one time span: how many there are, min, max, sum, and the first and last sample
(by time, then ``seq``). Valid means severity below INVALID and a number present (NaN is
stored as NULL and so never counts), the same rule as OPC UA's "good values only".
Aggregates merge associatively, which is all downsampling needs: a bucket of a query is
the merge of the rollup cells inside it plus aggregates of the raw rows at its edges.

Rollup cells are aggregates over fixed, epoch-aligned spans (:data:`WIDTHS_S`), stored in
``sample_rollup`` and maintained by :func:`maintain` in the very transaction that inserts
the samples. The fast path merges the new samples into the existing cells. When the
insert skipped rows (a batch replayed from the spool after a crash between commit and
spool bookkeeping), the new samples are not known exactly, so the affected cells are
recomputed from the raw rows instead -- either way a cell always equals the aggregate of
the rows it covers, and a replay never counts a sample twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from labctl.server.historian.encoding import numeric_value
from labctl.server.historian.schema import insert, sample, sample_rollup
from sqlalchemy import and_, delete, select
from sqlalchemy.engine import Connection

#: Rollup widths in seconds. A processed read uses rollups when its start and interval are
#: multiples of a width (one minute: any "nice" plot interval).
WIDTHS_S: tuple[int, ...] = (60,)

#: Severity at and above which a sample is not aggregated (EPICS INVALID).
INVALID = 3


@dataclass(slots=True)
class Aggregate:
    """Count, min, max, sum, first and last of the valid numeric samples in a span."""

    count: int
    min: float
    max: float
    sum: float
    first_us: int
    first_seq: int
    first: float
    last_us: int
    last_seq: int
    last: float

    @classmethod
    def of(cls, time_us: int, seq: int, value: float) -> Aggregate:
        """The aggregate of one sample."""
        return cls(1, value, value, value, time_us, seq, value, time_us, seq, value)

    def add(self, time_us: int, seq: int, value: float) -> None:
        """Include one more sample."""
        self.count += 1
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        self.sum += value
        if (time_us, seq) < (self.first_us, self.first_seq):
            self.first_us, self.first_seq, self.first = time_us, seq, value
        if (time_us, seq) > (self.last_us, self.last_seq):
            self.last_us, self.last_seq, self.last = time_us, seq, value

    def merge(self, other: Aggregate) -> None:
        """Include every sample of ``other`` (disjoint from this one's)."""
        self.count += other.count
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.sum += other.sum
        if (other.first_us, other.first_seq) < (self.first_us, self.first_seq):
            self.first_us, self.first_seq, self.first = other.first_us, other.first_seq, other.first
        if (other.last_us, other.last_seq) > (self.last_us, self.last_seq):
            self.last_us, self.last_seq, self.last = other.last_us, other.last_seq, other.last

    def copy(self) -> Aggregate:
        """An independent copy."""
        return Aggregate(
            self.count, self.min, self.max, self.sum, self.first_us, self.first_seq, self.first,
            self.last_us, self.last_seq, self.last,
        )


Key = tuple[int, int]
"""(pv_id, span start in microseconds)."""


def aggregate(rows: Iterable[tuple[int, int, int, float]], width_us: int) -> dict[Key, Aggregate]:
    """Aggregates of ``(pv_id, time_us, seq, value)`` rows per epoch-aligned span of ``width_us``."""
    out: dict[Key, Aggregate] = {}
    for pv_id, t, seq, v in rows:
        key = (pv_id, t - t % width_us)
        agg = out.get(key)
        if agg is None:
            out[key] = Aggregate.of(t, seq, v)
        else:
            agg.add(t, seq, v)
    return out


def valid_numeric(rows: Iterable[tuple]) -> list[tuple[int, int, int, float]]:
    """``(pv_id, time_us, seq, value)`` of the rows that aggregate, from sample-column tuples.

    ``rows`` are in :data:`labctl.server.historian.schema.SAMPLE_COLUMNS` order.
    """
    out = []
    for r in rows:
        if r[7] >= INVALID:
            continue
        v = numeric_value(r[3], r[4])
        if v is not None:
            out.append((r[0], r[1], r[2], v))
    return out


def _cell_values(pv_id: int, width_s: int, start_us: int, a: Aggregate) -> dict:
    return {
        "pv_id": pv_id, "width_s": width_s, "start_us": start_us, "count": a.count, "min": a.min, "max": a.max,
        "sum": a.sum, "first_us": a.first_us, "first_seq": a.first_seq, "first_val": a.first,
        "last_us": a.last_us, "last_seq": a.last_seq, "last_val": a.last,
    }


def _write_cells(conn: Connection, kind: str, width_s: int, cells: Mapping[Key, Aggregate]) -> None:
    if not cells:
        return
    stmt = insert(kind, sample_rollup)
    stmt = stmt.on_conflict_do_update(
        index_elements=["pv_id", "width_s", "start_us"],
        set_={c: stmt.excluded[c] for c in ("count", "min", "max", "sum", "first_us", "first_seq", "first_val",
                                            "last_us", "last_seq", "last_val")},
    )
    conn.execute(stmt, [_cell_values(pv_id, width_s, start, a) for (pv_id, start), a in cells.items()])


_MERGE_COLUMNS = (  # fmt: skip
    "pv_id", "width_s", "start_us", "count", "min", "max", "sum",
    "first_us", "first_seq", "first_val", "last_us", "last_seq", "last_val",
)


def _merge_sql(kind: str) -> str:
    """An upsert that merges a new cell into the stored one, in the database (:meth:`Aggregate.merge` in SQL).

    Every right-hand side of ``SET`` reads the row as it was before the update, on SQLite and
    PostgreSQL alike, so the first/last comparisons see the old ``first_us``/``last_us``.
    """
    least, greatest, mark = ("LEAST", "GREATEST", "%s") if kind == "postgresql" else ("min", "max", "?")
    t = "sample_rollup"
    earlier = f"(excluded.first_us, excluded.first_seq) < ({t}.first_us, {t}.first_seq)"
    later = f"(excluded.last_us, excluded.last_seq) > ({t}.last_us, {t}.last_seq)"
    sets = [
        f"count = {t}.count + excluded.count",
        f"min = {least}({t}.min, excluded.min)",
        f"max = {greatest}({t}.max, excluded.max)",
        f"sum = {t}.sum + excluded.sum",
        *(f"{c} = CASE WHEN {earlier} THEN excluded.{c} ELSE {t}.{c} END" for c in ("first_us", "first_seq", "first_val")),
        *(f"{c} = CASE WHEN {later} THEN excluded.{c} ELSE {t}.{c} END" for c in ("last_us", "last_seq", "last_val")),
    ]
    return (
        f"INSERT INTO {t} ({', '.join(_MERGE_COLUMNS)}) VALUES ({', '.join([mark] * len(_MERGE_COLUMNS))}) "
        f"ON CONFLICT (pv_id, width_s, start_us) DO UPDATE SET {', '.join(sets)}"
    )


_MERGE_SQL = {kind: _merge_sql(kind) for kind in ("sqlite", "postgresql")}


def maintain(conn: Connection, kind: str, rows: list[tuple[int, int, int, float]], exact: bool) -> None:
    """Bring the rollup cells covering ``rows`` up to date, in the caller's transaction.

    ``exact``: every one of ``rows`` was newly inserted: their aggregates are merged into
    the stored cells by one upsert, in the database (no read of the cells, and little
    Python on the historian's thread, which shares the interpreter with the event loop).
    Otherwise some were already archived and the affected cells are recomputed from the raw rows.
    """
    if not rows:
        return
    for width_s in WIDTHS_S:
        width_us = width_s * 1_000_000
        delta = aggregate(rows, width_us)
        if exact:
            conn.exec_driver_sql(
                _MERGE_SQL[kind],
                [
                    (pv_id, width_s, start, a.count, a.min, a.max, a.sum, a.first_us, a.first_seq, a.first,
                     a.last_us, a.last_seq, a.last)
                    for (pv_id, start), a in delta.items()
                ],
            )  # fmt: skip
        else:
            recompute(conn, kind, width_s, delta.keys())


def recompute(conn: Connection, kind: str, width_s: int, keys: Iterable[Key]) -> None:
    """Recompute the given cells from raw samples (deleting cells left empty)."""
    width_us = width_s * 1_000_000
    by_pv: dict[int, list[int]] = {}
    for pv_id, start in keys:
        by_pv.setdefault(pv_id, []).append(start)
    s_ = sample.c
    for pv_id, starts in by_pv.items():
        lo, hi = min(starts), max(starts) + width_us
        raw = conn.execute(
            select(s_.pv_id, s_.time_us, s_.seq, s_.float_val, s_.num_val, s_.str_val, s_.array_val, s_.severity).where(
                s_.pv_id == pv_id, s_.time_us >= lo, s_.time_us < hi
            )
        ).all()
        fresh = aggregate(valid_numeric(raw), width_us)
        wanted = {(pv_id, s) for s in starts}
        empty = [s for (p, s) in wanted if (p, s) not in fresh]
        if empty:
            r_ = sample_rollup.c
            conn.execute(delete(sample_rollup).where(and_(r_.pv_id == pv_id, r_.width_s == width_s, r_.start_us.in_(empty))))
        _write_cells(conn, kind, width_s, {k: a for k, a in fresh.items() if k in wanted})
