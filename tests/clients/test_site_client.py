"""The site parts of the client library against a server that is not part of a site, and their pure pieces.

A single server (SQLite or no historian) publishes no ``Site`` folder: a session to it
behaves exactly as before. The site itself, with several servers on PostgreSQL, is
tested in ``tests/site/test_clients_site.py``.
"""

from __future__ import annotations

import asyncio

import pytest
from asyncua import ua
from labctl.clients.cli.output import error_object
from labctl.clients.cli.servers import format_servers
from labctl.clients.errors import CommandRefused, NoSuchPV, ServerDown
from labctl.clients.monitor import Monitor
from labctl.clients.session import connect
from labctl.clients.site import ServerInfo, archived_metadata, disconnected
from labctl.ioc.types import PVType, Severity, Status
from labctl.server.cli import main

from .conftest import PASSWORDS


async def test_a_single_server_is_no_site_and_nothing_changes(url):
    async with await connect(url, "operator", PASSWORDS["operator"]) as s:
        assert s.server_name == "" and s.site_router is None
        assert await s.servers() == []
        assert [m.name for m in await s.list_pvs(site=True)] == [m.name for m in await s.list_pvs()]
        assert isinstance(s.monitor(["B:TEMP"]), Monitor)
        with pytest.raises(NoSuchPV):
            await s.get_many(["B:TEMP", "NOPE:X"])
        with pytest.raises(CommandRefused, match="not a server of a site"):
            await s.find_owners(["B:TEMP"])


async def test_labctl_servers_through_a_server_that_is_not_part_of_a_site(url, capsys, monkeypatch):
    monkeypatch.delenv("LABCTL_HISTORIAN_URL", raising=False)
    code = await asyncio.to_thread(main, ["servers", "--url", url, "--security", "None"])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err.startswith(f"labctl servers: {url} is not a server of a site"), err
    code = await asyncio.to_thread(main, ["servers", "--url", url, "--security", "None", "--json"])
    out, err = capsys.readouterr()
    assert code == 1 and '"kind": "not_found"' in err


def test_server_down_says_which_server_and_why_as_data():
    down = ServerDown(["B:X"], "beta", "opc.tcp://rack-b:4840", down=True)
    assert str(down) == "B:X: served by server 'beta' (opc.tcp://rack-b:4840), which is down (the site directory says so)"
    doc = error_object(down)
    assert doc["kind"] == "connection" and doc["error"] == "ServerDown" and doc["target"] == "B:X"
    assert doc["fields"] == {"pvs": ["B:X"], "server": "beta", "endpoint": "opc.tcp://rack-b:4840", "down": True}
    many = ServerDown(["B:1", "B:2", "B:3", "B:4"], "beta", "", down=False, reason="connection refused")
    assert str(many) == "B:1, B:2, B:3 and 1 more: served by server 'beta', which cannot be reached: connection refused"


def test_a_disconnected_sample_has_no_value():
    s = disconnected("B:X")
    assert not s.connected and (s.reading.value, s.reading.severity, s.reading.status) == (None, Severity.INVALID, Status.COMM)


def test_archived_metadata_takes_the_type_the_values_carry():
    def dv(variant: ua.Variant) -> ua.DataValue:
        return ua.DataValue(variant)

    cases = [
        ([dv(ua.Variant(None)), dv(ua.Variant(1.5, ua.VariantType.Double))], PVType.FLOAT64),
        ([dv(ua.Variant([1.0, 2.0], ua.VariantType.Double, is_array=True))], PVType.FLOAT64_ARRAY),
        ([dv(ua.Variant(3, ua.VariantType.Int64))], PVType.INT),
        ([dv(ua.Variant(True, ua.VariantType.Boolean))], PVType.BOOL),
        ([dv(ua.Variant("x", ua.VariantType.String))], PVType.STRING),
        ([dv(ua.Variant(2, ua.VariantType.UInt32))], PVType.ENUM),
        ([], PVType.FLOAT64),
    ]
    for values, expected in cases:
        meta = archived_metadata("B:X", values)
        assert (meta.name, meta.type, meta.historizing) == ("B:X", expected, True)


def test_the_servers_table_shows_each_server_and_its_detail():
    servers = [
        ServerInfo("alpha", "opc.tcp://a:4840", "up", "ok", "", "1.0", 2, ca_address="a", ca_port=5064, started=0.0, heartbeat=99.0),
        ServerInfo("beta", "", "down", "degraded", "instruments not connected: ls336", "1.0", 1),
    ]
    lines = format_servers(servers, now=100.0).splitlines()
    assert lines[0].split() == ["NAME", "STATE", "HEALTH", "OPC", "UA", "CHANNEL", "ACCESS", "VERSION", "PVS", "STARTED", "(UTC)",
                                "LAST", "HEARTBEAT"]  # fmt: skip
    assert lines[1].split() == ["alpha", "up", "ok", "opc.tcp://a:4840", "a:5064", "1.0", "2", "1970-01-01", "00:00:00", "1.0", "s", "ago"]
    assert lines[2].split() == ["beta", "down", "degraded", "-", "-", "1.0", "1", "-", "-"]
    assert lines[3] == "    instruments not connected: ls336"
