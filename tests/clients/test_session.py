"""The async client session against a real server."""

from __future__ import annotations

import asyncio

import pytest
from labctl.clients.errors import ConnectError, ConnectionLost, NoSuchPV, PutRefused
from labctl.clients.monitor import Monitor
from labctl.clients.session import connect
from labctl.ioc.types import PVType, Severity, Status

from tests.helpers import wait_for

from .conftest import PASSWORDS


@pytest.fixture
async def operator(url):
    async with await connect(url, "operator", PASSWORDS["operator"]) as s:
        yield s


@pytest.mark.parametrize("security", ["None", "Sign", "SignAndEncrypt", "auto"])
async def test_connect_with_each_security(url, security):
    async with await connect(url, "operator", PASSWORDS["operator"], security) as s:
        assert (s.site, s.user, s.roles) == ("bench", "operator", ("operator",))
        mode = s.client.security_policy.Mode.name
        assert mode == {"None": "None_", "auto": "SignAndEncrypt"}.get(security, security)


async def test_anonymous_session(url):
    async with await connect(url) as s:
        assert (s.user, s.roles) == ("anonymous", ())
        assert not (await s.info("B:TEMP")).user_writable


async def test_list_pvs_with_metadata(operator):
    assert {m.name for m in await operator.list_pvs()} >= {"B:TEMP", "B:PRES"}
    metas = {m.name: m for m in await operator.list_pvs("B:*")}
    assert set(metas) == {"B:TEMP", "B:COUNT", "B:ON", "B:MODE", "B:NOTE", "B:WAVE", "B:PRES", "B:NEW"}
    temp = metas["B:TEMP"]
    assert (temp.type, temp.unit, temp.unit_description, temp.display, temp.description) == (PVType.FLOAT64, "K", "kelvin", (0.0, 300.0), "bench temperature")
    assert (temp.writable, temp.user_writable, temp.path) == (True, True, "bench/soft/B:TEMP")
    assert {n: m.type for n, m in metas.items()} == {
        "B:TEMP": PVType.FLOAT64, "B:COUNT": PVType.INT, "B:ON": PVType.BOOL, "B:MODE": PVType.ENUM,
        "B:NOTE": PVType.STRING, "B:WAVE": PVType.FLOAT64_ARRAY, "B:PRES": PVType.FLOAT64, "B:NEW": PVType.FLOAT64,
    }
    assert metas["B:MODE"].states == ("OFF", "LOW", "HIGH")
    assert (metas["B:PRES"].writable, metas["B:PRES"].user_writable) == (False, False)
    assert [m.name for m in await operator.list_pvs("B:T*")] == ["B:TEMP"]
    assert await operator.list_pvs("NOPE:*") == []


async def test_get_every_type(operator):
    expected = {"B:TEMP": 4.2, "B:COUNT": 7, "B:ON": False, "B:MODE": 0, "B:NOTE": "hello", "B:WAVE": (1.0, 2.0)}
    values = await operator.get_many(list(expected))
    for v in values:
        assert v.value == expected[v.name] and type(v.value) is type(expected[v.name]), v
        assert (v.reading.severity, v.reading.status) == (Severity.NO_ALARM, Status.NO_ALARM)
    assert (await operator.get("B:MODE")).display_value == "OFF"
    assert (await operator.get("B:TEMP")).reading.timestamp > 0


async def test_get_reports_alarms_and_invalid_readings(server, operator):
    server.db.post("B:TEMP", 150.0)
    r = (await operator.get("B:TEMP")).reading
    assert (r.value, r.severity, r.status) == (150.0, Severity.MINOR, Status.HIGH)
    server.db.post("B:TEMP", 250.0)
    r = (await operator.get("B:TEMP")).reading
    assert (r.value, r.severity, r.status) == (250.0, Severity.MAJOR, Status.HIHI)
    server.db.invalidate(["B:TEMP"], Status.COMM)
    r = (await operator.get("B:TEMP")).reading
    assert (r.value, r.severity, r.status) == (None, Severity.INVALID, Status.COMM)
    r = (await operator.get("B:NEW")).reading
    assert (r.value, r.severity, r.status) == (None, Severity.INVALID, Status.UDF)


async def test_put_every_type(server, operator):
    for name, value, stored in (
        ("B:TEMP", 12, 12.0),
        ("B:COUNT", 42, 42),
        ("B:ON", True, True),
        ("B:MODE", "HIGH", 2),
        ("B:MODE", 1, 1),
        ("B:NOTE", "bye", "bye"),
        ("B:WAVE", (3.0, 4.0, 5.0), (3.0, 4.0, 5.0)),
    ):
        await operator.put(name, value)
        assert server.db.read(name).value == stored, name


async def test_put_accepts_numpy_values(server, operator):
    np = pytest.importorskip("numpy")  # a pinned dependency; never skipped in CI
    await operator.put("B:TEMP", np.float64(7.5))
    await operator.put("B:WAVE", np.array([1.0, 2.5]))
    assert (server.db.read("B:TEMP").value, server.db.read("B:WAVE").value) == (7.5, (1.0, 2.5))


@pytest.mark.parametrize(
    ("user", "name", "value", "status", "words"),
    [
        ("operator", "B:TEMP", 400.0, "BadOutOfRange", "400.0 is outside the drive limits [0.0, 350.0]"),
        ("operator", "B:TEMP", "warm", "BadTypeMismatch", "expected a number"),
        ("operator", "B:MODE", "MAX", "BadTypeMismatch", "'MAX' is not one of the states"),
        ("operator", "B:PRES", 1.0, "BadNotWritable", "the PV is read-only"),
        ("viewer", "B:TEMP", 1.0, "BadUserAccessDenied", "user 'viewer' may not write resource 'soft'"),
    ],
)
async def test_put_refused_carries_status_and_reason(url, user, name, value, status, words):
    async with await connect(url, user, PASSWORDS[user]) as s:
        with pytest.raises(PutRefused) as e:
            await s.put(name, value)
    assert (e.value.pv, e.value.status) == (name, status)
    assert words in e.value.reason
    assert str(e.value) == f"{name}: write refused ({status}): {e.value.reason}"


async def test_unknown_pvs(operator):
    with pytest.raises(NoSuchPV, match="no PV named 'B:NOPE'"):
        await operator.get("B:NOPE")
    with pytest.raises(NoSuchPV):
        await operator.put("B:NOPE", 1)
    with pytest.raises(NoSuchPV):
        await operator.monitor(["B:TEMP", "B:NOPE"]).start()


async def test_monitor_yields_current_values_then_every_change(server, operator):
    async with operator.monitor(["B:TEMP", "B:COUNT"]) as mon:
        first = {(await mon.next(5)).name, (await mon.next(5)).name}
        assert first == {"B:TEMP", "B:COUNT"}
        for i in range(12):
            server.db.post("B:TEMP", 10.0 + i)
        server.db.post("B:COUNT", 99)
        got = [await mon.next(5) for _ in range(13)]
    temps = [s.reading.value for s in got if s.name == "B:TEMP"]
    assert temps == [10.0 + i for i in range(12)]
    assert [s.reading.value for s in got if s.name == "B:COUNT"] == [99]


async def test_monitor_as_async_iterator_and_invalid_samples(server, operator):
    mon = operator.monitor(["B:TEMP"])
    seen = []
    async for sample in mon:
        seen.append(sample.reading)
        if len(seen) == 1:
            server.db.invalidate(["B:TEMP"], Status.COMM)
        if len(seen) == 2:
            break
    await mon.close()
    assert (seen[1].value, seen[1].severity, seen[1].status) == (None, Severity.INVALID, Status.COMM)


async def test_monitor_queue_is_bounded(server, operator):
    mon: Monitor = operator.monitor(["B:COUNT"], queue_size=5)
    async with mon:
        await mon.next(5)  # the current value
        for i in range(20):
            server.db.post("B:COUNT", 100 + i)
        # wait until the newest change has arrived in the client's buffer, then drain it
        await wait_for(lambda: mon._sub._event_queue.qsize() == 5 and any(
            getattr(e, "value", None) == 119 for e in mon._sub._event_queue._queue), what="the newest change")
        got = [(await mon.next(5)).reading.value for _ in range(5)]
    assert got == [115, 116, 117, 118, 119], "the oldest are dropped, the newest kept"


async def test_session_close_ends_its_monitors(operator):
    mon = operator.monitor(["B:TEMP"])
    await mon.start()
    await operator.close()
    with pytest.raises(StopAsyncIteration):
        await mon.__anext__()


async def test_login_refused(url):
    with pytest.raises(ConnectError, match="login refused for user 'operator'"):
        await connect(url, "operator", "wrong")


async def test_unreachable_server():
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(ConnectError, match="cannot connect"):
        await connect(f"opc.tcp://127.0.0.1:{port}", security="None", timeout_s=2)


async def test_silent_server_times_out():
    """A peer that accepts and never answers: the connection attempt ends with a clear error."""
    writers = []

    def hold(reader, writer):
        writers.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ConnectError, match="no answer within"):
            await connect(f"opc.tcp://127.0.0.1:{port}", security="None", timeout_s=0.3)
    finally:
        for w in writers:
            w.close()
        server.close()
        await server.wait_closed()


async def test_security_not_offered(tmp_path):
    from labctl.server.app import Server
    from labctl.server.site import parse_site

    from .conftest import site_text

    text = site_text(tmp_path / "state").replace("opcua: {host: 127.0.0.1, port: 0, trust: auto}", 'opcua: {host: 127.0.0.1, port: 0, trust: auto, security: ["None"]}')
    srv = Server(parse_site(text))
    await srv.start()
    try:
        with pytest.raises(ConnectError, match="does not offer Basic256Sha256 SignAndEncrypt"):
            await connect(srv.service("opcua").url, security="SignAndEncrypt")
        async with await connect(srv.service("opcua").url) as s:  # auto falls back to None
            assert s.client.security_policy.Mode.name == "None_"
    finally:
        await srv.stop()


async def test_monitor_ends_with_connection_lost_when_the_server_stops(tmp_path):
    from labctl.server.app import Server
    from labctl.server.site import parse_site

    from .conftest import site_text

    srv = Server(parse_site(site_text(tmp_path / "state")))
    await srv.start()
    try:
        session = await connect(srv.service("opcua").url, timeout_s=5)
        mon = session.monitor(["B:COUNT"])
        assert (await mon.next(5)).reading.value == 7
    finally:
        await srv.stop()
    with pytest.raises(ConnectionLost, match="subscription ended"):
        await mon.next(10)
    with pytest.raises(ConnectionLost):
        await session.get("B:COUNT")
    await session.close()


def test_the_client_certificate_is_kept_so_a_server_trusts_it_once(tmp_path, monkeypatch):
    """Every command of a user presents the same application certificate (a trust list trusts it once)."""
    import stat

    from labctl.clients import connection

    monkeypatch.setenv("LABCTL_CLIENT_PKI", str(tmp_path / "pki"))
    connection.application_certificate.cache_clear()
    try:
        first = connection.application_certificate()
        connection.application_certificate.cache_clear()  # a new process
        assert connection.application_certificate() == first
        key = tmp_path / "pki" / "client_key.der"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.read_bytes() == first[1]
        (tmp_path / "pki" / "client_cert.der").write_bytes(b"garbage")  # unreadable: made anew, kept again
        connection.application_certificate.cache_clear()
        second = connection.application_certificate()
        assert second != first and (tmp_path / "pki" / "client_cert.der").read_bytes() == second[0]
    finally:
        connection.application_certificate.cache_clear()
