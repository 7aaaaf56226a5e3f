"""An acknowledged write is never lost: kill -9 right after a burst, and every accepted write is in the audit trail.

A real ``labctl serve`` in a subprocess with the historian's default flush interval
(``batch_age_s: 0.5``, so its in-memory queue holds the last half second of records when
the process dies), written to over OPC UA by several clients at once; SIGKILL the moment
the last of a bounded number of writes was acknowledged; then started again on the same
state directory, where the audit journal is replayed into the archive.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time

import pytest
from labctl.clients.session import connect
from labctl.server.passwords import hash_password

from tests.served import site_servers

LABCTL = [sys.executable, "-m", "labctl"]
PASSWORD = "olga-pw"
CLIENTS = 4
WRITES = 300
"""Acknowledged writes in the burst, over all clients."""


def site_text() -> str:
    return f"""
site: durable
server: {{opcua: {{host: 127.0.0.1, trust: auto}}}}
historian: {{url: "sqlite:///{{state_dir}}/history.sqlite"}}
users:
  - {{name: olga, roles: [operator], password_hash: "{hash_password(PASSWORD)}"}}
resources: [{{name: lab, lockable: false}}]
pvs:
""" + "".join(
        f'  - {{name: "LAB:SP{i}", type: float64, writable: true, initial: -1.0, resource: lab, autosave: false}}\n'
        for i in range(CLIENTS)
    )


@pytest.fixture
def serve(tmp_path):
    site = tmp_path / "durable.yaml"
    site.write_text(site_text())
    with site_servers(site, tmp_path / "var", tmp_path) as start:
        yield start


async def test_every_acknowledged_write_is_in_the_audit_trail_after_kill_9(serve):
    since = time.time()
    first = serve()
    acked: list[tuple[str, float]] = []
    connected, finished = [0], [0]
    go, all_connected, all_finished, killed = asyncio.Event(), asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def writer(i: int) -> None:
        async with await connect(first.url, "olga", PASSWORD) as s:
            connected[0] += 1
            if connected[0] == CLIENTS:
                all_connected.set()
            await go.wait()
            k = 0
            while len(acked) < WRITES:
                await s.put(f"LAB:SP{i}", float(k))
                acked.append((f"LAB:SP{i}", float(k)))
                k += 1
            finished[0] += 1
            if finished[0] == CLIENTS:
                all_finished.set()
            await killed.wait()  # the session stays open: the server dies under it

    tasks = [asyncio.create_task(writer(i)) for i in range(CLIENTS)]
    try:
        await asyncio.wait_for(all_connected.wait(), 30)
        go.set()
        await asyncio.wait_for(all_finished.wait(), 120)
        first.stop(signal.SIGKILL)  # right after the last acknowledgement
    finally:
        killed.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert len(acked) >= WRITES

    second = serve()
    async with await connect(second.url, "olga", PASSWORD) as s:
        trail = await s.audit(since)
    written = {(r["target"], r["new"]) for r in trail if r["action"] == "write" and r["accepted"] and r["user"] == "olga"}
    missing = [w for w in acked if w not in written]
    assert missing == []
    assert second.saw("audit journal:")  # the earlier run's journal was handed to the historian
    assert second.stop() == 0
