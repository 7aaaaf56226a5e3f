"""Store and forward: the database goes away under steady ingest and comes back; nothing is lost or doubled.

The outages are real: a private PostgreSQL/TimescaleDB cluster (``pg_cluster_factory``) is
shut down and started again while a producer posts to the real core at a steady pace.
Every wait is for a condition (spool segments written, the spool drained), never for time.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from labctl.ioc.database import Database
from labctl.ioc.types import Reading
from labctl.server.historian import Historian, HistorianUnavailable
from labctl.server.historian.backend import open_backend
from labctl.server.historian.config import HistorianConfig
from labctl.server.historian.ingest import Capture, Ingestor
from labctl.server.historian.spool import Batch, Spool

from tests.helpers import wait_for
from tests.historian.support import future_minute, make_db

STEP_S = 0.001  # synthetic time between two samples: every one a distinct microsecond


class Producer:
    """Posts 1, 2, 3... to one PV at a steady pace, with timestamps ``t0 + (value - 1) * STEP_S``."""

    def __init__(self, db: Database, name: str, t0: float) -> None:
        self.db, self.name, self.t0 = db, name, t0
        self.n = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._stop.clear()
        self._task = asyncio.create_task(self._run(), name="producer")

    async def _run(self) -> None:
        while not self._stop.is_set():
            self.db.post(self.name, float(self.n + 1), self.t0 + self.n * STEP_S)
            self.n += 1
            await asyncio.sleep(0.002)  # the pace of the stream, not a wait for anything

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task


async def archived_values(h: Historian, name: str, t0: float, n: int) -> list[float]:
    page = await h.read_raw(name, t0, t0 + n * STEP_S + 1)
    times = [r.timestamp for r in page.readings]
    assert times == sorted(set(times)), "samples out of order or doubled"
    for r in page.readings:
        assert r.timestamp == round((t0 + (r.value - 1) * STEP_S) * 1e6) / 1e6
    return [r.value for r in page.readings]


async def assert_rollups_match(h: Historian, name: str, t0: float, n: int) -> None:
    end = t0 + (int(n * STEP_S / 60) + 1) * 60
    fast = (await h.read_processed_many([name], t0, end, 60))[name]
    slow = (await h.read_processed_many([name], t0, end, 60, use_rollups=False))[name]
    assert [(b.count, b.min, b.max, b.first, b.last) for b in fast] == [(b.count, b.min, b.max, b.first, b.last) for b in slow]
    assert sum(b.count for b in fast) == len(await archived_values(h, name, t0, n))


@pytest.mark.timescaledb
async def test_an_outage_is_back_filled_exactly_once_and_in_order(pg_cluster_factory, start_historian, caplog):
    caplog.set_level(logging.INFO, logger="labctl.server.historian")
    cluster = pg_cluster_factory(timescaledb=True)
    db = make_db()
    h = await start_historian(db, cluster.url, batch_age_s=0.1)
    t0 = future_minute()
    producer = Producer(db, "CRYO:RAW", t0)
    producer.start()
    try:
        await wait_for(lambda: h.stats()["written"] > 200, 30, "samples written before the outage")
        await asyncio.to_thread(cluster.stop)
        await wait_for(lambda: h.stats()["spool_segments"] >= 10, 30, "batches spooled during the outage")
        assert not h.stats()["database_up"]
        with pytest.raises(HistorianUnavailable, match="spooled until it returns"):
            await h.read_last("CRYO:RAW")
        await asyncio.to_thread(cluster.start)
        await wait_for(lambda: h.stats()["database_up"] and h.stats()["spool_segments"] == 0, 60, "the back-fill")
        resumed = h.stats()["written"]
        await wait_for(lambda: h.stats()["written"] > resumed + 100, 30, "live ingest after the back-fill")
    finally:
        await producer.stop()
    assert await h.flush()

    assert await archived_values(h, "CRYO:RAW", t0, producer.n) == [float(i + 1) for i in range(producer.n)]
    await assert_rollups_match(h, "CRYO:RAW", t0, producer.n)
    stats = h.stats()
    assert stats["outages"] == 1 and stats["backfilled"] > 0
    assert (stats["lost"], stats["spool_dropped_samples"], stats["spool_rejected_segments"]) == (0, 0, 0)
    messages = [r.getMessage() for r in caplog.records]
    assert any("unreachable" in m and "archiving to the spool" in m for m in messages)
    assert any("back-fill complete" in m for m in messages)


@pytest.mark.timescaledb
async def test_a_restarted_historian_back_fills_the_spool_of_its_predecessor(pg_cluster_factory, start_historian, tmp_path):
    cluster = pg_cluster_factory(timescaledb=True)
    db = make_db()
    state = tmp_path / "state"
    h1 = await start_historian(db, cluster.url, state_dir=state, batch_age_s=0.1)
    t0 = future_minute()
    producer = Producer(db, "CRYO:RAW", t0)
    producer.start()
    try:
        await wait_for(lambda: h1.stats()["written"] > 200, 30, "samples written before the outage")
        await asyncio.to_thread(cluster.stop)
        await wait_for(lambda: h1.stats()["spool_segments"] >= 5, 30, "batches spooled during the outage")
    finally:
        await producer.stop()
    await h1.stop()  # labctl goes down with a spool that is not empty...
    left = sorted(p.name for p in (state / "spool").glob("*.json"))
    assert len(left) >= 5

    h2 = await start_historian(db, cluster.url, state_dir=state, batch_age_s=0.1)  # ...and comes back first
    assert h2.stats()["spool_segments"] == len(left) and not h2.stats()["database_up"]
    producer.start()
    try:
        await wait_for(lambda: h2.stats()["spool_segments"] >= len(left) + 5, 30, "more batches spooled")
        await asyncio.to_thread(cluster.start)
        await wait_for(lambda: h2.stats()["database_up"] and h2.stats()["spool_segments"] == 0, 60, "the back-fill")
    finally:
        await producer.stop()
    assert await h2.flush()

    assert await archived_values(h2, "CRYO:RAW", t0, producer.n) == [float(i + 1) for i in range(producer.n)]
    await assert_rollups_match(h2, "CRYO:RAW", t0, producer.n)
    # the new instance's baseline repeated the last spooled readings: skipped, not doubled
    assert h2.stats()["duplicates"] >= 1


@pytest.mark.timescaledb
async def test_a_full_spool_keeps_the_newest_samples_and_counts_the_rest(pg_cluster_factory, start_historian, caplog):
    caplog.set_level(logging.INFO, logger="labctl.server.historian")
    cluster = pg_cluster_factory(timescaledb=True)
    db = make_db()
    h = await start_historian(db, cluster.url, batch_age_s=0.05, spool_max_mb=0.02)
    t0 = future_minute()
    producer = Producer(db, "CRYO:RAW", t0)
    producer.start()
    try:
        await wait_for(lambda: h.stats()["written"] > 100, 30, "samples written before the outage")
        await asyncio.to_thread(cluster.stop)
        await wait_for(lambda: h.stats()["spool_dropped_samples"] > 200, 60, "the spool to overflow")
        await asyncio.to_thread(cluster.start)
        await wait_for(lambda: h.stats()["database_up"] and h.stats()["spool_segments"] == 0, 60, "the back-fill")
    finally:
        await producer.stop()
    assert await h.flush()

    values = await archived_values(h, "CRYO:RAW", t0, producer.n)
    missing = sorted(set(float(i + 1) for i in range(producer.n)) - set(values))
    derived = await h.read_raw("CRYO:DOUBLE", t0, t0 + producer.n * STEP_S + 1)  # each post updates it too
    missing_derived = set(float(2 * (i + 1)) for i in range(producer.n)) - {r.value for r in derived.readings}
    dropped = h.stats()["spool_dropped_samples"]
    assert len(missing) + len(missing_derived) == dropped > 0  # every drop counted, nothing else lost
    assert missing == [float(v) for v in range(int(missing[0]), int(missing[-1]) + 1)]  # one gap...
    assert values[-1] == float(producer.n)  # ...and everything after it, up to the last sample
    messages = [r.getMessage() for r in caplog.records]
    assert any("is full" in m and "keep the newest" in m for m in messages)
    assert any(f"{dropped} samples were dropped" in m for m in messages)


async def test_a_replayed_segment_neither_doubles_samples_nor_rollups(archive_url, start_historian, tmp_path, caplog):
    """A crash after a back-fill commit but before the segment was deleted replays it: harmless."""
    db = make_db()
    state = tmp_path / "state"
    h1 = await start_historian(db, archive_url, state_dir=state)
    t0 = future_minute()
    for i in range(10):
        db.post("CRYO:RAW", float(i + 1), t0 + i)
    assert await h1.flush()
    await h1.stop()

    capture = Capture(db.infos())
    rows = [capture.sample("CRYO:RAW", Reading(float(i + 1), t0 + i), 0) for i in range(15)]  # 10 archived, 5 new
    spool = Spool(state / "spool", 10**7)
    spool.append(Batch(rows[:12], types={"CRYO:RAW": "float64"}))
    spool.append(Batch([("CRYO:RAW", None, 0, 1.0, None, None, None, 0, 0, 0)], types={"CRYO:RAW": "float64"}))  # refused
    spool.append(Batch(rows[8:], types={"CRYO:RAW": "float64"}))

    caplog.set_level(logging.ERROR, logger="labctl.server.historian")
    h2 = await start_historian(db, archive_url, state_dir=state)
    await wait_for(h2.flush, 30, "the back-fill")
    page = await h2.read_raw("CRYO:RAW", t0, t0 + 60)
    assert [r.value for r in page.readings] == [float(i + 1) for i in range(15)]
    buckets = await h2.read_processed_many(["CRYO:RAW"], t0, t0 + 60, 60)
    assert (buckets["CRYO:RAW"][0].count, buckets["CRYO:RAW"][0].mean) == (15, 8.0)
    stats = h2.stats()
    assert stats["spool_rejected_segments"] == 1 and stats["spool_segments"] == 0
    assert list((state / "spool" / "rejected").glob("*.json"))
    assert any("refused spooled batch" in r.getMessage() for r in caplog.records)


async def test_a_stuck_writer_costs_the_oldest_queued_updates_counted_and_logged(tmp_path, caplog):
    """The loop never waits for the ingest thread: past ``max_pending`` rows the oldest go."""
    db = make_db()
    backend = open_backend(f"sqlite:///{tmp_path}/h.sqlite")
    ingestor = Ingestor(backend, Spool(tmp_path / "spool", 10**6), db.infos(), batch_size=100, batch_age_s=0.1, max_pending=5)
    caplog.set_level(logging.ERROR, logger="labctl.server.historian")
    t0 = future_minute()
    for i in range(8):  # the worker is not running: as stuck as it gets
        ingestor.put("CRYO:RAW", Reading(float(i + 1), t0 + i))
    assert ingestor.stats()["lost"] == 3
    assert any("oldest queued updates are being dropped" in r.getMessage() for r in caplog.records)
    assert await asyncio.to_thread(ingestor.connect)
    ingestor.start()
    await asyncio.to_thread(ingestor.stop)
    backend.dispose()
    h = Historian(db, HistorianConfig(url=f"sqlite:///{tmp_path}/h.sqlite"), tmp_path / "state")
    await h.start()
    try:
        page = await h.read_raw("CRYO:RAW", t0, t0 + 60)
        assert [r.value for r in page.readings] == [4.0, 5.0, 6.0, 7.0, 8.0]
    finally:
        await h.stop()
