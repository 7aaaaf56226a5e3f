"""Ports, EPICS environments and the machine's background load, for the orchestrator."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from bench.proc import CLOCK_TICKS
from tests.helpers import free_port

#: Channel Access pinned to loopback (clients search 127.0.0.1 only; servers bind it only).
EPICS_LOOPBACK = {
    "EPICS_CA_ADDR_LIST": "127.0.0.1",
    "EPICS_CA_AUTO_ADDR_LIST": "NO",
    "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1",
    "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
    "EPICS_CA_MAX_ARRAY_BYTES": "100000",
}


def ca_server_env(port: int) -> dict[str, str]:
    """Environment of a Channel Access server on ``port`` (beacons to a port nobody listens on)."""
    beacon = str(free_port(socket.SOCK_DGRAM))
    return {
        **EPICS_LOOPBACK,
        "EPICS_CA_SERVER_PORT": str(port),
        "EPICS_CAS_SERVER_PORT": str(port),
        "EPICS_CAS_BEACON_PORT": beacon,
        "EPICS_CA_REPEATER_PORT": beacon,
    }


def ca_client_env(port: int) -> dict[str, str]:
    """Environment of a libca client of the server on ``port``."""
    return {
        **EPICS_LOOPBACK,
        "EPICS_CA_SERVER_PORT": str(port),
        "EPICS_CA_REPEATER_PORT": str(free_port(socket.SOCK_DGRAM)),
    }


def _busy_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return total - idle, total


def _tree_ticks(root: int) -> int:
    """CPU ticks of ``root`` and all its descendants (workers, PostgreSQL backends...)."""
    stats: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            f = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry.name)] = (int(f[1]), int(f[11]) + int(f[12]))
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    ticks, todo = 0, [root]
    while todo:
        pid = todo.pop()
        ticks += stats.get(pid, (0, 0))[1]
        todo.extend(children.get(pid, ()))
    return ticks


class LoadMeter:
    """CPU used by the machine, and by processes other than ours, over an interval.

    Benchmarks on a shared machine are only as good as its quiet: each measurement window
    records how many cores the rest of the machine kept busy meanwhile ("foreign" load).
    """

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        self._busy, self._total = _busy_ticks()
        self._ours = _tree_ticks(os.getpid())
        self._t = time.monotonic()

    def read(self) -> dict[str, float]:
        """Cores busy in all, and cores busy outside our processes, since :meth:`start`."""
        busy, _ = _busy_ticks()
        ours = _tree_ticks(os.getpid())
        seconds = max(time.monotonic() - self._t, 1e-6)
        total_cores = (busy - self._busy) / CLOCK_TICKS / seconds
        ours_cores = (ours - self._ours) / CLOCK_TICKS / seconds
        return {"busy_cores": round(total_cores, 3), "foreign_cores": round(max(0.0, total_cores - ours_cores), 3)}


def wait_quiet(max_wait_s: float, threshold_cores: float = 0.3, sample_s: float = 1.0) -> dict[str, float]:
    """Wait (up to ``max_wait_s``) until the machine's load stays below ``threshold_cores``.

    Returns the last sample with the seconds waited; a busy machine is reported, not hidden.
    """
    t = time.monotonic()
    while True:
        meter = LoadMeter()
        time.sleep(sample_s)
        sample = meter.read()
        waited = time.monotonic() - t
        if sample["busy_cores"] < threshold_cores or waited >= max_wait_s:
            return {**sample, "waited_s": round(waited, 1)}
