"""The historian on SQLite, PostgreSQL and TimescaleDB alike: ingest, deadband, INVALID, queries, schema, audit.

Every test here runs once per backend (the ``archive_url`` fixture). Values enter through
the real core (``db.post`` / ``db.invalidate`` / ``db.write``) and leave through the
historian's query API; ``await historian.flush()`` is the synchronisation point.
"""

from __future__ import annotations

import math
import random
import time

import pytest
from labctl.ioc.errors import PermissionDenied, UnknownPV, WrongType
from labctl.ioc.types import Identity, Reading, Severity, Status
from labctl.server.historian import Historian, HistorianError, SchemaTooNew, query, rollup
from labctl.server.historian.encoding import to_us
from labctl.server.historian.ingest import apply_retention
from labctl.server.historian.schema import SCHEMA_VERSION, pv, pv_meta, sample, sample_rollup, schema_version
from sqlalchemy import create_engine, func, inspect, select, update

from tests.helpers import wait_for
from tests.historian.support import SITE, future_minute, make_db


def q(ts: float) -> float:
    """A timestamp as the archive keeps it (whole microseconds)."""
    return round(ts * 1_000_000) / 1_000_000


async def raw(h: Historian, name: str, start: float, end: float) -> list[Reading]:
    page = await h.read_raw(name, start, end)
    assert page.continuation is None
    return page.readings


# ---- ingest ---------------------------------------------------------------------------------


async def test_every_type_is_archived_with_its_alarm_state(db, archive_url, start_historian):
    h = await start_historian(db, archive_url)
    t0 = future_minute()
    posts = [
        ("CRYO:RAW", 1.25),
        ("CRYO:RAW", -1e300),
        ("CRYO:COUNT", -7),
        ("CRYO:COUNT", 2**62 + 1),  # beyond a double's 53 bits: kept exactly
        ("CRYO:VALVE", True),
        ("CRYO:VALVE", False),
        ("CRYO:MODE", 2),
        ("CRYO:NOTE", "héllo, wörld ✓"),
        ("CRYO:NOTE", "nul\x00inside"),
        ("CRYO:TRACE", (1.0, math.nan, -2.5, 1e-300)),
        ("CRYO:TRACE", ()),
    ]
    for i, (name, value) in enumerate(posts):
        db.post(name, value, t0 + i * 0.001)
    assert await h.flush() is True

    expected: dict[str, list[Reading]] = {}
    for i, (name, value) in enumerate(posts):
        stored = value.replace("\x00", "\ufffd") if isinstance(value, str) else value
        expected.setdefault(name, []).append(Reading(stored, q(t0 + i * 0.001)))
    for name, readings in expected.items():
        assert await raw(h, name, t0, t0 + 60) == readings, name
    # the derived PV was recomputed by the core and archived like any other
    assert await raw(h, "CRYO:DOUBLE", t0, t0 + 60) == [Reading(2.5, q(t0)), Reading(-2e300, q(t0 + 0.001))]
    assert h.stats()["written"] >= len(posts)


async def test_updates_in_the_same_microsecond_are_all_kept_in_order(db, archive_url, start_historian):
    h = await start_historian(db, archive_url)
    t = future_minute()
    for v in (1.0, 2.0, 3.0):
        db.post("CRYO:RAW", v, t)
    assert await h.flush()
    assert [r.value for r in await raw(h, "CRYO:RAW", t, t + 1)] == [1.0, 2.0, 3.0]
    (bucket,) = await h.read_processed("CRYO:RAW", t, t + 60, 60)
    assert (bucket.count, bucket.first, bucket.last) == (3, 1.0, 3.0)


async def test_only_updates_past_the_archive_deadband_are_stored(db, archive_url, start_historian):
    h = await start_historian(db, archive_url)
    t0 = future_minute()
    seen = []
    db.subscribe(lambda u: seen.append(u.reading.value), names=["CRYO:TEMP"])  # every posted update
    # CRYO:TEMP has an archive deadband of 0.5 K around the last archived value (4.2 at first)
    for i, v in enumerate([5.0, 5.2, 5.4, 5.6, 6.0, 6.2, 4.0, 4.3]):
        db.post("CRYO:TEMP", v, t0 + i)
    assert await h.flush()
    assert seen == [5.0, 5.2, 5.4, 5.6, 6.0, 6.2, 4.0, 4.3]
    assert [r.value for r in await raw(h, "CRYO:TEMP", t0, t0 + 60)] == [5.0, 5.6, 6.2, 4.0]


async def test_invalid_readings_are_recorded_and_left_out_of_aggregates(db, archive_url, start_historian):
    h = await start_historian(db, archive_url)
    t0 = future_minute()
    db.post("CRYO:RAW", 1.0, t0)
    db.post("CRYO:RAW", 2.0, t0 + 1)
    db.invalidate(["CRYO:RAW"], Status.COMM, t0 + 2)  # the instrument was lost: last value, INVALID/COMM
    db.post("CRYO:RAW", math.nan, t0 + 3)  # an unreadable sensor: INVALID/READ
    db.post("CRYO:RAW", 3.0, t0 + 4)
    assert await h.flush()

    got = await raw(h, "CRYO:RAW", t0, t0 + 60)
    assert got == [
        Reading(1.0, t0),
        Reading(2.0, t0 + 1),
        Reading(2.0, t0 + 2, Severity.INVALID, Status.COMM),
        Reading(math.nan, t0 + 3, Severity.INVALID, Status.READ),
        Reading(3.0, t0 + 4),
    ]
    # the derived PV follows its input into INVALID/LINK
    derived = await raw(h, "CRYO:DOUBLE", t0, t0 + 60)
    assert [(r.severity, r.status) for r in derived][2] == (Severity.INVALID, Status.LINK)
    # alarm transitions are events of their own
    assert await h.read_alarm_events("CRYO:RAW", t0, t0 + 60) == [
        (t0 + 2, Severity.INVALID, Status.COMM),
        (t0 + 3, Severity.INVALID, Status.READ),
        (t0 + 4, Severity.NO_ALARM, Status.NO_ALARM),
    ]
    (bucket,) = await h.read_processed("CRYO:RAW", t0, t0 + 60, 60)
    assert (bucket.count, bucket.min, bucket.max, bucket.mean, bucket.first, bucket.last) == (3, 1.0, 3.0, 2.0, 1.0, 3.0)
    assert (bucket.first_time, bucket.last_time) == (t0, t0 + 4)


# ---- raw and last-value queries ---------------------------------------------------------------


async def test_raw_reads_page_forward_and_backward(db, archive_url, start_historian):
    h = await start_historian(db, archive_url)
    t0 = future_minute()
    for i in range(25):
        db.post("CRYO:RAW", float(i + 1), t0 + i)  # 0.0 is the initial value: no change
    assert await h.flush()

    values, token, pages = [], None, 0
    while True:
        page = await h.read_raw("CRYO:RAW", t0, t0 + 60, limit=10, continuation=token)
        values += [r.value for r in page.readings]
        pages += 1
        token = page.continuation
        if token is None:
            break
    assert (values, pages) == ([float(i + 1) for i in range(25)], 3)

    values, token = [], None
    while True:
        page = await h.read_raw("CRYO:RAW", t0, t0 + 60, limit=7, continuation=token, reverse=True)
        values += [r.value for r in page.readings]
        token = page.continuation
        if token is None:
            break
    assert values == [float(i + 1) for i in reversed(range(25))]

    # [start, end) is half-open; an exact page leaves no continuation behind
    assert [r.value for r in await raw(h, "CRYO:RAW", t0 + 5, t0 + 10)] == [6.0, 7.0, 8.0, 9.0, 10.0]
    page = await h.read_raw("CRYO:RAW", t0 + 5, t0 + 10, limit=5)
    assert page.continuation is None
    many = await h.read_raw_many(["CRYO:RAW", "CRYO:DOUBLE"], t0, t0 + 3)
    assert [r.value for r in many["CRYO:DOUBLE"].readings] == [2.0, 4.0, 6.0]

    with pytest.raises(HistorianError, match="continuation"):
        await h.read_raw("CRYO:RAW", t0, t0 + 60, limit=5, continuation="garbage")
    with pytest.raises(HistorianError, match="ends before it starts"):
        await h.read_raw("CRYO:RAW", t0 + 60, t0)
    with pytest.raises(UnknownPV):
        await h.read_raw("NO:SUCH:PV", t0, t0 + 60)


async def test_last_and_next_values(db, archive_url, start_historian):
    h = await start_historian(db, archive_url)
    t0 = future_minute()
    for i in range(10):
        db.post("CRYO:RAW", float(i + 1), t0 + i)
    db.post("CRYO:COUNT", 42, t0 + 0.5)
    db.invalidate(["CRYO:COUNT"], Status.TIMEOUT, t0 + 7)
    assert await h.flush()

    assert await h.read_last("CRYO:RAW") == Reading(10.0, t0 + 9)
    assert await h.read_last("CRYO:RAW", at=t0 + 4.5) == Reading(5.0, t0 + 4)
    assert await h.read_last("CRYO:RAW", at=t0 + 4) == Reading(5.0, t0 + 4)  # "at or before"
    assert await h.read_last("CRYO:RAW", at=1000.0) is None
    assert await h.read_next("CRYO:RAW", t0 + 4.5) == Reading(6.0, t0 + 5)
    assert await h.read_next("CRYO:RAW", t0 + 100) is None

    last = await h.read_last_many(["CRYO:RAW", "CRYO:COUNT", "CRYO:NOTE"], at=t0 + 8)
    assert last["CRYO:RAW"] == Reading(9.0, t0 + 8)
    assert last["CRYO:COUNT"] == Reading(42, t0 + 7, Severity.INVALID, Status.TIMEOUT)
    assert last["CRYO:NOTE"].value == ""  # the baseline recorded when the historian started
    assert last["CRYO:NOTE"].timestamp < t0
    with pytest.raises(UnknownPV):
        await h.read_last_many(["CRYO:RAW", "NO:SUCH:PV"])


# ---- processed queries -----------------------------------------------------------------------------


def _expected_buckets(samples: list[tuple[float, float]], start: float, end: float, interval: float) -> list[tuple]:
    out = []
    k = 0
    while start + k * interval < end:
        b0, b1 = start + k * interval, min(start + (k + 1) * interval, end)
        vs = [(t, v) for t, v in samples if b0 <= t < b1]
        if vs:
            values = [v for _, v in vs]
            out.append((len(vs), min(values), max(values), sum(values) / len(vs), vs[0][1], vs[-1][1], vs[0][0], vs[-1][0]))
        else:
            out.append((0, None, None, None, None, None, None, None))
        k += 1
    return out


def _as_tuples(buckets) -> list[tuple]:
    return [(b.count, b.min, b.max, b.mean, b.first, b.last, b.first_time, b.last_time) for b in buckets]


def _assert_buckets(got, expected) -> None:
    assert len(got) == len(expected)
    for g, e in zip(_as_tuples(got), expected, strict=True):
        assert g[:3] == e[:3] and g[4:] == e[4:]
        assert g[3] == pytest.approx(e[3], rel=1e-12, abs=1e-12) if e[3] is not None else g[3] is None


@pytest.mark.parametrize("statement_chunks", ["default", "tiny"])
async def test_processed_buckets_from_rollups_and_raw_rows_agree(db, archive_url, start_historian, statement_chunks, monkeypatch):
    if statement_chunks == "tiny":  # many PVs / many raw ranges: split over several statements, merged after
        monkeypatch.setattr(query, "_CHUNK", 1)
        monkeypatch.setattr(query, "_ARRAY_CHUNK", 2)
        monkeypatch.setattr(query, "_RANGES", 2)
    h = await start_historian(db, archive_url)
    t0 = future_minute()
    rng = random.Random(7)
    raw_samples, counts = [], []
    for i in range(1200):  # twenty minutes at 1 Hz, an INVALID gap, two PVs
        t = t0 + i + 0.25
        if 100 <= i < 110:
            db.invalidate(["CRYO:RAW"], Status.COMM, t)
        else:
            v = round(rng.uniform(-10, 10), 6)
            db.post("CRYO:RAW", v, t)
            raw_samples.append((q(t), v))
        db.post("CRYO:COUNT", i % 7 + 1, t0 + i + 0.5)  # never the initial 0: every post archives
        counts.append((q(t0 + i + 0.5), float(i % 7 + 1)))
    assert await h.flush()

    cases = [
        (t0, t0 + 1200, 60),  # whole rollup cells
        (t0, t0 + 290, 120),  # cells, then a raw tail; the last bucket is cut at the end
        (t0 + 7.3, t0 + 1190.1, 250),  # cells inside buckets, raw rows for the cells across boundaries
        (t0 + 60, t0 + 1200, 247),  # aligned start, unaligned interval
        (t0 + 7.3, t0 + 250, 45),  # short buckets: raw rows only
        (t0 - 60, t0 + 1320, 300),  # empty buckets at both ends (the baselines are older)
        (t0 + 30, t0 + 31, 0.25),  # sub-second buckets
    ]
    for start, end, interval in cases:
        fast = await h.read_processed_many(["CRYO:RAW", "CRYO:COUNT"], start, end, interval)
        slow = await h.read_processed_many(["CRYO:RAW", "CRYO:COUNT"], start, end, interval, use_rollups=False)
        for name, samples in (("CRYO:RAW", raw_samples), ("CRYO:COUNT", counts)):
            expected = _expected_buckets(samples, start, end, interval)
            _assert_buckets(fast[name], expected)
            _assert_buckets(slow[name], expected)
            assert [(b.start, b.end) for b in fast[name]][-1][1] == end

    with pytest.raises(HistorianError, match="string PV"):
        await h.read_processed("CRYO:NOTE", t0, t0 + 60, 10)
    with pytest.raises(HistorianError, match="positive"):
        await h.read_processed("CRYO:RAW", t0, t0 + 60, 0)
    with pytest.raises(HistorianError, match="at most"):
        await h.read_processed("CRYO:RAW", t0, t0 + 86_400 * 365, 1)


async def test_rollups_equal_their_raw_rows(db, archive_url, start_historian):
    """Cells are merged batch by batch, in the database; afterwards each equals its raw rows' aggregate.

    Samples arrive out of time order across batches (a later batch brings earlier and later
    times of a cell already stored), so every field of the merge is exercised: count, min,
    max, sum, and first and last by time.
    """
    h = await start_historian(db, archive_url, batch_size=7)
    t0 = future_minute()
    n = 200
    for i in range(n):
        k = (i * 37) % n  # a permutation of the times: each batch straddles the others'
        db.post("CRYO:RAW", float((k * 13) % 11 + 1), t0 + k * 0.9)
        if i % 50 == 0:
            await h.flush()  # several batches per cell
    assert await h.flush()
    columns = ("start_us", "count", "min", "max", "sum", "first_us", "first_seq", "first_val", "last_us", "last_seq", "last_val")
    engine = create_engine(h.url)
    try:
        with engine.connect() as conn:
            pv_id = conn.execute(select(pv.c.id).where(pv.c.name == "CRYO:RAW")).scalar_one()
            cells = conn.execute(
                select(*(sample_rollup.c[c] for c in columns))
                .where(sample_rollup.c.pv_id == pv_id, sample_rollup.c.start_us >= int(t0 * 1e6))
                .order_by(sample_rollup.c.start_us)
            ).all()
            raw = conn.execute(
                select(sample.c.pv_id, sample.c.time_us, sample.c.seq, sample.c.float_val, sample.c.num_val,
                       sample.c.str_val, sample.c.array_val, sample.c.severity)
                .where(sample.c.pv_id == pv_id, sample.c.time_us >= int(t0 * 1e6))
            ).all()  # fmt: skip
    finally:
        engine.dispose()
    assert sum(c[1] for c in cells) == n
    expected = rollup.aggregate(rollup.valid_numeric(raw), 60_000_000)
    assert len(cells) == len(expected) >= 3
    for row in cells:
        a = expected[(pv_id, row[0])]
        want = (a.count, a.min, a.max, pytest.approx(a.sum), a.first_us, a.first_seq, a.first, a.last_us, a.last_seq, a.last)
        assert tuple(row[1:]) == want, f"cell at {row[0]}"
    buckets = await h.read_processed_many(["CRYO:RAW"], t0, t0 + 180, 60, use_rollups=False)
    assert [(c[1], c[4]) for c in cells] == [(b.count, pytest.approx(b.mean * b.count)) for b in buckets["CRYO:RAW"]]


# ---- schema ---------------------------------------------------------------------------------------


async def test_schema_creation_is_idempotent_and_metadata_is_versioned(db, archive_url, start_historian, tmp_path):
    h1 = await start_historian(db, archive_url)
    t0 = future_minute()
    db.post("CRYO:RAW", 1.0, t0)
    assert await h1.flush()
    await h1.stop()

    h2 = await start_historian(db, archive_url)  # same database, same state directory
    assert await h2.flush()
    assert h2.stats()["duplicates"] == len(db.names())  # the baselines were archived already
    assert [r.value for r in await raw(h2, "CRYO:RAW", t0, t0 + 1)] == [1.0]
    await h2.stop()

    changed = make_db(SITE.replace("unit: K", "unit: mK"))
    h3 = await start_historian(changed, archive_url, state_dir=tmp_path / "other-state")
    history = await h3.read_metadata_history("CRYO:TEMP")
    assert [meta["unit"] for _, meta in history] == ["K", "mK"]
    assert [meta["unit"] for _, meta in await h3.read_metadata_history("CRYO:RAW")] == [""]
    await h3.stop()

    engine = create_engine(h3.url)
    try:
        with engine.begin() as conn:
            assert conn.execute(select(schema_version.c.component, schema_version.c.version)).all() == [("historian", SCHEMA_VERSION)]
            assert conn.execute(select(func.count()).select_from(pv)).scalar() == len(db.names())
            assert conn.execute(select(func.count()).select_from(pv_meta)).scalar() == len(db.names()) + 1
            assert conn.execute(select(pv.c.unit).where(pv.c.name == "CRYO:TEMP")).scalar() == "mK"
            conn.execute(update(schema_version).values(version=99))
    finally:
        engine.dispose()
    with pytest.raises(SchemaTooNew, match="schema version 99"):
        await start_historian(db, archive_url)


async def test_samples_table_keys(archive_url, db, start_historian):
    """What the idempotent writes rely on: the primary key of ``sample``."""
    h = await start_historian(db, archive_url)
    engine = create_engine(h.url)
    try:
        assert inspect(engine).get_pk_constraint("sample")["constrained_columns"] == ["pv_id", "time_us", "seq"]
    finally:
        engine.dispose()


# ---- audit ---------------------------------------------------------------------------------------


async def test_audit_records_are_archived(db, archive_url, start_historian):
    h = await start_historian(db, archive_url)
    alice = Identity("alice", frozenset({"cryo_operator"}), "opcua", "10.0.0.7")
    bob = Identity("bob", frozenset({"viewer"}), "ca", "pc2")
    start = db.clock()
    await db.write("CRYO:RAW", 3.5, alice)
    with pytest.raises(PermissionDenied):
        await db.write("CRYO:RAW", 9.0, bob)
    with pytest.raises(WrongType):
        await db.write("CRYO:TRACE", "not an array", alice)
    await db.write("CRYO:TRACE", [1.0, 2.0], alice)
    assert await h.flush()

    records = await h.read_audit(start - 1)
    assert [(r.action, r.user, r.protocol, r.host, r.target, r.accepted) for r in records] == [
        ("write", "alice", "opcua", "10.0.0.7", "CRYO:RAW", True),
        ("write", "bob", "ca", "pc2", "CRYO:RAW", False),
        ("write", "alice", "opcua", "10.0.0.7", "CRYO:TRACE", False),
        ("write", "alice", "opcua", "10.0.0.7", "CRYO:TRACE", True),
    ]
    assert (records[0].old, records[0].new) == (0.0, 3.5)
    assert "may not write" in records[1].reason
    assert records[3].new == (1.0, 2.0)
    assert all(start - 1 <= r.time <= db.clock() for r in records)
    only = await h.read_audit(target="CRYO:RAW")
    assert [r.user for r in only] == ["alice", "bob"]


# ---- the two backends side by side ---------------------------------------------------------------


@pytest.mark.timescaledb
async def test_every_backend_gives_the_same_answers(timescaledb_database, plain_pg_url, start_historian, tmp_path):
    started = time.time()  # one clock for all: their initial readings carry the same timestamp
    urls = {"sqlite": f"sqlite:///{tmp_path}/a/history.sqlite", "timescaledb": timescaledb_database.url,
            "postgresql": plain_pg_url}
    dbs = {k: make_db(clock=lambda: started) for k in urls}
    hs = {k: await start_historian(dbs[k], urls[k], state_dir=tmp_path / k) for k in dbs}
    t0 = future_minute()
    rng = random.Random(11)
    for i in range(600):  # ten minutes of mixed traffic, the same on both
        t = t0 + i + rng.random() * 0.5
        for db in dbs.values():
            db.post("CRYO:RAW", round(math.sin(i / 17) * 100, 9), t)
            db.post("CRYO:COUNT", (i * 7919) % 101 + 1, t + 0.1)
            db.post("CRYO:MODE", i % 3, t + 0.2)
            if i % 97 == 0:
                db.invalidate(["CRYO:RAW"], Status.COMM, t + 0.3)
            if i % 50 == 0:
                db.post("CRYO:RAW", 42.0, t + 0.4)
                db.post("CRYO:RAW", 43.0, t + 0.4)  # same microsecond
                db.post("CRYO:NOTE", f"step {i}", t + 0.4)
                db.post("CRYO:TRACE", [float(i), math.nan], t + 0.4)
    for h in hs.values():
        assert await h.flush()

    names = ["CRYO:RAW", "CRYO:DOUBLE", "CRYO:COUNT", "CRYO:MODE", "CRYO:NOTE", "CRYO:TRACE"]
    answers = {}
    for k, h in hs.items():
        answers[k] = {
            "raw": await h.read_raw_many(names, t0, t0 + 600),
            "page": await h.read_raw("CRYO:RAW", t0 + 100, t0 + 500, limit=50, reverse=True),
            "last": [await h.read_last_many(names, at=t0 + s) for s in (0, 99.5, 333.3, 1e6)],
            "aligned": await h.read_processed_many(names[:4], t0, t0 + 600, 120),
            "odd": await h.read_processed_many(names[:4], t0 + 3.3, t0 + 597.1, 37.7),
            "mixed": await h.read_processed_many(names[:4], t0 + 3.3, t0 + 597.1, 241.5),
        }
    a = answers["sqlite"]
    assert sum(len(p.readings) for p in a["raw"].values()) > 2000
    for other in ("timescaledb", "postgresql"):
        b = answers[other]
        assert a["raw"] == b["raw"], other
        assert a["page"] == b["page"], other
        assert a["last"] == b["last"], other
        for key in ("aligned", "odd", "mixed"):
            for name in names[:4]:
                assert len(a[key][name]) == len(b[key][name])
                for x, y in zip(a[key][name], b[key][name], strict=True):
                    assert (x.start, x.end, x.count, x.min, x.max, x.first, x.last, x.first_time, x.last_time) == (
                        y.start, y.end, y.count, y.min, y.max, y.first, y.last, y.first_time, y.last_time
                    ), (other, key, name)
                    assert x.mean == pytest.approx(y.mean, rel=1e-12) if x.count else y.mean is None


async def test_retention_drops_old_samples_and_their_rollups(db, archive_url, start_historian, tmp_path):
    h = await start_historian(db, archive_url)  # no retention: keeps everything
    now = time.time()
    old = (math.floor(now / 86_400) - 3) * 86_400.0  # three days ago, a day boundary (a whole chunk)
    for i in range(5):
        db.post("CRYO:RAW", float(i + 1), old + i)
    new = future_minute()
    db.post("CRYO:RAW", 9.0, new)
    assert await h.flush()
    assert len(await raw(h, "CRYO:RAW", old, old + 60)) == 5

    with h.backend.engine.begin() as conn:
        apply_retention(conn, h.backend, to_us(now - 2 * 86_400))
    assert await raw(h, "CRYO:RAW", old, old + 60) == []
    for use_rollups in (True, False):
        old_buckets = await h.read_processed_many(["CRYO:RAW"], old, old + 60, 60, use_rollups=use_rollups)
        assert old_buckets["CRYO:RAW"][0].count == 0
    assert await h.read_last("CRYO:RAW") == Reading(9.0, new)

    for i in range(5):
        db.post("CRYO:RAW", float(i + 1), old + 100 + i)
    assert await h.flush()
    await h.stop()
    # a historian configured with retention applies it as soon as it is connected (then hourly)
    h2 = await start_historian(db, archive_url, state_dir=tmp_path / "state2", retention_days=1)

    async def old_samples_gone() -> bool:
        return not (await h2.read_raw("CRYO:RAW", old, old + 200)).readings

    await wait_for(old_samples_gone, 10, "retention to run")
    assert await h2.read_last("CRYO:RAW") == Reading(9.0, new)
