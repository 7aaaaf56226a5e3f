"""A server under test with its clients, and one measurement window over them.

:class:`Rig` starts a server worker (:mod:`bench.serve`) and ``clients`` client workers
(:mod:`bench.ca_client` or :mod:`bench.ua_client`) subscribed to all its N PVs, each in
its own process. :meth:`Rig.measure` then runs one window: the server's pacer posts at
``rate`` from now until the window ends; the window ``[t0, t1]`` starts after
``warmup_s``; clients count and time what arrives in it and report ``grace_s`` later.
The result joins the server's side (posted, skipped, CPU), the clients' (delivered
updates per second, pooled latency percentiles, CPU) and the machine's (foreign load).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import profiling
from bench.env import LoadMeter, ca_client_env, ca_server_env
from bench.proc import Worker
from bench.stats import pooled
from tests.helpers import free_port, free_tcp_udp_port

#: Channels (or monitored items) clients may be creating at the same time.
CONNECT_AT_ONCE = 40_000
#: Protocols each server kind speaks.
PROTOCOLS = {"labctl": ("ca", "opcua"), "caproto": ("ca",), "softioc": ("ca",), "asyncua": ("opcua",)}


class Rig:
    """One server and its subscribed clients (see the module docstring)."""

    def __init__(
        self,
        kind: str,
        count: int,
        *,
        protocol: str,
        clients: int = 1,
        interval_ms: float = 100.0,
        server_args: list[str] | None = None,
        client_count: int | None = None,
        workdir: Path | None = None,
        server_env: dict[str, str] | None = None,
    ) -> None:
        if protocol not in PROTOCOLS[kind]:
            raise ValueError(f"{kind} does not serve {protocol}")
        self.kind = kind
        self.count = count
        self.protocol = protocol
        self.n_clients = clients
        self.interval_ms = interval_ms
        self.client_count = count if client_count is None else client_count
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="labctl-bench-"))
        self.env: dict[str, str] = {}
        args = [kind, "--count", count, *(server_args or [])]
        if kind == "labctl":
            args += ["--state-dir", str(self.workdir / "state")]
        port = free_tcp_udp_port()
        self.env = {**ca_server_env(port), **(server_env or {})}
        if kind == "asyncua":
            args += ["--opcua-port", free_port()]
        self.server = Worker(f"{kind} server", "bench.serve", args, self.env)
        self.clients: list[Worker] = []
        self.startup: dict[str, Any] = {}

    def client(self, name: str, count: int, extra: list[str] | None = None) -> Worker:
        """A client worker of this rig's protocol subscribed to ``count`` PVs (not started)."""
        ready = self.server.ready
        if self.protocol == "ca":
            return Worker(name, "bench.ca_client", ["--count", count, *(extra or [])], ca_client_env(ready["ca_port"]))
        args = [
            "--url",
            ready["opcua_url"],
            "--ns-uri",
            ready["ns_uri"],
            "--count",
            count,
            "--interval-ms",
            self.interval_ms,
            *(extra or []),
        ]
        return Worker(name, "bench.ua_client", args)

    async def __aenter__(self) -> Rig:
        t = time.monotonic()
        try:
            await self.server.start(timeout=600)
            self.startup["server_s"] = round(time.monotonic() - t, 3)
            self.startup["server_phases"] = self.server.ready.get("phases")
            self.startup["server_memory"] = self.server.memory()
            t = time.monotonic()
            self.clients = [
                self.client(f"{self.protocol} client {i}", self.client_count) for i in range(self.n_clients)
            ]
            # Connect at most ~40 000 channels at once: 20 clients searching 10 000 names each at
            # the same moment overflow the server's search socket, and libca then backs its
            # searches off for minutes.
            step = max(1, CONNECT_AT_ONCE // max(1, self.client_count))
            for k in range(0, len(self.clients), step):
                await asyncio.gather(*(c.start(timeout=600) for c in self.clients[k : k + step]))
            self.startup["clients_s"] = round(time.monotonic() - t, 3)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)
        await self.server.close()

    async def measure(
        self,
        rate: float,
        *,
        warmup_s: float = 1.0,
        duration_s: float = 4.0,
        grace_s: float = 1.5,
        feed_rate: float | None = None,
        profile: Path | None = None,
    ) -> dict[str, Any]:
        """One measurement window (see the module docstring)."""
        now = time.time()
        t0 = now + warmup_s
        t1 = t0 + duration_s
        t_end = t1 + 0.2
        await self.server.call("drive", rate=rate, t_end=t_end, t0=t0, t1=t1)
        if feed_rate:
            feed = asyncio.create_task(
                self.server.call("feed", timeout=t_end - now + 120, rate=feed_rate, t_end=t_end, t0=t0, t1=t1)
            )
        for c in self.clients:
            await c.call("window", t0=t0, t1=t1, grace=grace_s)
        await asyncio.sleep(max(0.0, t0 - time.time()))
        meter = LoadMeter()
        cpu0 = [self.server.cpu_seconds(), *(c.cpu_seconds() for c in self.clients)]
        stats0 = await self.server.call("stats") if self.kind == "labctl" else {}
        spy = asyncio.create_task(profiling.record(self.server.pid, duration_s, profile)) if profile else None
        await asyncio.sleep(max(0.0, t1 - time.time()))
        cpu1 = [self.server.cpu_seconds(), *(c.cpu_seconds() for c in self.clients)]
        load = meter.read()
        stats1 = await self.server.call("stats") if self.kind == "labctl" else {}
        driven = await self.server.event("driven", timeout=t_end - time.time() + 120)
        fed = (await feed) if feed_rate else None
        results = [await c.event("result", timeout=grace_s + 120) for c in self.clients]
        frames = None
        if spy is not None:
            path = await spy
            frames = profiling.top_frames(path) if path else None
        window = t1 - t0
        posted = driven["posted_in_window"]
        delivered = sum(r["count"] for r in results)
        stamped = sum(r["stamped"] for r in results)
        latency = pooled([(r["count"], r.pop("sample_us")) for r in results])
        out: dict[str, Any] = {
            "window_s": round(window, 3),
            "rate_offered": rate,
            "posted_rate": posted / window,
            "driver": driven,
            "delivered_rate": delivered / window,
            "per_client_rate": delivered / window / max(1, len(results)),
            "coverage": stamped / (posted * len(results)) if posted and results else None,
            "latency": latency,
            "server_cores": round((cpu1[0] - cpu0[0]) / window, 3),
            "clients_cores": round(sum(b - a for a, b in zip(cpu0[1:], cpu1[1:], strict=True)) / window, 3),
            "load": load,
            "per_client": results,
        }
        if fed is not None:
            fed.pop("id", None)
            fed.pop("ok", None)
            out["feed"] = fed
        if stats1:
            out["server_stats"] = {"before": _plain(stats0), "after": _plain(stats1)}
        if frames is not None:
            out["profile"] = frames
        return out


def _plain(answer: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in answer.items() if k not in ("id", "ok")}


@contextlib.asynccontextmanager
async def extra_clients(rig: Rig, protocol_clients: list[Worker]):
    """Start more client workers beside a rig's own; close them afterwards."""
    try:
        await asyncio.gather(*(c.start(timeout=600) for c in protocol_clients))
        yield protocol_clients
    finally:
        await asyncio.gather(*(c.close() for c in protocol_clients), return_exceptions=True)
