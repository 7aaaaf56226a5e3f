"""Reads are always current, over every protocol; deadbands filter monitors and archiving only.

A whole server (OPC UA, Channel Access, the historian on SQLite) serves a writable PV with
a monitor deadband of 0.5 and an archive deadband of 1.0, and a gauge scanned every 20 ms
whose reading never changes (a pyvisa-sim instrument defined here, so the test does not
depend on the demo's simulations). Each test writes a value inside the monitor deadband
through one protocol and reads it back at once with a real client (asyncua and labctl's
own session library, caproto's client for every DBR type, pyepics/libca): the new value
and a new time stamp. A monitor subscriber receives nothing for it -- its next update is
the next change past the deadband -- and the archive has only what passed the archive
deadband. The scanned gauge's time stamp advances on every protocol while its monitors
stay quiet, as a scanned EPICS record's TIME does.
"""

from __future__ import annotations

import datetime as dt
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua
from caproto import ChannelType, SubscriptionType
from labctl.clients.session import connect as labctl_connect
from labctl.server.app import Server
from labctl.server.site import parse_site

from tests.helpers import free_port, free_tcp_udp_port, wait_for
from tests.protocol.ca.epics_tools import EpicsTools, find_tools
from tests.protocol.ca.support import Recorder, client, connect, pyepics
from tests.protocol.opcua.conftest import open_client, password_hash

SIM = """\
spec: "1.1"
devices:
  gauge:
    eom:
      TCPIP SOCKET: {q: "\\n", r: "\\n"}
    error:
      response:
        command_error: ERROR
    dialogues:
      - q: "*IDN?"
        r: "TEST,GAUGE,0001,1.0"
      - q: ":MEAS:PRES?"
        r: "+1.00000E-06"
resources:
  TCPIP0::127.0.0.1::5025::SOCKET:
    device: gauge
"""


def site_text(tmp_path: Path, ca_port: int, beacon_port: int) -> str:
    """The test site: T:AO (deadbands monitor 0.5, archive 1.0) and the scanned gauge G:PRES."""
    sim = tmp_path / "gauge.yaml"
    sim.write_text(SIM)
    return f"""
site: current
server:
  state_dir: "{tmp_path / "state"}"
  opcua: {{host: 127.0.0.1, port: 0, anonymous: true, security: [None, Basic256Sha256_SignAndEncrypt], trust: auto}}
  ca:
    port: {ca_port}
    beacon_port: {beacon_port}
    interfaces: [127.0.0.1]
    access:
      rules:
        - {{users: ['*'], hosts: ['*'], roles: [operator]}}
historian: {{url: "sqlite:///{tmp_path}/history.sqlite"}}
users:
  - {{name: operator, roles: [operator], password_hash: "{password_hash("operator")}"}}
instruments:
  - name: gauge
    driver: scpi
    resource: "TCPIP0::127.0.0.1::5025::SOCKET"
    visa_library: "@sim"
    sim_file: "{sim}"
    scan_s: 0.02
    pvs:
      - {{name: "G:PRES", type: float64, unit: mbar, read: ":MEAS:PRES?"}}
pvs:
  - {{name: "T:AO", type: float64, unit: V, precision: 3, writable: true, initial: 5.0,
     deadband: {{monitor: 0.5, archive: 1.0}}}}
"""


@pytest.fixture
async def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Server]:
    """The whole server, started; caproto's clients in this process point at its CA port."""
    ca_port = free_tcp_udp_port()
    monkeypatch.setenv("EPICS_CA_SERVER_PORT", str(ca_port))
    monkeypatch.setenv("EPICS_CA_ADDR_LIST", "127.0.0.1")
    monkeypatch.setenv("EPICS_CA_AUTO_ADDR_LIST", "NO")
    server = Server(parse_site(site_text(tmp_path, ca_port, free_port(socket.SOCK_DGRAM)), "current.yaml"))
    async with server:
        await server.db.link("gauge").wait_connected(10.0)
        yield server


def url(server: Server) -> str:
    return server.service("opcua").url  # type: ignore[attr-defined]


def unix(when: dt.datetime) -> float:
    """An OPC UA time as UNIX seconds (asyncua gives naive UTC or aware datetimes)."""
    return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()


class Changes:
    """An asyncua subscription handler keeping every data change of every node."""

    def __init__(self) -> None:
        self.values: dict[str, list[Any]] = {}

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        self.values.setdefault(node.nodeid.Identifier, []).append(val)


async def watch(c: Client, names: list[str]) -> Changes:
    """A subscription of ``names`` whose first (current) values have arrived."""
    changes = Changes()
    ns = await c.get_namespace_index("urn:labctl:current")
    sub = await c.create_subscription(20, changes)
    await sub.subscribe_data_change([c.get_node(ua.NodeId(n, ns)) for n in names])
    await wait_for(lambda: all(changes.values.get(n) for n in names), what="the first values")
    return changes


async def archived(server: Server, name: str, since: float) -> list[float]:
    historian = server.service("historian")
    assert await historian.flush()  # type: ignore[attr-defined]
    page = await historian.read_raw(name, since, since + 3600)  # type: ignore[attr-defined]
    return [r.value for r in page.readings if r.timestamp > since]


# ---- OPC UA ---------------------------------------------------------------------------------


async def test_opcua_read_after_a_write_inside_the_monitor_deadband(served):
    c = await open_client(url(served), "operator", security="SignAndEncrypt")
    try:
        watcher = await watch(c, ["T:AO"])
        ns = await c.get_namespace_index("urn:labctl:current")
        node = c.get_node(ua.NodeId("T:AO", ns))
        before = await node.read_data_value()
        since = served.db.clock()  # what the archive got from now on
        await node.write_value(ua.DataValue(ua.Variant(4.6, ua.VariantType.Double)))

        after = await node.read_data_value()
        assert after.Value.Value == 4.6 and after.StatusCode.is_good()
        assert unix(after.SourceTimestamp) > unix(before.SourceTimestamp)
        assert unix(after.SourceTimestamp) == pytest.approx(served.db.read("T:AO").timestamp, abs=1e-6)
        async with await labctl_connect(url(served), security="None", timeout_s=10) as s:
            got = (await s.get("T:AO")).reading  # what `labctl get` shows
            assert (got.value, got.timestamp) == (4.6, pytest.approx(unix(after.SourceTimestamp), abs=1e-6))

        # 6.2 passes both deadbands from 5.0 (the last value monitors and the archive saw)
        await node.write_value(ua.DataValue(ua.Variant(6.2, ua.VariantType.Double)))
        await wait_for(lambda: watcher.values["T:AO"][-1] == 6.2, what="the change past the deadband")
        assert watcher.values["T:AO"] == [5.0, 6.2], "nothing for the write inside the deadband"
        # 6.8 passes the monitor deadband (from 6.2), not the archive's
        await node.write_value(ua.DataValue(ua.Variant(6.8, ua.VariantType.Double)))
        await wait_for(lambda: watcher.values["T:AO"][-1] == 6.8, what="a second change")
        assert (await node.read_value()) == 6.8
        assert await archived(served, "T:AO", since) == [6.2], "only what passed the archive deadband"
    finally:
        await c.disconnect()


async def test_opcua_read_of_a_scanned_pv_carries_its_latest_scan_time(served):
    c = await open_client(url(served))
    try:
        watcher = await watch(c, ["G:PRES"])
        ns = await c.get_namespace_index("urn:labctl:current")
        node = c.get_node(ua.NodeId("G:PRES", ns))
        first = await node.read_data_value()
        assert first.Value.Value == 1.0e-6

        async def later() -> bool:
            dv = await node.read_data_value()
            return dv.Value.Value == 1.0e-6 and unix(dv.SourceTimestamp) > unix(first.SourceTimestamp)

        await wait_for(later, what="a later scan's time stamp on Read")
        assert watcher.values["G:PRES"] == [1.0e-6], "an unchanged value is no data change"
    finally:
        await c.disconnect()


# ---- Channel Access: caproto's client -----------------------------------------------------

#: Every DBR type a double can be read as, by family; the TIME ones carry the stamp.
FAMILIES = {
    "DOUBLE": ChannelType.DOUBLE,
    "FLOAT": ChannelType.FLOAT,
    "STRING": ChannelType.STRING,
    "LONG": ChannelType.LONG,
    "INT": ChannelType.INT,
    "CHAR": ChannelType.CHAR,
    "ENUM": ChannelType.ENUM,
}


#: caproto's client decodes DBR_GR_STRING and DBR_CTRL_STRING with the DBR_TIME_STRING layout;
#: EPICS (and labctl's server) send them in the DBR_STS_STRING layout, so caproto would misread
#: them. The stock caget checks those two (tests/protocol/ca/test_conformance_tools.py).
_CAPROTO_MISREADS = {ChannelType.GR_STRING, ChannelType.CTRL_STRING}


def _dbr_types() -> list[ChannelType]:
    out = []
    for name in FAMILIES:
        for prefix in ("", "STS_", "TIME_", "GR_", "CTRL_"):
            t = getattr(ChannelType, prefix + name, None)
            if t is not None and t not in out and t not in _CAPROTO_MISREADS:
                out.append(t)
    return out


def _value(response: Any) -> Any:
    value = response.data[0]
    if isinstance(value, bytes):
        return value.decode()
    return value.item() if hasattr(value, "item") else value


async def test_ca_get_after_a_put_inside_the_monitor_deadband_every_dbr_type(served):
    async with client(served.service("ca").port, lambda port: None, user="alice", host="lab-pc") as ctx:  # type: ignore[attr-defined]
        pv = await connect(ctx, "T:AO")
        monitors = Recorder()
        monitors.add(pv, "value", SubscriptionType.DBE_VALUE | SubscriptionType.DBE_ALARM)
        await monitors.until(lambda: len(monitors.got["value"]) == 1)
        before = (await pv.read(data_type=ChannelType.TIME_DOUBLE)).metadata.timestamp
        await pv.write([5.4], wait=True)  # caput -c inside MDEL 0.5
        core = served.db.read("T:AO")
        assert core.value == 5.4
        native = {ChannelType.DOUBLE: 5.4, ChannelType.FLOAT: pytest.approx(5.4, abs=1e-6)}
        for data_type in _dbr_types():
            response = await pv.read(data_type=data_type)
            family = ChannelType(int(data_type) % 7)
            if family in native:
                assert _value(response) == native[family], data_type.name
            elif family is ChannelType.STRING:
                assert float(_value(response)) == 5.4, data_type.name
            elif family is not ChannelType.ENUM:
                assert _value(response) == 5, data_type.name
            if data_type.name.startswith("TIME_"):
                stamp = response.metadata.timestamp
                assert stamp > before and stamp == pytest.approx(core.timestamp, abs=1e-6), data_type.name
        # the monitor heard nothing of it: its next update is the next change past MDEL
        await pv.write([6.0], wait=True)
        await monitors.until(lambda: len(monitors.got["value"]) >= 2)
        assert [v for v, _, _ in monitors.got["value"]] == [5.0, 6.0]
        await monitors.close()


async def test_ca_time_stamp_of_a_scanned_pv_follows_its_scans(served):
    async with client(served.service("ca").port, lambda port: None) as ctx:  # type: ignore[attr-defined]
        pv = await connect(ctx, "G:PRES")
        monitors = Recorder()
        monitors.add(pv, "value", SubscriptionType.DBE_VALUE | SubscriptionType.DBE_ALARM)
        await monitors.until(lambda: len(monitors.got["value"]) == 1)
        first = await pv.read(data_type=ChannelType.TIME_DOUBLE)

        async def later() -> bool:
            r = await pv.read(data_type=ChannelType.TIME_DOUBLE)
            return _value(r) == 1.0e-6 and r.metadata.timestamp > first.metadata.timestamp

        await wait_for(later, what="a later scan's DBR_TIME stamp")
        assert [v for v, _, _ in monitors.got["value"]] == [1.0e-6]
        await monitors.close()


# ---- Channel Access: pyepics (libca) ---------------------------------------------------


async def test_pyepics_get_after_a_put_inside_the_monitor_deadband(served):
    async with pyepics(served.service("ca").port) as ca:  # type: ignore[attr-defined]
        await ca.call("monitor", pv="T:AO")
        assert (await ca.event(lambda e: e["event"] == "monitor"))["value"] == 5.0
        before = (await ca.call("get", pv="T:AO", form="time"))["timestamp"]
        await ca.call("put_wait", pv="T:AO", value=4.6)
        core = served.db.read("T:AO")
        got = await ca.call("get", pv="T:AO", form="time")
        assert got["value"] == 4.6 and got["timestamp"] > before
        assert got["timestamp"] == pytest.approx(core.timestamp, abs=1e-6)
        assert (await ca.call("get", pv="T:AO", form="ctrl"))["value"] == 4.6
        assert (await ca.call("get", pv="T:AO"))["value"] == 4.6
        assert float((await ca.call("get", pv="T:AO", string=True))["value"]) == 4.6
        await ca.call("put_wait", pv="T:AO", value=3.0)
        got = await ca.event(lambda e: e["event"] == "monitor")
        assert got["value"] == 3.0, "the write inside the deadband posted no monitor"
        scanned = await ca.call("get", pv="G:PRES", form="time")

        async def later() -> bool:
            return (await ca.call("get", pv="G:PRES", form="time"))["timestamp"] > scanned["timestamp"]

        await wait_for(later, what="a later scan's DBR_TIME stamp through libca")



async def test_epics_base_caget_after_a_caput_inside_the_monitor_deadband(served):
    """EPICS base's own tools (they send DBR_STRING for ``caput``, not the native type)."""
    tools = EpicsTools(find_tools(), served.service("ca").port)  # type: ignore[attr-defined]
    async with tools.camonitor("T:AO") as monitor:  # "T:AO  2026-12-07 10:00:00.123456 5"
        first = await monitor.line()
        assert first.split()[-1] == "5", first  # precision 3: camonitor prints "5" for 5.000
        before = first.split()[1:3]
        put = await tools.caput("-c", "T:AO", "4.6")  # inside MDEL 0.5
        assert put.returncode == 0, put
        got = await tools.caget("-t", "-d", "DBR_TIME_DOUBLE", "T:AO")
        assert "4.6" in got.stdout, got
        stamp = await tools.caget("-a", "T:AO")
        assert served.db.read("T:AO").value == 4.6 and "4.6" in stamp.stdout, stamp
        assert (await tools.caput("-c", "T:AO", "3")).returncode == 0  # outside the deadband
        after = await monitor.line()
        assert after.split()[-1] == "3", "the put inside the deadband posted no monitor: " + "\n".join(monitor.lines)
        assert after.split()[1:3] > before
