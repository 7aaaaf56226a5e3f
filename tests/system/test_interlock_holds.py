"""Interlocks hold on the demo site (issue 16, item 1), end to end over every way in.

The demo site (``config/demo.yaml``) runs in-process with its cryostat plant and bridge
sped up (time constants of tens of milliseconds, a 20 ms scan, ``mxc_warm``'s grace
periods shortened); everything else -- users, resources, interlock actions, CA access
rules -- is the demo's. The compressor stops, ``mxc_warm`` trips and turns the heaters
off, and then everyone tries to turn them on again while it is tripped: the operator and
the admin over OPC UA (labctl's client library, refusals as data), the admin over
Channel Access with libca (pyepics, in a subprocess) and the operator with caproto's
client, each holding the cryostat's lock, and a job. Every write is refused naming the
interlock and audited once; the job is held; the heaters stay off; a value set at the
bridge's front panel is written back to safe.
"""

from __future__ import annotations

import os
import pwd
import socket

import pytest
from labctl.clients.errors import PutRefused
from labctl.clients.session import connect
from labctl.ioc.interlocks import state_pv
from labctl.ioc.jobs import JobState
from labctl.ioc.types import Identity
from labctl.server.app import Overrides, Server
from labctl.server.ca.config import CAAccessRule
from labctl.server.site import load_site

from tests.helpers import free_port, free_tcp_udp_port, wait_for
from tests.protocol.ca.support import client, pyepics
from tests.protocol.ca.support import connect as ca_connect

DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "config", "demo.yaml")
ME = pwd.getpwuid(os.getuid()).pw_name  # what libca reports
ECA_NORMAL = 1
HEATERS = {"CRYO:MXC:HTR:RANGE": "1 mA", "CRYO:STILL:HTR": 10.0}


def fast_demo(state_dir, ca_port: int, beacon_port: int):
    site = load_site(DEMO)
    cryo = site.simulations["cryo"]
    options = {**cryo.options, "tau_s": {"mxc": 0.05, "still": 0.05}, "warm_tau_s": {"50K": 2.0, "4K": 2.0, "still": 0.3, "mxc": 0.3}}
    instruments = tuple(i.model_copy(update={"scan_s": 0.02}) if i.name == "bridge" else i for i in site.instruments)
    interlocks = tuple(i.model_copy(update={"for_s": 0.2, "clear_for_s": 0.2}) if i.name == "mxc_warm" else i for i in site.interlocks)
    access = site.server.ca.access
    # libca reports this process's user: the site grants it the admin role over CA, as a site would its admins
    access = access.model_copy(update={"rules": (*access.rules, CAAccessRule(users=(ME,), hosts=("*",), roles=("admin",)))})
    site = site.model_copy(
        update={
            "simulations": {**site.simulations, "cryo": cryo.model_copy(update={"options": options})},
            "instruments": instruments,
            "interlocks": interlocks,
            "server": site.server.model_copy(
                update={
                    "ca": site.server.ca.model_copy(update={"access": access}),
                    "opcua": site.server.opcua.model_copy(update={"trust": "auto"}),  # the test's client certificates
                }
            ),
        }
    )
    return Overrides(
        opcua_host="127.0.0.1", opcua_port=0, ca_port=ca_port, ca_beacon_port=beacon_port, ca_interfaces=["127.0.0.1"],
        no_historian=True, state_dir=str(state_dir),
    ).apply(site)  # fmt: skip


@pytest.fixture
def caproto_env(monkeypatch):
    """Point caproto's clients in this process at a server port (they read the environment per search)."""

    def point(port: int) -> None:
        monkeypatch.setenv("EPICS_CA_SERVER_PORT", str(port))
        monkeypatch.setenv("EPICS_CA_ADDR_LIST", "127.0.0.1")
        monkeypatch.setenv("EPICS_CA_AUTO_ADDR_LIST", "NO")

    return point


@pytest.fixture
async def demo(tmp_path):
    srv = Server(fast_demo(tmp_path / "var", free_tcp_udp_port(), free_port(socket.SOCK_DGRAM)), base_dir=os.path.dirname(DEMO))
    srv.audits = []
    srv.db.add_audit_sink(srv.audits.append)
    async with srv:
        await wait_for(lambda: srv.db.read("CRYO:MXC:TEMP").valid, what="first reading")
        yield srv


def heaters_off(db) -> bool:
    return db.read("CRYO:MXC:HTR:RANGE").value == 0 and db.read("CRYO:STILL:HTR").value == 0.0


def write_refusals(srv, mark: int) -> list[tuple[str, str, str]]:
    return [(a.target, a.user, a.protocol) for a in srv.audits[mark:] if a.action == "write" and not a.accepted]


async def test_a_tripped_interlock_holds_the_heaters_off_against_everyone(demo, caproto_env):
    db, control, plant = demo.db, demo.control, demo.plants["cryo"]
    url = demo.service("opcua").url
    # the operator runs the heaters, then the compressor stops and mxc_warm trips
    async with await connect(url, "operator", "operator-demo") as op:
        lease = await op.lock("cryostat", duration_s=120)
        await op.put("CRYO:MXC:HTR:RANGE", "1 mA")
        await op.put("CRYO:STILL:HTR", 20.0)
        plant.stop_compressor()
        await wait_for(lambda: control.interlocks.state("mxc_warm") == "TRIPPED", timeout=20, what="mxc_warm trips")
        await wait_for(lambda: heaters_off(db), what="heaters driven off")
        assert db.read(state_pv("mxc_warm")).value == 3
        mark = len(demo.audits)
        # the operator, still holding the lock, over OPC UA
        for pv, value in HEATERS.items():
            with pytest.raises(PutRefused) as e:
                await op.put(pv, value)
            assert (e.value.kind, e.value.error, e.value.fields["interlock"], e.value.fields["pv"]) == ("conflict", "Interlocked", "mxc_warm", pv)
        await op.put("CRYO:MXC:HTR:RANGE", "Off")  # the safe value itself is accepted
        await op.unlock("cryostat", lease.token)
    # the admin over OPC UA, with the lock (an admin is not above an interlock)
    async with await connect(url, "admin", "admin-demo") as adm:
        await adm.lock("cryostat", duration_s=120)
        for pv, value in HEATERS.items():
            with pytest.raises(PutRefused) as e:
                await adm.put(pv, value)
            assert (e.value.error, e.value.fields["interlock"]) == ("Interlocked", "mxc_warm")
        # a job: held by the interlock, it never touches the heater
        job_id = await adm.submit("heater_sweep", {"setpoints": [0.05]})
        assert control.jobs.get(job_id).state is JobState.QUEUED
        assert "interlock:mxc_warm" in control.jobs.held  # the queue is held by the interlock
    await wait_for(lambda: control.arbiter.holder("cryostat") is None, what="the admin's session gave the lock back")
    # the admin over Channel Access (libca), holding the lock through the arbiter's CA PVs
    async with pyepics(demo.service("ca").port) as ca:
        await ca.call("put_callback", pv="ARB:CRYOSTAT:REQUEST", value="60", tag="lock")
        assert (await ca.event(lambda e: e["event"] == "put_done" and e["tag"] == "lock"))["status"] == ECA_NORMAL
        for pv, value in (("CRYO:MXC:HTR:RANGE", 4), ("CRYO:STILL:HTR", 10.0)):
            await ca.call("put_callback", pv=pv, value=value, tag=pv)
            assert (await ca.event(lambda e, pv=pv: e["event"] == "put_done" and e["tag"] == pv))["status"] != ECA_NORMAL
        await ca.call("put_callback", pv="ARB:CRYOSTAT:RELEASE", value="done", tag="unlock")
        await ca.event(lambda e: e["event"] == "put_done" and e["tag"] == "unlock")
    # the operator over Channel Access (caproto, reporting the demo's operator name)
    async with client(demo.service("ca").port, caproto_env, user="operator", host="localhost") as ctx:
        request = await ca_connect(ctx, "ARB:CRYOSTAT:REQUEST")
        assert (await request.write(["60"], wait=True)).status.name == "ECA_NORMAL"
        for pv, value in (("CRYO:MXC:HTR:RANGE", [4]), ("CRYO:STILL:HTR", [10.0])):
            chan = await ca_connect(ctx, pv)
            assert (await chan.write(value, wait=True)).status.name == "ECA_PUTFAIL"
    # every attempt refused, once each, naming the interlock; the heaters never came on
    refused = write_refusals(demo, mark)
    assert refused == [
        ("CRYO:MXC:HTR:RANGE", "operator", "opcua"), ("CRYO:STILL:HTR", "operator", "opcua"),
        ("CRYO:MXC:HTR:RANGE", "admin", "opcua"), ("CRYO:STILL:HTR", "admin", "opcua"),
        ("CRYO:MXC:HTR:RANGE", ME, "ca"), ("CRYO:STILL:HTR", ME, "ca"),
        ("CRYO:MXC:HTR:RANGE", "operator", "ca"), ("CRYO:STILL:HTR", "operator", "ca"),
    ]  # fmt: skip
    assert all("mxc_warm" in a.reason for a in demo.audits[mark:] if a.action == "write" and not a.accepted)
    assert heaters_off(db) and control.interlocks.state("mxc_warm") == "TRIPPED"
    # someone turns the heater on at the bridge's front panel: the interlock writes it back to safe
    bridge = db.link("bridge").driver
    await bridge.write("heater_range:0", 4)
    await wait_for(lambda: any(a.action == "interlock.reassert" and a.target == "CRYO:MXC:HTR:RANGE" for a in demo.audits), what="re-assertion")
    await wait_for(lambda: heaters_off(db), what="heater off again")
    control.jobs.cancel(job_id, Identity("admin", frozenset({"admin"}), "test"))
