"""The blocking wrapper, used from a worker thread as a script would (the server runs on the test's loop)."""

from __future__ import annotations

import asyncio
import threading

import pytest
from labctl.clients import sync
from labctl.clients.errors import PutRefused, RequestTimeout

from .conftest import PASSWORDS


async def test_script_session(server, url):
    def script():
        with sync.connect(url, "operator", PASSWORDS["operator"], timeout_s=10) as s:
            assert (s.site, s.user, s.roles) == ("bench", "operator", ("operator",))
            assert [m.name for m in s.list_pvs("B:T*")] == ["B:TEMP"]
            assert s.get("B:TEMP").value == 4.2
            s.put("B:TEMP", 9.5)
            assert [v.value for v in s.get_many(["B:TEMP", "B:COUNT"])] == [9.5, 7]
            with pytest.raises(PutRefused, match="outside the drive limits"):
                s.put("B:TEMP", 1e6)
            return s._thread

    thread = await asyncio.to_thread(script)
    assert not thread.is_alive(), "closing ends the loop thread"
    assert server.db.read("B:TEMP").value == 9.5


async def test_sync_monitor_with_timeouts(server, url):
    subscribed = threading.Event()
    posted = threading.Event()

    def script():
        with sync.connect(url, timeout_s=10) as s, s.monitor(["B:COUNT"]) as mon:
            assert mon.next(5).reading.value == 7
            with pytest.raises(RequestTimeout, match="no change of B:COUNT within 0.2 s"):
                mon.next(0.2)  # nothing changes: the call returns instead of hanging
            subscribed.set()
            assert posted.wait(10)
            return [mon.next(5).reading.value for _ in range(10)]

    task = asyncio.create_task(asyncio.to_thread(script))
    await asyncio.to_thread(subscribed.wait, 30)
    for i in range(10):
        server.db.post("B:COUNT", i)
    posted.set()
    assert await task == list(range(10))


async def test_a_call_that_runs_out_of_time_raises(url):
    def script():
        s = sync.connect(url, timeout_s=10)
        try:
            with pytest.raises(RequestTimeout, match="no answer within 0.1 s"):
                s._run(asyncio.sleep(5), timeout_s=0.1)
            assert s.get("B:COUNT").value == 7, "the session still works afterwards"
        finally:
            s.close()
        with pytest.raises(Exception, match="closed"):
            s.get("B:COUNT")

    await asyncio.to_thread(script)


async def test_failed_connect_leaves_no_thread(url):
    def clients() -> int:  # the client's loop threads (the in-process server may start its own, e.g. password checks)
        return sum(t.name == "labctl-client" for t in threading.enumerate())

    def script():
        before = clients()
        with pytest.raises(Exception, match="login refused"):
            sync.connect(url, "operator", "wrong")
        return before, clients()

    before, after = await asyncio.to_thread(script)
    assert after <= before
