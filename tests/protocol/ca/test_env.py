"""The standard EPICS environment and the site file decide where the CA server listens."""

from __future__ import annotations

import asyncio
import socket

import pytest
from caproto import CLIENT, Beacon, Broadcaster, SearchRequest, SearchResponse, VersionRequest
from caproto.server import common
from labctl.server.ca.config import CAConfig
from labctl.server.ca.env import (
    MAX_LATENCY_S,
    WARN_LATENCY_S,
    CASettingsError,
    NetInterface,
    host_interfaces,
    resolve,
    tune_latency,
)

from tests.helpers import free_port, free_tcp_udp_port
from tests.protocol.ca.support import serve, site_yaml

#: A host with loopback, an Ethernet interface, a point-to-point link and an interface without broadcast.
HOST = [
    NetInterface("lo", "127.0.0.1", None, loopback=True),
    NetInterface("eth0", "10.0.0.5", "10.0.0.255"),
    NetInterface("tun0", "10.8.0.2", "10.8.0.1"),
    NetInterface("wg0", "10.9.0.2", None),
]


def host() -> list[NetInterface]:
    return HOST


def test_defaults_without_environment():
    s = resolve(CAConfig(), {}, host)
    assert s.interfaces == ("0.0.0.0",)
    assert (s.port, s.beacon_port, s.beacon_period_s) == (5064, 5065, 15.0)
    assert s.beacon_addresses == (("10.0.0.255", 5065), ("10.8.0.1", 5065))  # never loopback's, as an IOC
    assert s.ignore_hosts == frozenset()


@pytest.mark.parametrize(
    ("interfaces", "env", "beacons"),
    [
        # served on loopback only: beacons to loopback, not to a broadcast the host cannot reach
        (("127.0.0.1",), {}, ("127.0.0.1",)),
        (("10.0.0.5",), {}, ("10.0.0.255",)),  # one interface: its broadcast address
        (("10.0.0.5", "127.0.0.1"), {}, ("10.0.0.255", "127.0.0.1")),
        (("10.9.0.2",), {}, ()),  # no broadcast there: no automatic beacons (an IOC warns of an empty list)
        (("10.0.0.5",), {"EPICS_CAS_BEACON_ADDR_LIST": "10.1.2.3"}, ("10.1.2.3", "10.0.0.255")),
        (("10.0.0.5",), {"EPICS_CAS_BEACON_ADDR_LIST": "10.1.2.3", "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO"}, ("10.1.2.3",)),
    ],
)
def test_beacons_go_to_the_served_interfaces_broadcast_addresses(interfaces, env, beacons):
    s = resolve(CAConfig(interfaces=interfaces), env, host)
    assert s.beacon_addresses == tuple((b, 5065) for b in beacons)


def test_a_wildcard_server_beacons_to_the_limited_broadcast_where_interfaces_cannot_be_read():
    assert resolve(CAConfig(), {}, lambda: None).beacon_addresses == (("255.255.255.255", 5065),)


def test_this_hosts_interfaces_are_read():
    found = host_interfaces()
    assert found is not None and any(i.loopback and i.address.startswith("127.") for i in found)


def test_cas_variables_win_over_ca_variables():
    env = {
        "EPICS_CA_SERVER_PORT": "6000",
        "EPICS_CAS_SERVER_PORT": "6100",
        "EPICS_CA_REPEATER_PORT": "6001",
        "EPICS_CAS_BEACON_PORT": "6101",
        "EPICS_CA_ADDR_LIST": "10.0.0.255",
        "EPICS_CAS_BEACON_ADDR_LIST": "10.1.0.255 10.2.0.9:7000",
        "EPICS_CA_AUTO_ADDR_LIST": "YES",
        "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
        "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1 10.1.0.5",
        "EPICS_CA_BEACON_PERIOD": "30",
        "EPICS_CAS_BEACON_PERIOD": "5",
        "EPICS_CAS_IGNORE_ADDR_LIST": "10.9.9.9 10.9.9.8:5064",
    }
    s = resolve(CAConfig(), env)
    assert s.interfaces == ("127.0.0.1", "10.1.0.5")
    assert (s.port, s.beacon_port, s.beacon_period_s) == (6100, 6101, 5.0)
    assert s.beacon_addresses == (("10.1.0.255", 6101), ("10.2.0.9", 7000))
    assert s.ignore_hosts == {"10.9.9.9", "10.9.9.8"}


def test_ca_variables_are_the_fallback():
    env = {
        "EPICS_CA_SERVER_PORT": "6000",
        "EPICS_CA_REPEATER_PORT": "6001",
        "EPICS_CA_ADDR_LIST": "10.0.0.255",
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
        "EPICS_CA_BEACON_PERIOD": "30",
    }
    s = resolve(CAConfig(), env)
    assert (s.port, s.beacon_port, s.beacon_period_s) == (6000, 6001, 30.0)
    assert s.beacon_addresses == (("10.0.0.255", 6001),)


def test_site_file_wins_over_the_environment():
    env = {"EPICS_CAS_SERVER_PORT": "6100", "EPICS_CAS_BEACON_PORT": "6101", "EPICS_CAS_INTF_ADDR_LIST": "10.1.0.5"}
    s = resolve(CAConfig(port=7100, beacon_port=7101, interfaces=("127.0.0.1",)), env)
    assert (s.interfaces, s.port, s.beacon_port) == (("127.0.0.1",), 7100, 7101)


def test_no_beacons_when_asked_for_none():
    s = resolve(CAConfig(), {"EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO"}, host)
    assert s.beacon_addresses == ()


def test_the_wildcard_interface_covers_the_others():
    assert resolve(CAConfig(interfaces=("127.0.0.1", "0.0.0.0")), {}).interfaces == ("0.0.0.0",)


@pytest.mark.parametrize(
    ("env", "cfg", "message"),
    [
        ({"EPICS_CAS_SERVER_PORT": "http"}, {}, "EPICS_CAS_SERVER_PORT='http': expected a port number"),
        ({"EPICS_CA_SERVER_PORT": "70000"}, {}, "EPICS_CA_SERVER_PORT='70000': a port is 0..65535"),
        ({"EPICS_CAS_INTF_ADDR_LIST": "eth0"}, {}, "EPICS_CAS_INTF_ADDR_LIST: 'eth0' is not an IPv4 address"),
        ({"EPICS_CAS_BEACON_ADDR_LIST": "10.0.0.1:x"}, {}, "EPICS_CAS_BEACON_ADDR_LIST entry '10.0.0.1:x'"),
        ({"EPICS_CAS_BEACON_PERIOD": "0"}, {}, "must be positive"),
        ({}, {"interfaces": ("lab-server",)}, "server.ca.interfaces: 'lab-server' is not an IPv4 address"),
    ],
)
def test_bad_settings_name_the_culprit(env, cfg, message):
    with pytest.raises(CASettingsError) as e:
        resolve(CAConfig(**cfg), env)
    assert message in str(e.value)


def test_latency_ceiling(monkeypatch):
    monkeypatch.setattr(common, "MAX_LATENCY", common.MAX_LATENCY)  # restored after the test
    monkeypatch.setattr(common, "HIGH_LOAD_WARN_LATENCY_SEC", common.HIGH_LOAD_WARN_LATENCY_SEC)
    got = tune_latency({})
    assert (common.MAX_LATENCY, common.HIGH_LOAD_WARN_LATENCY_SEC) == (MAX_LATENCY_S, WARN_LATENCY_S)
    assert got["max_latency_s"] == MAX_LATENCY_S
    common.MAX_LATENCY = 0.3  # as caproto read it from the operator's environment at import
    tune_latency({"CAPROTO_SERVER_MAX_LATENCY_SEC": "0.3"})
    assert common.MAX_LATENCY == 0.3


async def _search(port: int, name: str) -> int:
    """Search ``name`` by UDP on 127.0.0.1:``port``; return the TCP port in the reply."""
    b = Broadcaster(CLIENT)
    loop = asyncio.get_running_loop()
    replies: asyncio.Queue[bytes] = asyncio.Queue()

    class Protocol(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            replies.put_nowait(data)

    transport, _ = await loop.create_datagram_endpoint(Protocol, local_addr=("127.0.0.1", 0))
    try:
        request = b.send(VersionRequest(0, 13), SearchRequest(name, 1, 13))
        transport.sendto(request, ("127.0.0.1", port))
        data = await asyncio.wait_for(replies.get(), 10.0)
        (reply,) = [c for c in b.recv(data, ("127.0.0.1", port)) if isinstance(c, SearchResponse)]
        return reply.port
    finally:
        transport.close()


async def _beacon(sock: socket.socket) -> Beacon:
    loop = asyncio.get_running_loop()
    data = await asyncio.wait_for(loop.sock_recv(sock, 1024), 10.0)
    (beacon,) = Broadcaster(CLIENT).recv(data, ("127.0.0.1", 0))
    return beacon


async def test_ports_and_beacons_from_the_environment(monkeypatch):
    port, beacon_port = free_tcp_udp_port(), free_port(socket.SOCK_DGRAM)
    monkeypatch.setenv("EPICS_CAS_SERVER_PORT", str(port))
    monkeypatch.setenv("EPICS_CAS_BEACON_PORT", str(beacon_port))
    monkeypatch.setenv("EPICS_CAS_BEACON_ADDR_LIST", "127.0.0.1")
    monkeypatch.setenv("EPICS_CAS_AUTO_BEACON_ADDR_LIST", "NO")
    site = site_yaml(None, None, interfaces=None)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
        listener.bind(("127.0.0.1", beacon_port))
        listener.setblocking(False)
        async with serve(site) as s:
            assert s.site.server.ca.port is None  # nothing in the site file: the environment decides
            assert (s.service.port, s.service.tcp_port) == (port, port)
            assert s.service.context.interfaces == ["127.0.0.1"]  # EPICS_CAS_INTF_ADDR_LIST (tests/conftest.py)
            assert s.service.endpoints() == [f"ca://127.0.0.1:{port}"]
            assert await _search(port, "TEST:TEMP") == port
            beacon = await _beacon(listener)
            assert beacon.server_port == port


async def test_site_file_ports_win(monkeypatch):
    port, beacon_port = free_tcp_udp_port(), free_port(socket.SOCK_DGRAM)
    monkeypatch.setenv("EPICS_CAS_SERVER_PORT", str(free_tcp_udp_port()))
    monkeypatch.setenv("EPICS_CAS_BEACON_PORT", str(free_port(socket.SOCK_DGRAM)))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
        listener.bind(("127.0.0.1", beacon_port))
        listener.setblocking(False)
        async with serve(site_yaml(port, beacon_port, prefix="LAB:")) as s:
            assert s.service.port == port
            assert s.service.endpoints() == [f"ca://127.0.0.1:{port} (PV prefix 'LAB:')"]
            assert await _search(port, "LAB:TEST:TEMP") == port
            assert (await _beacon(listener)).server_port == port


async def test_port_zero_picks_a_free_port():
    async with serve(site_yaml(0, free_port(socket.SOCK_DGRAM))) as s:
        assert s.service.port > 0
        assert await _search(s.service.port, "TEST:TEMP") == s.service.tcp_port


async def test_a_taken_tcp_port_moves_circuits_elsewhere_as_an_ioc_does():
    port = free_tcp_udp_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        async with serve(site_yaml(port, free_port(socket.SOCK_DGRAM))) as s:
            assert s.service.port == port  # searches still on the configured port
            assert s.service.tcp_port != port
            assert await _search(port, "TEST:TEMP") == s.service.tcp_port


async def test_ignored_clients_get_no_search_reply(monkeypatch):
    monkeypatch.setenv("EPICS_CAS_IGNORE_ADDR_LIST", "127.0.0.1")
    async with serve(site_yaml(free_tcp_udp_port(), free_port(socket.SOCK_DGRAM))) as s:
        assert ("127.0.0.1", 40000) in s.service.context.ignore_addresses
        assert ("127.0.0.2", 40000) not in s.service.context.ignore_addresses


async def test_an_address_not_on_this_host_is_a_clear_error():
    from labctl.server.ca.context import CAStartError

    site = site_yaml(free_tcp_udp_port(), free_port(socket.SOCK_DGRAM), interfaces="[192.0.2.1]")
    with pytest.raises(CAStartError, match=r"cannot bind UDP 192\.0\.2\.1:\d+"):
        async with serve(site):
            pass


async def test_a_loopback_server_beacons_to_loopback_by_itself(monkeypatch):
    """No beacon list, automatic beacons on: a server on 127.0.0.1 beacons to 127.0.0.1 (not 255.255.255.255)."""
    monkeypatch.delenv("EPICS_CAS_BEACON_ADDR_LIST", raising=False)
    monkeypatch.delenv("EPICS_CA_ADDR_LIST", raising=False)
    monkeypatch.setenv("EPICS_CAS_AUTO_BEACON_ADDR_LIST", "YES")
    beacon_port = free_port(socket.SOCK_DGRAM)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
        listener.bind(("127.0.0.1", beacon_port))
        listener.setblocking(False)
        async with serve(site_yaml(free_tcp_udp_port(), beacon_port)) as s:
            assert s.service.settings is not None
            assert s.service.settings.beacon_addresses == (("127.0.0.1", beacon_port),)
            assert (await _beacon(listener)).server_port == s.service.port
