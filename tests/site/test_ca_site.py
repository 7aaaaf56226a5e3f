"""Channel Access across a site: EPICS clients find every server's PVs through one name server, or by search.

Servers run in-process on one real PostgreSQL database (``tests/site/conftest.py``), each
with Channel Access on loopback; the clients are EPICS base's own tools and pyepics
(libca), in subprocesses, configured only through the EPICS environment as people
configure them: ``EPICS_CA_NAME_SERVERS`` naming one labctl server (with no search
address at all), or ``EPICS_CA_ADDR_LIST`` naming every server. The name service's
rules (names, the negative cache, bounds) are also tested without sockets, and its one
source of owners, the site directory service (shared with the OPC UA ``FindOwners``),
by counting the directory's queries.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import socket
from typing import Any

import caproto as ca
import pytest
from caproto._commands import read_from_bytestream
from labctl.server.app import Server
from labctl.server.ca.names import NameTable, Redirect, pv_of
from labctl.server.historian import directory as sql
from labctl.server.historian.backend import open_backend
from labctl.server.siteinfo import HEALTH_OK, HEALTH_STOPPED, ServerEntry
from sqlalchemy import event

from tests.helpers import free_port, free_tcp_udp_port, wait_for
from tests.pg.availability import skip_or_fail
from tests.protocol.ca.epics_tools import EpicsTools, find_tools
from tests.protocol.ca.support import pyepics
from tests.site.conftest import LAPSE_S

#: The user libca reports (the access rules of server B grant it writes; A's grant nothing).
ME = pwd.getpwuid(os.getuid()).pw_name
WRITE_ME = f"{{rules: [{{users: ['{ME}'], roles: [operator]}}]}}"
#: How long caget waits for a search answer when none must come.
NO_ANSWER_WAIT_S = 1.0


def ca_section(port: int, *, interface: str = "127.0.0.1", access: str = "{}") -> str:
    """A ``server.ca`` section on one loopback address and ``port``, beacons to a port of their own."""
    return (
        f"{{interfaces: ['{interface}'], port: {port}, beacon_port: {free_port(socket.SOCK_DGRAM)}, access: {access}}}"
    )


def name_server_tools(bindir: Any, server: Server) -> EpicsTools:
    """caget & co. whose only way to find a PV is ``server``'s CA TCP port as their name server."""
    tools = EpicsTools(bindir, free_tcp_udp_port())  # a server port nobody serves: UDP finds nothing
    tools.env.update(
        {
            "EPICS_CA_NAME_SERVERS": f"127.0.0.1:{ca_of(server).tcp_port}",
            "EPICS_CA_ADDR_LIST": "",
            "EPICS_CA_AUTO_ADDR_LIST": "NO",
        }
    )
    return tools


def ca_of(server: Server) -> Any:
    return server.service("ca")


async def knows(name_server: Server, pv: str, owner: Server) -> None:
    """Wait until ``name_server`` answers searches for ``pv`` with ``owner``'s CA port (its directory saw it)."""
    names = ca_of(name_server).names
    assert names is not None, "the CA service of a site server runs a name service"
    port = ca_of(owner).tcp_port
    await wait_for(
        lambda: (r := names.resolve(pv)) is not None and r.port == port,
        timeout=LAPSE_S + 10,
        what=f"{pv} known to the name service at port {port}",
    )


async def sees_down(observer: Server, name: str) -> None:
    """Wait until ``observer``'s directory shows server ``name`` down."""
    directory = observer.service("sitedir")
    await wait_for(
        lambda: any(e.name == name and not e.up for e in directory.servers),  # type: ignore[attr-defined]
        timeout=LAPSE_S + 10,
        what=f"{name} down in the directory",
    )


@pytest.fixture
def bindir() -> Any:
    """EPICS base's CA tools (skipped locally, failed under CI=true, when missing)."""
    return find_tools()


async def test_caget_and_caput_find_every_server_through_one_name_server(pg_database, start_server, bindir):
    url = pg_database.url
    a = await start_server("a", ["A:X", "A:Y"], url, opcua=False, ca=ca_section(free_tcp_udp_port()))
    b = await start_server("b", ["B:X", "B:Y"], url, opcua=False, ca=ca_section(free_tcp_udp_port(), access=WRITE_ME))
    assert ca_of(a).tcp_port != ca_of(b).tcp_port
    await knows(a, "B:X", b)
    tools = name_server_tools(bindir, a)

    got = await tools.caget("-t", "A:X", "B:X", "B:Y.EGU")
    assert got.returncode == 0, got
    assert got.stdout.split("\n")[:2] == ["1", "1"], got  # A's own PV, and B's through A's redirect

    # B's PV is written on B, as B's access rules allow; A's rules let this user only read A's PVs
    put = await tools.caput("-c", "B:X", "4.5")
    assert put.returncode == 0, put
    assert b.db.read("B:X").value == 4.5
    assert (await tools.caget("-t", "B:X")).stdout.strip() == "4.5"
    refused = await tools.caput("-c", "A:X", "2.5")
    assert refused.returncode != 0 and "Write access denied" in refused.output, refused
    assert a.db.read("A:X").value == 1.0

    # a name no server owns: no answer
    missing = await tools.caget("-w", f"{NO_ANSWER_WAIT_S:g}", "C:NOWHERE")
    assert missing.returncode != 0 and "not found" in missing.output, missing


async def test_pyepics_finds_three_servers_through_one_name_server(pg_database, start_server):
    url = pg_database.url
    a = await start_server("a", ["A:X"], url, opcua=False, ca=ca_section(free_tcp_udp_port()))
    b = await start_server("b", ["B:X"], url, opcua=False, ca=ca_section(free_tcp_udp_port(), access=WRITE_ME))
    c = await start_server("c", ["C:X"], url, opcua=False, ca=ca_section(free_tcp_udp_port()))
    await knows(a, "B:X", b)
    await knows(a, "C:X", c)
    c.db.post("C:X", -3.5)
    env = {
        "EPICS_CA_NAME_SERVERS": f"127.0.0.1:{ca_of(a).tcp_port}",
        "EPICS_CA_ADDR_LIST": "",
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
    }
    async with pyepics(free_tcp_udp_port(), env=env) as client:  # its server port is served by no one
        own = await client.call("connect", pv="A:X")
        assert (own["type"], own["read"], own["write"]) == ("DOUBLE", True, False)
        other = await client.call("connect", pv="B:X")
        assert (other["type"], other["read"], other["write"]) == ("DOUBLE", True, True)  # B's rules, not A's
        assert (await client.call("get", pv="B:X"))["value"] == 1.0
        await client.call("put_wait", pv="B:X", value=7.25)
        assert b.db.read("B:X").value == 7.25
        assert (await client.call("get", pv="B:X"))["value"] == 7.25
        third = await client.call("connect", pv="C:X")
        assert (third["read"], third["write"]) == (True, False)
        assert (await client.call("get", pv="C:X"))["value"] == -3.5


def _loopback_pair_port() -> int:
    """A port free for TCP and UDP on both 127.0.0.1 and 127.0.0.2."""
    for _ in range(100):
        port = free_tcp_udp_port()
        try:
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                with socket.socket(socket.AF_INET, kind) as s:
                    s.bind(("127.0.0.2", port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on both 127.0.0.1 and 127.0.0.2")


async def test_an_address_list_of_every_server_on_one_port_finds_each_ones_pvs(pg_database, start_server, bindir):
    # Entries without a port are searched on EPICS_CA_SERVER_PORT: each server binds its own
    # loopback address (Linux routes all of 127.0.0.0/8 to the loopback interface), same port.
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.2", 0))
    except OSError:  # pragma: no cover - a system whose loopback has one address
        skip_or_fail("127.0.0.2 cannot be bound on this system (one loopback address); the test needs two")
    url = pg_database.url
    port = _loopback_pair_port()
    a = await start_server("a", ["A:X"], url, opcua=False, ca=ca_section(port, interface="127.0.0.1"))
    b = await start_server("b", ["B:X"], url, opcua=False, ca=ca_section(port, interface="127.0.0.2", access=WRITE_ME))
    assert (ca_of(a).port, ca_of(b).port) == (port, port)
    tools = EpicsTools(bindir, port)
    tools.env["EPICS_CA_ADDR_LIST"] = "127.0.0.1 127.0.0.2"
    got = await tools.caget("-t", "A:X", "B:X")
    assert got.returncode == 0 and got.stdout.split() == ["1", "1"], got
    put = await tools.caput("-c", "B:X", "3")
    assert put.returncode == 0 and b.db.read("B:X").value == 3.0, put
    # each server answers UDP searches for its own PVs only: listing A alone finds no PV of B
    tools.env["EPICS_CA_ADDR_LIST"] = "127.0.0.1"
    alone = await tools.caget("-w", f"{NO_ANSWER_WAIT_S:g}", "B:X")
    assert alone.returncode != 0 and "not found" in alone.output, alone


async def test_an_address_list_with_a_port_per_server_finds_each_ones_pvs(pg_database, start_server, bindir):
    url = pg_database.url
    servers = [
        await start_server(name, [f"{name.upper()}:X"], url, opcua=False, ca=ca_section(free_tcp_udp_port()))
        for name in ("a", "b", "c")
    ]
    tools = EpicsTools(bindir, free_tcp_udp_port())  # the default port: served by no one
    tools.env["EPICS_CA_ADDR_LIST"] = " ".join(f"127.0.0.1:{ca_of(s).port}" for s in servers)
    servers[2].db.post("C:X", 9.0)
    got = await tools.caget("-t", "A:X", "B:X", "C:X")
    assert got.returncode == 0 and got.stdout.split() == ["1", "1", "9"], got


async def test_a_stopped_servers_pvs_disconnect_and_are_no_longer_found(pg_database, start_server, bindir):
    url = pg_database.url
    a = await start_server("a", ["A:X"], url, opcua=False, ca=ca_section(free_tcp_udp_port()))
    b = await start_server("b", ["B:X"], url, opcua=False, ca=ca_section(free_tcp_udp_port()))
    await knows(a, "B:X", b)
    tools = name_server_tools(bindir, a)
    async with tools.camonitor("B:X", "A:X") as monitor:
        first = {(await monitor.line()).split()[0], (await monitor.line()).split()[0]}
        assert first == {"B:X", "A:X"}, monitor.lines
        await b.stop()
        line = await monitor.until(lambda text: text.startswith("B:X"))
        assert "disconnected" in line, monitor.lines
        b.db.post("B:X", 2.0)  # nothing reaches a client any more (stopped)
        a.db.post("A:X", 6.0)
        line = await monitor.until(lambda text: text.startswith("A:X"))
        assert line.split()[-1] == "6", monitor.lines  # A keeps serving through the same name server
    await sees_down(a, "b")
    gone = await tools.caget("-w", f"{NO_ANSWER_WAIT_S:g}", "B:X")
    assert gone.returncode != 0 and "not found" in gone.output, gone
    assert (await tools.caget("-t", "A:X")).stdout.strip() == "6"

    # B starts again (on another port): the name server sends clients there
    b2 = await start_server("b", ["B:X"], url, opcua=False, ca=ca_section(free_tcp_udp_port()))
    await knows(a, "B:X", b2)
    back = await tools.caget("-t", "B:X")
    assert back.returncode == 0 and back.stdout.strip() == "1", back


async def test_name_searches_on_the_wire_as_libca_sends_them(pg_database, start_server):
    """VERSION (its priority field a sequence flag) then SEARCH, repeated on one circuit; replies as an IOC's."""
    url = pg_database.url
    a = await start_server("a", ["A:X"], url, opcua=False, ca=ca_section(free_tcp_udp_port()))
    b = await start_server("b", ["B:X"], url, opcua=False, ca=ca_section(free_tcp_udp_port()))
    await knows(a, "B:X", b)
    reader, writer = await asyncio.open_connection("127.0.0.1", ca_of(a).tcp_port)
    try:

        async def frame(*searches: tuple[str, int, int], replies: int) -> list[Any]:
            """Send one search frame as libca does; read ``replies`` answers (VERSION answers aside)."""
            messages = [ca.VersionRequest(1, 13)] + [ca.SearchRequest(n, cid, 13, reply=r) for n, cid, r in searches]
            writer.write(b"".join(bytes(m) for m in messages))
            got: list[Any] = []
            data = bytearray()
            while len(got) < replies:
                chunk = await asyncio.wait_for(reader.read(4096), 5.0)
                assert chunk, f"the server closed the connection; answers so far: {got}"
                data += chunk
                while True:
                    data, command, _ = read_from_bytestream(data, ca.SERVER)
                    if command is ca.NEED_DATA:
                        break
                    if not isinstance(command, ca.VersionResponse):
                        got.append(command)
            return got

        writer.write(bytes(ca.VersionRequest(0, 13)))  # the circuit's own VERSION: priority 0
        first = await frame(("A:X", 1, ca.NO_REPLY), ("B:X", 2, ca.NO_REPLY), replies=2)
        assert [(m.cid, m.port, m.ip) for m in first] == [
            (1, ca_of(a).tcp_port, "255.255.255.255"),  # own: "this server"
            (2, ca_of(b).tcp_port, "127.0.0.1"),  # redirect to the owner
        ]
        again = await frame(("C:NOWHERE", 3, ca.DO_REPLY), ("B:X.EGU", 4, ca.NO_REPLY), replies=2)  # a new frame
        assert isinstance(again[0], ca.NotFoundResponse) and again[0].cid == 3
        assert (again[1].cid, again[1].port) == (4, ca_of(b).tcp_port)
    finally:
        writer.close()
        await writer.wait_closed()


# ---- the rules, without sockets ----------------------------------------------------------------


def entry(name: str, *, port: int | None = 5064, address: str = "10.0.0.2", up: bool = True, started: float = 1.0) -> ServerEntry:
    return ServerEntry(
        name=name, site="lab", host="h", pid=1, version="1", opcua_endpoint="", ca_address=address if port else "",
        ca_port=port, ca_tcp_port=port, pv_count=1, started=started, heartbeat=started, heartbeat_s=0.2, lapse_s=1.0,
        health=HEALTH_OK if up else HEALTH_STOPPED, detail="", age_s=0.1,
    )  # fmt: skip


def test_pv_of_a_searched_name():
    assert pv_of("B:X") == "B:X"
    assert pv_of("B:X.EGU") == pv_of("B:X.VAL$") == pv_of('B:X.{"dbnd":{"abs":1}}') == "B:X"
    assert pv_of("LAB:B:X", "LAB:") == "B:X"
    assert pv_of("B:X", "LAB:") is None  # not this site's prefix
    assert pv_of("ARB:PUMP:REQUEST") == pv_of("ARB:PUMP:RELEASE") == "ARB:PUMP:OWNER"  # lock commands: the lock's owner
    assert pv_of("") is None and pv_of("B X") is None and pv_of("::") is None  # no PV name


def test_table_redirects_to_owners_that_are_up_and_serve_ca():
    table = NameTable("a")
    table.set_servers([entry("a"), entry("b"), entry("c", up=False), entry("d", port=None)], {})
    table.replace_owners({"A:X": "a", "B:X": "b", "C:X": "c", "D:X": "d"})
    assert table.resolve("B:X.EGU", 0.0) == Redirect("b", "10.0.0.2", 5064)
    assert table.resolve("A:X", 0.0) is None  # own PVs are the circuit's (one owned here but not served: nothing)
    assert table.resolve("C:X", 0.0) is None  # down
    assert table.resolve("D:X", 0.0) is None  # no Channel Access
    assert (table.redirected, table.unanswered) == (1, 3)
    assert table.pending == {}  # known names are not looked up


def test_table_host_names_wait_for_resolution():
    table = NameTable("a")
    assert table.set_servers([entry("b", address="rack-b,10.0.0.9")], {}) == {"rack-b"}  # the first interface
    table.replace_owners({"B:X": "b"})
    assert table.resolve("B:X", 0.0) is None
    assert table.set_servers([entry("b", address="rack-b,10.0.0.9")], {"rack-b": "10.1.1.1"}) == set()
    assert table.resolve("B:X", 0.0) == Redirect("b", "10.1.1.1", 5064)
    assert table.set_servers([entry("b", address="rack-b")], {"rack-b": None}) == set()  # failed: not asked again
    assert table.resolve("B:X", 0.0) is None


def test_unknown_names_are_looked_up_once_per_ttl_and_bounded():
    table = NameTable("a", negative_ttl_s=5.0, negative_max=3, pending_max=2)
    table.set_servers([entry("b")], {})
    assert table.resolve("N:1", 0.0) is None
    assert table.pending == {}  # nothing looked up before the owner map was first read
    owners: dict[str, str] = {}  # the directory's map: a lookup adds what it found there
    table.replace_owners(owners)
    for name in ("N:1", "N:1.EGU", "N:2", "N:3"):
        table.resolve(name, 0.0)
    assert list(table.pending) == ["N:1", "N:2"] and table.dropped == 1  # one entry per PV, at most two
    batch = table.take_pending()
    assert batch == ["N:1", "N:2"] and table.pending == {}
    table.resolve("N:1", 0.5)
    assert table.pending == {}  # searched again while its lookup is under way: not asked twice
    owners["N:2"] = "b"
    table.learned(batch, {"N:2": "b"}, now=1.0)  # N:2 found; N:1 owned by no server
    assert table.asking == set()
    assert table.resolve("N:2", 1.0) == Redirect("b", "10.0.0.2", 5064)
    table.resolve("N:1", 5.9)
    assert table.pending == {}  # within its negative TTL: not asked again
    table.resolve("N:1", 6.1)
    assert list(table.pending) == ["N:1"]  # expired: asked again
    table.learned(table.take_pending(), {}, now=7.0)
    table.learned(["N:5", "N:6", "N:7"], {}, now=7.0)
    assert table.negative_size == 3  # bounded: the oldest went first
    table.resolve("N:1", 7.5)
    assert list(table.pending) == ["N:1"]
    table.resolve("X" * 300, 7.5)
    assert list(table.pending) == ["N:1"]  # too long to be looked up


class OwnerQueries:
    """The owner queries a server's site directory service sends its database: whole readings and lookups of names."""

    def __init__(self, server: Server) -> None:
        self.engine = server.service("sitedir")._backend.engine  # type: ignore[attr-defined]
        self.whole = 0
        self.lookups: list[list[str]] = []
        event.listen(self.engine, "before_cursor_execute", self._sent)

    def _sent(self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if statement.lstrip().startswith("SELECT site_pv.name, site_pv.server"):
            if "WHERE" in statement:
                self.lookups.append(sorted(parameters.values()))
            else:
                self.whole += 1

    def close(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self._sent)


def _claim_unseen(url: str, pv: str, server: str) -> None:
    """A claim of ``pv`` for ``server`` that changes no server row: the directory's heartbeats do not read it."""
    backend = open_backend(url, pool_size=1)
    try:
        with backend.engine.begin() as conn:
            conn.execute(sql.site_pv.insert().values(name=pv, server=server, claimed_us=sql.db_now_us(conn)))
    finally:
        backend.dispose()


STEADY_LAPSE_S = 60.0
"""A lapse no heartbeat reaches, however slow the machine: the servers of a test that counts readings stop cleanly."""


def _published(directory: Any, name: str) -> bool:
    """Whether ``directory`` shows server ``name`` up with its Channel Access ports."""
    return any(e.name == name and e.up and e.ca_tcp_port for e in directory.servers)


async def test_one_reading_of_the_owners_serves_the_name_service_and_find_owners(pg_cluster_factory, start_server, caplog):
    """The directory service reads the owner map once per change of ownership; both adapters answer from it."""
    cluster = pg_cluster_factory()
    url = cluster.url
    a = await start_server("a", ["A:X"], url, ca=ca_section(free_tcp_udp_port()), lapse_s=STEADY_LAPSE_S)  # OPC UA too
    sitedir = a.service("sitedir")
    names = ca_of(a).names
    folder = a.service("opcua").site_folder  # type: ignore[attr-defined]
    assert names is not None and folder is not None
    queries = OwnerQueries(a)
    try:
        # another server registers: a's next heartbeat reads the owners, once, and both adapters answer from that
        b = await start_server("b", ["B:X"], url, ca=ca_section(free_tcp_udp_port()), lapse_s=STEADY_LAPSE_S)
        b_url = b.service("opcua").url  # type: ignore[attr-defined]
        await wait_for(lambda: sitedir.owners.get("B:X") == "b" and _published(sitedir, "b"), timeout=LAPSE_S + 10,
                       what="b and its PV in a's directory")  # fmt: skip
        assert names.resolve("B:X") == Redirect("b", "127.0.0.1", ca_of(b).tcp_port)  # at once: no query of its own
        assert folder.owner_of("B:X")[0] == "b"
        await wait_for(lambda: folder.owner_of("B:X") == ("b", b_url, "up"), what="b shown in the Site folder")
        assert (queries.whole, queries.lookups) == (1, [])

        # a name the map lacks is looked up once for a batch of searches; what is found serves FindOwners too
        await asyncio.to_thread(_claim_unseen, url, "B:EXTRA", "b")
        assert names.resolve("B:EXTRA") is None and names.resolve("B:NONE") is None
        await wait_for(lambda: names.resolve("B:EXTRA") is not None, what="the lookup")
        assert folder.owner_of("B:EXTRA") == ("b", b_url, "up") and sitedir.owners["B:EXTRA"] == "b"
        assert names.resolve("B:NONE") is None and folder.owner_of("B:NONE") == ("", "", "")  # negative: not asked again
        assert (queries.whole, queries.lookups) == (1, [["B:EXTRA", "B:NONE"]])

        # a server that starts takes over the PVs of one that stopped: one more reading, seen by both
        await b.stop()
        await wait_for(lambda: folder.owner_of("B:X") == ("b", b_url, "down"), timeout=LAPSE_S + 10, what="b down")
        assert names.resolve("B:X") is None  # a down owner is not answered for
        c = await start_server("c", ["B:X", "C:X"], url, ca=ca_section(free_tcp_udp_port()), lapse_s=STEADY_LAPSE_S)
        c_url = c.service("opcua").url  # type: ignore[attr-defined]
        await wait_for(lambda: sitedir.owners.get("B:X") == "c" and _published(sitedir, "c"), timeout=LAPSE_S + 10,
                       what="c owning B:X in a's directory")  # fmt: skip
        for pv in ("B:X", "C:X"):
            assert names.resolve(pv) == Redirect("c", "127.0.0.1", ca_of(c).tcp_port)
        await wait_for(lambda: folder.owner_of("C:X") == ("c", c_url, "up"), what="c shown in the Site folder")
        assert folder.owner_of("B:X") == ("c", c_url, "up")
        assert (queries.whole, len(queries.lookups)) == (2, 1)  # b's stop changed no ownership; c's registration did

        # the database away: both answer from the last reading; lookups fail, logged once
        caplog.set_level(logging.WARNING, logger="labctl.ca")
        await asyncio.to_thread(cluster.stop)
        await wait_for(lambda: not sitedir.database_up, timeout=10, what="the outage noticed")
        assert names.resolve("C:X") == Redirect("c", "127.0.0.1", ca_of(c).tcp_port)
        assert folder.owner_of("C:X") == ("c", c_url, "up")
        assert names.resolve("D:X") is None
        await wait_for(lambda: any("site directory cannot be read" in r.getMessage() for r in caplog.records),
                       what="the failed lookup logged")  # fmt: skip
        await asyncio.to_thread(cluster.start)
        await wait_for(lambda: sitedir.database_up, timeout=15, what="the directory back")
    finally:
        queries.close()
