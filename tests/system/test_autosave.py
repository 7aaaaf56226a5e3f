"""Values survive a restart (autosave): server-kept PVs and instrument setpoints, kill -9 included.

A real ``labctl serve`` in a subprocess (simulated cryostat on the Lake Shore driver),
written to over OPC UA with the client library, killed with SIGKILL, and started again on
the same state directory; and in-process servers for the site switches.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest
from labctl.clients.session import connect
from labctl.server.app import Server
from labctl.server.autosave import read_file
from labctl.server.passwords import hash_password
from labctl.server.site import parse_site

from tests.helpers import wait_for, wait_for_sync
from tests.served import site_servers
from tests.sites import FAST_CRYOSTAT

LABCTL = [sys.executable, "-m", "labctl"]
PASSWORD = "olga-pw"
NOTE = "fridge cold, sample B"


def site_text(extra: str = "") -> str:
    return f"""
site: keep
server: {{opcua: {{host: 127.0.0.1, trust: auto}}}}
historian: {{url: "sqlite:///{{state_dir}}/history.sqlite", batch_age_s: 0.05}}
{extra}
users:
  - {{name: olga, roles: [operator], password_hash: "{hash_password(PASSWORD)}"}}
resources: [{{name: cryostat, lockable: false}}, {{name: lab, lockable: false}}]
""" + FAST_CRYOSTAT + """pvs:
  - {name: "LAB:NOTE", type: string, writable: true, initial: "", length: 100, resource: lab}
  - {name: "LAB:GAIN", type: float64, writable: true, initial: 1.0, resource: lab, autosave: false}
  - {name: "LAB:WAVE", type: "float64[]", writable: true, initial: [0.0, 0.0], length: 2, resource: lab}
"""


@pytest.fixture
def serve(tmp_path):
    site = tmp_path / "keep.yaml"
    site.write_text(site_text())
    with site_servers(site, tmp_path / "var", tmp_path) as start:
        yield start


def saved(tmp_path: Path) -> dict:
    """The values in the autosave file (read_file raises if it were ever torn)."""
    return {k: v["value"] for k, v in read_file(tmp_path / "var" / "autosave.json").items()}


async def test_values_survive_kill_9_and_restores_are_audited(serve, tmp_path):
    first = serve()
    async with await connect(first.url, "olga", PASSWORD) as s:
        await s.put("LAB:NOTE", NOTE)
        await s.put("LAB:GAIN", 2.5)
        await s.put("LAB:WAVE", [1.5, -2.0])
        await s.put("CRYO:STILL:HTR", 12.5)
        await s.put("CRYO:MXC:HTR:RANGE", 3)
        acked = time.monotonic()
    wait_for_sync(lambda: saved(tmp_path).get("CRYO:MXC:HTR:RANGE") == 3, timeout=10, what="the last write saved")
    print(f"autosave: last write on disk {1000 * (time.monotonic() - acked):.1f} ms after its acknowledgement (polled)")
    first.stop(signal.SIGKILL)

    since = time.time()
    second = serve()
    async with await connect(second.url, "olga", PASSWORD) as s:
        assert (await s.get("LAB:NOTE")).value == NOTE
        assert (await s.get("LAB:GAIN")).value == 1.0  # autosave: false -- starts afresh
        assert tuple((await s.get("LAB:WAVE")).value) == (1.5, -2.0)

        async def setpoints_back() -> bool:
            return (await s.get("CRYO:STILL:HTR")).value == 12.5 and (await s.get("CRYO:MXC:HTR:RANGE")).value == 3

        await wait_for_async(setpoints_back)  # sent to the instrument once it connects
        audit = await s.audit(since)
    restores = {r["target"]: r for r in audit if r["action"] == "restore"}
    assert set(restores) == {"LAB:NOTE", "LAB:WAVE", "CRYO:STILL:HTR", "CRYO:MXC:HTR:RANGE"}
    assert {(r["user"], r["host"], r["accepted"]) for r in restores.values()} == {("labctl", "autosave", True)}
    assert restores["LAB:NOTE"]["new"] == NOTE and restores["LAB:NOTE"]["old"] == ""
    assert second.stop() == 0


async def wait_for_async(predicate) -> None:
    """Poll an async predicate until true (at most 10 s)."""
    result = {"ok": False}

    async def check() -> None:
        result["ok"] = await predicate()

    deadline = time.monotonic() + 10
    while True:
        await check()
        if result["ok"]:
            return
        assert time.monotonic() < deadline, "not restored in 10 s"
        await wait_for(lambda: True, timeout=1)


async def test_a_kill_right_after_a_write_keeps_a_whole_file(serve, tmp_path):
    first = serve()
    async with await connect(first.url, "olga", PASSWORD) as s:
        await s.put("LAB:NOTE", "before")
        wait_for_sync(lambda: saved(tmp_path).get("LAB:NOTE") == "before", timeout=10, what="saved")
        await s.put("LAB:NOTE", "after")
    first.proc.send_signal(signal.SIGKILL)  # inside the documented window: "after" may or may not be on disk
    first.stop()
    doc = json.loads((tmp_path / "var" / "autosave.json").read_text())  # complete, whatever the moment
    assert doc["pvs"]["LAB:NOTE"]["value"] in ("before", "after")
    second = serve()
    async with await connect(second.url) as s:
        assert (await s.get("LAB:NOTE")).value == doc["pvs"]["LAB:NOTE"]["value"]


def in_process(tmp_path: Path, extra: str = "") -> Server:
    text = site_text(extra).replace("server: {opcua: {host: 127.0.0.1, trust: auto}}", f'server: {{state_dir: "{tmp_path / "var"}", opcua: {{enabled: false}}, ca: {{enabled: false}}}}')
    return Server(parse_site(text.replace('"sqlite:///{state_dir}/history.sqlite"', f'"sqlite:///{tmp_path}/h.sqlite"'), "keep.yaml"))


async def test_a_clean_stop_saves_and_a_site_can_turn_it_off(tmp_path):
    from labctl.ioc.types import SYSTEM

    first = in_process(tmp_path)
    async with first:
        await first.db.write("LAB:NOTE", "kept", SYSTEM)
        await first.db.write("LAB:GAIN", 3.0, SYSTEM)
    kept = saved(tmp_path)
    assert kept["LAB:NOTE"] == "kept" and "LAB:GAIN" not in kept  # autosave: false
    assert {"CRYO:STILL:HTR", "CRYO:MXC:HTR:RANGE"} <= set(kept)  # setpoints, as the instrument reported them
    assert "CRYO:MXC:TEMP" not in kept  # a reading, not a setpoint
    second = in_process(tmp_path)
    async with second:
        assert second.db.read("LAB:NOTE").value == "kept"
        assert second.db.read("LAB:GAIN").value == 1.0
    off = in_process(tmp_path, "autosave: {enabled: false}")
    assert "autosave" not in [s.name for s in off.services]
    async with off:
        assert off.db.read("LAB:NOTE").value == ""


async def test_an_unreadable_file_is_set_aside(tmp_path):
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "autosave.json").write_text('{"format": "labctl-autosave", "vers')
    server = in_process(tmp_path)
    async with server:
        assert server.db.read("LAB:NOTE").value == ""
    assert list((tmp_path / "var").glob("autosave.json.unreadable-*"))
