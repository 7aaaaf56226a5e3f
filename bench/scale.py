"""Scenario 4, scale: start-up time and resident memory with 10 000 and 100 000 PVs.

Each server is started as a fresh process with N PVs and timed from the moment the
process is spawned until it reports ``ready`` (its ports bound, every PV served); its
resident memory (``VmRSS``) is read then, and its peak (``VmHWM``). labctl serves both
protocols and archives into SQLite, as ``labctl serve`` does, from a site FILE that it
reads as ``labctl serve`` does (the N PVs as one numbered ``range`` entry; see
:mod:`bench.site`), so its start-up includes reading the site file; the time the
benchmark server takes to write that file first is left out. The phases it reports say
where the time goes; :mod:`bench.sitefile` times reading sites of both forms on its own. Then one Channel Access client and one OPC UA client
each read a PV, which shows both protocols answer. The baselines start the same N PVs:
plain caproto and the C-core IOC over Channel Access, plain asyncua over OPC UA.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from bench import profiling
from bench.proc import Worker
from bench.rig import Rig
from bench.site import SITE_WRITE_PHASE


async def run_server(kind: str, count: int) -> dict[str, Any]:
    """Start one server of ``count`` PVs; its start-up time, phases and memory."""
    protocol = "opcua" if kind == "asyncua" else "ca"
    rig = Rig(kind, count, protocol=protocol, clients=0)
    t = time.monotonic()
    try:
        await rig.server.start(timeout=1200)
        startup_s = time.monotonic() - t
        # The benchmark's own preparation (labctl writing its site file) is not start-up.
        startup_s -= (rig.server.ready.get("phases") or {}).get(SITE_WRITE_PHASE, 0.0)
        memory = rig.server.memory()
        answered = {}
        protocols = ("ca", "opcua") if kind == "labctl" else (protocol,)
        for p in protocols:
            rig.protocol = p
            client: Worker = rig.client(f"{p} probe", 1)
            t = time.monotonic()
            try:
                ready = await client.start(timeout=300)
                answered[p] = {"first_value_s": round(time.monotonic() - t, 3), "connect_s": ready["connect_s"]}
            finally:
                await client.close()
    finally:
        await rig.close()
    return {
        "scenario": "scale",
        "server": kind,
        "pvs": count,
        "startup_s": startup_s,
        "phases": rig.server.ready.get("phases"),
        "rss": memory["rss"],
        "peak_rss": memory["peak_rss"],
        "answered": answered,
    }


async def run_sitefile(count: int) -> dict[str, Any]:
    """The site-file parse of ``count`` PVs (:mod:`bench.sitefile`)."""
    worker = Worker(f"site file {count}", "bench.sitefile", ["--count", count])
    try:
        ready = await worker.start(timeout=1200)
        memory = worker.memory()
    finally:
        await worker.close()
    ready.pop("event", None)
    return {"scenario": "sitefile", **ready, "peak_rss": memory["peak_rss"]}


async def profile_startup(count: int, out: Path) -> tuple[dict, dict]:
    """py-spy over labctl's start-up with ``count`` PVs, from spawn to ``ready``."""
    rig = Rig("labctl", count, protocol="ca", clients=0)
    worker = rig.server
    try:
        start = asyncio.create_task(worker.start(timeout=1200))
        while worker.proc is None:
            await asyncio.sleep(0.01)
        path = await profiling.record_until(worker.pid, start, out)
        ready = start.result()
    finally:
        await rig.close()
    frames = profiling.top_frames(path) if path else {}
    return frames, {"pvs": count, "phases": ready.get("phases")}
