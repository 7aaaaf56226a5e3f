"""Monitor updates sent directly (server.ca.monitors): the same bytes as caproto's, in order, bounded."""

from __future__ import annotations

import asyncio
import socket

import caproto as ca
import pytest
from caproto import ChannelType, SubscriptionType
from labctl.ioc.build import build_database
from labctl.ioc.types import EventMask, Reading, Severity, Status
from labctl.server.ca.channels import ServedChannel, build_channel
from labctl.server.ca.monitors import HIGH_WATER_BYTES, EventEncoder, Outbox, epics_stamp, fast_type
from labctl.server.site import parse_site

from tests.helpers import wait_for
from tests.protocol.ca.support import client, connect, serve, site_yaml

FAMILIES = ("", "STS_", "TIME_", "GR_", "CTRL_")
READINGS = [
    Reading(1.5, 1_700_000_000.123456, Severity.NO_ALARM, Status.NO_ALARM),
    Reading(-250.25, 1_700_000_001.999999, Severity.MAJOR, Status.HIHI),
    Reading(3.0, 1_700_000_002.5, Severity.INVALID, Status.COMM),
]


def channels() -> dict[str, ServedChannel]:
    site = parse_site(site_yaml(0, 0), "test-site.yaml")
    db = build_database(site)
    return {info.name: build_channel(info, db.read(info.name), None, info.name) for info in db.infos()}  # type: ignore[arg-type]


@pytest.mark.parametrize(("pv", "native"), [("TEST:TEMP", "DOUBLE"), ("TEST:COUNT", "LONG"), ("TEST:MODE", "ENUM"),
                                            ("TEST:ENABLED", "ENUM")])  # fmt: skip
async def test_encoded_updates_are_caprotos_bytes(pv, native):
    ch = channels()[pv]
    for family in FAMILIES:
        data_type = ChannelType[family + native]
        assert fast_type(ch.data_type, ch.max_length, data_type, 1)
        metadata, _ = await ch._read(data_type)
        encoder = EventEncoder(data_type, bytes(metadata))
        for reading in READINGS:
            value = reading.value if native == "DOUBLE" else int(abs(reading.value)) % 2
            ch.apply_now(Reading(value, reading.timestamp, reading.severity, reading.status), EventMask.VALUE)
            metadata, values = await ch._read(data_type)
            expected = bytes(ca.EventAddResponse(values, data_type, 1, 1, 77, metadata=metadata))
            value, status, severity, stamp = ch._served
            assert encoder.header(77) + encoder.payload(value, status, severity, stamp) == expected, (family, reading)


def test_only_scalar_native_unfiltered_types_go_direct():
    chans = channels()
    temp, spectrum, label = chans["TEST:TEMP"], chans["TEST:SPECTRUM"], chans["TEST:LABEL"]
    assert fast_type(temp.data_type, temp.max_length, ChannelType.TIME_DOUBLE, 0)
    assert not fast_type(temp.data_type, temp.max_length, ChannelType.TIME_STRING, 1)  # converted
    assert not fast_type(temp.data_type, temp.max_length, ChannelType.TIME_FLOAT, 1)
    assert not fast_type(temp.data_type, temp.max_length, ChannelType.TIME_DOUBLE, 5)
    assert not fast_type(spectrum.data_type, spectrum.max_length, ChannelType.TIME_DOUBLE, 1)  # an array
    assert not fast_type(label.data_type, label.max_length, ChannelType.TIME_STRING, 1)


def test_epics_time_stamps():
    assert epics_stamp(631_152_000.0) == (0, 0)
    assert epics_stamp(1_700_000_000.25) == (1_700_000_000 - 631_152_000, 250_000_000)
    assert epics_stamp(1_700_000_000.9999999999) == (1_700_000_001 - 631_152_000, 0)


async def test_direct_and_caproto_paths_deliver_the_same_updates_in_order(ports, caproto_env):
    async with serve(site_yaml(*ports)) as s, client(s.port, caproto_env) as ctx:
        pv = await connect(ctx, "TEST:TEMP")
        got: dict[str, list[tuple[float, int, float]]] = {}
        subs = []
        kinds = {"native": "native", "time": "time", "control": "control", "time-string": ChannelType.TIME_STRING}
        for key, data_type in kinds.items():
            got[key] = []
            sub = pv.subscribe(data_type=data_type, mask=SubscriptionType.DBE_VALUE | SubscriptionType.DBE_ALARM)

            async def record(sub, response, key=key):
                value = response.data[0]
                value = float(value.decode() if isinstance(value, bytes) else value)
                md = response.metadata
                stamp = md.timestamp if hasattr(md, "stamp") else 0.0
                severity = int(md.severity) if hasattr(md, "severity") else -1
                got[key].append((value, severity, stamp))

            sub.add_callback(record)
            subs.append((sub, record))
        await wait_for(lambda: all(got.values()), what="every subscription's current value")
        channel = s.service.channels["TEST:TEMP"]
        assert {spec.data_type_name for spec in channel._direct} == {"DOUBLE", "TIME_DOUBLE", "CTRL_DOUBLE"}
        assert {spec.data_type_name for spec in channel._slow} == {"TIME_STRING"}
        values = [10.0 + i / 4 for i in range(1, 41)] + [260.0, 11.0]
        for n, value in enumerate(values, start=2):  # caproto's path keeps only the latest of a burst
            s.db.post("TEST:TEMP", value)
            await wait_for(lambda n=n: all(len(g) == n for g in got.values()), what=f"update {value} on every path")
        for key, g in got.items():
            assert [v for v, _, _ in g] == [10.0, *values], key
        last = s.db.read("TEST:TEMP")
        assert got["time"][-1][2] == pytest.approx(last.timestamp, abs=1e-6)
        assert got["time"][-2][1] == Severity.MAJOR == got["control"][-2][1]  # 260 is above HIHI
        for sub, _ in subs:
            await sub.clear()


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    for sock in (a, b):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    return a, b


async def test_a_client_that_does_not_read_gets_the_latest_update_of_each_monitor_and_memory_stays_bounded():
    ours, theirs = _pair()
    _, writer = await asyncio.open_connection(sock=ours)
    outbox = Outbox(writer.transport, lambda: "test client")  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    message = bytes(40)
    posted = 0
    while outbox._latest is None:  # until the socket buffer passes the high-water mark
        for subid in range(1000):
            outbox.post(subid, message)
            posted += 1
        await asyncio.sleep(0)
        assert posted < 50 * HIGH_WATER_BYTES // len(message), "never fell behind"
    for rnd in range(20):  # behind: one message per subscription is kept, the newest
        for subid in range(1000):
            outbox.post(subid, subid.to_bytes(4, "big") + rnd.to_bytes(4, "big") + bytes(32))
            posted += 1
    assert len(outbox._latest) == 1000 and not outbox._pending
    assert outbox.dropped >= 19 * 1000  # nothing lost uncounted: sent + dropped == posted, below
    assert writer.transport.get_write_buffer_size() < HIGH_WATER_BYTES + 1000 * len(message)

    received = bytearray()
    theirs.setblocking(False)

    def drain() -> None:
        while True:
            try:
                chunk = theirs.recv(1 << 20)
            except BlockingIOError:
                return
            received.extend(chunk)

    loop.add_reader(theirs.fileno(), drain)
    try:
        await wait_for(lambda: outbox._latest is None and outbox.sent == posted - outbox.dropped,
                       what="the latest updates once the client reads again")  # fmt: skip
        await wait_for(lambda: len(received) == 40 * outbox.sent, what="every byte written")
    finally:
        loop.remove_reader(theirs.fileno())
    tail = received[-40 * 1000 :]
    latest = {
        int.from_bytes(tail[i : i + 4], "big"): int.from_bytes(tail[i + 4 : i + 8], "big")
        for i in range(0, len(tail), 40)
    }
    assert latest == {subid: 19 for subid in range(1000)}
    writer.close()
    theirs.close()


async def test_behind_a_cancelled_subscription_gets_nothing_more():
    ours, theirs = _pair()
    _, writer = await asyncio.open_connection(sock=ours)
    outbox = Outbox(writer.transport, lambda: "test client")  # type: ignore[arg-type]
    outbox._latest = {1: b"one", 2: b"two"}
    outbox.write_now(lambda: {2})
    assert outbox._latest == {2: b"two"}
    writer.close()
    theirs.close()


async def test_client_connections_send_small_messages_at_once(ports, caproto_env):
    """TCP_NODELAY on every circuit: a monitor update never waits for the client's delayed ACK."""
    async with serve(site_yaml(*ports)) as s, client(s.port, caproto_env) as ctx:
        await connect(ctx, "TEST:TEMP")
        circuits = list(s.service.context.circuits)
        assert circuits
        for circuit in circuits:
            sock = circuit.client.writer.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
