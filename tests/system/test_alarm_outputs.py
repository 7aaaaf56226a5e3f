"""Alarms and interlocks reach people and tools: Channel Access, notifications, webhooks."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from caproto import ChannelType
from caproto.asyncio.client import Context
from labctl.ioc.types import Identity
from labctl.server.app import Overrides, Server
from labctl.server.site import parse_site

from tests.helpers import free_port, free_tcp_udp_port, wait_for

OP = Identity("olga", frozenset({"operator"}), "test")


class Hook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 -- http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def webhook():
    Hook.received = []
    httpd = HTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/alarms", Hook.received
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


SITE = """
site: alarms
notifications:
  burst: 3
  window_s: 600
  webhooks: [{url: "WEBHOOK", min_severity: MINOR}]
pvs:
  - {name: "LAB:T", type: float64, unit: K, writable: true, initial: 1.0, alarm: {high: 5.0, hihi: 10.0, guidance: "open the valve"}}
  - {name: "LAB:P", type: float64, unit: mbar, writable: true, initial: 1.0}
interlocks:
  - {name: p_high, pv: "LAB:P", trip: 100.0, resume: 50.0, actions: {refuse_writes: [soft]}}
"""


@pytest.fixture
async def server(tmp_path, webhook, monkeypatch):
    url, _ = webhook
    port, beacon = free_tcp_udp_port(), free_port(socket.SOCK_DGRAM)
    site = parse_site(SITE.replace("WEBHOOK", url), "alarms.yaml")
    site = Overrides(no_opcua=True, no_historian=True, state_dir=str(tmp_path), ca_port=port, ca_beacon_port=beacon,
                     ca_interfaces=["127.0.0.1"]).apply(site)  # fmt: skip
    srv = Server(site, base_dir=tmp_path)
    monkeypatch.setenv("EPICS_CA_SERVER_PORT", str(port))
    async with srv:
        yield srv


async def test_a_flapping_pv_gives_a_bounded_number_of_notifications(server, webhook):
    _, received = webhook
    notifier = server.control.alarms.notifier
    for i in range(100):  # flaps across the HIGH limit a hundred times
        await server.db.write("LAB:T", 6.0 if i % 2 == 0 else 1.0, OP)
    assert notifier.sent == 3  # burst per source within the window: raised, cleared, raised
    await notifier.drain()
    # the webhook takes alarms at or above its severity: the two raised ones, not the clear
    await wait_for(lambda: len(received) == 2, what="webhook posts")
    assert [r["event"] for r in received] == ["raised", "raised"]
    first = received[0]
    assert (first["source"], first["event"], first["severity"], first["guidance"]) == ("LAB:T", "raised", "MINOR", "open the valve")
    assert first["site"] == "alarms"
    assert server.control.alarms.limiter.suppressed["LAB:T"] == 97  # counted, to be reported with the next one


async def test_alarm_and_interlock_states_are_visible_over_channel_access(server):
    ctx = Context(client_name="olga", host_name="lab-pc", timeout=10.0)
    try:
        pvs = await ctx.get_pvs("LAB:T", "ALARM:HIGHEST", "ALARM:ACTIVE:MAJOR", "ILK:P_HIGH:STATE", timeout=10.0)
        for pv in pvs:
            await pv.wait_for_connection(timeout=10.0)
        t, highest, major, ilk = pvs
        await server.db.write("LAB:T", 11.0, OP)
        await server.db.write("LAB:P", 500.0, OP)
        reading = await t.read(data_type="time")
        assert (reading.metadata.severity, reading.metadata.status) == (2, 3)  # MAJOR, HIHI
        assert (await highest.read(data_type=ChannelType.STRING)).data == [b"MAJOR"]
        assert (await major.read()).data[0] == 2  # LAB:T and the tripped interlock
        assert (await ilk.read(data_type=ChannelType.STRING)).data == [b"TRIPPED"]
        assert (await ilk.read(data_type="time")).metadata.severity == 2
    finally:
        await ctx.disconnect()
