"""A site across network namespaces: three ``labctl serve`` processes and PostgreSQL/TimescaleDB, each in its own.

The network is :mod:`tests.site.netns` (a bridge and veth pairs on ``10.213.0.0/24``,
which exists only on this machine); the cluster runs in namespace ``db``, the servers in
``a``, ``b``, ``c`` (and ``d`` for an intruder), each serving OPC UA and Channel Access on
its own address. The test talks to them over the bridge: the site directory and the
archive from the database, PV writes over OPC UA. Every load loop is bounded in count
and time; waits are for conditions, with timeouts.

* all three register with their endpoints; a fourth serving a PV of the first is refused;
* kill -9 of one: the others go on serving and archiving, its PV shows disconnected in a
  client of another server within seconds, it shows down once its lapse is over, its
  archived history stays readable, and restarted it takes its PVs back;
* clients connected to one server only, with the accounts in the site database: the
  library (from the test) and ``labctl get/put/monitor/history`` (from namespace ``d``)
  on the other servers' PVs; pyepics finding every server's PVs through that server's CA
  name service; a user disabled with ``labctl user disable`` refused on all three;
* a database outage of a minute (``OUTAGE_S``; ``LABCTL_SITE_OUTAGE_S`` sets another
  length) while all three archive and are written to: each historian reports the outage
  and spools, and once the database is back the writes go on until every server has
  back-filled its spool and heartbeats ``ok`` again; every value written to every server
  is then in the archive exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua
from labctl.clients.session import Session, connect
from labctl.server.historian import query as history
from labctl.server.historian.backend import open_backend
from labctl.server.passwords import hash_password

from tests.helpers import free_tcp_udp_port, wait_for
from tests.pg.availability import require_timescaledb
from tests.pg.cluster import PgCluster, PgDatabase
from tests.protocol.ca.support import pyepics
from tests.site.conftest import directory, login, query, read_owners, run_labctl
from tests.site.netns import ONE_WORKER, SiteNetwork, require_netns

pytestmark = ONE_WORKER

SITE = "lab"
HEARTBEAT_S = 0.5
LAPSE_S = 3.0
OPCUA_PORT = 4840
CA_PORT = 5064
PG_PORT = 5432
NAMESPACE = f"urn:labctl:{SITE}"
WRITER, WRITER_PW = "writer", "writer-pw-1"
PVS_PER_SERVER = 4
#: How long the database is down in the outage test (the fault's length: the test's parameter).
OUTAGE_S = float(os.environ.get("LABCTL_SITE_OUTAGE_S", "60"))
#: How long every server may take, once the database is back, to back-fill its spool and heartbeat ``ok``.
RECOVERY_S = 60.0
#: The servers: node (namespace) -> (server name, PV prefix).
SERVERS = {"a": ("alpha", "A"), "b": ("beta", "B"), "c": ("gamma", "C")}

_db_names = itertools.count(1)


@dataclass
class Site:
    """The network and the database cluster of this module's tests."""

    net: SiteNetwork
    cluster: PgCluster
    writer_hash: str


@pytest.fixture(scope="module")
def site_network() -> Iterator[Site]:
    """The namespaces, the bridge, and PostgreSQL/TimescaleDB in namespace ``db``; all removed after the module."""
    require_netns()
    require_timescaledb()
    net = SiteNetwork(["db", "a", "b", "c", "d"]).create()
    cluster = None
    try:
        db = net["db"]
        cluster = PgCluster(timescaledb=True, host=db.address, port=PG_PORT, netns=db.netns)
        cluster.start()
        yield Site(net, cluster, hash_password(WRITER_PW))
    finally:
        if cluster is not None:
            cluster.cleanup(mode="immediate")
        net.destroy()


@pytest.fixture
def site_db(site_network: Site) -> Iterator[PgDatabase]:
    """A fresh database with TimescaleDB on the namespace's cluster (started again if a test stopped it)."""
    cluster = site_network.cluster
    cluster.start()
    db = cluster.create_database(f"site{next(_db_names)}", timescaledb=True)
    yield db
    if cluster.is_running():
        cluster.drop_database(db.name)


class NsServer:
    """``labctl serve`` in a node's namespace, its log lines collected as they come."""

    def __init__(
        self, site: Site, node: str, name: str, pvs: list[str], url: str, tmp_path: Path, accounts: str = "site_file"
    ) -> None:
        self.site, self.node, self.name, self.pvs = site, node, name, pvs
        self.address = site.net[node].address
        self.url = f"opc.tcp://{self.address}:{OPCUA_PORT}"
        self.state_dir = tmp_path / f"state-{name}"
        self.site_file = tmp_path / f"{name}.yaml"
        pv_lines = "".join(f'  - {{name: "{pv}", type: float64, initial: 0.0, writable: true}}\n' for pv in pvs)
        # the accounts: the site file's writer, or the site database's (``labctl user``), re-read every heartbeat
        users = f'users:\n  - {{name: {WRITER}, roles: [admin], password_hash: "{site.writer_hash}"}}\n'
        if accounts == "database":
            users = ""
        self.site_file.write_text(f"""
site: {SITE}
server:
  name: {name}
  accounts: {accounts}
  directory: {{heartbeat_s: {HEARTBEAT_S}, lapse_s: {LAPSE_S}, accounts_refresh_s: {HEARTBEAT_S}}}
  opcua: {{host: "{self.address}", port: {OPCUA_PORT}, trust: auto, security: [None, Basic256Sha256_SignAndEncrypt]}}
  ca: {{interfaces: ["{self.address}"], port: {CA_PORT}}}
historian: {{url: "{url}", batch_age_s: 0.05}}
autosave: {{enabled: false}}
{users}pvs:
{pv_lines}""")
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._reader: threading.Thread | None = None

    def start(self) -> NsServer:
        """Start it (its log from the start on is collected)."""
        self.lines = []
        env = {**os.environ, "LABCTL_LOG_LEVEL": "INFO"}
        argv = [sys.executable, "-m", "labctl", "serve", str(self.site_file), "--state-dir", str(self.state_dir)]
        self.proc = self.site.net.spawn(self.node, argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.lines.append(line.rstrip())

    def saw(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    async def ready(self, timeout: float = 60.0) -> NsServer:
        """Until it logs that it is ready (failing with its log if it exits first)."""
        assert self.proc is not None
        await wait_for(lambda: self.saw("ready;") or self.proc.poll() is not None, timeout=timeout, what=f"{self.name} ready")
        assert self.proc.poll() is None, "\n".join(self.lines)
        return self

    def signal(self, sig: int) -> int:
        """Send ``sig`` and reap the process; its exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # it did not stop: end it, so nothing outlives the namespace
            self.proc.kill()
            rc = self.proc.wait(timeout=30)
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return rc


@pytest.fixture
def servers(site_network: Site, site_db: PgDatabase, tmp_path: Path) -> Iterator[Callable[..., NsServer]]:
    """``servers(node)`` -> an NsServer for that node's server on this test's database (not started); all ended after."""
    made: list[NsServer] = []

    def make(node: str, name: str | None = None, pvs: list[str] | None = None, accounts: str = "site_file") -> NsServer:
        default_name, prefix = SERVERS.get(node, (node, node.upper()))
        pvs = pvs if pvs is not None else [f"{prefix}:V{k}" for k in range(PVS_PER_SERVER)]
        s = NsServer(site_network, node, name or default_name, pvs, site_db.url, tmp_path, accounts)
        made.append(s)
        return s

    yield make
    for s in made:
        if s.proc is not None and s.proc.poll() is None:
            s.signal(signal.SIGTERM)


async def start_all(make: Callable[..., NsServer], accounts: str = "site_file") -> dict[str, NsServer]:
    """The three servers, started at once; by node."""
    started = {node: make(node, accounts=accounts).start() for node in SERVERS}
    await asyncio.gather(*(s.ready() for s in started.values()))
    return started


# ---- writing and counting ------------------------------------------------------------------------------------


class Writer:
    """Writes 1, 2, 3... to every PV of one server over OPC UA (one Write request each time), counting what was taken."""

    def __init__(self, server: NsServer) -> None:
        self.server = server
        self.written = 0
        """The last value every PV of the server took (Good status)."""
        self.client: Client | None = None
        self.nodes: list = []

    async def open(self) -> Writer:
        self.client = await login(self.server.url, WRITER, WRITER_PW)
        idx = await self.client.get_namespace_index(NAMESPACE)
        self.nodes = [self.client.get_node(ua.NodeId(pv, idx)) for pv in self.server.pvs]
        return self

    async def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.disconnect()
            self.client = None

    async def write(self, count: int, period_s: float, until: asyncio.Event | None = None, limit_s: float = 120.0) -> None:
        """Up to ``count`` more values, one every ``period_s``, stopping early when ``until`` is set or ``limit_s`` passes."""
        assert self.client is not None
        deadline = time.monotonic() + limit_s
        for _ in range(count):
            if (until is not None and until.is_set()) or time.monotonic() > deadline:
                return
            value = float(self.written + 1)
            await self.client.write_values(self.nodes, [value] * len(self.nodes))
            self.written += 1
            await asyncio.sleep(period_s)  # pacing a bounded load, not waiting for an event


def archived(url: str, pvs: list[str]) -> dict[str, dict[float, int]]:
    """PV -> {value: rows} of the values >= 1 archived for ``pvs`` (blocking)."""
    rows = query(
        url, "SELECT pv, float_val, count(*) AS n FROM sample_named WHERE pv = ANY(:pvs) AND float_val >= 1 GROUP BY pv, float_val",
        pvs=pvs,
    )  # fmt: skip
    out: dict[str, dict[float, int]] = {pv: {} for pv in pvs}
    for r in rows:
        out[r.pv][r.float_val] = r.n
    return out


async def all_archived(url: str, server: NsServer, upto: int) -> bool:
    found = await asyncio.to_thread(archived, url, server.pvs)
    return all(len(values) >= upto for values in found.values())


def assert_exactly_once(url: str, server: NsServer, upto: int) -> None:
    """Each value 1..upto of every PV of ``server`` is archived exactly once (none lost, none twice, none extra)."""
    expected = {float(v): 1 for v in range(1, upto + 1)}
    for pv, values in archived(url, server.pvs).items():
        assert values == expected, f"{pv}: {len(values)} distinct values for {upto} written; twice: {[v for v, n in values.items() if n != 1][:5]}"


async def _is_down(url: str, name: str) -> bool:
    return not (await directory(url))[name].up


async def _all_ok(url: str, names: list[str], since: float = 0.0) -> bool:
    """Every server named is up with the health ``ok`` (no spooled samples), by a heartbeat from ``since`` (UNIX s) on."""
    found = await directory(url)
    return all(n in found and found[n].up and found[n].health == "ok" and found[n].heartbeat >= since for n in names)


#: What a historian logs when its database goes away, and when its spool is written back (:mod:`labctl.server.historian.ingest`).
SPOOLING, BACKFILLED = "; archiving to the spool", "historian: back-fill complete"


async def _recovered(url: str, started: dict[str, NsServer], since: float) -> bool:
    """Every server's historian back-filled its spool, and its heartbeat since ``since`` reports ``ok`` (spool empty)."""
    if not all(s.saw(BACKFILLED) for s in started.values()):  # the log first: no database query until it can be true
        return False
    return await _all_ok(url, [s.name for s in started.values()], since)


# ---- the tests ----------------------------------------------------------------------------------------------


async def test_three_servers_in_their_namespaces_register_and_a_taken_pv_is_refused(site_db, servers, site_network):
    url = site_db.url
    started = await start_all(servers)
    found = await directory(url)
    assert sorted(found) == ["alpha", "beta", "gamma"]
    for node, s in started.items():
        entry = found[s.name]
        assert entry.up and entry.opcua_endpoint == s.url, entry
        assert (entry.ca_address, entry.ca_port) == (site_network.net[node].address, CA_PORT)
        assert entry.pv_count == PVS_PER_SERVER
    owners = await asyncio.to_thread(read_owners, url)
    assert owners == {pv: s.name for s in started.values() for pv in s.pvs}

    intruder = servers("d", "delta", ["D:V0", "A:V1"]).start()
    assert intruder.proc is not None
    await wait_for(lambda: intruder.proc.poll() is not None, timeout=60, what="delta refused")
    assert intruder.signal(signal.SIGTERM) == 1, "\n".join(intruder.lines)
    refusal = intruder.lines[-1]
    assert "server 'delta' cannot serve 1 PV(s)" in refusal and "PV 'A:V1' is served by 'alpha'" in refusal, refusal
    assert started["a"].url in refusal
    assert "delta" not in await directory(url)


async def test_a_killed_server_leaves_the_others_serving_its_history_readable_and_takes_its_pvs_back(site_db, servers):
    url = site_db.url
    started = await start_all(servers)
    writers = {node: await Writer(s).open() for node, s in started.items()}
    watcher = await connect(started["a"].url, WRITER, WRITER_PW, "auto")  # a client of alpha, watching beta's PV
    watching = contextlib.AsyncExitStack()
    try:
        await asyncio.gather(*(w.write(20, 0.01) for w in writers.values()))
        beta = started["b"]
        await wait_for(lambda: all_archived(url, beta, 20), timeout=20, what="beta's values archived")
        await wait_for(lambda: _sees_up(watcher, ["beta"]), timeout=SETTLE_S, what="beta up in alpha's site folder")
        mon = await watching.enter_async_context(watcher.monitor([beta.pvs[0]]))
        first = await mon.next(10)
        assert (first.name, first.connected, first.reading.value) == (beta.pvs[0], True, 20.0)
        killed_at = time.monotonic()
        assert beta.signal(signal.SIGKILL) == -signal.SIGKILL
        await writers["b"].close()
        # its PV shows disconnected in the client within seconds (no value, not a stale one)
        gone = await mon.next(DISCONNECT_S)
        assert time.monotonic() - killed_at < DISCONNECT_S
        assert (gone.name, gone.connected, gone.reading.value) == (beta.pvs[0], False, None), gone

        # the others serve and archive on
        await asyncio.gather(writers["a"].write(20, 0.01), writers["c"].write(20, 0.01))
        for node in ("a", "c"):
            await wait_for(lambda n=node: all_archived(url, started[n], 40), timeout=20, what=f"{started[node].name} archiving")
            assert_exactly_once(url, started[node], 40)
        # down once its lapse is over, not before
        await wait_for(lambda: _is_down(url, "beta"), timeout=LAPSE_S + 15, what="beta down")
        assert time.monotonic() - killed_at >= LAPSE_S - 0.5
        assert {e.name: e.up for e in (await directory(url)).values()} == {"alpha": True, "beta": False, "gamma": True}
        # its history stays in the shared archive, read with labctl's history queries
        assert_exactly_once(url, beta, 20)
        page = await asyncio.to_thread(_read_history, url, beta.pvs[0])
        assert [v for _, v in page] == [0.0, *map(float, range(1, 21))]  # the start-up value, then every one written

        # restarted, it takes its PVs back and archives again
        beta.start()
        await beta.ready()
        assert (await directory(url))["beta"].up
        owners = await asyncio.to_thread(read_owners, url)
        assert {owners[pv] for pv in beta.pvs} == {"beta"}
        # the client's monitor follows it back
        back = await _next_connected(mon, SETTLE_S + 10)
        assert (back.name, back.reading.value) == (beta.pvs[0], 0.0), back
        await watching.aclose()
        writers["b"] = await Writer(beta).open()
        writers["b"].written = 20
        await writers["b"].write(10, 0.01)
        await wait_for(lambda: all_archived(url, beta, 30), timeout=20, what="beta archiving again")
        assert_exactly_once(url, beta, 30)
    finally:
        await watching.aclose()
        await watcher.close()
        for w in writers.values():
            await w.close()


async def _next_connected(mon: Any, timeout: float) -> Any:
    """The monitor's next connected sample (at most ten samples, within ``timeout``)."""
    deadline = time.monotonic() + timeout
    for _ in range(10):
        sample = await mon.next(max(0.1, deadline - time.monotonic()))
        if sample.connected:
            return sample
    raise AssertionError("ten samples and none connected")


def _read_history(url: str, pv: str) -> list[tuple[float, float]]:
    backend = open_backend(url, pool_size=1)
    try:
        with backend.engine.connect() as conn:
            (entry,) = history.catalogue(conn, [pv], {})
            page = history.read_raw(conn, entry, 0, int(time.time() * 1e6) + 10_000_000)
            return [(r.timestamp, r.value) for r in page.readings]
    finally:
        backend.dispose()


async def test_a_database_outage_loses_and_duplicates_no_sample_of_any_server(site_db, servers, site_network):
    url = site_db.url
    cluster = site_network.cluster
    started = await start_all(servers)
    writers = [await Writer(s).open() for s in started.values()]
    names = [s.name for s in started.values()]
    try:
        await asyncio.gather(*(w.write(20, 0.02) for w in writers))
        recovered = asyncio.Event()
        period_s = 0.05
        limit_s = OUTAGE_S + RECOVERY_S + 30
        budget = int(limit_s / period_s)  # bounded in count and in time (limit_s), whatever happens to the events
        timings: dict[str, float] = {}

        async def outage() -> None:
            try:
                await asyncio.to_thread(cluster.stop, "fast")
                down_at = time.monotonic()
                # every historian noticed (a batch failed) and spools: the outage is under test, not just scheduled
                await wait_for(lambda: all(s.saw(SPOOLING) for s in started.values()), timeout=OUTAGE_S, what="every historian spooling")
                timings["noticed_s"] = time.monotonic() - down_at
                await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))  # the fault's length is the test's parameter
                await asyncio.to_thread(cluster.start)
                back_at, back_wall = time.monotonic(), time.time()
                timings["outage_s"] = back_at - down_at
                # writing on until every server has written its spool back and says so in a heartbeat
                await wait_for(lambda: _recovered(url, started, back_wall), timeout=RECOVERY_S, what="every spool back-filled, every server ok")
                timings["recovery_s"] = time.monotonic() - back_at
            finally:
                recovered.set()  # the writers stop however this ended

        await asyncio.gather(outage(), *(w.write(budget, period_s, until=recovered, limit_s=limit_s) for w in writers))
        assert timings["outage_s"] >= OUTAGE_S and "recovery_s" in timings, timings
        for w in writers:
            assert w.written > 20 + OUTAGE_S / period_s / 2, f"{w.server.name} took too few writes: {w.written}"
        for w in writers:
            await wait_for(lambda w=w: all_archived(url, w.server, w.written), timeout=60, what=f"{w.server.name} archived")
        await wait_for(lambda: _all_ok(url, names), timeout=30, what="every server ok, spools empty")
        for w in writers:
            assert_exactly_once(url, w.server, w.written)
        for s in started.values():
            assert s.saw(SPOOLING) and s.saw(BACKFILLED) and not s.saw("Traceback"), "\n".join(s.lines[-30:])
    finally:
        for w in writers:
            await w.close()


# ---- clients across the namespaces ----------------------------------------------------------------------
#
# The servers take their accounts from the site database (``labctl user``, re-read every
# heartbeat). Clients connect to alpha only: the library from the test (over the bridge),
# the CLI from namespace ``d`` (a client machine of its own), pyepics from the test with
# alpha's CA name service as its only way to find a PV.

OPERATOR, OPERATOR_PW = "operator", "operator-pw-1"
ALICE, ALICE_PW = "alice", "alice-pw-1"
#: How long a change of the site may take to show to a client (the lapse and a few heartbeats).
SETTLE_S = LAPSE_S + 10.0
#: How soon after a kill -9 its PVs must show disconnected in a client's monitor.
DISCONNECT_S = 5.0


async def _add_user(url: str, name: str, password: str, roles: str) -> None:
    rc, out, err = await run_labctl("user", "add", name, "--roles", roles, "--historian-url", url, "--stdin", stdin=f"{password}\n")
    assert rc == 0, (out, err)


async def _cli(net: SiteNetwork, *args: str, user: str = OPERATOR, password: str = OPERATOR_PW) -> subprocess.CompletedProcess[str]:
    """``labctl ARGS`` run in namespace ``d`` as ``user`` (the password from the environment)."""
    env = {**os.environ, "LABCTL_USER": user, "LABCTL_PASSWORD": password}
    return await asyncio.to_thread(net.run, "d", [sys.executable, "-m", "labctl", *args], 60.0, env)


async def _sees_up(s: Session, names: list[str]) -> bool:
    shown = {e.name: e for e in await s.servers()}
    return all(n in shown and shown[n].state == "up" and shown[n].endpoint for n in names)


async def _login_refused(url: str, user: str, password: str) -> bool:
    try:
        client = await login(url, user, password)
    except ua.UaStatusCodeError as e:
        return e.code == ua.StatusCodes.BadUserAccessDenied
    await client.disconnect()
    return False


async def _session_closed(client: Client) -> bool:
    try:
        await client.get_node(ua.ObjectIds.Server_ServerStatus_State).read_value()
    except (ua.UaStatusCodeError, ConnectionError):
        return True
    return False


async def _history_has(s: Session, pv: str, since: float, value: float) -> bool:
    return value in list((await s.history(pv, since)).values)


async def test_clients_in_other_namespaces_use_every_servers_pvs_through_one(site_db, servers, site_network):
    url = site_db.url
    net = site_network.net
    await _add_user(url, OPERATOR, OPERATOR_PW, "operator")
    await _add_user(url, ALICE, ALICE_PW, "operator")
    started = await start_all(servers, accounts="database")
    alpha = started["a"]
    names = [s.name for s in started.values()]
    since = time.time() - 60

    # the library, connected to alpha only: get, put, monitor and history of beta's and gamma's PVs
    s = await connect(alpha.url, OPERATOR, OPERATOR_PW, "auto")
    try:
        await wait_for(lambda: _sees_up(s, names), timeout=SETTLE_S, what="every server up in alpha's site folder")
        values = await s.get_many(["B:V0", "A:V0", "C:V0"])
        assert [(v.name, v.value) for v in values] == [("B:V0", 0.0), ("A:V0", 0.0), ("C:V0", 0.0)]
        await s.put("B:V0", 2.5)
        assert (await s.get("B:V0")).value == 2.5
        async with s.monitor(["A:V1", "C:V1"]) as mon:
            assert {(await mon.next(10)).name for _ in range(2)} == {"A:V1", "C:V1"}, "current values first"
            await s.put("C:V1", 3.5)
            sample = await mon.next(10)
            assert (sample.name, sample.connected, sample.reading.value) == ("C:V1", True, 3.5)
        await wait_for(lambda: _history_has(s, "B:V0", since, 2.5), timeout=20, what="B:V0's write in its history through alpha")

        # the CLI in its own namespace, pointed at alpha: get across the three, put on beta, monitor gamma's PV, beta's history
        got = await _cli(net, "get", "A:V2", "B:V2", "C:V2", "--url", alpha.url, "--json")
        assert got.returncode == 0, got.stderr
        assert [(v["name"], v["value"]) for v in json.loads(got.stdout)] == [("A:V2", 0.0), ("B:V2", 0.0), ("C:V2", 0.0)]
        put = await _cli(net, "put", "B:V2", "4.25", "--url", alpha.url, "--json")
        assert put.returncode == 0 and json.loads(put.stdout)["value"] == 4.25, put.stderr
        assert (await s.get("B:V2")).value == 4.25
        env = {**os.environ, "LABCTL_USER": OPERATOR, "LABCTL_PASSWORD": OPERATOR_PW}
        argv = [sys.executable, "-m", "labctl", "monitor", "C:V2", "--url", alpha.url, "--json", "--count", "2", "--timeout", "20"]
        monitor = net.spawn("d", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            assert monitor.stdout is not None
            first = json.loads(await asyncio.to_thread(monitor.stdout.readline) or "null")  # ends by --timeout at worst
            assert first is not None and (first["name"], first["value"]) == ("C:V2", 0.0), monitor.stderr.read() if first is None else first
            await s.put("C:V2", 5.5)
            second = json.loads(await asyncio.to_thread(monitor.stdout.readline) or "null")
            assert second is not None and (second["name"], second["value"]) == ("C:V2", 5.5), second
            assert await asyncio.to_thread(monitor.wait, 30) == 0
        finally:
            if monitor.poll() is None:
                monitor.kill()
                monitor.wait(timeout=10)
            for stream in (monitor.stdout, monitor.stderr):
                if stream is not None:
                    stream.close()
        hist = await _cli(net, "history", "B:V0", "--url", alpha.url, "--since", "10m", "--json")
        assert hist.returncode == 0, hist.stderr
        assert 2.5 in [r["value"] for r in json.loads(hist.stdout)["rows"]], hist.stdout
    finally:
        await s.close()

    # pyepics finds every server's PVs through alpha's name service, on the bridge (no search address at all)
    entries = await directory(url)
    env = {
        "EPICS_CA_NAME_SERVERS": f"{alpha.address}:{entries['alpha'].ca_tcp_port}",
        "EPICS_CA_ADDR_LIST": "",
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
    }
    async with pyepics(free_tcp_udp_port(), env=env) as client:  # its server port on loopback is served by no one
        for pv, value in (("A:V3", 0.0), ("B:V0", 2.5), ("C:V1", 3.5)):  # each only on its owner's bridge address
            found = await client.call("connect", pv=pv)
            assert found["type"] == "DOUBLE" and found["read"], found
            assert (await client.call("get", pv=pv))["value"] == value

    # a user disabled with `labctl user disable` is refused on all three within seconds, open sessions closed
    sessions = [await login(srv.url, ALICE, ALICE_PW) for srv in started.values()]
    try:
        rc, out, err = await run_labctl("user", "disable", ALICE, "--historian-url", url)
        assert rc == 0, (out, err)
        disabled_at = time.monotonic()
        for srv in started.values():
            await wait_for(lambda srv=srv: _login_refused(srv.url, ALICE, ALICE_PW), timeout=5, what=f"{ALICE} refused by {srv.name}")
        for c in sessions:
            await wait_for(lambda c=c: _session_closed(c), timeout=5, what=f"{ALICE}'s open session closed")
        assert time.monotonic() - disabled_at < 10
        for srv in started.values():  # the others are let in as before
            await (await login(srv.url, OPERATOR, OPERATOR_PW)).disconnect()
    finally:
        for c in sessions:
            with contextlib.suppress(Exception):
                await c.disconnect()
