"""Scenario 2, write round trip: write a setpoint, wait for its monitor to show it.

A client writes ``MAG:SETP`` and times each write until the value it wrote comes back on
its own subscription to the PV, ``n`` times in a row: idle, and again while the server
carries a fan-out load (N PVs, one subscribed fan-out client of the same protocol) at
each of the given rates -- a moderate one, and the fan-out scenario's one-client rate. In labctl the setpoint belongs to a Lake Shore 336 driven through
pyvisa-sim, so a write runs the whole write path (roles, limits, interlocks, the driver's
``SETP`` command, its read-back ``SETP?``, the audit record); the baselines serve a
plain writable PV (caproto ``ChannelDouble``, an asyncua variable, a softIOC ``ao``
record), which is the floor the protocol library sets. Over Channel Access the write is a
``ca_put``; over OPC UA a Write request as user ``operator``, watched by a subscription
with publishing interval 0 (published as soon as the change is queued).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.rig import Rig
from bench.serve import SETPOINT_PV
from bench.site import OPERATOR, OPERATOR_PASSWORD

SERVERS = {"ca": ("labctl", "caproto", "softioc"), "opcua": ("labctl", "asyncua")}


async def run(
    kind: str,
    protocol: str,
    count: int,
    rates: list[float],
    *,
    writes: int,
    duration_s: float,
    warmup_s: float,
    password_hash: str,
    server_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Idle round trips against one server, then loaded ones at each of ``rates``."""
    server_args = ["--instrument"]
    if kind == "labctl":
        server_args += ["--password-hash", password_hash]
    async with Rig(kind, count, protocol=protocol, clients=1, server_args=server_args, server_env=server_env) as rig:
        login = (
            ["--user", OPERATOR, "--password", OPERATOR_PASSWORD] if protocol == "opcua" and kind == "labctl" else []
        )
        writer = rig.client(f"{protocol} writer", 0, login)
        try:
            await writer.start(timeout=120)
            idle = _clean(await writer.call("roundtrip", timeout=writes * 6 + 30, pv=SETPOINT_PV, n=writes))
            if kind == "labctl":
                idle["stages"] = _stages(await rig.server.call("stages"))
            loaded = []
            for k, rate in enumerate(rates):
                measure = asyncio.create_task(rig.measure(rate, warmup_s=warmup_s, duration_s=duration_s))
                await asyncio.sleep(warmup_s)
                deadline = time.time() + duration_s
                rt = _clean(
                    await writer.call(
                        "roundtrip", timeout=duration_s + 60, pv=SETPOINT_PV, n=writes, base=2.0 + k, deadline=deadline
                    )
                )
                load = await measure
                rt["rate_offered"] = rate
                if kind == "labctl":
                    rt["stages"] = _stages(await rig.server.call("stages"))
                rt["load"] = {k: load[k] for k in ("posted_rate", "delivered_rate", "latency", "server_cores", "load")}
                loaded.append(rt)
        finally:
            await writer.close()
    return {
        "scenario": "roundtrip",
        "protocol": protocol,
        "server": kind,
        "pvs": count,
        "idle": idle,
        "loaded": loaded,
    }


def _clean(answer: dict[str, Any]) -> dict[str, Any]:
    answer = {k: v for k, v in answer.items() if k not in ("id", "ok")}
    answer["latency"] = {k: v for k, v in answer["latency"].items() if not k.startswith("hist")}
    return answer


def _stages(answer: dict[str, Any]) -> dict[str, Any]:
    """The server's per-step times of the writes just made (:mod:`bench.stages`)."""
    return {k: v for k, v in answer.items() if k not in ("id", "ok")}
