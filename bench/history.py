"""Scenario 5, history: downsampled day, week and month of 1 Hz data, one PV and 100 PVs.

``python -m bench.history --url URL ...`` (one process per backend) starts labctl's
historian on a database of its own, seeds it with 1 Hz samples through the historian's
own bulk path -- :func:`labctl.server.historian.ingest.write_batch`, the function its ingest
thread commits every batch with (binary COPY on PostgreSQL, ``executemany`` on SQLite,
rollup cells maintained in the same transaction) -- and then times
``Historian.read_processed_many``, the query API behind HistoryRead and the clients'
``history``:

* one PV over the last day, week and month (``--days-one`` of data, default 30);
* 100 PVs over the last day (``--days-many``; longer spans when seeded, the last hour
  when less than a day is).

Each query asks for about 1 000 buckets of whole minutes (60 s for a day, 10 min for a
week, 43 min for a month), as a chart of that span would, aligned to the minute; one more
asks for a month in exactly 1 000 buckets ending at an arbitrary second (buckets that
straddle the 60 s rollup cells). Each is run ``--repeat`` times (the first on a cold
cache), and beside it the same query with ``use_rollups=False``: the same buckets
aggregated from the raw rows, which is the baseline the rollups are measured against.
Both paths must agree on every bucket's count. PostgreSQL is ANALYZEd after seeding, as
autovacuum would do on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.site import PREFIX, site_data
from bench.wire import Requests, emit, pv_names

DAY = 86_400


def _rows(name: str, start_s: int, seconds: int, received_us: int) -> list[tuple]:
    """1 Hz float samples of one PV as the historian captures them (name, time_us, seq, values...)."""
    return [
        (name, (start_s + i) * 1_000_000, 0, math.sin(i / 600.0) + (i % 7) * 0.01, None, None, None, 0, 0, received_us)
        for i in range(seconds)
    ]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--state-dir", default=None)
    parser.add_argument("--days-one", type=float, default=30)
    parser.add_argument("--pvs-many", type=int, default=100)
    parser.add_argument("--days-many", type=float, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--raw-repeat", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=100_000, help="rows per seeding transaction")
    args = parser.parse_args()

    from labctl.ioc.build import build_database
    from labctl.server.historian import Historian
    from labctl.server.historian.config import HistorianConfig
    from labctl.server.historian.ingest import write_batch
    from labctl.server.historian.spool import Batch
    from labctl.server.site import SiteConfig
    from sqlalchemy import text

    state = Path(args.state_dir or tempfile.mkdtemp(prefix="labctl-bench-history-"))
    names = pv_names(PREFIX, max(1, args.pvs_many))
    site = SiteConfig.model_validate(site_data(len(names), state_dir=str(state), historian_url=None))
    db = build_database(site)
    historian = Historian(db, HistorianConfig(url=args.url), state)
    await historian.start()
    backend = historian.backend
    assert backend is not None
    engine = backend.engine

    # Seed: PV 0 gets --days-one, the others --days-many, all ending at a minute an hour ago.
    end_s = (int(time.time()) // 60) * 60 - 3600
    with engine.connect() as conn:
        ids = {name: pv_id for name, pv_id in conn.execute(text("SELECT name, id FROM pv"))}
    plan = [(names[0], int(args.days_one * DAY))] + [(n, int(args.days_many * DAY)) for n in names[1:]]
    seeded = 0
    t = time.perf_counter()
    received = time.time_ns() // 1000

    def seed() -> int:
        done = 0
        for name, seconds in plan:
            start_s = end_s - seconds
            for k in range(0, seconds, args.chunk):
                rows = _rows(name, start_s + k, min(args.chunk, seconds - k), received)
                with engine.begin() as conn:
                    result = write_batch(conn, backend, ids, Batch(rows, types={name: "float64"}), replay=False)
                done += result.inserted
        if backend.kind == "postgresql":
            with engine.begin() as conn:
                conn.execute(text("ANALYZE sample"))
                conn.execute(text("ANALYZE sample_rollup"))
        return done

    seeded = await asyncio.to_thread(seed)
    seed_s = time.perf_counter() - t

    queries: list[tuple[str, list[str], int, int, int]] = []  # label, names, start_s, end_s, interval_s
    for label, span in (("day", DAY), ("week", 7 * DAY), ("month", 30 * DAY)):
        if span <= args.days_one * DAY:
            queries.append((f"1 PV, {label}", names[:1], end_s - span, end_s, max(60, round(span / 1000 / 60) * 60)))
    for label, span in (("hour", 3600), ("day", DAY), ("week", 7 * DAY), ("month", 30 * DAY)):
        if len(names) > 1 and span <= args.days_many * DAY and (span > 3600 or args.days_many < 1):
            queries.append(
                (f"{len(names)} PVs, {label}", names, end_s - span, end_s, max(60, round(span / 1000 / 60) * 60))
            )
    if 30 * DAY <= args.days_one * DAY:
        odd_end = end_s - 17
        queries.append(
            ("1 PV, month, 1000 unaligned buckets", names[:1], odd_end - 30 * DAY, odd_end, 30 * DAY // 1000)
        )

    results = []
    for label, q_names, s, e, interval in queries:
        timings: dict[str, list[float]] = {"rollups": [], "raw": []}
        counts: dict[str, int] = {}
        buckets = 0
        for path, repeat in (("rollups", args.repeat), ("raw", args.raw_repeat)):
            for _ in range(repeat):
                t = time.perf_counter()
                out = await historian.read_processed_many(q_names, s, e, interval, use_rollups=path == "rollups")
                timings[path].append(time.perf_counter() - t)
            counts[path] = sum(b.count for bs in out.values() for b in bs)
            buckets = sum(len(bs) for bs in out.values())
        results.append(
            {
                "query": label,
                "pvs": len(q_names),
                "span_s": e - s,
                "interval_s": interval,
                "buckets": buckets,
                "samples": counts["rollups"],
                "agree": counts["rollups"] == counts["raw"],
                "rollups_s": timings["rollups"],
                "raw_s": timings["raw"],
                "rollups_median_s": statistics.median(timings["rollups"]),
                "rollups_first_s": timings["rollups"][0],
                "raw_median_s": statistics.median(timings["raw"]) if timings["raw"] else None,
            }
        )
    size = None
    if backend.kind == "sqlite":
        path = Path(backend.url.database or "")
        size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    else:
        with engine.connect() as conn:
            size = conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one()
    await historian.stop()
    loop = asyncio.get_running_loop()
    requests = Requests(loop, {})
    requests.start()
    emit(
        {
            "event": "ready",
            "backend": backend.describe(),
            "seeded_rows": seeded,
            "seed_s": seed_s,
            "seed_rows_per_s": seeded / seed_s if seed_s else 0.0,
            "database_bytes": size,
            "queries": results,
        }
    )
    await requests.stopped.wait()


async def run(
    backend: str,
    url: str,
    *,
    days_one: float,
    pvs_many: int,
    days_many: float,
    repeat: int,
    state_dir: Path,
    raw_repeat: int = 2,
) -> dict[str, Any]:
    """Seed and query one backend in a worker process (see the module docstring)."""
    from bench.proc import Worker

    worker = Worker(
        f"history {backend}",
        "bench.history",
        [
            "--url",
            url,
            "--state-dir",
            state_dir,
            "--days-one",
            days_one,
            "--pvs-many",
            pvs_many,
            "--days-many",
            days_many,
            "--repeat",
            repeat,
            "--raw-repeat",
            raw_repeat,
        ],
    )
    try:
        ready = await worker.start(timeout=3600)
    finally:
        await worker.close()
    ready.pop("event", None)
    return {"scenario": "history", "backend_kind": backend, **ready}


if __name__ == "__main__":
    asyncio.run(main())
