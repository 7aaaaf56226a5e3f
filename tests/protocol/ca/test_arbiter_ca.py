"""Channel Access users in the arbiter, over the wire: lock commands, rights that follow the lock.

A whole server (control layer and CA service, as in production) runs in the test's
loop. libca (pyepics, in a subprocess) is the CA user whose names the test cannot choose
(:data:`ME` at :data:`HOST`); caproto's client plays the other CA users (alice, bob...),
reporting the names a test picks and sending puts whatever its access rights say, so it
also reaches the server's refusals. Leases are short where a test waits for one to lapse.
"""

from __future__ import annotations

import functools
import logging
import os
import pwd
import socket

import pytest
from asyncua import Client as UaClient
from asyncua import ua
from caproto import AccessRights, ChannelType
from labctl.ioc.arbiter import Arbiter
from labctl.ioc.errors import Forbidden, LockedBy
from labctl.ioc.types import Identity
from labctl.server.ca.access import Client
from labctl.server.ca.arbiter import LockRequest, client_id, command_pv_names, parse_request
from labctl.server.ca.context import CAStartError
from labctl.server.passwords import hash_password

from tests.helpers import wait_for
from tests.protocol.ca.support import (
    PyEpics,
    ServedServer,
    client,
    connect,
    pyepics,
    serve,
    serve_server,
    site_yaml,
)

#: What libca reports: the user of this uid and this machine's host name.
ME = pwd.getpwuid(os.getuid()).pw_name
HOST = socket.gethostname()
ME_CLIENT = f"ca:{ME}@{HOST}"

ECA_NORMAL = 1  # as libca hands statuses to callbacks (code << 3 | severity)
ECA_NOWTACCESS = 376
RW = AccessRights.READ | AccessRights.WRITE

RESOURCES = """
resources:
  - {name: cryostat, max_lease_s: 600}
  - {name: bench, lockable: false}
"""
PVS = """
pvs:
  - {name: CRYO:SETPOINT, type: float64, unit: K, writable: true, drive: [0, 1], initial: 0.1, resource: cryostat}
  - {name: CRYO:TEMP, type: float64, unit: K, initial: 0.01, resource: cryostat}
  - {name: BENCH:VOLTS, type: float64, unit: V, writable: true, initial: 0.0, resource: bench}
"""
#: Operators: libca's user and the caproto clients' names; mallory has no role.
ACCESS = f"""
rules:
  - {{users: ["{ME}", alice, bob, carol, dave], roles: [operator]}}
"""
ADMIN = Identity("root", frozenset({"admin"}), "opcua", "admin-pc")


def site(ports, tmp_path, *, access: str = ACCESS, prefix: str = "", pvs: str = PVS) -> str:
    return site_yaml(*ports, access=access, extra=RESOURCES, pvs=pvs, prefix=prefix, state_dir=str(tmp_path))


def drain(ca: PyEpics) -> list[dict]:
    """The worker's events so far (dropped)."""
    out = []
    while not ca.events.empty():
        out.append(ca.events.get_nowait())
    return out


async def put(ca: PyEpics, pv: str, value, tag: str) -> int:
    """ca_put_callback; the ECA status libca handed the callback."""
    await ca.call("put_callback", pv=pv, value=value, tag=tag)
    done = await ca.event(lambda e: e["event"] == "put_done" and e["tag"] == tag)
    return done["status"]


async def writable(ca: PyEpics, pv: str, expected: bool) -> None:
    """Wait until libca has write access ``expected`` on ``pv`` (re-checked at each access-rights callback)."""
    while (await ca.call("access", pv=pv))["write"] is not expected:
        await ca.event(lambda e: e["event"] == "access" and e["pv"] == pv)


def lock_audit(s: ServedServer) -> list[tuple[str, str, bool]]:
    """(action, user, accepted) of every lock record, in order."""
    return [(a.action, a.user, a.accepted) for a in s.audit if a.action.startswith("lock.")]


def grants(s: ServedServer) -> list[str]:
    """Who was granted the lock, in order."""
    return [a.user for a in s.audit if a.action == "lock.grant" and a.accepted]


# ---- the protocol, pure ----------------------------------------------------------------------


def test_request_text():
    assert parse_request("600") == LockRequest(600.0, 0)
    assert parse_request(" 1.5 , 5 ") == LockRequest(1.5, 5)
    assert parse_request("60,-2") == LockRequest(60.0, -2)
    assert parse_request("60,3.0") == LockRequest(60.0, 3)
    assert str(LockRequest(60.0, 5)) == "60,5"
    for bad, why in [
        ("soon", "expected 'duration[,priority]'"),
        ("60,high", "expected 'duration[,priority]'"),
        ("60,1,2", "expected 'duration[,priority]'"),
        ("0", "positive number of seconds"),
        ("-5", "positive number of seconds"),
        ("nan", "positive number of seconds"),
        ("60,1.5", "integer"),
    ]:
        with pytest.raises(ValueError, match=why.replace("[", r"\[")):
            parse_request(bad)
    assert command_pv_names("cryostat") == {"request": "ARB:CRYOSTAT:REQUEST", "release": "ARB:CRYOSTAT:RELEASE"}
    assert client_id(Identity("alice", host="lab-pc")) == "ca:alice@lab-pc"


# ---- libca: request, write, release; rights follow -------------------------------------------------


async def test_libca_user_requests_writes_and_releases(ports, tmp_path):
    async with serve_server(site(ports, tmp_path)) as s, pyepics(s.port) as ca:
        assert (await ca.call("connect", pv="CRYO:SETPOINT"))["write"] is False  # lockable, not held
        request = await ca.call("connect", pv="ARB:CRYOSTAT:REQUEST")
        assert (request["type"], request["read"], request["write"]) == ("STRING", True, True)
        assert (await ca.call("get", pv="ARB:CRYOSTAT:OWNER"))["value"] == ""

        assert await put(ca, "ARB:CRYOSTAT:REQUEST", "60", "request") == ECA_NORMAL
        # Put completion: granted, the new rights were sent before it, and OWNER shows it.
        assert (await ca.call("access", pv="CRYO:SETPOINT"))["write"] is True
        assert (await ca.call("get", pv="ARB:CRYOSTAT:OWNER"))["value"] == ME
        lease = s.control.arbiter.holder("cryostat")
        assert (lease.user, lease.duration_s, lease.priority) == (ME, 60.0, 0)
        assert lease.client.startswith(ME_CLIENT + "/127.0.0.1:")  # the circuit holds it, not the name
        assert (await ca.call("get", pv="ARB:CRYOSTAT:EXPIRES"))["value"] == lease.expires_at
        assert (await ca.call("get", pv="ARB:CRYOSTAT:REQUEST"))["value"] == "60,0"  # the request, read back

        assert await put(ca, "CRYO:SETPOINT", 0.05, "write") == ECA_NORMAL
        assert s.db.read("CRYO:SETPOINT").value == 0.05
        assert (await ca.call("connect", pv="CRYO:TEMP"))["write"] is False  # read-only PVs stay so

        assert await put(ca, "ARB:CRYOSTAT:RELEASE", "done", "release") == ECA_NORMAL
        assert (await ca.call("access", pv="CRYO:SETPOINT"))["write"] is False
        assert (await ca.call("get", pv="ARB:CRYOSTAT:OWNER"))["value"] == ""
        assert s.control.arbiter.holder("cryostat") is None
        assert lock_audit(s) == [("lock.grant", ME, True), ("lock.release", ME, True)]
        grant = next(a for a in s.audit if a.action == "lock.grant")
        assert (grant.target, grant.host) == ("cryostat", lease.client)  # the lease's client names the CA circuit
        (write,) = [a for a in s.audit if a.action == "write"]
        assert (write.user, write.host, write.protocol, write.new, write.accepted) == (ME, HOST, "ca", 0.05, True)


async def test_rights_flip_on_an_open_channel_when_granted_and_when_the_lease_lapses(ports, tmp_path):
    async with serve_server(site(ports, tmp_path)) as s, pyepics(s.port) as ca:
        assert (await ca.call("connect", pv="CRYO:SETPOINT"))["write"] is False
        drain(ca)
        assert await put(ca, "ARB:CRYOSTAT:REQUEST", "1", "take") == ECA_NORMAL  # a one-second lease
        await writable(ca, "CRYO:SETPOINT", True)
        # Writing REQUEST again renews: same lease, later expiry.
        first = s.control.arbiter.holder("cryostat")
        assert await put(ca, "ARB:CRYOSTAT:REQUEST", "1", "renew") == ECA_NORMAL
        renewed = s.control.arbiter.holder("cryostat")
        assert renewed is not None and renewed.token == first.token and renewed.expires_at >= first.expires_at
        # Not renewed again: the lease lapses and the server takes write access back.
        await writable(ca, "CRYO:SETPOINT", False)
        assert s.control.arbiter.holder("cryostat") is None
        assert s.db.read("ARB:CRYOSTAT:OWNER").value == ""
        assert lock_audit(s) == [("lock.grant", ME, True), ("lock.renew", ME, True), ("lock.expire", ME, True)]
        answer = await ca.request("put_wait", pv="CRYO:SETPOINT", value=0.2)
        assert not answer["ok"] and "Write access denied" in answer["error"]  # libca refuses locally now


# ---- other users: refused while held, told by whom and until when -------------------------------------


async def test_another_users_write_is_refused_while_held_and_names_holder_and_expiry(
    ports, tmp_path, caproto_env, caplog
):
    async with serve_server(site(ports, tmp_path)) as s, pyepics(s.port) as ca:
        assert await put(ca, "ARB:CRYOSTAT:REQUEST", "60", "request") == ECA_NORMAL
        lease = s.control.arbiter.holder("cryostat")
        refusal = str(LockedBy("CRYO:SETPOINT", "cryostat", ME, lease.expires_at, client=lease.client))
        async with client(s.port, caproto_env, user="bob") as ctx:
            setpoint = await connect(ctx, "CRYO:SETPOINT")
            assert setpoint.access_rights == AccessRights.READ  # bob may write the cryostat, but ME holds it
            # Who and until when are public PVs...
            owner, expires = await connect(ctx, "ARB:CRYOSTAT:OWNER"), await connect(ctx, "ARB:CRYOSTAT:EXPIRES")
            assert (await owner.read()).data[0].decode() == ME
            assert (await expires.read()).data[0] == lease.expires_at
            # ...a put-callback gets ECA_NOWTACCESS, and the audit trail has the sentence.
            response = await setpoint.write([0.5], wait=True)
            assert response.status.name == "ECA_NOWTACCESS"
            refused = s.audit[-1]
            assert (refused.action, refused.user, refused.accepted) == ("write", "bob", False)
            assert refused.reason == refusal.split("write refused: ")[1]
            assert f"locked by {ME} until" in refused.reason
            # A plain put is answered with a CA error message carrying the same sentence.
            caplog.set_level(logging.DEBUG, logger="caproto.circ")
            await setpoint.write([0.6], wait=False)
            messages = await wait_for(
                lambda: [m for r in caplog.records for m in r.args or () if type(m).__name__ == "ErrorResponse"],
                what="the error message of the refused plain put",
            )
            assert bytes(messages[0].error_message).rstrip(b"\0").decode() == refusal
            assert messages[0].status.name == "ECA_NOWTACCESS"
            # Bob asking for the lock waits in the queue (his put completes: queued).
            request = await connect(ctx, "ARB:CRYOSTAT:REQUEST")
            assert (await request.write(["60,1"], wait=True)).status.name == "ECA_NORMAL"
            assert s.db.read("ARB:CRYOSTAT:QUEUE").value == 1
            (waiter,) = s.control.arbiter.queue("cryostat")
            assert (waiter.user, waiter.priority) == ("bob", 1) and waiter.client.startswith("ca:bob@lab-pc/127.0.0.1:")
            assert s.db.read("CRYO:SETPOINT").value == 0.1


async def test_libca_is_told_holder_and_expiry_when_a_plain_put_crosses_a_handover(ports):
    """The CA error message of a refused plain put reaches libca's exception handler.

    The bare adapter here (no control layer, so nobody re-sends rights): the real arbiter
    is the write path's lock check, and the lock changes hands behind an open channel's
    back, as it can while a put is on its way.
    """
    async with serve(site_yaml(*ports, access=ACCESS, extra=RESOURCES, pvs=PVS)) as s, pyepics(s.port) as ca:
        arbiter = Arbiter(s.site.resources)
        s.db.locks = arbiter
        rules = s.service.rules
        await ca.call("connect", pv="CRYO:TEMP")  # the circuit, to lock for
        (circuit,) = s.service.context.circuits
        ip, port = circuit.circuit.address
        arbiter.request("cryostat", rules.identity(Client(ME, HOST, ip, port)), s.db.clock(), duration_s=60)
        await ca.call("exceptions")
        assert (await ca.call("connect", pv="CRYO:SETPOINT"))["write"] is True
        arbiter.break_lock("cryostat", ADMIN, s.db.clock())
        bob, _ = arbiter.request("cryostat", rules.identity(Client("bob", "lab-pc")), s.db.clock(), duration_s=60)
        await ca.call("put", pv="CRYO:SETPOINT", value=0.5)
        error = await ca.event(lambda e: e["event"] == "exception")
        assert error["ctx"] == str(LockedBy("CRYO:SETPOINT", "cryostat", "bob", bob.expires_at, client=bob.client))
        assert error["status"] == ECA_NOWTACCESS
        assert s.db.read("CRYO:SETPOINT").value == 0.1
        assert (s.audit[-1].user, s.audit[-1].accepted) == (ME, False)


async def test_requests_refused_and_malformed_are_audited(ports, tmp_path, caproto_env):
    async with serve_server(site(ports, tmp_path)) as s:
        async with client(s.port, caproto_env, user="mallory") as ctx:
            request = await connect(ctx, "ARB:CRYOSTAT:REQUEST")
            assert request.access_rights == AccessRights.READ  # no role that may write the cryostat
            assert (await request.write(["60"], wait=True)).status.name == "ECA_NOWTACCESS"
        async with client(s.port, caproto_env, user="alice") as ctx:
            request = await connect(ctx, "ARB:CRYOSTAT:REQUEST")
            release = await connect(ctx, "ARB:CRYOSTAT:RELEASE")
            assert (request.access_rights, release.access_rights) == (RW, RW)
            for bad in ("soon", "60,high", "-5"):
                assert (await request.write([bad], wait=True)).status.name == "ECA_PUTFAIL"
            assert (await release.write(["x"], wait=True)).status.name == "ECA_PUTFAIL"  # holds nothing
            response = await request.write([1], data_type=ChannelType.PUT_ACKS, wait=True)
            assert response.status.name == "ECA_PUTFAIL"
            # A number is a duration, whatever its wire type.
            assert (await request.write([30.0], data_type=ChannelType.DOUBLE, wait=True)).status.name == "ECA_NORMAL"
            assert s.control.arbiter.holder("cryostat").duration_s == 30.0
        assert s.control.arbiter.holder("cryostat").user == "alice"
        # Each refusal audited once, under the policy's action (lock.request, lock.release), with the value put when it
        # was not a command at all; the release's wrong token is not recorded.
        refused = [(a.action, a.user, a.new) for a in s.audit if not a.accepted]
        assert refused == [
            ("lock.request", "mallory", None),
            ("lock.request", "alice", "soon"),
            ("lock.request", "alice", "60,high"),
            ("lock.request", "alice", "-5"),
            ("lock.release", "alice", None),
            ("lock.request", "alice", None),
        ]  # fmt: skip
        assert {(a.protocol, a.host, a.target) for a in s.audit if not a.accepted} == {("ca", "lab-pc", "cryostat")}


async def test_libca_refuses_a_request_locally_without_the_role(ports, tmp_path):
    """libca honours the rights it was sent: a put to a read-only channel never leaves the client."""
    access = "rules:\n  - {users: [alice], roles: [operator]}"
    async with serve_server(site(ports, tmp_path, access=access)) as s, pyepics(s.port) as ca:
        assert (await ca.call("connect", pv="ARB:CRYOSTAT:REQUEST"))["write"] is False
        answer = await ca.request("put_wait", pv="ARB:CRYOSTAT:REQUEST", value="60")
        assert not answer["ok"] and "Write access denied" in answer["error"]
        assert s.control.arbiter.holder("cryostat") is None


# ---- waiting: lapse, priority then arrival -------------------------------------------------------------


async def test_a_holder_that_disappears_loses_the_lock_to_waiters_by_priority_then_arrival(
    ports, tmp_path, caproto_env
):
    async with (
        serve_server(site(ports, tmp_path)) as s,
        client(s.port, caproto_env, user="bob") as bob,
        client(s.port, caproto_env, user="carol") as carol,
        client(s.port, caproto_env, user="dave") as dave,
    ):
        ca = await PyEpics.start(s.port)
        try:
            assert await put(ca, "ARB:CRYOSTAT:REQUEST", "60", "take") == ECA_NORMAL
            channels = {}
            for name, ctx, request in [(b"bob", bob, "60"), (b"carol", carol, "60,5"), (b"dave", dave, "60,5")]:
                channels[name] = await connect(ctx, "CRYO:SETPOINT")
                req = await connect(ctx, "ARB:CRYOSTAT:REQUEST")
                assert (await req.write([request], wait=True)).status.name == "ECA_NORMAL"
            # Bob came first, but carol and dave asked with priority 5 (and carol before dave).
            assert [w.user for w in s.control.arbiter.queue("cryostat")] == ["carol", "dave", "bob"]
            assert s.db.read("ARB:CRYOSTAT:QUEUE").value == 3
            assert await put(ca, "ARB:CRYOSTAT:REQUEST", "1", "last-renewal") == ECA_NORMAL  # one more second
        finally:
            ca.proc.kill()  # the holder crashes: nobody renews its lease
            await ca.close()
        await wait_for(lambda: s.db.read("ARB:CRYOSTAT:OWNER").value == "carol", timeout=10, what="carol's turn")
        await wait_for(lambda: channels[b"carol"].access_rights == RW, what="carol's write access")
        assert channels[b"dave"].access_rights == AccessRights.READ
        for name, ctx in [(b"carol", carol), (b"dave", dave)]:
            release = await connect(ctx, "ARB:CRYOSTAT:RELEASE")
            assert (await release.write(["1"], wait=True)).status.name == "ECA_NORMAL"
            assert channels[name].access_rights == AccessRights.READ  # its own rights, before completion
        await wait_for(lambda: channels[b"bob"].access_rights == RW, what="bob's write access")
        assert grants(s) == [ME, "carol", "dave", "bob"]
        assert ("lock.expire", ME, True) in lock_audit(s)


# ---- Channel Access against another protocol ---------------------------------------------------------


OLGA_PASSWORD = "olga-pw"


@functools.cache
def olga_hash() -> str:
    return hash_password(OLGA_PASSWORD)


class OpcUaUser:
    """The OPC UA party of the contention test: a plain asyncua client (user olga, an operator).

    It takes part in arbitration as any OPC UA client can: the resource's Lock object
    (``RequestLock``, which queues by priority, and ``ReleaseLease``), and plain Writes
    whose refusals it reads from ``Session/LastWriteRefusal``.
    """

    def __init__(self, client: UaClient, idx: int) -> None:
        self.client = client
        self.idx = idx
        self.token = ""

    @classmethod
    async def connect(cls, url: str) -> OpcUaUser:
        client = UaClient(url, timeout=10)
        client.set_user("olga")
        client.set_password(OLGA_PASSWORD)
        await client.connect()
        return cls(client, await client.get_namespace_index("urn:labctl:catest"))

    async def _call(self, method: str, *args: ua.Variant) -> list:
        base = "/catest/Resources/cryostat/Lock"
        req = ua.CallMethodRequest()
        req.ObjectId = ua.NodeId(base, self.idx)
        req.MethodId = ua.NodeId(f"{base}/{method}", self.idx)
        req.InputArguments = list(args)
        (res,) = await self.client.uaclient.call([req])
        res.StatusCode.check()
        return [v.Value for v in res.OutputArguments]

    async def request(self, duration_s: float, priority: int = 0) -> str:
        """Take or queue for the lock; ``granted`` or ``queued``."""
        status, self.token, _ = await self._call(
            "RequestLock",
            ua.Variant(float(duration_s), ua.VariantType.Double),
            ua.Variant(priority, ua.VariantType.Int32),
            ua.Variant(True, ua.VariantType.Boolean),
        )
        return {0: "granted", 1: "queued"}[status]

    async def release(self) -> None:
        """Give the lock up."""
        await self._call("ReleaseLease", ua.Variant(self.token, ua.VariantType.String))

    async def write(self, pv: str, value: float) -> str:
        """Write a PV; the refusal sentence, or "" when accepted."""
        node = self.client.get_node(ua.NodeId(pv, self.idx))
        try:
            await node.write_value(ua.DataValue(ua.Variant(value, ua.VariantType.Double)))
        except ua.UaStatusCodeError as e:
            assert e.code == ua.StatusCodes.BadLocked
            return await self.client.get_node(ua.NodeId("/catest/Session/LastWriteRefusal", self.idx)).read_value()
        return ""

    async def close(self) -> None:
        await self.client.disconnect()


async def test_ca_and_opcua_users_contend_for_one_resource_and_the_arbiter_serializes_them(ports, tmp_path):
    text = site(ports, tmp_path).replace(
        "opcua: {enabled: false}", "opcua: {host: 127.0.0.1, port: 0, trust: auto}"
    ) + f'users:\n  - {{name: olga, roles: [operator], password_hash: "{olga_hash()}"}}\n'
    async with serve_server(text) as s, pyepics(s.port) as ca:
        ua_user = await OpcUaUser.connect(s.server.service("opcua").url)
        try:
            assert (await ca.call("connect", pv="CRYO:SETPOINT"))["write"] is False
            assert await put(ca, "ARB:CRYOSTAT:REQUEST", "60", "ca-1") == ECA_NORMAL
            assert await ua_user.request(60) == "queued"
            refusal = await ua_user.write("CRYO:SETPOINT", 0.3)
            assert f"locked by {ME} until" in refusal and refusal.startswith("CRYO:SETPOINT: write refused:")
            assert await put(ca, "CRYO:SETPOINT", 0.2, "ca-write-1") == ECA_NORMAL
            drain(ca)

            assert await put(ca, "ARB:CRYOSTAT:RELEASE", "1", "ca-release") == ECA_NORMAL  # olga's turn
            assert (await ca.call("access", pv="CRYO:SETPOINT"))["write"] is False
            assert s.db.read("ARB:CRYOSTAT:OWNER").value == "olga"
            assert s.control.arbiter.holder("cryostat").client.startswith("opcua:session-")
            assert await put(ca, "ARB:CRYOSTAT:REQUEST", "60", "ca-2") == ECA_NORMAL  # queued behind olga
            assert s.db.read("ARB:CRYOSTAT:QUEUE").value == 1
            assert await ua_user.write("CRYO:SETPOINT", 0.3) == ""
            drain(ca)

            await ua_user.release()  # the lease changes hands from another protocol: the CA client is told
            await writable(ca, "CRYO:SETPOINT", True)
            assert await put(ca, "CRYO:SETPOINT", 0.4, "ca-write-2") == ECA_NORMAL
        finally:
            await ua_user.close()
        assert grants(s) == [ME, "olga", ME]
        writes = [(a.user, a.protocol, a.new, a.accepted) for a in s.audit if a.action == "write"]
        assert writes == [("olga", "opcua", 0.3, False), (ME, "ca", 0.2, True), ("olga", "opcua", 0.3, True), (ME, "ca", 0.4, True)]  # fmt: skip


async def test_admin_break_is_audited_and_the_ca_holder_loses_write_access(ports, tmp_path, caproto_env):
    async with serve_server(site(ports, tmp_path)) as s, pyepics(s.port) as ca:
        await ca.call("connect", pv="CRYO:SETPOINT")
        assert await put(ca, "ARB:CRYOSTAT:REQUEST", "60", "request") == ECA_NORMAL
        await writable(ca, "CRYO:SETPOINT", True)
        async with client(s.port, caproto_env, user="bob") as bob:
            request = await connect(bob, "ARB:CRYOSTAT:REQUEST")
            assert (await request.write(["60"], wait=True)).status.name == "ECA_NORMAL"  # bob waits
            bob_setpoint = await connect(bob, "CRYO:SETPOINT")
            with pytest.raises(Forbidden) as denied:  # only admins break locks
                s.control.break_lock("cryostat", s.service.rules.identity(Client("bob", "lab-pc")))
            assert (denied.value.action, denied.value.target) == ("lock.break", "cryostat")
            assert denied.value.fields() == {"user": "bob", "needs": "the admin role"}
            s.control.break_lock("cryostat", ADMIN, "maintenance")
            await writable(ca, "CRYO:SETPOINT", False)
            await wait_for(lambda: bob_setpoint.access_rights == RW, what="bob's write access")
        breaks = [(a.user, a.protocol, a.new, a.accepted, a.reason) for a in s.audit if a.action == "lock.break"]
        assert breaks == [("bob", "ca", None, False, denied.value.reason), ("root", "arbiter", ME, True, "maintenance")]
        assert grants(s) == [ME, "bob"]


# ---- naming --------------------------------------------------------------------------------------------


async def test_command_channels_are_channel_access_only_and_prefixed(ports, tmp_path, caproto_env):
    async with serve_server(site(ports, tmp_path, prefix="LAB:")) as s:
        assert "ARB:CRYOSTAT:REQUEST" not in s.db  # not database PVs: OPC UA has its own methods
        assert not any(name.startswith("ARB:BENCH") for name in s.db.names())  # not lockable
        context = s.service.context
        for name in ("LAB:ARB:CRYOSTAT:REQUEST", "LAB:ARB:CRYOSTAT:RELEASE", "LAB:ARB:CRYOSTAT:OWNER"):
            assert context[name] is not None
        for name in ("LAB:ARB:BENCH:REQUEST", "ARB:CRYOSTAT:REQUEST", "ARB:CRYOSTAT:OWNER"):
            with pytest.raises(KeyError):
                context[name]
        async with client(s.port, caproto_env, user="alice") as ctx:
            bench = await connect(ctx, "LAB:BENCH:VOLTS")
            assert bench.access_rights == RW  # no lock needed on a resource that is not lockable
            request = await connect(ctx, "LAB:ARB:CRYOSTAT:REQUEST")
            assert (await request.write(["60"], wait=True)).status.name == "ECA_NORMAL"
        assert s.control.arbiter.holder("cryostat").client.startswith("ca:alice@lab-pc/")


async def test_a_pv_named_like_a_command_channel_stops_the_start(ports, tmp_path):
    pvs = PVS + "  - {name: ARB:CRYOSTAT:REQUEST, type: string, writable: true, initial: ''}\n"
    with pytest.raises(CAStartError, match="lock command channel"):
        async with serve_server(site(ports, tmp_path, pvs=pvs)):
            pass


# ---- a lock is held by a circuit, not a name; priorities bounded (issue 17, items 5 and 6) -------------


async def test_another_circuit_claiming_the_holders_name_is_refused(ports, tmp_path, caproto_env):
    async with serve_server(site(ports, tmp_path)) as s:
        async with client(s.port, caproto_env, user="alice") as first, client(s.port, caproto_env, user="alice") as second:
            request = await connect(first, "ARB:CRYOSTAT:REQUEST")
            assert (await request.write(["60"], wait=True)).status.name == "ECA_NORMAL"
            holder = s.control.arbiter.holder("cryostat")
            mine, theirs = await connect(first, "CRYO:SETPOINT"), await connect(second, "CRYO:SETPOINT")
            assert (mine.access_rights, theirs.access_rights) == (RW, AccessRights.READ)  # rights per circuit
            assert (await mine.write([0.2], wait=True)).status.name == "ECA_NORMAL"
            assert (await theirs.write([0.3], wait=True)).status.name == "ECA_NOWTACCESS"  # same name, other circuit
            assert s.db.read("CRYO:SETPOINT").value == 0.2
            refused = s.audit[-1]
            assert (refused.action, refused.user, refused.accepted) == ("write", "alice", False)
            assert refused.reason.endswith(f"held by client {holder.client}")
            # The other circuit's RELEASE holds nothing: it cannot give the first one's lease away.
            release = await connect(second, "ARB:CRYOSTAT:RELEASE")
            assert (await release.write(["x"], wait=True)).status.name == "ECA_PUTFAIL"
            assert s.control.arbiter.holder("cryostat").client == holder.client


async def test_a_ca_client_claiming_an_opcua_holders_name_is_refused(ports, tmp_path, caproto_env):
    async with serve_server(site(ports, tmp_path)) as s:
        session = Identity("alice", frozenset({"operator"}), "opcua", "10.0.0.5", client="opcua:session-7@10.0.0.5")
        s.control.request_lock("cryostat", session, duration_s=60)
        assert s.db.may_write("CRYO:SETPOINT", session)
        async with client(s.port, caproto_env, user="alice") as ctx:
            setpoint = await connect(ctx, "CRYO:SETPOINT")
            assert setpoint.access_rights == AccessRights.READ
            assert (await setpoint.write([0.3], wait=True)).status.name == "ECA_NOWTACCESS"
        assert s.db.read("CRYO:SETPOINT").value == 0.1
        assert s.audit[-1].reason.endswith("held by client opcua:session-7@10.0.0.5")


async def test_a_closed_circuits_queued_request_is_withdrawn(ports, tmp_path, caproto_env):
    async with serve_server(site(ports, tmp_path)) as s:
        async with client(s.port, caproto_env, user="alice") as holder:
            assert (await (await connect(holder, "ARB:CRYOSTAT:REQUEST")).write(["60"], wait=True)).status.name == "ECA_NORMAL"
            async with client(s.port, caproto_env, user="bob") as waiter:
                assert (await (await connect(waiter, "ARB:CRYOSTAT:REQUEST")).write(["60,5"], wait=True)).status.name == "ECA_NORMAL"
                assert [w.user for w in s.control.arbiter.queue("cryostat")] == ["bob"]
            await wait_for(lambda: not s.control.arbiter.queue("cryostat"), timeout=10, what="bob's request withdrawn")
            assert s.control.arbiter.holder("cryostat").user == "alice"  # a lease is left to lapse
        assert [a.user for a in s.audit if a.action == "lock.withdraw"] == ["bob"]


@pytest.mark.parametrize("text", ["60,1e308", "60,1001", "60,-1001", "60,nan", "60,inf", "60," + "9" * 30])
async def test_priorities_out_of_range_are_refused_over_ca(ports, tmp_path, caproto_env, caplog, text):
    async with serve_server(site(ports, tmp_path)) as s:
        async with client(s.port, caproto_env, user="alice") as ctx:
            request = await connect(ctx, "ARB:CRYOSTAT:REQUEST")
            assert (await request.write([text], wait=True)).status.name == "ECA_PUTFAIL"
        assert s.control.arbiter.holder("cryostat") is None
        (refused,) = [a for a in s.audit if not a.accepted]
        assert (refused.action, refused.user, refused.new) == ("lock.request", "alice", text)
    assert not [r for r in caplog.records if r.exc_info and r.name.startswith("labctl")]


def test_request_priorities_are_bounded():
    assert parse_request("60,1000") == LockRequest(60.0, 1000)
    assert parse_request("60,-1000") == LockRequest(60.0, -1000)
    for bad in ("60,1e308", "60,1001", "60,-1001", "60,nan", "60,inf"):
        with pytest.raises(ValueError):
            parse_request(bad)
