"""Interoperability with an independent OPC UA stack: node-opcua, driven as a subprocess.

``tests/node/interop.js`` reports each step as a JSON line; the test acts on them (posts
values once the client has subscribed) and checks what node-opcua saw. node-opcua is
pinned in ``tests/node/package-lock.json`` and installed by ``scripts/install-test-deps.sh``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from labctl.server.opcua.units import unit_id

from .conftest import NAMESPACE, PASSWORDS, SITE

pytestmark = pytest.mark.node

NODE_DIR = Path(__file__).resolve().parents[2] / "node"
SCRIPT = NODE_DIR / "interop.js"
PREFIX = "@labctl "


def _node() -> str:
    node = shutil.which("node")
    assert node, "node-opcua tests need Node.js 20 (`node` on PATH)"
    assert (NODE_DIR / "node_modules" / "node-opcua-client").is_dir(), (
        "node-opcua is not installed: run `bash scripts/install-test-deps.sh` (npm ci in tests/node)"
    )
    return node


class Interop:
    """A running interop.js: its JSON lines, one at a time."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[dict] = []
        self.log: list[str] = []
        """node-opcua's own output, for the failure message."""

    async def next(self, timeout: float = 30.0) -> dict:
        assert self.proc.stdout is not None
        while True:
            raw = (await asyncio.wait_for(self.proc.stdout.readline(), timeout)).decode(errors="replace")
            if not raw:
                stderr = (await self.proc.stderr.read()).decode(errors="replace") if self.proc.stderr else ""
                output = "".join(self.log)[-3000:]
                raise AssertionError(f"interop.js ended early after {self.lines}; output:\n{output}\nstderr:\n{stderr[-3000:]}")
            if raw.startswith(PREFIX):
                break
            self.log.append(raw)
        line = json.loads(raw[len(PREFIX) :])
        self.lines.append(line)
        if line["event"] == "error":
            raise AssertionError(f"node-opcua: {line['message']} (after {self.lines[:-1]})")
        return line

    async def expect(self, event: str) -> dict:
        line = await self.next()
        assert line["event"] == event, f"expected {event!r}, got {line}"
        return line


async def run_interop(tmp_path: Path, config: dict) -> Interop:
    config = {"namespace": NAMESPACE, "pki": str(tmp_path / "node-pki"), "timeoutMs": 20000, **config}
    proc = await asyncio.create_subprocess_exec(
        _node(), str(SCRIPT), json.dumps(config), cwd=NODE_DIR, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    return Interop(proc)


async def finish(run: Interop) -> None:
    assert await asyncio.wait_for(run.proc.wait(), 30) == 0


async def test_node_opcua_operator_reads_writes_and_subscribes(server, service, tmp_path):
    run = await run_interop(
        tmp_path,
        {"url": service.url, "user": "operator", "password": PASSWORDS["operator"], "path": [SITE, "soft", "LAB:TEMP"], "write": 12.5, "changes": 12},
    )
    try:
        connected = await run.expect("connected")
        assert connected["securityMode"] == "SignAndEncrypt"
        read = await run.expect("read")
        assert read["nodeId"].endswith(";s=LAB:TEMP")
        assert (read["value"], read["status"], read["userAccessLevel"]) == (4.2, "Good", 3)
        assert read["unit"] == {"unitId": unit_id("KEL"), "displayName": "K", "namespaceUri": "http://www.opcfoundation.org/UA/units/un/cefact"}
        assert (await run.expect("write"))["status"] == "Good"
        assert (await run.expect("readback"))["value"] == 12.5
        assert server.db.read("LAB:TEMP").value == 12.5
        await run.expect("subscribed")
        series = [20.0 + i for i in range(12)]
        for value in series:
            server.db.post("LAB:TEMP", value)
        changes = []
        while True:
            line = await run.next()
            if line["event"] == "done":
                break
            assert line["event"] == "change" and line["status"] == "Good"
            changes.append(line["value"])
        assert changes[1:] == series, "the current value, then every change"
        await finish(run)
    finally:
        if run.proc.returncode is None:
            run.proc.kill()
            await run.proc.wait()


async def test_node_opcua_viewer_is_refused_a_write(server, service, tmp_path, audit):
    run = await run_interop(
        tmp_path,
        {"url": service.url, "user": "viewer", "password": PASSWORDS["viewer"], "path": [SITE, "soft", "LAB:TEMP"], "write": 1.0, "changes": 0, "expectRefusal": True},
    )
    try:
        await run.expect("connected")
        assert (await run.expect("read"))["userAccessLevel"] == 1
        assert (await run.expect("write"))["status"] == "BadUserAccessDenied"
        await run.expect("done")
        await finish(run)
    finally:
        if run.proc.returncode is None:
            run.proc.kill()
            await run.proc.wait()
    assert server.db.read("LAB:TEMP").value == 4.2
    (record,) = audit.of("write")
    assert (record.user, record.accepted) == ("viewer", False)
