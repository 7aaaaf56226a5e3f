"""Scenario 3, archiving: sustained samples per second into SQLite and TimescaleDB, none dropped.

labctl serves the fan-out load (N PVs at the fan-out rate, one Channel Access client
subscribed to all of them; OPC UA served too) with its historian on the backend under
test, while an archive feed pushes samples of 1 000 further PVs (``ARCH:...``) into the
historian's ingest path -- ``Ingestor.put``, the entry point of the historian's database
subscription -- at ``feed_rate`` per second. Measured:

* ``ingest_rate``: rows committed per second during the window (the ingest thread's
  ``written`` counter, read before and after);
* ``sustained_rate``: every sample received in the run divided by the time until the
  last of them was committed (the window plus the final flush) -- the rate the
  historian keeps up with, not just accepts;
* the proof that nothing was dropped: samples the driver posted and the feed put
  (``expected``) against the historian's counters (``received``, ``written``, ``lost``)
  and against ``SELECT count(*)`` of the archived rows of those PVs since the run began.

Beside it, in the same run: the same number of rows written to a scratch table of the
same shape by a bare ``COPY`` (PostgreSQL) / ``executemany`` (SQLite) (:mod:`bench.bare`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.rig import Rig

ARCHIVE_PVS = 1000


async def run(
    backend: str,
    url: str,
    count: int,
    rate: float,
    feed_rate: float,
    *,
    duration_s: float,
    warmup_s: float,
    batch_size: int = 5000,
    profile: Path | None = None,
) -> dict[str, Any]:
    """One backend: the loaded window, the drain, the counts, the bare baseline."""
    args = ["--historian", url, "--extra", ARCHIVE_PVS]
    async with Rig("labctl", count, protocol="ca", clients=1, server_args=args) as rig:
        since = time.time()
        m = await rig.measure(rate, warmup_s=warmup_s, duration_s=duration_s, feed_rate=feed_rate, profile=profile)
        t = time.monotonic()
        flush = await rig.server.call("flush", timeout=600)
        drain_s = time.monotonic() - t
        stats = (await rig.server.call("stats"))["historian"]
        arch_rows = (await rig.server.call("count", timeout=600, prefix="ARCH:", since=since))["rows"]
        bench_rows = (await rig.server.call("count", timeout=600, prefix="BENCH:", since=since))["rows"]
        feed = m["feed"]
        driver = m["driver"]
        before, after = m["server_stats"]["before"]["historian"], m["server_stats"]["after"]["historian"]
        window = m["window_s"]
        # Everything the run put in was committed by the end of the flush: it ran
        # from the drive's start until then.
        run_s = driver["seconds"] + drain_s
        bare = await rig.server.call("bare", timeout=900, rows=min(feed["posted"], 2_000_000), batch=batch_size)
    for d in (flush, bare):
        d.pop("id", None)
        d.pop("ok", None)
    expected = feed["posted"] + driver["posted"]
    return {
        "scenario": "archive",
        "backend": backend,
        "pvs": count,
        "rate_offered": rate,
        "feed_offered": feed_rate,
        "feed": feed,
        "fanout": {k: m[k] for k in ("posted_rate", "delivered_rate", "latency", "server_cores", "load")},
        "ingest_rate": (after["written"] - before["written"]) / window,
        "sustained_rate": expected / run_s if run_s else 0.0,
        "drain_s": drain_s,
        "flush": flush,
        "counts": {
            "expected": expected,
            "fed": feed["posted"],
            "posted": driver["posted"],
            "received": stats["received"],
            "written": stats["written"],
            "lost": stats["lost"],
            "spooled": stats["spooled"],
            "rows_arch": arch_rows,
            "rows_bench": bench_rows,
            "rows": arch_rows + bench_rows,
            "dropped": expected - (arch_rows + bench_rows),
        },
        "historian_stats": stats,
        "bare": bare,
        "startup": rig.startup,
        **({"profile": m["profile"]} if "profile" in m else {}),
    }
