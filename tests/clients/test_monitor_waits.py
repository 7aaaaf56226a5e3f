"""Monitors wait: a quiet PV is no error unless a timeout is asked for (library, blocking wrapper, CLI).

No test sleeps to let time pass: a monitor with a short timeout on the same quiet PV is
the clock -- once it has given up, the monitors without one have waited at least as
long and must still be waiting, and must then deliver the next change.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading

import pytest
from labctl.clients import sync
from labctl.clients.errors import RequestTimeout
from labctl.clients.session import connect


async def test_the_async_iterator_waits_on_a_quiet_pv(server, url):
    async with await connect(url, timeout_s=0.5) as s:  # a short request timeout: it must not bound the wait
        async with s.monitor(["B:COUNT"]) as mon, s.monitor(["B:COUNT"]) as clock:
            assert (await mon.next()).reading.value == 7
            assert (await clock.next(5)).reading.value == 7
            waiting = asyncio.create_task(anext(mon))
            with pytest.raises(RequestTimeout):
                await clock.next(1.0)  # a second of quiet, and the request timeout twice over
            assert not waiting.done(), "the iterator still waits"
            server.db.post("B:COUNT", 8)
            sample = await asyncio.wait_for(waiting, 10)
            assert (sample.name, sample.reading.value) == ("B:COUNT", 8)
            assert (await clock.next(5)).reading.value == 8, "a timeout leaves the monitor usable"


async def test_the_blocking_monitor_waits_unless_a_timeout_is_asked_for(server, url):
    first = threading.Event()
    gave_up = threading.Event()

    def script():
        with sync.connect(url, timeout_s=0.5) as s:
            with s.monitor(["B:COUNT"]) as mon, s.monitor(["B:COUNT"], timeout_s=1.0) as clock:
                assert next(mon).reading.value == 7 and next(clock).reading.value == 7
                first.set()
                with pytest.raises(RequestTimeout):
                    next(clock)  # the monitor's own timeout_s
                gave_up.set()
                got = next(mon)  # the session's 0.5 s request timeout does not apply: it waits
                return got.reading.value

    task = asyncio.create_task(asyncio.to_thread(script))
    await asyncio.to_thread(first.wait, 30)
    await asyncio.to_thread(gave_up.wait, 30)
    assert not task.done()
    server.db.post("B:COUNT", 9)
    assert await asyncio.wait_for(task, 30) == 9


async def _labctl(url: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "labctl", *args, "--url", url, "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=dict(os.environ),
    )  # fmt: skip


async def test_cli_monitor_waits_by_default_and_gives_up_with_timeout(server, url):
    patient = await _labctl(url, "monitor", "B:COUNT", "--count", "2")
    impatient = await _labctl(url, "monitor", "B:COUNT", "--timeout", "1")
    try:
        for proc in (patient, impatient):
            first = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
            assert (first["name"], first["value"]) == ("B:COUNT", 7)
        out, err = await asyncio.wait_for(impatient.communicate(), 60)
        assert impatient.returncode == 1 and out == b""
        assert json.loads(err)["kind"] == "timeout"
        assert patient.returncode is None, "without --timeout, monitor waits for the change"
        server.db.post("B:COUNT", 10)
        out, err = await asyncio.wait_for(patient.communicate(), 60)
        assert patient.returncode == 0, err.decode()
        assert [json.loads(line)["value"] for line in out.decode().splitlines()] == [10]
    finally:
        for proc in (patient, impatient):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_cli_monitor_with_timeout_ends_normally_when_changes_come(server, url):
    proc = await _labctl(url, "monitor", "B:COUNT", "--count", "3", "--timeout", "30")
    try:
        await asyncio.wait_for(proc.stdout.readline(), 60)
        for value in (11, 12):
            server.db.post("B:COUNT", value)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert [json.loads(line)["value"] for line in out.decode().splitlines()] == [11, 12]


async def test_request_timeout_of_other_commands_is_unchanged(server, url):
    proc = await _labctl(url, "get", "B:COUNT", "--timeout", "5")
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert json.loads(out)[0]["value"] == 7
