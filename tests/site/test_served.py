"""``labctl serve`` processes of one site: registered with both protocols, refused on a taken PV, down after kill -9.

The commands as people run them (subprocesses, real signals), on a fresh PostgreSQL
database; the site directory is read from the database, never from the processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import wait_for
from tests.served import Served
from tests.site.conftest import LAPSE_S, directory, read_owners, site_yaml


def _serve(site: Path, tmp_path: Path, name: str) -> Served:
    return Served([sys.executable, "-m", "labctl", "serve", str(site)], tmp_path / f"state-{name}", cwd=tmp_path)


async def test_served_servers_register_refuse_a_taken_pv_and_go_down_when_killed(pg_database, start_server, tmp_path):
    url = pg_database.url
    alpha_site = tmp_path / "alpha.yaml"
    alpha_site.write_text(site_yaml("alpha", ["A:X", "A:Y"], url, tmp_path / "unused", ca="{}"))
    alpha = _serve(alpha_site, tmp_path, "alpha")
    try:
        await asyncio.to_thread(alpha.wait_ready)
        entry = (await directory(url))["alpha"]
        assert entry.up and entry.health == "ok" and entry.pv_count == 2
        assert entry.opcua_endpoint == f"opc.tcp://127.0.0.1:{alpha.ua_port}"
        assert (entry.ca_address, entry.ca_port) == ("127.0.0.1", alpha.ca_port)

        # a second server with one of alpha's PVs exits 1, naming the PV and both servers
        gamma_site = tmp_path / "gamma.yaml"
        gamma_site.write_text(site_yaml("gamma", ["G:Z", "A:Y"], url, tmp_path / "state-gamma", opcua=False))
        gamma = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "labctl", "serve", str(gamma_site), "--no-ca"],
            cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert gamma.returncode == 1, gamma.stderr
        refusal = gamma.stderr.strip().splitlines()[-1]
        assert refusal.startswith("labctl serve: server 'gamma' cannot serve 1 PV(s)"), refusal
        assert "PV 'A:Y' is served by 'alpha'" in refusal and f"opc.tcp://127.0.0.1:{alpha.ua_port}" in refusal

        # labctl servers, as a command
        listed = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "labctl", "servers", "--json"],
            capture_output=True, text=True, timeout=60, env={**os.environ, "LABCTL_HISTORIAN_URL": url},
        )  # fmt: skip
        assert listed.returncode == 0, listed.stderr
        assert [(s["name"], s["state"]) for s in json.loads(listed.stdout)] == [("alpha", "up")]

        # kill -9: down once its heartbeat lapses; its PVs then go to the next server that serves them
        killed_at = time.monotonic()
        alpha.stop(signal.SIGKILL)
        await wait_for(lambda: _is_down(url, "alpha"), timeout=LAPSE_S + 10, what="alpha down")
        assert time.monotonic() - killed_at >= LAPSE_S - 0.3  # by the lapse, not before
        entry = (await directory(url))["alpha"]
        assert entry.health == "ok" and entry.age_s > LAPSE_S  # its last word, now too old
        await start_server("beta", ["A:Y", "B:X"], url)
        assert await asyncio.to_thread(read_owners, url) == {"A:X": "alpha", "A:Y": "beta", "B:X": "beta"}
    finally:
        if alpha.proc.poll() is None:
            alpha.stop(signal.SIGKILL)


async def _is_down(url: str, name: str) -> bool:
    return not (await directory(url))[name].up
