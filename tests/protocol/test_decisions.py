"""One decision for every action, on every protocol: the README's role table, tried over the wire.

Every (role, action) pair is performed by a real client -- labctl's library over OPC UA,
and caproto's client over Channel Access where the action exists there (PV writes and
lock commands) -- against one server. The decision (refused as forbidden, or not) must
be the README's, refusals must arrive as typed exceptions with their fields, and each
refusal must leave exactly one audit record naming who, what and why, alike on both
protocols.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from caproto.asyncio.client import Context
from labctl.clients import errors as client_errors
from labctl.clients.session import Session, connect
from labctl.ioc.policy import Action
from labctl.ioc.types import Identity, Severity
from labctl.server.app import Server
from labctl.server.passwords import hash_password
from labctl.server.site import parse_site

from tests.helpers import free_port, free_tcp_udp_port, wait_for
from tests.unit.test_policy import ROLES, readme_table

pytestmark = pytest.mark.timeout(300)

USERS = {"viewer": "viewer", "operator": "operator", "expert": "expert", "admin": "admin"}  # user name = role
OTHER = Identity("someone", frozenset({"operator"}), "test")


@functools.cache
def password_hash(user: str) -> str:
    return hash_password(f"{user}-pw")


def site_text(state_dir: Path, ua_port: int, ca_port: int, beacon_port: int) -> str:
    users = "".join(f'  - {{name: {u}, roles: [{r}], password_hash: "{password_hash(u)}"}}\n' for u, r in USERS.items())
    return f"""
site: lab
server:
  state_dir: "{state_dir}"
  opcua: {{host: 127.0.0.1, port: {ua_port}, trust: auto}}
  ca:
    interfaces: [127.0.0.1]
    port: {ca_port}
    beacon_port: {beacon_port}
    access:
      user_groups: {{operators: [operator]}}
      host_groups: {{anywhere: ["*"]}}
      rules:
        - {{users: [operators], hosts: [anywhere], roles: [operator]}}
historian: {{enabled: false}}
users:
{users}
resources:
  - {{name: cryostat, lockable: true}}
  - {{name: bench, lockable: false}}
pvs:
  - {{name: "BENCH:SP", type: float64, initial: 0.0, writable: true, resource: bench}}
  - {{name: "CRYO:T", type: float64, initial: 0.01, resource: cryostat, alarm: {{high: 1.0}}}}
  - {{name: "CRYO:SETP", type: float64, initial: 0.0, writable: true, resource: cryostat}}
procedures:
  sweep:
    description: waits long enough to be cancelled
    steps:
      - sleep: 60
interlocks:
  - {{name: warm, pv: "CRYO:T", trip: 5.0, resume: 1.0, reset: manual}}
"""


@asynccontextmanager
async def served(tmp_path: Path) -> AsyncIterator[Server]:
    ports = (free_port(), free_tcp_udp_port(), free_port(socket.SOCK_DGRAM))
    server = Server(parse_site(site_text(tmp_path, *ports), "decisions.yaml"))
    async with server:
        yield server


def ua_url(server: Server) -> str:
    return server.service("opcua").url  # type: ignore[attr-defined]


async def prepare(server: Server, action: Action) -> dict[str, Any]:
    """Arrange the target each role acts on: someone else's lock or job, an alarm, a tripped interlock."""
    control, db = server.control, server.db
    for lease in [control.arbiter.holder("cryostat")]:
        if lease is not None:
            control.break_lock("cryostat", Identity("root", frozenset({"admin"}), "test"))
    if action is Action.LOCK_BREAK:
        control.request_lock("cryostat", OTHER, duration_s=600, client="other")
    if action in (Action.JOB_VIEW, Action.JOB_CANCEL):
        job = control.submit_job("sweep", {}, OTHER)
        return {"job": job.id}
    if action in (Action.ALARM_ACK, Action.ALARM_SHELVE, Action.ALARM_UNSHELVE):
        db.post("CRYO:T", 2.0)
        await wait_for(lambda: control.alarms.table.get("CRYO:T").latched >= Severity.MINOR)
    if action is Action.INTERLOCK_RESET:
        db.post("CRYO:T", 9.0)
        await wait_for(lambda: control.interlocks.state("warm") == "TRIPPED")
        db.post("CRYO:T", 0.01)
        await wait_for(lambda: control.interlocks.state("warm") == "RESET_NEEDED")
    return {}


ACT: dict[Action, Callable[[Session, dict[str, Any]], Awaitable[Any]]] = {
    Action.PV_WRITE: lambda s, t: s.put("BENCH:SP", 1.0),
    Action.LOCK_LIST: lambda s, t: s.locks(),
    Action.LOCK_REQUEST: lambda s, t: s.lock("cryostat", duration_s=30),
    Action.LOCK_RENEW: lambda s, t: s.renew("cryostat", "not-a-token"),
    Action.LOCK_RELEASE: lambda s, t: s.unlock("cryostat", "not-a-token"),
    Action.LOCK_BREAK: lambda s, t: s.break_lock("cryostat"),
    Action.PROCEDURE_LIST: lambda s, t: s.procedures(),
    Action.JOB_LIST: lambda s, t: s.jobs(),
    Action.JOB_SUBMIT: lambda s, t: s.submit("sweep", {}),
    Action.JOB_VIEW: lambda s, t: s.job(t["job"]),
    Action.JOB_CANCEL: lambda s, t: s.cancel(t["job"]),
    Action.ALARM_LIST: lambda s, t: s.alarms(),
    Action.ALARM_ACK: lambda s, t: s.acknowledge("CRYO:T", "seen"),
    Action.ALARM_SHELVE: lambda s, t: s.shelve("CRYO:T", 60, "sensor swap"),
    Action.ALARM_UNSHELVE: lambda s, t: s.unshelve("CRYO:T"),
    Action.INTERLOCK_LIST: lambda s, t: s.interlocks(),
    Action.INTERLOCK_RESET: lambda s, t: s.reset_interlock("warm"),
    Action.AUDIT_READ: lambda s, t: s.audit(since=0),
}


async def test_every_role_and_action_over_opcua_is_the_readme_table_and_each_refusal_is_audited_once(tmp_path):
    table = readme_table()
    assert set(ACT) == set(Action)
    async with served(tmp_path) as server:
        audit: list = []
        server.db.add_audit_sink(audit.append)
        sessions = {r: await connect(ua_url(server), user=None if r == "anonymous" else r, password=None if r == "anonymous" else f"{r}-pw") for r in ROLES}
        try:
            for action in Action:
                for role in ROLES:
                    target = await prepare(server, action)
                    before = len(audit)
                    try:
                        await ACT[action](sessions[role], target)
                        forbidden = False
                    except client_errors.Refused as e:
                        forbidden = e.kind == "forbidden"
                        assert e.action == action.value and e.error, (action, role, e.to_dict())
                        if forbidden:
                            assert isinstance(e, client_errors.Forbidden)
                            assert e.fields.get("user", role if role != "anonymous" else "anonymous")
                        refusals = [a for a in audit[before:] if not a.accepted]
                        assert len(refusals) == 1, (action, role, refusals)
                        (record,) = refusals
                        assert (record.action, record.user, record.protocol) == (action.value, role, "opcua")
                        assert record.reason and record.reason in e.message
                    assert forbidden is not table[action][role], (action, role)
        finally:
            for s in sessions.values():
                await s.close()


async def test_writes_and_lock_commands_over_channel_access_decide_and_audit_as_over_opcua(tmp_path, monkeypatch):
    async with served(tmp_path) as server:
        audit: list = []
        server.db.add_audit_sink(audit.append)
        ca_port = server.service("ca").port  # type: ignore[attr-defined]
        monkeypatch.setenv("EPICS_CA_SERVER_PORT", str(ca_port))
        monkeypatch.setenv("EPICS_CA_ADDR_LIST", "127.0.0.1")
        monkeypatch.setenv("EPICS_CA_AUTO_ADDR_LIST", "NO")

        async def over_ca(user: str, pv: str, value: Any) -> str:
            ctx = Context(client_name=user, host_name="lab-pc", timeout=10.0)
            try:
                (chan,) = await ctx.get_pvs(pv, timeout=10.0)
                await chan.wait_for_connection(timeout=10.0)
                return (await chan.write([value], wait=True)).status.name
            finally:
                await ctx.disconnect()

        async def over_ua(user: str, pv: str, value: Any) -> str:
            async with await connect(ua_url(server), user=user, password=f"{user}-pw") as s:
                try:
                    await s.put(pv, value)
                    return "ok"
                except client_errors.Refused as e:
                    return e.kind

        def refusals(since: int) -> list[tuple]:
            return [(a.action, a.user, a.target, a.reason) for a in audit[since:] if not a.accepted]

        for user in ("viewer", "operator"):
            n = len(audit)
            ca = await over_ca(user, "BENCH:SP", 2.0)
            ca_refused = refusals(n)
            n = len(audit)
            ua_kind = await over_ua(user, "BENCH:SP", 2.0)
            ua_refused = refusals(n)
            assert (ca == "ECA_NORMAL") is (ua_kind == "ok"), user
            assert ca_refused == ua_refused and len(ca_refused) == (0 if ua_kind == "ok" else 1), user
        # a lock command refused for the role, over CA, is audited once with the action's own name
        n = len(audit)
        assert await over_ca("viewer", "ARB:CRYOSTAT:REQUEST", "60") == "ECA_NOWTACCESS"
        assert [(a.action, a.user, a.accepted) for a in audit[n:]] == [("lock.request", "viewer", False)]
