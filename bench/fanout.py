"""Scenario 1, fan-out: N PVs updating at a total rate, subscribed by one and by many clients.

For each PV count and client count, every server that speaks the protocol is measured in
turn under the same load: over Channel Access labctl, plain caproto and the C-core IOC
(pythonSoftIOC); over OPC UA labctl and plain asyncua (publishing interval 100 ms). labctl
serves both protocols and archives into SQLite throughout, as in production, whichever
protocol is being measured. The many-client cells use a lower total rate
(``rate_many``), since every client receives every update and the clients themselves
share the machine's two cores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.rig import Rig

SERVERS = {"ca": ("labctl", "caproto", "softioc"), "opcua": ("labctl", "asyncua")}


async def run_cell(
    kind: str,
    protocol: str,
    count: int,
    clients: int,
    rate: float,
    *,
    duration_s: float,
    warmup_s: float,
    interval_ms: float = 100.0,
    profile: Path | None = None,
    server_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One server, one protocol, one load: the measured window and the rig's start-up."""
    grace = 1.6 if protocol == "ca" else max(1.0, 3 * interval_ms / 1000)
    async with Rig(
        kind, count, protocol=protocol, clients=clients, interval_ms=interval_ms, server_env=server_env
    ) as rig:
        m = await rig.measure(rate, warmup_s=warmup_s, duration_s=duration_s, grace_s=grace, profile=profile)
        return {
            "scenario": "fanout",
            "protocol": protocol,
            "server": kind,
            "pvs": count,
            "clients": clients,
            "interval_ms": interval_ms if protocol == "opcua" else None,
            **m,
            "startup": rig.startup,
        }


def cells(
    sizes: list[int], client_counts: list[int], rate: float, rate_many: float, protocols: list[str]
) -> list[tuple[str, str, int, int, float]]:
    """(server, protocol, PVs, clients, rate) of every cell, baselines beside labctl."""
    out = []
    for n in sizes:
        for k in client_counts:
            r = rate if k == 1 else rate_many
            for protocol in protocols:
                for kind in SERVERS[protocol]:
                    out.append((kind, protocol, n, k, r))
    return out
