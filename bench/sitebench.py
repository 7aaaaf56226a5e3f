"""Scenario 7, a site: N labctl servers of M PVs each archiving into one TimescaleDB, against one server of N x M PVs.

A site of several servers (README, "A site of several servers") shares one
PostgreSQL/TimescaleDB database: the archive, and the site directory in which every
server registers and claims its PVs. This scenario measures what spreading the same PVs
and the same load over N servers costs or gains, both arrangements in the same run, on
one PostgreSQL cluster (fsync on), each in a database of its own:

* **one server**: one labctl server of N x M PVs (``BENCH:00000`` ...);
* **site**: N labctl servers of M PVs each (``SITE1:00000`` ..., ``SITE2:00000`` ...;
  ``server.name`` ``site-1`` ...), started all at once, as a site is started.

Every server serves Channel Access and OPC UA (no clients) and archives every update, as
in production (:mod:`bench.serve`). Measured for each arrangement:

* ``startup_s``: from the moment the first server process is spawned until the last one
  is ready -- its ports bound, registered in the site directory and its PVs claimed
  (labctl's directory service registers before anything else starts and heartbeats once
  every service runs) -- less the time each server took to write its generated site file;
  ``startup_cpu_s`` and ``startup_database_cpu_s``, the CPU seconds the servers and
  PostgreSQL spent meanwhile (on a machine with fewer cores than servers, the site's
  start-up is bounded by their sum), and each server's start-up phases. The directory is then
  read (``directory``): every server must be up and own exactly its PVs (``registered``);
* before the window, every server's historian writes the values it archives at start-up
  (one per PV, ``initial_flush_s``) and the orchestrator settles (``settle``: a
  checkpoint of the database and a quiet machine), so both arrangements begin their
  window from the same state and neither carries the other's (or its own start-up's)
  backlog into it;
* the same total update rate, spread evenly over the servers: each server's pacer
  (:class:`bench.driver.Pacer`, through ``Database.post``) posts ``rate / N`` per second
  over its PVs, all in one window ``[t0, t1]`` after a warm-up;
* ``ingest_rate``: rows the servers' historians committed per second during the window
  (their ``written`` counters, read before and after), summed; ``backlog``: updates
  received but not yet committed at the window's end;
* ``sustained_rate``: every sample posted in the run divided by the time until the last
  of them was committed (the drive plus the final flush of every server) -- the rate the
  site keeps up with, not just accepts;
* the proof that nothing was dropped, per server as in :mod:`bench.archive`: samples its
  pacer posted against ``SELECT count(*)`` of the archived rows of its PVs since the run
  began, and its historian's ``lost`` counter;
* resident memory of every server when ready and after the run; CPU of every server and
  of PostgreSQL (the postmaster and its backends) in the window.

The offered rate (``--site-rate``, 20 000 updates/s by default, ten times the fan-out load
the archive scenario serves) is the same for both arrangements; whether each *carried* it
is part of the result, not an assumption: updates the pacers could not post in time
(``skipped``: the servers' event loops were short of CPU) and updates posted faster than
the historian committed them (``backlog``, ``ingest_rate`` below ``posted_rate``) are
reported beside the offered rate, and the tables say which arrangement fell short of it
and where (:func:`bench.report.site_table`). Skipped updates are not dropped samples: a
dropped sample is one posted and not archived. The targets: none dropped in either
arrangement (hard), and the site's sustained rate within
:data:`bench.report.RATE_TOLERANCE` of the single server's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.env import LoadMeter, _tree_ticks, ca_server_env
from bench.proc import CLOCK_TICKS, Worker
from bench.site import PREFIX, SITE_WRITE_PHASE
from tests.helpers import free_tcp_udp_port


@dataclass(frozen=True)
class Member:
    """One server of an arrangement: its name in the site directory, its PVs' prefix and count."""

    name: str
    prefix: str
    pvs: int


def one_server(servers: int, pvs: int) -> list[Member]:
    """The N x M PVs on one server."""
    return [Member("one", PREFIX, servers * pvs)]


def site(servers: int, pvs: int) -> list[Member]:
    """N servers of M PVs each, each with its own names."""
    return [Member(f"site-{k}", f"SITE{k}:", pvs) for k in range(1, servers + 1)]


async def run(
    url_one: str,
    url_site: str,
    servers: int,
    pvs: int,
    rate: float,
    *,
    duration_s: float,
    warmup_s: float,
    workdir: Path,
    database_pid: int | None = None,
    settle: Callable[[], Awaitable[object]] | None = None,
) -> dict[str, Any]:
    """Both arrangements, one after the other, at the same total ``rate``.

    ``settle`` is awaited before each arrangement starts and again before its window (the
    orchestrator checkpoints the database and waits for a quiet machine there).
    """
    one = await measure(
        one_server(servers, pvs), url_one, rate, duration_s=duration_s, warmup_s=warmup_s,
        workdir=workdir / "one", database_pid=database_pid, settle=settle,
    )  # fmt: skip
    many = await measure(
        site(servers, pvs), url_site, rate, duration_s=duration_s, warmup_s=warmup_s,
        workdir=workdir / "site", database_pid=database_pid, settle=settle,
    )  # fmt: skip
    return {
        "scenario": "site",
        "servers": servers,
        "pvs_per_server": pvs,
        "pvs": servers * pvs,
        "rate_offered": rate,
        "one": one,
        "site": many,
    }


async def measure(
    members: list[Member],
    url: str,
    rate: float,
    *,
    duration_s: float,
    warmup_s: float,
    workdir: Path,
    database_pid: int | None = None,
    settle: Callable[[], Awaitable[object]] | None = None,
) -> dict[str, Any]:
    """Start ``members`` at once into the database ``url``, drive them for one window, count what they archived."""
    quiet = await settle() if settle is not None else None
    workers = [
        Worker(
            f"labctl server {m.name}",
            "bench.serve",
            [
                "labctl", "--count", m.pvs, "--prefix", m.prefix, "--server-name", m.name,
                "--historian", url, "--state-dir", str(workdir / m.name / "state"),
            ],
            ca_server_env(free_tcp_udp_port()),
        )  # fmt: skip
        for m in members
    ]
    try:
        result = await _measure(members, workers, rate, duration_s, warmup_s, database_pid, settle)
        return {**result, "quiet_before_startup": quiet}
    finally:
        await asyncio.gather(*(w.close() for w in workers), return_exceptions=True)


async def _measure(
    members: list[Member],
    workers: list[Worker],
    rate: float,
    duration_s: float,
    warmup_s: float,
    database_pid: int | None,
    settle: Callable[[], Awaitable[object]] | None,
) -> dict[str, Any]:
    # ---- start-up: all at once, until the last is ready (registered, its PVs claimed)
    launched = time.monotonic()
    startup_meter = LoadMeter()
    db_startup0 = _tree_ticks(database_pid) if database_pid else None

    async def start(w: Worker) -> float:
        ready = await w.start(timeout=1200)
        written = (ready.get("phases") or {}).get(SITE_WRITE_PHASE, 0.0)
        return time.monotonic() - launched - written

    ready_s = await asyncio.gather(*(start(w) for w in workers))
    startup_s = max(ready_s)
    startup_cpu_s = [w.cpu_seconds() for w in workers]  # until the last is ready (those ready earlier idle on)
    startup_load = startup_meter.read()
    db_startup = None if db_startup0 is None else round((_tree_ticks(database_pid) - db_startup0) / CLOCK_TICKS, 2)
    directory = (await workers[0].call("directory", timeout=300))["servers"]
    memory_ready = [w.memory() for w in workers]
    wanted = {m.name: m.pvs for m in members}
    listed = {e["name"]: e for e in directory if e["name"] in wanted}
    registered = len(listed) == len(members) and all(
        e["up"] and e["owned"] == wanted[name] for name, e in listed.items()
    )

    # ---- the values archived at start-up in the database, the database checkpointed, the machine quiet
    t = time.monotonic()
    await asyncio.gather(*(w.call("flush", timeout=600) for w in workers))
    initial_flush_s = time.monotonic() - t
    quiet = await settle() if settle is not None else None

    # ---- one window: the total rate spread evenly over the servers
    since = time.time()
    share = rate / len(workers)
    t0 = since + warmup_s
    t1 = t0 + duration_s
    t_end = t1 + 0.2
    for w in workers:
        await w.call("drive", rate=share, t_end=t_end, t0=t0, t1=t1)
    await asyncio.sleep(max(0.0, t0 - time.time()))
    meter = LoadMeter()
    cpu0 = [w.cpu_seconds() for w in workers]
    db0 = _tree_ticks(database_pid) if database_pid else None
    stats0 = await asyncio.gather(*(w.call("stats") for w in workers))
    await asyncio.sleep(max(0.0, t1 - time.time()))
    cpu1 = [w.cpu_seconds() for w in workers]
    db1 = _tree_ticks(database_pid) if database_pid else None
    load = meter.read()
    stats1 = await asyncio.gather(*(w.call("stats") for w in workers))
    window = t1 - t0
    driven = await asyncio.gather(*(w.event("driven", timeout=t_end - time.time() + 120) for w in workers))

    # ---- drain: every server flushes its historian; then count the rows of each
    t = time.monotonic()
    flushed = await asyncio.gather(*(w.call("flush", timeout=600) for w in workers))
    drain_s = time.monotonic() - t
    final = await asyncio.gather(*(w.call("stats") for w in workers))
    rows = [
        (await w.call("count", timeout=600, prefix=m.prefix, since=since))["rows"]
        for w, m in zip(workers, members, strict=True)
    ]
    memory_end = [w.memory() for w in workers]

    per_server = []
    for k, m in enumerate(members):
        h0, h1, hist = stats0[k]["historian"], stats1[k]["historian"], final[k]["historian"]
        d = driven[k]
        per_server.append(
            {
                "name": m.name,
                "prefix": m.prefix,
                "pvs": m.pvs,
                "ready_s": round(ready_s[k], 3),
                "startup_cpu_s": round(startup_cpu_s[k], 2),
                "phases": workers[k].ready.get("phases"),
                "rate_offered": share,
                "posted": d["posted"],
                "skipped": d["skipped"],
                "posted_rate": d["posted_in_window"] / window,
                "max_round_s": d["max_round_s"],
                "written_in_window": h1["written"] - h0["written"],
                "backlog": h1["received"] - h1["written"],
                "rows": rows[k],
                "dropped": d["posted"] - rows[k],
                "lost": hist["lost"],
                "spooled": hist["spooled"],
                "in_database": flushed[k]["in_database"],
                "cores": round((cpu1[k] - cpu0[k]) / window, 3),
                "rss_ready": memory_ready[k]["rss"],
                "rss_end": memory_end[k]["rss"],
                "peak_rss": memory_end[k]["peak_rss"],
                "historian_stats": hist,
            }
        )
    posted = sum(s["posted"] for s in per_server)
    run_s = max(d["seconds"] for d in driven) + drain_s
    return {
        "servers": len(members),
        "pvs": sum(m.pvs for m in members),
        "startup_s": round(startup_s, 3),
        "startup_cpu_s": round(sum(startup_cpu_s), 2),
        "startup_load": startup_load,
        "startup_database_cpu_s": db_startup,
        "registered": registered,
        "initial_flush_s": round(initial_flush_s, 3),
        "quiet_before_window": quiet,
        "directory": directory,
        "window_s": round(window, 3),
        "rate_offered": rate,
        "posted_rate": sum(s["posted_rate"] for s in per_server),
        "ingest_rate": sum(s["written_in_window"] for s in per_server) / window,
        "backlog": sum(s["backlog"] for s in per_server),
        "sustained_rate": posted / run_s if run_s else 0.0,
        "drain_s": drain_s,
        "counts": {
            "posted": posted,
            "skipped": sum(s["skipped"] for s in per_server),
            "rows": sum(s["rows"] for s in per_server),
            "dropped": sum(s["dropped"] for s in per_server),
            "lost": sum(s["lost"] for s in per_server),
        },
        "rss_total_ready": sum(s["rss_ready"] for s in per_server),
        "rss_total_end": sum(s["rss_end"] for s in per_server),
        "servers_cores": round(sum(s["cores"] for s in per_server), 3),
        "database_cores": None if db0 is None else round((db1 - db0) / CLOCK_TICKS / window, 3),
        "load": load,
        "per_server": per_server,
    }
