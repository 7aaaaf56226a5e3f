"""The site directory: servers of one PostgreSQL database register, heartbeat, own their PVs.

Real servers in-process on a fresh database each (heartbeat 0.2 s, down after 1 s), and
the ``labctl servers`` command reading the same tables. Each server's directory service
keeps the site's owner map in memory, checked against the database's. Waiting is for
events (a row changes), with timeouts; nothing sleeps a fixed time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os

import pytest
from labctl.clients.cli.servers import format_servers as client_table
from labctl.clients.site import ServerInfo
from labctl.ioc.errors import LabctlError
from labctl.server.app import Server
from labctl.server.historian import directory as sql
from labctl.server.historian.backend import open_backend
from labctl.server.historian.schema import SCHEMA_VERSION
from labctl.server.site import parse_site
from labctl.server.sitedir import SiteDirectoryService, format_servers
from labctl.server.siteinfo import (
    HEALTH_OK,
    HEALTH_STOPPED,
    PVsOwnedElsewhere,
    ServerEntry,
    ServerNameTaken,
    SiteMismatch,
)

from tests.helpers import wait_for
from tests.site.conftest import LAPSE_S, directory, query, read_owners, run_labctl, site_yaml


async def test_two_servers_register_with_their_endpoints_and_pvs(pg_database, start_server):
    url = pg_database.url
    a = await start_server("alpha", ["A:X", "A:Y"], url)
    sitedir = a.service("sitedir")
    assert sitedir.owners_loaded and dict(sitedir.owners) == {"A:X": "alpha", "A:Y": "alpha"}  # read at registration
    told: list[tuple[set[str], dict[str, str]]] = []
    sitedir.add_listener(lambda servers: told.append(({e.name for e in servers}, dict(sitedir.owners))))
    b = await start_server("beta", ["B:X"], url)
    servers = await directory(url)
    assert set(servers) == {"alpha", "beta"}
    for server, entry, pvs in ((a, servers["alpha"], 2), (b, servers["beta"], 1)):
        assert entry.up and entry.health == "ok", entry
        assert entry.opcua_endpoint == server.service("opcua").url
        assert entry.pv_count == pvs and entry.site == "lab" and entry.version
        assert entry.ca_address == "" and entry.ca_port is None  # Channel Access is off
        assert entry.heartbeat_s == 0.2 and entry.lapse_s == LAPSE_S
    assert await asyncio.to_thread(read_owners, url) == {"A:X": "alpha", "A:Y": "alpha", "B:X": "beta"}
    # each server sees the whole site at its heartbeats, with the owner map read as it changed; listeners told
    await wait_for(lambda: {e.name for e in sitedir.servers} == {"alpha", "beta"}, timeout=5, what="alpha sees beta")
    assert dict(sitedir.owners) == await asyncio.to_thread(read_owners, url)
    assert ({"alpha", "beta"}, {"A:X": "alpha", "A:Y": "alpha", "B:X": "beta"}) in told
    assert sitedir.me is not None and sitedir.me.name == "alpha"
    assert await sitedir.read_owners(["B:X", "NOPE"]) == {"B:X": "beta"}
    with pytest.raises(TypeError):
        sitedir.owners["B:X"] = "alpha"  # type: ignore[index]  # read-only for everyone but the service
    # heartbeats advance
    first = servers["alpha"].heartbeat
    await wait_for(lambda: _later(url, "alpha", first), timeout=5, what="a heartbeat")


async def _later(url: str, name: str, than: float) -> bool:
    return (await directory(url))[name].heartbeat > than


async def test_a_pv_another_live_server_owns_is_refused_with_both_names(pg_database, start_server, make_server):
    url = pg_database.url
    await start_server("alpha", ["A:X", "A:Y"], url)
    gamma = make_server("gamma", ["G:Z", "A:Y"], url)
    with pytest.raises(PVsOwnedElsewhere) as refused:
        await gamma.start()
    message = str(refused.value)
    assert "'A:Y'" in message and "'alpha'" in message and "'gamma'" in message, message
    assert "'G:Z'" not in message
    assert [(pv, owner.name) for pv, owner in refused.value.conflicts] == [("A:Y", "alpha")]
    # nothing of gamma was claimed, archived or left running
    assert await asyncio.to_thread(read_owners, url) == {"A:X": "alpha", "A:Y": "alpha"}
    assert "gamma" not in await directory(url)
    assert not await asyncio.to_thread(query, url, "SELECT 1 FROM pv WHERE name = 'G:Z'")


async def test_a_cleanly_stopped_server_is_down_at_once_and_its_pvs_are_taken_over(pg_database, start_server, caplog):
    url = pg_database.url
    alpha = await start_server("alpha", ["A:X", "A:Y"], url)
    await alpha.stop()
    entry = (await directory(url))["alpha"]
    assert not entry.up and entry.health == "stopped"
    caplog.set_level(logging.WARNING, logger="labctl.server.sitedir")
    await start_server("delta", ["A:Y", "D:Z"], url)
    owners = await asyncio.to_thread(read_owners, url)
    assert owners == {"A:X": "alpha", "A:Y": "delta", "D:Z": "delta"}
    assert any("took over 1 PVs from server 'alpha'" in r.getMessage() for r in caplog.records)


async def test_a_server_whose_heartbeat_lapsed_is_down_and_its_pvs_are_taken_over(pg_database, start_server):
    url = pg_database.url
    alpha = await start_server("alpha", ["A:X"], url)
    sitedir = alpha.service("sitedir")
    await sitedir._supervisor.stop()  # alpha hangs: no more heartbeats (a crash is the subprocess test's)
    await wait_for(lambda: _down(url, "alpha"), timeout=LAPSE_S + 5, what="alpha down")
    await start_server("beta", ["A:X"], url)
    assert await asyncio.to_thread(read_owners, url) == {"A:X": "beta"}
    # alpha's next heartbeat finds it lapsed, registers again, and leaves A:X to beta, which is up
    await sitedir.beat()
    assert sitedir.conflicts and sitedir.conflicts[0][0] == "A:X"
    entry = (await directory(url))["alpha"]
    assert entry.up and entry.health == "conflict" and "A:X" in entry.detail
    assert await asyncio.to_thread(read_owners, url) == {"A:X": "beta"}
    assert dict(sitedir.owners) == {"A:X": "beta"}  # read again as it registered again


async def _down(url: str, name: str) -> bool:
    return not (await directory(url))[name].up


async def test_three_servers_starting_at_once_migrate_the_schema_once(pg_database, make_server):
    url = pg_database.url
    servers = [make_server(f"s{i}", [f"S{i}:X", f"S{i}:Y"], url) for i in range(3)]
    results = await asyncio.gather(*(s.start() for s in servers), return_exceptions=True)
    try:
        assert [r for r in results if r is not None] == []
        found = await directory(url)
        assert set(found) == {"s0", "s1", "s2"} and all(e.up for e in found.values())
        versions = dict(await asyncio.to_thread(query, url, "SELECT component, version FROM historian_schema"))
        assert versions == {"historian": SCHEMA_VERSION, "site": 1}
        assert len(await asyncio.to_thread(read_owners, url)) == 6
    finally:
        for s, r in zip(servers, results, strict=True):
            if r is None:
                await s.stop()


async def test_the_directory_catches_up_after_a_database_outage(pg_cluster_factory, start_server, make_server, caplog):
    cluster = pg_cluster_factory()
    url = cluster.url
    alpha = await start_server("alpha", ["A:X"], url)
    sitedir = alpha.service("sitedir")
    caplog.set_level(logging.INFO, logger="labctl.server.sitedir")
    await asyncio.to_thread(cluster.stop)
    await wait_for(lambda: not sitedir.database_up, timeout=10, what="the outage noticed")
    alpha.db.post("A:X", 2.5)  # still serving
    assert alpha.db.read("A:X").value == 2.5
    assert dict(sitedir.owners) == {"A:X": "alpha"}  # the last reading stays
    with pytest.raises(Exception, match="(?i)connect"):
        await sitedir.lookup_owners(["B:X"])
    # a server starting during the outage starts too, unregistered, its owner map not read
    beta = make_server("beta", ["B:X"], url)
    await beta.start()
    try:
        assert not beta.service("sitedir").registered
        assert not beta.service("sitedir").owners_loaded and dict(beta.service("sitedir").owners) == {}
        await asyncio.to_thread(cluster.start)
        await wait_for(lambda: sitedir.database_up and beta.service("sitedir").registered, timeout=15, what="caught up")
        both = {"A:X": "alpha", "B:X": "beta"}
        await wait_for(lambda: dict(sitedir.owners) == both == dict(beta.service("sitedir").owners), timeout=15,
                       what="both owner maps read again")  # fmt: skip
        found = await directory(url)
        assert found["alpha"].up and found["beta"].up and found["alpha"].age_s < LAPSE_S
        assert found["beta"].opcua_endpoint == beta.service("opcua").url
        assert await asyncio.to_thread(read_owners, url) == {"A:X": "alpha", "B:X": "beta"}
        assert any("unreachable" in r.getMessage() for r in caplog.records)
        assert any("reachable again" in r.getMessage() for r in caplog.records)
    finally:
        await beta.stop()


async def test_labctl_servers_lists_the_site(pg_database, start_server):
    url = pg_database.url
    await start_server("alpha", ["A:X", "A:Y"], url)
    beta = await start_server("beta", ["B:X"], url)
    await beta.stop()
    rc, out, err = await run_labctl("servers", "--historian-url", url, "--json")
    assert rc == 0, err
    doc = {s["name"]: s for s in json.loads(out)}
    assert doc["alpha"]["state"] == "up" and doc["alpha"]["pv_count"] == 2 and doc["alpha"]["health"] == "ok"
    assert doc["beta"]["state"] == "down" and doc["beta"]["health"] == "stopped"
    assert doc["alpha"]["started"].endswith("+00:00") and doc["alpha"]["opcua_endpoint"].startswith("opc.tcp://127.0.0.1:")
    rc, out, err = await run_labctl("servers", "--historian-url", url)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "HEALTH", "OPC", "UA", "CHANNEL", "ACCESS", "VERSION", "PVS", "STARTED",
                                "(UTC)", "LAST", "HEARTBEAT"]  # fmt: skip
    assert lines[1].split()[:3] == ["alpha", "up", "ok"] and lines[2].split()[:3] == ["beta", "down", "stopped"]
    assert lines[1].endswith(" s ago") and lines[1].split()[-6] == "2"  # PVS, then STARTED (UTC) and LAST HEARTBEAT
    # forget: refused while up, done when down (audited)
    rc, _, err = await run_labctl("servers", "--historian-url", url, "--forget", "alpha")
    assert rc == 1 and "is up" in err
    rc, out, err = await run_labctl("servers", "--historian-url", url, "--forget", "beta")
    assert rc == 0 and "forgot server 'beta'" in out, err
    assert set(await directory(url)) == {"alpha"}
    rows = await asyncio.to_thread(query, url, "SELECT action, target FROM audit_event WHERE action = 'server.forget'")
    assert [tuple(r) for r in rows] == [("server.forget", "server:beta")]


def _row(name: str, heartbeat: float, age_s: float, *, health: str = HEALTH_OK, detail: str = "") -> ServerEntry:
    return ServerEntry(
        name=name, site="lab", host=f"{name}.lab", pid=1, version="1.0", opcua_endpoint=f"opc.tcp://{name}:4840",
        ca_address=name if name != "beta" else "", ca_port=5064, ca_tcp_port=5064, pv_count=3, started=0.0,
        heartbeat=heartbeat, heartbeat_s=2.0, lapse_s=10.0, health=health, detail=detail, age_s=age_s,
    )  # fmt: skip


def test_the_directory_table_is_the_clients_with_ages_by_the_database_clock():
    # read at 100.0 by the database's clock; gamma's heartbeat came in after the reading began (aged 0)
    rows = [_row("alpha", 99.0, 1.0), _row("beta", 40.0, 60.0, health=HEALTH_STOPPED, detail="went away"), _row("gamma", 100.5, 0.0)]
    text = format_servers(rows)
    shown = [
        ServerInfo(e.name, e.opcua_endpoint, e.state, e.health, e.detail, e.version, e.pv_count, e.host, e.ca_address,
                   e.ca_port, e.ca_tcp_port, e.started, e.heartbeat)
        for e in rows
    ]  # fmt: skip
    assert text == client_table(shown, now=100.0)  # one table, whichever way the rows came
    lines = text.splitlines()
    assert lines[1].split() == ["alpha", "up", "ok", "opc.tcp://alpha:4840", "alpha:5064", "1.0", "3", "1970-01-01",
                                "00:00:00", "1.0", "s", "ago"]  # fmt: skip
    assert lines[2].split()[:5] == ["beta", "down", "stopped", "opc.tcp://beta:4840", "-"] and lines[2].endswith("60.0 s ago")
    assert lines[3] == "    went away"
    assert lines[4].startswith("gamma") and lines[4].endswith(" 0.0 s ago")
    assert format_servers([]) == client_table([], now=0.0)


async def test_labctl_servers_says_what_is_wrong_with_its_database(pg_database, tmp_path):
    rc, _, err = await run_labctl("servers", "--historian-url", f"sqlite:///{tmp_path}/h.sqlite")
    assert rc == 1 and "PostgreSQL" in err
    rc, out, err = await run_labctl("servers", "--historian-url", pg_database.url)
    assert rc == 0 and out == "" and "no server has registered" in err


def test_a_sqlite_server_has_no_site_directory(tmp_path):
    text = site_yaml("solo", ["S:X"], f"sqlite:///{tmp_path}/h.sqlite", tmp_path / "state", opcua=False)
    server = Server(parse_site(text, "solo.yaml"))
    assert not any(isinstance(s, SiteDirectoryService) for s in server.services)
    accounts = text.replace("accounts: site_file", "accounts: database")
    with pytest.raises(LabctlError, match="server.accounts is 'database', but the historian URL sqlite"):
        Server(parse_site(accounts, "solo.yaml"))


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ("directory: {heartbeat_s: 0.2, lapse_s: 1.0, accounts_refresh_s: 0.2}", None),
        ("directory: {heartbeat_s: 1, lapse_s: 1.5}", "server.directory.lapse_s: must be at least twice heartbeat_s"),
        ("directory: {heartbeat_s: 0}", "server.directory.heartbeat_s"),
        ("directory: {address: ''}", "server.directory.address"),
    ],
)
def test_directory_settings_are_checked(tmp_path, change, problem):
    text = site_yaml("solo", ["S:X"], "postgresql+psycopg://u@h/db", tmp_path, opcua=False)
    text = text.replace("directory: {heartbeat_s: 0.2, lapse_s: 1.0, accounts_refresh_s: 0.2}", change)
    if problem is None:
        parse_site(text, "solo.yaml")
        return
    with pytest.raises(LabctlError) as e:
        parse_site(text, "solo.yaml")
    assert problem in str(e.value)


@pytest.mark.parametrize("name", ["rack a", "-rack", "x" * 64, "rack/a"])
def test_a_bad_server_name_is_refused_with_its_key(tmp_path, name):
    text = site_yaml(f'"{name}"', ["S:X"], "postgresql+psycopg://u@h/db", tmp_path, opcua=False)
    with pytest.raises(LabctlError) as e:
        parse_site(text, "solo.yaml")
    assert "server.name" in str(e.value)


async def test_a_restart_on_the_same_host_replaces_its_earlier_run_and_another_host_is_refused(pg_database, start_server, make_server):
    url = pg_database.url
    first = await start_server("alpha", ["A:X"], url)
    old = first.service("sitedir")
    await old._supervisor.stop()  # the earlier run, still up in the directory, stops heartbeating (a hung process)
    second = await start_server("alpha", ["A:X"], url)  # same host: a restart, at once
    assert (await directory(url))["alpha"].up and second.service("sitedir").registered
    await old.beat()  # the earlier run finds its name taken by the new run, and stops heartbeating
    assert old.superseded_by is not None and old.superseded_by.pid == os.getpid()
    # another host under a name that is up: refused
    await asyncio.to_thread(_register_elsewhere, url, "omega", "lab")
    with pytest.raises(ServerNameTaken, match="server name 'omega' is in use by a server that is up on host 'elsewhere'"):
        await make_server("omega", ["O:X"], url).start()
    # another site in the same database: refused
    await asyncio.to_thread(_register_elsewhere, url, "foreign", "other-lab")
    with pytest.raises(SiteMismatch, match="holds the directory of site 'other-lab'"):
        await make_server("zeta", ["Z:X"], url).start()


def _register_elsewhere(url: str, name: str, site: str) -> None:
    """A server row as another host's server that is up would leave it (heartbeat now, a long lapse)."""
    backend = open_backend(url, pool_size=1)
    try:
        with backend.engine.begin() as conn:
            conn.execute(
                sql.site_server.insert().values(
                    name=name, site=site, instance="x" * 32, host="elsewhere", pid=1, version="0", pv_count=0,
                    started_us=sql.db_now_us(conn), heartbeat_us=sql.db_now_us(conn), heartbeat_s=60.0, lapse_s=120.0,
                    health="ok",
                )
            )  # fmt: skip
    finally:
        backend.dispose()
