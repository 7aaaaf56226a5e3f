"""Scenario: CA get and OPC UA read latency, idle and under a flood of bad OPC UA logins from another address.

A labctl server (subprocess, Channel Access and OPC UA on loopback, one password account)
is measured from this process at 127.0.0.1: CA gets for ``seconds`` (caproto's threading
client, one channel kept open, one get after the other) and OPC UA reads for as long (asyncua, one anonymous session) of the
same PV, p50/p99. Then a second subprocess floods the OPC UA endpoint from 127.0.0.2 with
wrong-password logins for the real account (``--flooders`` concurrent asyncua clients,
each: connect, ActivateSession refused, disconnect, again), and the same gets and reads
are measured during the flood, in the same run. The goal (README, "Security"): p99
under the flood within 2x of idle. The flood's attempts during the measurement are
reported with it: a server that holds a throttled address's connections at the door
sees few.

    python -m bench.loginflood [--measure 5] [--flooders 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path
from typing import Any

from bench.site import OPERATOR, OPERATOR_PASSWORD, PREFIX, site_data, write_site

#: The flood's source address (the measured clients use 127.0.0.1): another host, as far as the server can tell.
FLOOD_SOURCE = "127.0.0.2"


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"n": len(xs), "p50_ms": 1e3 * xs[len(xs) // 2], "p99_ms": 1e3 * xs[min(len(xs) - 1, int(len(xs) * 0.99))]}


async def _flood(url: str, seconds: float, flooders: int, source: str) -> None:
    """Bad logins from ``source`` for ``seconds``; prints the attempts so far every 0.5 s (one JSON line each)."""
    from asyncua import Client

    count = [0]
    end = time.monotonic() + seconds

    async def connect_from(self: Any, host: str, port: int) -> None:  # asyncua's UaClient.connect_socket, bound to ``source``
        from asyncua.client.ua_client import UaClientState

        self._set_state(UaClientState.CONNECTING)
        try:
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(loop.create_connection(self._make_protocol, host, port, local_addr=(source, 0)), self._timeout)
        except BaseException:
            self._set_state(UaClientState.DISCONNECTED)
            raise
        self._set_state(UaClientState.SOCKET_OPEN)

    async def one() -> None:
        while time.monotonic() < end:
            c = Client(url, timeout=5)
            c.uaclient.connect_socket = types.MethodType(connect_from, c.uaclient)
            c.set_user(OPERATOR)
            c.set_password("wrong-password")
            try:
                await c.connect()
            except Exception:  # refused (or held past the client's timeout), as intended
                pass
            try:
                await c.disconnect()
            except Exception:  # already closed
                pass
            count[0] += 1

    async def progress() -> None:
        while time.monotonic() < end:
            print(json.dumps({"t": time.monotonic(), "attempts": count[0]}), flush=True)
            await asyncio.sleep(0.5)

    logging.disable(logging.WARNING)  # asyncua logs every refused login; the counts are what matter
    await asyncio.gather(progress(), *(one() for _ in range(flooders)))


class _Progress:
    """The flooder's latest attempt count, read from its output."""

    def __init__(self, stream: Any) -> None:
        self.attempts = 0
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            try:
                self.attempts = json.loads(line)["attempts"]
            except (ValueError, KeyError):
                continue


def _ca_gets(pv: Any, seconds: float) -> list[float]:
    out: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        pv.read(timeout=5)
        out.append(time.perf_counter() - t)
    return out


async def _ua_reads(node: Any, seconds: float) -> list[float]:
    out: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        await node.read_value()
        out.append(time.perf_counter() - t)
    return out


async def measure(seconds: float, flooders: int) -> dict[str, Any]:
    from asyncua import Client, ua
    from labctl.server.passwords import hash_password

    with tempfile.TemporaryDirectory(prefix="labctl-loginflood-") as tmp:
        ua_port, ca_port = _free_port(), _free_port()
        data = site_data(10, state_dir=f"{tmp}/state", ca_port=ca_port, historian_url=None, password_hash=hash_password(OPERATOR_PASSWORD))
        data["server"]["opcua"]["port"] = ua_port
        site = write_site(Path(tmp) / "site.yaml", data)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        server = subprocess.Popen(
            [sys.executable, "-c", "from labctl.server.cli import main; raise SystemExit(main())", "serve", str(site), "--log-level", "WARNING"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        threading.Thread(target=lambda: [None for _ in server.stdout], daemon=True).start()  # type: ignore[union-attr]
        url = f"opc.tcp://127.0.0.1:{ua_port}"
        try:
            client = Client(url, timeout=10)
            for _ in range(300):
                try:
                    await client.connect()
                    break
                except OSError:
                    await asyncio.sleep(0.2)
            idx = await client.get_namespace_index("urn:labctl:bench")
            node = client.get_node(ua.NodeId(f"{PREFIX}00000", idx))
            os.environ.update(EPICS_CA_AUTO_ADDR_LIST="NO", EPICS_CA_ADDR_LIST="127.0.0.1", EPICS_CA_SERVER_PORT=str(ca_port))
            from caproto.threading.client import Context

            ctx = Context()
            (pv,) = ctx.get_pvs(f"{PREFIX}00000", timeout=10)
            pv.wait_for_connection(timeout=10)
            await asyncio.to_thread(_ca_gets, pv, 0.5)  # warm-up
            await _ua_reads(node, 0.5)
            idle = {"ca_get": _pct(await asyncio.to_thread(_ca_gets, pv, seconds)), "opcua_read": _pct(await _ua_reads(node, seconds))}
            flood_s = 60.0
            flood = subprocess.Popen(
                [sys.executable, "-m", "bench.loginflood", "--flood", url, "--seconds", str(flood_s), "--flooders", str(flooders), "--source", FLOOD_SOURCE],
                stdout=subprocess.PIPE, text=True, env=env, cwd=Path(__file__).resolve().parent.parent,
            )  # fmt: skip
            progress = _Progress(flood.stdout)
            await asyncio.sleep(1.0)  # the flood under way
            t0, before = time.monotonic(), progress.attempts
            loaded = {"ca_get": _pct(await asyncio.to_thread(_ca_gets, pv, seconds)), "opcua_read": _pct(await _ua_reads(node, seconds))}
            measured_s = time.monotonic() - t0
            await asyncio.sleep(0.6)  # the flooder's next progress line
            attempts = progress.attempts - before
            flood.terminate()
            flood.wait(10)
            ctx.disconnect()
            await client.disconnect()
        finally:
            server.terminate()
            server.wait(20)
    return {
        "scenario": "loginflood",
        "flooders": flooders,
        "flood_source": FLOOD_SOURCE,
        "idle": idle,
        "flood": loaded,
        "flood_measured_s": measured_s,
        "flood_attempts": attempts,
        "flood_rate_per_s": attempts / measured_s if measured_s else 0.0,
        "flood_total_attempts": progress.attempts,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--measure", type=float, default=5.0, help="seconds of CA gets, then of OPC UA reads, in each phase")
    p.add_argument("--flooders", type=int, default=4, help="concurrent bad-login clients")
    p.add_argument("--flood", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    p.add_argument("--source", default=FLOOD_SOURCE, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.flood:
        asyncio.run(_flood(args.flood, args.seconds, args.flooders, args.source))
        return
    result = asyncio.run(measure(args.measure, args.flooders))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
