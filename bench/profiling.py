"""Profiles of a server under load: py-spy samples its process; the top frames are kept.

py-spy (a sampling profiler that reads another process's stacks without stopping it)
records the server for the measurement window in its "raw" (collapsed-stack) format.
:func:`top_frames` turns that into the frames that hold the CPU: *self* time (the frame
was on top of the stack) and *inclusive* time (anywhere on it), as percentages of the
samples of each thread, idle samples excluded.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import sys
from collections import Counter
from pathlib import Path


def py_spy() -> str | None:
    """The py-spy executable next to this interpreter, or on PATH."""
    candidate = Path(sys.executable).with_name("py-spy")
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


def _command(exe: str, pid: int, rate: int, out: Path, *extra: str) -> list[str]:
    """py-spy's command line: sample ``pid`` at ``rate`` Hz, every thread, collapsed stacks into ``out``."""
    return [exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--output", str(out),
            "--threads", "--nonblocking", *extra]  # fmt: skip


async def record(pid: int, seconds: float, out: Path, rate: int = 200) -> Path | None:
    """Sample process ``pid`` for ``seconds`` into ``out`` (collapsed stacks); None without py-spy."""
    exe = py_spy()
    if exe is None:
        return None
    proc = await asyncio.create_subprocess_exec(
        *_command(exe, pid, rate, out, "--duration", str(max(1, round(seconds)))),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"py-spy failed ({proc.returncode}): {err.decode(errors='replace')[-500:]}")
    return out


async def record_until(pid: int, done: asyncio.Future, out: Path, rate: int = 100) -> Path | None:
    """Sample process ``pid`` from now until ``done`` resolves (py-spy writes its file on SIGINT)."""
    exe = py_spy()
    if exe is None:
        return None
    proc = await asyncio.create_subprocess_exec(
        *_command(exe, pid, rate, out, "--idle"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await done
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        _, err = await proc.communicate()
    if not out.exists():
        raise RuntimeError(f"py-spy wrote no profile ({proc.returncode}): {err.decode(errors='replace')[-500:]}")
    return out


_IDLE = ("select (selectors.py", "wait (threading.py", "_worker (concurrent/futures/thread.py", "Requests._read")


def _function(frame: str) -> str:
    """``name (file.py:123)`` -> ``name (file.py)``: shares are per function, not per line."""
    return _LINE.sub(")", frame)


_LINE = re.compile(r":\d+\)$")


#: Where a server's time goes, by the outermost function of each sampled stack that names
#: a part of labctl (or of a library on its behalf). Serving under load:
SERVING = (
    ("Labctl.feed", "archive feed: Ingestor.put"),
    ("Pacer.run", "driver: Database.post and its inline subscribers"),
    ("Labctl.post", "driver: Database.post and its inline subscribers"),
    ("Database.post", "driver: Database.post and its inline subscribers"),
    ("CAService._on_update", "CA: direct monitors (ServedChannel.apply_now, encode, Outbox)"),
    ("ServedChannel.apply_now", "CA: direct monitors (ServedChannel.apply_now, encode, Outbox)"),
    ("Outbox.", "CA: direct monitors (ServedChannel.apply_now, encode, Outbox)"),
    ("UpdateQueue", "CA: UpdateQueue -> ServedChannel.apply (caproto write, publish)"),
    ("CAService._apply", "CA: UpdateQueue -> ServedChannel.apply (caproto write, publish)"),
    ("ServedChannel.apply", "CA: UpdateQueue -> ServedChannel.apply (caproto write, publish)"),
    ("ChannelData.", "CA: UpdateQueue -> ServedChannel.apply (caproto write, publish)"),
    ("MaskedChannel.publish", "CA: UpdateQueue -> ServedChannel.apply (caproto write, publish)"),
    ("ChannelAlarm.", "CA: UpdateQueue -> ServedChannel.apply (caproto write, publish)"),
    ("Context.subscription_queue_loop", "CA: caproto context loop (a response per subscription)"),
    ("Context._subscription_queue", "CA: caproto context loop (a response per subscription)"),
    ("ServerChannel.subscribe", "CA: caproto context loop (a response per subscription)"),
    ("VirtualCircuit.subscription_queue_loop", "CA: caproto circuit loop (batching, send)"),
    ("VirtualCircuit.get_from_sub_queue", "CA: caproto circuit loop (batching, send)"),
    ("VirtualCircuit.send", "CA: caproto circuit loop (batching, send)"),
    ("Publisher._drain", "OPC UA: Publisher._drain -> monitored items"),
    ("MonitoredItemService.", "OPC UA: Publisher._drain -> monitored items"),
    ("InternalSubscription.", "OPC UA: publish and encode"),
    ("UaProcessor.", "OPC UA: publish and encode"),
    ("Ingestor._run", "historian: ingest thread"),
)
#: Starting up:
STARTUP = (
    ("register_catalogue", "historian: register_catalogue"),
    ("_register", "historian: register_catalogue"),
    ("Historian.start", "historian: other start-up"),
    ("Ingestor.", "historian: other start-up"),
    ("build (server/opcua/address_space.py)", "OPC UA: address space build"),
    ("OpcUaService.start", "OPC UA: other start-up"),
    ("CAService.start", "CA: channels and server"),
    ("build_database", "database: build"),
    ("Database.", "database: build"),
    ("Server.__init__", "database and drivers: build"),
    ("SiteConfig", "site: validation"),
    ("site_data", "site: generation (benchmark only)"),
)


def components(path: Path, table: tuple[tuple[str, str], ...] = SERVING) -> dict[str, dict[str, float]]:
    """Per thread, the share of busy samples spent in each component of ``table``."""
    out: dict[str, Counter] = {}
    busy: Counter = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        thread = frames[0].split(":", 1)[-1].strip() if frames[0].startswith("thread") else "main"
        if any(marker in frames[-1] for marker in _IDLE):
            continue
        k = int(count)
        busy[thread] += k
        name = "other (event loop, libraries)"
        for f in frames[1:]:  # the outermost match wins
            fn = _function(f)
            hit = next((c for prefix, c in table if fn.startswith(prefix) or prefix in fn), None)
            if hit is not None:
                name = hit
                break
        out.setdefault(thread, Counter())[name] += k
    return {t: {c: round(k / busy[t] * 100, 1) for c, k in counts.most_common()} for t, counts in out.items()}


def top_frames(path: Path, n: int = 15) -> dict:
    """The busiest functions in a collapsed-stack file, per thread: self and inclusive shares."""
    per_thread: dict[str, dict[str, Counter]] = {}
    samples: Counter = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        thread = frames[0].split(":", 1)[-1].strip() if frames[0].startswith("thread") else "main"
        frames = [frames[0], *(_function(f) for f in frames[1:])]
        leaf = frames[-1]
        if any(marker in leaf for marker in _IDLE):
            continue
        k = int(count)
        samples[thread] += k
        t = per_thread.setdefault(thread, {"self": Counter(), "inclusive": Counter()})
        t["self"][leaf] += k
        for f in set(frames[1:]):
            t["inclusive"][f] += k
    total = sum(samples.values()) or 1
    out = {"busy_samples": dict(samples), "threads": {}}
    for thread, c in per_thread.items():
        ns = samples[thread] or 1
        out["threads"][thread] = {
            "share_of_busy": round(samples[thread] / total, 3),
            "self": [(f, round(k / ns * 100, 1)) for f, k in c["self"].most_common(n)],
            "inclusive": [(f, round(k / ns * 100, 1)) for f, k in c["inclusive"].most_common(n + 12)],
        }
    return out
