"""Clients see the whole site: one session to any server reaches every server's PVs.

Two (or three) real servers in-process on one real PostgreSQL database
(``tests/site/conftest.py``: heartbeat 0.2 s, down after 1 s), each serving OPC UA on a
free loopback port with the same accounts. The client connects to one of them only, as
people do, with a password over SignAndEncrypt; the ``Site`` folder, ``FindOwners`` and
HistoryRead of other servers' PVs are also checked with a plain asyncua client. The CLI
runs as a subprocess (``labctl get``) or in-process (``labctl servers``). Waiting is for
conditions with timeouts, never for a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua
from labctl.clients.errors import NoSuchPV, ServerDown, TooManySessions
from labctl.clients.session import Session, connect
from labctl.clients.site import ServerInfo
from labctl.ioc.types import Severity, Status
from labctl.server.app import Server
from labctl.server.passwords import hash_password
from labctl.server.site import parse_site

from tests.helpers import wait_for
from tests.site.conftest import LAPSE_S, run_labctl, site_yaml

PASSWORD = "operator-pw"
#: How long a change of the site may take to show everywhere (a few heartbeats and the lapse).
SETTLE_S = LAPSE_S + 5.0


@functools.cache
def _hash() -> str:
    return hash_password(PASSWORD)


def _site_text(name: str, pvs: Sequence[str], url: str, state_dir: Path, *, resource: str | None = None) -> str:
    """A server of the site: soft PVs, the operator account, and optionally a lockable resource with a PV."""
    extra = f'users:\n  - {{name: operator, roles: [operator], password_hash: "{_hash()}"}}\n'
    if resource is not None:
        extra += f"resources:\n  - {{name: {resource}, lockable: true}}\n"
    text = site_yaml(name, pvs, url, state_dir, extra=extra)
    if resource is not None:
        text += f'  - {{name: "{resource.upper()}:SET", type: float64, initial: 0.0, writable: true, resource: {resource}}}\n'
    return text


class Site:
    """Servers of one site on the test's database, started and stopped by the test."""

    def __init__(self, url: str, tmp_path: Path) -> None:
        self.url = url
        self.tmp_path = tmp_path
        self.servers: dict[str, Server] = {}

    async def start(self, name: str, pvs: Sequence[str], **kw: Any) -> Server:
        text = _site_text(name, pvs, self.url, self.tmp_path / name, **kw)
        server = Server(parse_site(text, f"{name}.yaml"), base_dir=self.tmp_path, source=f"{name}.yaml")
        await server.start()
        self.servers[name] = server
        return server

    async def stop(self, name: str) -> None:
        await self.servers.pop(name).stop()

    def endpoint(self, name: str) -> str:
        return self.servers[name].service("opcua").url  # type: ignore[attr-defined]

    async def connect(self, name: str, **kw: Any) -> Session:
        return await connect(self.endpoint(name), "operator", PASSWORD, "auto", **kw)


@pytest.fixture
async def site(pg_database: Any, tmp_path: Path) -> AsyncIterator[Site]:
    s = Site(pg_database.url, tmp_path)
    try:
        yield s
    finally:
        for name in reversed(list(s.servers)):
            await s.stop(name)


@contextlib.asynccontextmanager
async def session_to(site: Site, name: str, **kw: Any) -> AsyncIterator[Session]:
    s = await site.connect(name, **kw)
    try:
        yield s
    finally:
        await s.close()


async def sees(s: Session, **states: str) -> list[ServerInfo]:
    """Wait until the session's server shows each named server in that state (with its endpoint when up)."""

    async def shown() -> list[ServerInfo] | None:
        servers = await s.servers()
        by_name = {e.name: e for e in servers}
        for name, state in states.items():
            e = by_name.get(name)
            if e is None or e.state != state or (state == "up" and not e.endpoint):
                return None
        return servers

    return await wait_for(shown, timeout=SETTLE_S, what=f"the site folder showing {states}")


# ---- the Site folder and FindOwners ----------------------------------------------------------------------


async def test_the_site_folder_lists_every_server_with_its_state(site):
    alpha = await site.start("alpha", ["A:X", "A:Y"])
    await site.start("beta", ["B:X"])
    async with session_to(site, "alpha") as s:
        assert s.server_name == "alpha"
        servers = await sees(s, alpha="up", beta="up")
        assert [e.name for e in servers] == ["alpha", "beta"]
        by_name = {e.name: e for e in servers}
        for name, count in (("alpha", 2), ("beta", 1)):
            e = by_name[name]
            assert e.endpoint == site.endpoint(name) and e.health == "ok" and e.pv_count == count, e
            assert e.version and e.host and e.started and e.heartbeat and e.ca_address == "" and e.ca_port is None
        # the Site object is not a folder of PVs: a plain listing does not show it
        assert [m.name for m in await s.list_pvs("*:*") if not m.name.startswith("ALARM:")] == ["A:X", "A:Y"]

        await site.stop("beta")
        down = {e.name: e for e in await sees(s, alpha="up", beta="down")}
        assert down["beta"].health == "stopped"
        # forgotten for good: its object goes
        rc, _, err = await run_labctl("servers", "--historian-url", site.url, "--forget", "beta")
        assert rc == 0, err
        await wait_for(lambda: _names(s, ["alpha"]), timeout=SETTLE_S, what="beta gone from the site folder")
    # the same over a plain OPC UA client: browse names and values
    client = Client(alpha.service("opcua").url)  # type: ignore[attr-defined]
    await client.connect()
    try:
        idx = await client.get_namespace_index("urn:labctl:lab")
        assert await client.get_node(ua.NodeId("/lab/Site/ThisServer", idx)).read_value() == "alpha"
        state = client.get_node(ua.NodeId("/lab/Site/Servers/alpha/State", idx))
        assert await state.read_value() == "up"
        assert (await state.read_browse_name()).Name == "State"
        servers = await client.get_node(ua.NodeId("/lab/Site/Servers", idx)).get_children()
        assert [(await n.read_browse_name()).Name for n in servers] == ["alpha"]
        with pytest.raises(ua.UaStatusCodeError):
            await client.get_node(ua.NodeId("/lab/Site/Servers/beta/State", idx)).read_value()
    finally:
        await client.disconnect()


async def _names(s: Session, names: list[str]) -> bool:
    return [e.name for e in await s.servers()] == names


async def test_find_owners_answers_from_the_directory_with_bounded_input(site):
    alpha = await site.start("alpha", ["A:X"])
    beta = await site.start("beta", ["B:X"])
    async with session_to(site, "alpha") as s:
        await sees(s, beta="up")
        owners = await wait_for(lambda: _owners_known(s, ["A:X", "B:X"]), timeout=SETTLE_S, what="B:X's owner")
        assert (owners["A:X"].server, owners["A:X"].endpoint, owners["A:X"].state) == ("alpha", site.endpoint("alpha"), "up")
        assert (owners["B:X"].server, owners["B:X"].endpoint, owners["B:X"].state) == ("beta", site.endpoint("beta"), "up")
        assert (await s.find_owners(["NOPE:X", "x" * 10_000]))== {"NOPE:X": None, "x" * 10_000: None}
        assert beta.service("sitedir").server_name == "beta"  # type: ignore[attr-defined]

    client = Client(alpha.service("opcua").url)  # type: ignore[attr-defined]
    await client.connect()
    try:
        idx = await client.get_namespace_index("urn:labctl:lab")
        site_obj = client.get_node(ua.NodeId("/lab/Site", idx))
        method = ua.NodeId("/lab/Site/FindOwners", idx)
        servers, endpoints, states = await site_obj.call_method(method, ua.Variant(["B:X", "A:X", "NOPE"], ua.VariantType.String))
        assert servers == ["beta", "alpha", ""] and states == ["up", "up", ""] and endpoints[2] == ""
        assert await site_obj.call_method(method, ua.Variant([], ua.VariantType.String)) == [[], [], []]
        for bad, code in (
            (ua.Variant([f"P:{i}" for i in range(1001)], ua.VariantType.String), ua.StatusCodes.BadTooManyOperations),
            (ua.Variant("B:X", ua.VariantType.String), ua.StatusCodes.BadInvalidArgument),
            (ua.Variant([1, 2], ua.VariantType.Int32), ua.StatusCodes.BadInvalidArgument),
        ):
            with pytest.raises(ua.UaStatusCodeError) as refused:
                await site_obj.call_method(method, bad)
            assert refused.value.code == code
        # the server keeps answering a normal call after bad ones
        assert (await site_obj.call_method(method, ua.Variant(["A:X"], ua.VariantType.String)))[0] == ["alpha"]
    finally:
        await client.disconnect()


async def _owners_known(s: Session, names: list[str]) -> dict | None:
    owners = await s.find_owners(names)
    return owners if all(o is not None and o.endpoint for o in owners.values()) else None


# ---- the library across servers -------------------------------------------------------------------------


async def test_get_put_monitor_and_list_across_servers_from_one_session(site):
    await site.start("alpha", ["A:X"])
    beta = await site.start("beta", ["B:X", "B:Y"])
    async with session_to(site, "alpha") as s:
        await sees(s, beta="up")
        values = await s.get_many(["B:X", "A:X", "B:Y"])
        assert [(v.name, v.value) for v in values] == [("B:X", 1.0), ("A:X", 1.0), ("B:Y", 1.0)]
        assert (await s.info("B:Y")).writable

        await s.put("B:X", 2.5)
        assert beta.db.read("B:X").value == 2.5  # written on its own server, as the operator
        assert (await s.get("B:X")).value == 2.5
        with pytest.raises(NoSuchPV):
            await s.get_many(["A:X", "NOWHERE:X"])

        listed = [m.name for m in await s.list_pvs("*:*", site=True) if not m.name.startswith("ALARM:")]
        assert listed == ["A:X", "B:X", "B:Y"]

        async with s.monitor(["A:X", "B:X"]) as mon:
            first = {(await mon.next(10)).name for _ in range(2)}
            assert first == {"A:X", "B:X"}, "current values first, from both servers"
            await s.put("B:X", 3.5)
            await s.put("A:X", 4.5)
            got: dict[str, float] = {}
            while set(got) != {"A:X", "B:X"}:
                sample = await mon.next(10)
                assert sample.connected
                got[sample.name] = sample.reading.value
            assert got == {"A:X": 4.5, "B:X": 3.5}
        router = s.site_router
        assert router is not None and list(router.sessions) == ["beta"], "one session per other server, kept"


async def test_the_sessions_to_other_servers_are_bounded(site):
    await site.start("alpha", ["A:X"])
    await site.start("beta", ["B:X"])
    await site.start("gamma", ["C:X"])
    async with session_to(site, "alpha", max_sessions=1) as s:
        await sees(s, beta="up", gamma="up")
        assert (await s.get("B:X")).value == 1.0
        assert (await s.get("C:X")).value == 1.0  # the idle session to beta made room
        router = s.site_router
        assert router is not None and list(router.sessions) == ["gamma"]
        async with s.monitor(["B:X"]) as mon:
            assert (await mon.next(10)).name == "B:X"
            with pytest.raises(TooManySessions, match="1 sessions to other servers"):
                await s.get("C:X")  # the one session is in use by the monitor
        assert (await s.get("C:X")).value == 1.0
    with pytest.raises(ValueError, match="max_sessions"):
        await site.connect("alpha", max_sessions=0)


async def test_locks_of_another_servers_resource_through_one_session(site):
    await site.start("alpha", ["A:X"])
    beta = await site.start("beta", ["B:X"], resource="bench")
    async with session_to(site, "alpha") as s:
        await sees(s, beta="up")
        async with s.hold_lock("bench", 30) as held:
            assert beta.db.read("ARB:BENCH:OWNER").value.startswith("operator")
            await s.put("BENCH:SET", 1.5, lease=held.lease)
            assert beta.db.read("BENCH:SET").value == 1.5
        assert beta.db.read("ARB:BENCH:OWNER").value == ""


# ---- a server that stops ---------------------------------------------------------------------------------


async def test_a_stopped_servers_pvs_are_down_and_disconnected_then_back(site):
    await site.start("alpha", ["A:X"])
    await site.start("beta", ["B:X"])
    async with session_to(site, "alpha") as s:
        await sees(s, beta="up")
        async with s.monitor(["A:X", "B:X"]) as mon:
            assert {(await mon.next(10)).name for _ in range(2)} == {"A:X", "B:X"}
            stopped_at = time.monotonic()
            await site.stop("beta")
            sample = await mon.next(5)
            assert time.monotonic() - stopped_at < 5
            assert sample.name == "B:X" and not sample.connected
            assert (sample.reading.value, sample.reading.severity, sample.reading.status) == (None, Severity.INVALID, Status.COMM)
            assert "B:X" in mon.disconnected and "beta" in mon.disconnected["B:X"]  # type: ignore[union-attr]

            async def says_down() -> ServerDown | None:
                try:
                    await s.get("B:X")
                except ServerDown as e:
                    return e if e.down else None
                return None

            refused = await wait_for(says_down, timeout=SETTLE_S, what="B:X's server shown down")
            assert refused.server == "beta" and refused.pvs == ["B:X"] and refused.kind == "connection"
            assert str(refused) == f"B:X: served by server 'beta' ({refused.endpoint}), which is down (the site directory says so)"
            assert (await s.get("A:X")).value == 1.0, "alpha's PVs are not affected"

            # beta comes back (at another port): the monitor follows it there
            await site.start("beta", ["B:X"])
            back = await mon.next(SETTLE_S + 10)
            assert back.name == "B:X" and back.connected and back.reading.value == 1.0
            assert "B:X" not in mon.disconnected  # type: ignore[union-attr]
        assert (await s.get("B:X")).value == 1.0


async def test_the_history_of_a_stopped_servers_pv_is_read_through_another(site):
    alpha = await site.start("alpha", ["A:X"])
    await site.start("beta", ["B:X"])
    async with session_to(site, "alpha") as s:
        await sees(s, beta="up")
        since = time.time() - 60
        await s.put("B:X", 7.25)
        await site.stop("beta")  # archived and audited on the way out
        await sees(s, beta="down")
        history = await s.history("B:X", since)
        assert 7.25 in list(history.values) and history.values[0] == 1.0, history.values
        assert history.meta.name == "B:X"
        audit = await s.audit(since, pv="B:X")
        assert [(r["action"], r["user"], r["accepted"]) for r in audit if r["target"] == "B:X"][-1][:3] == ("write", "operator", True)

    # a plain client reads it from alpha too, which never served B:X
    client = Client(alpha.service("opcua").url)  # type: ignore[attr-defined]
    await client.connect()
    try:
        idx = await client.get_namespace_index("urn:labctl:lab")
        values = await client.get_node(ua.NodeId("B:X", idx)).read_raw_history(
            _utc(since), _utc(time.time() + 1), numvalues=100
        )  # fmt: skip
        assert 7.25 in [dv.Value.Value for dv in values if dv.Value is not None]
        missing = await client.get_node(ua.NodeId("NEVER:ARCHIVED", idx)).read_raw_history(_utc(since), _utc(time.time()))
    except ua.UaStatusCodeError as e:
        assert e.code == ua.StatusCodes.BadNodeIdUnknown
    else:
        raise AssertionError(f"a PV the archive never held has history: {missing}")
    finally:
        await client.disconnect()


def _utc(t: float) -> Any:
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.UTC)


# ---- the command line ------------------------------------------------------------------------------------


async def _labctl(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "labctl", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "LABCTL_PASSWORD": PASSWORD, "LABCTL_USER": "operator"},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_labctl_get_across_two_servers_and_servers_through_one(site):
    await site.start("alpha", ["A:X"])
    await site.start("beta", ["B:Y"])
    async with session_to(site, "alpha") as s:
        await sees(s, beta="up")
    url = site.endpoint("alpha")
    rc, out, err = await _labctl("get", "A:X", "B:Y", "--url", url, "--json")
    assert rc == 0, err
    assert [(v["name"], v["value"], v["severity"]) for v in json.loads(out)] == [("A:X", 1.0, "NO_ALARM"), ("B:Y", 1.0, "NO_ALARM")]

    rc, out, err = await run_labctl("servers", "--url", url, "--json")
    assert rc == 0, err
    listed = json.loads(out)
    assert [(e["name"], e["state"], e["opcua_endpoint"]) for e in listed] == [
        ("alpha", "up", url), ("beta", "up", site.endpoint("beta"))
    ]  # fmt: skip
    rc, out, err = await run_labctl("servers", "--url", url)
    assert rc == 0, err
    assert out.splitlines()[0].split()[:3] == ["NAME", "STATE", "HEALTH"]
    assert [line.split()[:3] for line in out.splitlines()[1:]] == [["alpha", "up", "ok"], ["beta", "up", "ok"]]
    rc, direct, err = await run_labctl("servers", "--historian-url", site.url)
    assert rc == 0, err
    # one table either way: the same lines, but for the heartbeats' ages (reckoned at two moments)
    assert [line.split()[:-3] for line in direct.splitlines()] == [line.split()[:-3] for line in out.splitlines()]

    await site.stop("beta")
    async with session_to(site, "alpha") as s:
        await sees(s, beta="down")
    rc, out, err = await _labctl("get", "A:X", "B:Y", "--url", url)
    assert rc == 1 and out == ""
    assert err.strip() == (
        f"labctl get: B:Y: served by server 'beta' ({_endpoint_of(err)}), which is down (the site directory says so)"
    )


def _endpoint_of(text: str) -> str:
    return text.split("(", 1)[1].split(")", 1)[0]


# ---- the terminal UI ------------------------------------------------------------------------------------


async def test_the_terminal_ui_lists_and_watches_every_servers_pvs(site):
    from labctl.clients.tui.app import LabctlApp
    from labctl.clients.tui.link import LinkState
    from labctl.clients.tui.widgets import PVTable

    await site.start("alpha", ["A:X"])
    beta = await site.start("beta", ["B:X"])
    async with session_to(site, "alpha") as s:
        await sees(s, beta="up")
    app = LabctlApp(site.endpoint("alpha"), "operator", PASSWORD, "auto", reconnect_min_s=0.05, reconnect_max_s=0.5,
                    theme="textual-dark")  # fmt: skip
    async with app.run_test(size=(140, 40)) as pilot:

        async def until(predicate: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
            await wait_for(predicate, timeout=timeout, what=what)
            await pilot.pause()

        await until(lambda: app.link_status.state is LinkState.CONNECTED and app.catalogs, "connected with the PV list")
        assert {"A:X", "B:X"} <= set(app.metas)
        table = app.screen.query_one(PVTable)
        await until(lambda: table.cell_text("B:X", "value") == "1.000", "beta's PV shown")
        beta.db.post("B:X", 2.0)
        await until(lambda: table.cell_text("B:X", "value") == "2.000", "beta's PV live")
        await site.stop("beta")
        await until(lambda: app.readings["B:X"].severity is Severity.INVALID, "beta's PV invalid once beta stops")
        assert app.link_status.state is LinkState.CONNECTED, "alpha's session goes on"


# ---- the control-room display's connection ----------------------------------------------------------------


async def test_the_display_lists_reads_and_watches_every_servers_pvs(site):
    from labctl.clients.gui.link import Connected, HistoryResult
    from labctl.clients.gui.link import Link as DisplayLink

    await site.start("alpha", ["A:X"])
    beta = await site.start("beta", ["B:X"])
    async with session_to(site, "alpha") as s:
        await sees(s, beta="up")
    link = DisplayLink(site.endpoint("alpha"), "operator", PASSWORD, "auto", reconnect_min_s=0.05, reconnect_max_s=0.5)
    events: list[Any] = []
    samples: list[Any] = []

    def drained() -> None:
        events.extend(link.inbox.take_events())
        samples.extend(link.inbox.take_samples(10_000))

    def event(kind: type) -> Any:
        drained()
        return next((e for e in events if isinstance(e, kind)), None)

    link.start()  # its own thread and loop, as in the display
    try:
        connected = await wait_for(lambda: event(Connected), timeout=20, what="the display connected")
        assert {"A:X", "B:X"} <= set(connected.metas) and connected.readings["B:X"].value == 1.0
        link.watch(["A:X", "B:X"])
        beta.db.post("B:X", 6.0)
        await wait_for(lambda: drained() or any(x.name == "B:X" and x.reading.value == 6.0 for x in samples), timeout=10,
                       what="beta's PV live in the display")  # fmt: skip
        assert await beta.service("historian").flush()  # type: ignore[attr-defined]  # archived before it is asked for
        rid = link.request_history("B:X", time.time() - 60, time.time() + 1)

        def answered() -> Any:
            drained()
            return next((e for e in events if isinstance(e, HistoryResult) and e.request_id == rid), None)

        answer = await wait_for(answered, timeout=10, what="beta's history")
        assert not answer.error and 6.0 in list(answer.values), answer
    finally:
        await asyncio.to_thread(link.stop)
