"""Scenario: CA get and OPC UA read latency, idle and under a flood of bad OPC UA logins from one address.

A labctl server (subprocess, Channel Access and OPC UA on loopback, one password account)
is measured from this process: ``n`` CA gets (caproto's threading client, one channel kept
open) and ``n`` OPC UA reads (asyncua, one anonymous session) of the same PV, p50/p99.
Then a second subprocess floods the OPC UA endpoint with wrong-password logins for the
real account (``--flooders`` concurrent asyncua clients, each: connect, ActivateSession
refused, disconnect, again), and the same gets and reads are measured during the flood,
in the same run. The issue's goal: p99 under the flood within 2x of idle. The flood's
rate of attempts is reported with it.

    python -m bench.loginflood [--n 300] [--flooders 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.site import OPERATOR, OPERATOR_PASSWORD, PREFIX, site_data, write_site


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"n": len(xs), "p50_ms": 1e3 * xs[len(xs) // 2], "p99_ms": 1e3 * xs[min(len(xs) - 1, int(len(xs) * 0.99))]}


async def _flood(url: str, seconds: float, flooders: int) -> None:
    from asyncua import Client

    count = [0]
    end = time.monotonic() + seconds

    async def one() -> None:
        while time.monotonic() < end:
            c = Client(url, timeout=5)
            c.set_user(OPERATOR)
            c.set_password("wrong-password")
            try:
                await c.connect()
            except Exception:  # refused, as intended
                pass
            try:
                await c.disconnect()
            except Exception:  # already closed
                pass
            count[0] += 1

    await asyncio.gather(*(one() for _ in range(flooders)))
    print(json.dumps({"attempts": count[0], "rate_per_s": count[0] / seconds}), flush=True)


def _ca_gets(pv: Any, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        pv.read(timeout=5)
        out.append(time.perf_counter() - t)
    return out


async def _ua_reads(node: Any, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await node.read_value()
        out.append(time.perf_counter() - t)
    return out


async def measure(n: int, flooders: int) -> dict[str, Any]:
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
            await asyncio.to_thread(_ca_gets, pv, 20)  # warm-up
            await _ua_reads(node, 20)
            idle = {"ca_get": _pct(await asyncio.to_thread(_ca_gets, pv, n)), "opcua_read": _pct(await _ua_reads(node, n))}
            flood_s = 60.0
            flood = subprocess.Popen(
                [sys.executable, "-m", "bench.loginflood", "--flood", url, "--seconds", str(flood_s), "--flooders", str(flooders)],
                stdout=subprocess.PIPE, text=True, env=env, cwd=Path(__file__).resolve().parent.parent,
            )  # fmt: skip
            await asyncio.sleep(3.0)  # the flood under way (and past its first, hashed, failures)
            t0 = time.monotonic()
            loaded = {"ca_get": _pct(await asyncio.to_thread(_ca_gets, pv, n)), "opcua_read": _pct(await _ua_reads(node, n))}
            measured_s = time.monotonic() - t0
            flood.terminate()
            flood.wait(10)
            ctx.disconnect()
            await client.disconnect()
        finally:
            server.terminate()
            server.wait(20)
    return {"scenario": "loginflood", "flooders": flooders, "idle": idle, "flood": loaded, "flood_measured_s": measured_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=300, help="gets and reads per phase")
    p.add_argument("--flooders", type=int, default=4, help="concurrent bad-login clients")
    p.add_argument("--flood", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.flood:
        asyncio.run(_flood(args.flood, args.seconds, args.flooders))
        return
    result = asyncio.run(measure(args.n, args.flooders))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
