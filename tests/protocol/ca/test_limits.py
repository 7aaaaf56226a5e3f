"""Per-client limits of the Channel Access server (``server.ca.limits``), attacked over the wire.

Raw clients (caproto's sans-I/O client circuit over a plain socket) send what libca would
not: a header announcing 2 GiB, more channels and monitors than allowed, malformed bytes;
a client that subscribes in a converted type and stops reading. Each test checks the
bound the README promises, never a timing.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import socket
import struct
import weakref
from typing import Any

import caproto as ca
import pytest
from caproto import ChannelType, SubscriptionType
from labctl.ioc.errors import ConfigError
from labctl.server.ca.env import resolve
from labctl.server.site import parse_site

from tests.helpers import wait_for
from tests.protocol.ca.support import client, connect, serve, site_yaml

TIMEOUT_S = 10.0
MASK = SubscriptionType.DBE_VALUE | SubscriptionType.DBE_ALARM


def limits_yaml(**limits: Any) -> str:
    """A ``server.ca.limits`` block for :func:`site_yaml`'s ``extra`` (indented under ``server.ca``)."""
    return "".join(f"      {k}: {v}\n" for k, v in limits.items())


def limited_site(ports: tuple[int, int], **limits: Any) -> str:
    """The test site with ``limits`` under ``server.ca.limits``."""
    text = site_yaml(*ports)
    block = "    limits:\n" + limits_yaml(**limits)
    return text.replace("    access:\n", block + "    access:\n", 1)


class RawClient:
    """A CA client on a plain socket: caproto's sans-I/O circuit encodes, the test decides what is sent."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.circuit = ca.VirtualCircuit(ca.CLIENT, writer.get_extra_info("peername"), 0)
        self.received: list[Any] = []
        self._cid = 0
        self._subid = 0

    @classmethod
    async def open(cls, port: int, *, rcvbuf: int | None = None, user: str = "mallory") -> RawClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        raw = cls(reader, writer)
        raw.send(ca.VersionRequest(0, ca.DEFAULT_PROTOCOL_VERSION), ca.HostNameRequest("attack-pc"),
                 ca.ClientNameRequest(user))  # fmt: skip
        return raw

    def send(self, *commands: Any) -> None:
        self.writer.write(b"".join(bytes(b) for b in self.circuit.send(*commands)))

    async def expect(self, kind: type, n: int = 1) -> list[Any]:
        """Read until ``n`` commands of ``kind`` arrived (returns them)."""

        async def read() -> list[Any]:
            while True:
                got = [c for c in self.received if isinstance(c, kind)]
                if len(got) >= n:
                    return got
                data = await self.reader.read(65536)
                assert data, "the server closed the connection"
                commands, _ = self.circuit.recv(data)
                for command in commands:
                    self.circuit.process_command(command)
                    self.received.append(command)

        return await asyncio.wait_for(read(), TIMEOUT_S)

    async def channel(self, name: str) -> Any:
        """Create a channel and wait for it to connect (or fail)."""
        self._cid += 1
        chan = ca.ClientChannel(name, self.circuit, self._cid)
        self.send(chan.create())
        await asyncio.wait_for(self._until(lambda: chan.states[ca.CLIENT] in (ca.CONNECTED, ca.CLOSED)
                                           or self._failed(chan.cid)), TIMEOUT_S)  # fmt: skip
        return chan

    def _failed(self, cid: int) -> bool:
        return any(isinstance(c, ca.CreateChFailResponse) and c.cid == cid for c in self.received)

    async def _until(self, done: Any) -> None:
        while not done():
            data = await self.reader.read(65536)
            assert data, "the server closed the connection"
            commands, _ = self.circuit.recv(data)
            for command in commands:
                self.circuit.process_command(command)
                self.received.append(command)

    def subscribe(self, chan: Any, data_type: ChannelType) -> int:
        self._subid += 1
        self.send(chan.subscribe(data_type=data_type, data_count=0, subscriptionid=self._subid, mask=MASK))
        return self._subid

    async def closed(self) -> bool:
        """Whether the server closes the connection (reads until EOF; True) within the timeout."""

        async def drain() -> bool:
            while True:
                try:
                    data = await self.reader.read(65536)
                except ConnectionError:
                    return True
                if not data:
                    return True

        return await asyncio.wait_for(drain(), TIMEOUT_S)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


def warnings_of(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "labctl.ca" and text in r.getMessage()]


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or "never retrieved" in r.getMessage()]
    assert not bad, [f"{r.name}: {r.getMessage()}" for r in bad]


# ---- the site file ---------------------------------------------------------------------


def test_limits_come_from_the_site_file_and_bad_ones_are_refused_clearly(ports):
    site = parse_site(limited_site(ports, max_array_bytes=100000, channels_per_client=5, send_queue_bytes=65536))
    limits = site.server.ca.limits
    assert (limits.max_array_bytes, limits.channels_per_client, limits.send_queue_bytes) == (100000, 5, 65536)
    assert limits.subscriptions_per_client == 40_000  # the default
    assert resolve(site.server.ca, {"EPICS_CA_MAX_ARRAY_BYTES": "20000"}).max_array_bytes == 100000  # the site wins
    default = parse_site(site_yaml(*ports)).server.ca
    assert resolve(default, {"EPICS_CA_MAX_ARRAY_BYTES": "20000"}).max_array_bytes == 20000
    assert (
        resolve(default, {"EPICS_CAS_MAX_ARRAY_BYTES": "30000", "EPICS_CA_MAX_ARRAY_BYTES": "20000"}).max_array_bytes
        == 30000
    )
    assert resolve(default, {}).max_array_bytes is None  # the service's default for its PVs

    for key, value, expected in [
        ("channels_per_client", 0, "greater than or equal to 1"),
        ("max_array_bytes", 100, "greater than or equal to 16384"),
        ("send_queue_bytes", "lots", "integer"),
        ("subscriptions", 5, "unknown key"),
    ]:
        with pytest.raises(ConfigError) as err:
            parse_site(limited_site(ports, **{key: value}), "lab.yaml")
        text = str(err.value)
        assert f"server.ca.limits.{key}" in text and "lab.yaml" in text, text
        assert expected.lower() in text.lower(), text


async def test_default_payload_limit_is_an_iocs_plus_the_largest_pv(ports):
    async with serve(site_yaml(*ports)) as s:
        # TEST:LABEL (60 characters, up to 4 UTF-8 bytes each, and the NUL) is the largest value
        assert s.service.context.max_array_bytes == 16384 + 4 * 60 + 1


# ---- payloads ------------------------------------------------------------------------------


def _extended_header(command: int, payload_size: int, data_type: int = 6, data_count: int = 1) -> bytes:
    """A CA message header announcing ``payload_size`` bytes (the extended form, as for large arrays)."""
    return struct.pack(">HHHHII", command, 0xFFFF, data_type, 0, 0, 0) + struct.pack(">II", payload_size, data_count)


async def test_a_client_announcing_2_GiB_is_disconnected_at_the_header(ports, caplog):
    caplog.set_level(logging.DEBUG)
    async with serve(limited_site(ports, max_array_bytes=65536)) as s:
        raw = await RawClient.open(s.service.tcp_port)
        chan = await raw.channel("TEST:SPECTRUM")
        header = _extended_header(4, 2**31, data_type=6, data_count=2**28)  # CA_PROTO_WRITE of 2 GiB
        raw.writer.write(header[:8] + struct.pack(">II", chan.sid, 1) + header[16:])
        raw.writer.write(bytes(1000))  # the start of its data
        assert await raw.closed()
        await raw.close()
        await wait_for(lambda: not s.service.context.circuits, what="the circuit released")
        (line,) = warnings_of(caplog, "announced a 2147483648-byte message")
        assert "the limit is 65536" in line.getMessage() and "127.0.0.1" in line.getMessage()

        # A legitimate client is not affected, and a message within the limit goes through.
        ok = await RawClient.open(s.service.tcp_port, user="alice")
        chan = await ok.channel("TEST:SPECTRUM")
        ok.send(chan.read(data_type=ChannelType.DOUBLE, data_count=0, ioid=1, notify=True))
        (answer,) = await ok.expect(ca.ReadNotifyResponse)
        assert list(answer.data) == [0, 1, 2, 3, 4, 5, 6, 7]
        await ok.close()
    no_tracebacks(caplog)


async def test_an_oversized_header_is_refused_before_its_data_is_read(ports, caplog):
    """The server reads at most one 4 KiB chunk beyond the header, however much the client pushes."""
    async with serve(limited_site(ports, max_array_bytes=16384)) as s:
        raw = await RawClient.open(s.service.tcp_port)
        await raw.channel("TEST:TEMP")
        raw.writer.write(_extended_header(0, 16385))  # one byte over: a header alone, no data yet
        assert await raw.closed()
        await raw.close()
    assert len(warnings_of(caplog, "announced a 16385-byte message")) == 1


# ---- channels and monitors per client ---------------------------------------------------------


async def test_channels_and_monitors_per_client_are_limited_and_logged_once(ports, caplog):
    async with serve(limited_site(ports, channels_per_client=2, subscriptions_per_client=3)) as s:
        raw = await RawClient.open(s.service.tcp_port)
        temp = await raw.channel("TEST:TEMP")
        await raw.channel("TEST:COUNT")
        for name in ("TEST:MODE", "TEST:LABEL", "TEST:RO"):  # over the limit: each fails, one line
            chan = await raw.channel(name)
            assert raw._failed(chan.cid)
        assert len(s.service.context.circuits) == 1
        circuit = next(iter(s.service.context.circuits))
        assert len(circuit.circuit.channels_sid) == 2

        subids = [raw.subscribe(temp, ChannelType.TIME_STRING) for _ in range(5)]
        errors = await raw.expect(ca.ErrorResponse, 2)
        assert {e.status.name for e in errors} == {"ECA_ALLOCMEM"}
        await raw.expect(ca.EventAddResponse, 3)
        assert circuit.subscription_ids == set(subids[:3])
        # Cancelling one frees a place.
        raw.send(temp.unsubscribe(subids[0]))
        await wait_for(lambda: subids[0] not in circuit.subscription_ids, what="the cancel processed")
        raw.subscribe(temp, ChannelType.TIME_DOUBLE)
        await wait_for(lambda: len(circuit.subscription_ids) == 3, what="the new monitor")
        await raw.close()
    assert len(warnings_of(caplog, "channels_per_client")) == 1
    assert len(warnings_of(caplog, "subscriptions_per_client")) == 1
    no_tracebacks(caplog)


# ---- a client that stops reading ----------------------------------------------------------------


async def test_a_stopped_converted_type_monitor_client_holds_a_bounded_queue(ports, caproto_env):
    subscriptions = 200
    async with serve(limited_site(ports, send_queue_bytes=65536)) as s:
        context = s.service.context
        raw = await RawClient.open(s.service.tcp_port, rcvbuf=4096)
        temp = await raw.channel("TEST:TEMP")
        for _ in range(subscriptions):  # DBR_TIME_STRING of a double: caproto's (converting) path
            raw.subscribe(temp, ChannelType.TIME_STRING)
        await raw.expect(ca.EventAddResponse, subscriptions)
        (circuit,) = context.circuits
        channel = s.service.channels["TEST:TEMP"]
        assert {spec.data_type_name for spec in channel._slow} == {"TIME_STRING"} and not channel._direct
        # The client reads no more. Updates keep coming; caproto alone would queue them without bound.
        high = 0
        for n in range(400):
            s.db.post("TEST:TEMP", 20.0 + n % 50)  # beyond the monitor deadband (0.01)
            await wait_for(lambda: not s.service._queue._pending and context.subscription_queue.empty(),
                           what="the update published")  # fmt: skip
            high = max(high, circuit.outbox.waiting)
            assert context.subscription_queue.qsize() == 0
        assert circuit.outbox._latest is not None, "the client never fell behind"
        assert high <= subscriptions  # the latest per monitor, never more
        assert circuit.outbox.dropped > 0
        buffered = circuit.client.writer.transport.get_write_buffer_size()
        assert buffered <= 65536 + subscriptions * 100  # the limit plus one round of updates

        # Another client on the same path is not held up by it.
        async with client(s.port, caproto_env) as ctx:
            pv = await connect(ctx, "TEST:TEMP")
            got: list[bytes] = []
            sub = pv.subscribe(data_type=ChannelType.TIME_STRING)

            async def record(sub: Any, response: Any) -> None:
                got.append(response.data[0])

            sub.add_callback(record)
            await wait_for(lambda: got, what="the current value")
            s.db.post("TEST:TEMP", 123.0)
            await wait_for(lambda: got[-1].startswith(b"123"), what="the new value")
            await sub.clear()
        await raw.close()
        await wait_for(lambda: not context.circuits, what="the stopped client released")


# ---- memory when clients go -------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_circuits_are_freed_without_a_garbage_collection_and_rss_returns(ports, caplog):
    """100 clients connect, monitor on both paths, and leave: nothing is left for a collector to find."""

    async def visit(port: int) -> weakref.ref[Any]:
        raw = await RawClient.open(port)
        temp = await raw.channel("TEST:TEMP")
        spectrum = await raw.channel("TEST:SPECTRUM")
        raw.subscribe(temp, ChannelType.TIME_DOUBLE)
        raw.subscribe(temp, ChannelType.TIME_STRING)
        raw.subscribe(spectrum, ChannelType.TIME_DOUBLE)
        await raw.expect(ca.EventAddResponse, 3)
        (circuit,) = [
            c for c in s.service.context.circuits if c.circuit.address[1] == raw.writer.get_extra_info("sockname")[1]
        ]
        ref = weakref.ref(circuit)
        del circuit
        await raw.close()
        return ref

    async with serve(site_yaml(*ports)) as s:
        context = s.service.context
        await visit(s.service.tcp_port)  # warm-up: first channels built, caches filled
        await wait_for(lambda: not context.circuits, what="the warm-up client gone")
        gc.collect()
        baseline = _rss()
        gc.disable()  # as at idle in the server, where the raised threshold means no collection runs
        try:
            refs = []
            for _ in range(10):
                refs += await asyncio.gather(*(visit(s.service.tcp_port) for _ in range(10)))
                s.db.post("TEST:TEMP", random.Random(len(refs)).uniform(1, 100))
            await wait_for(lambda: not context.circuits, what="every client gone")
            await wait_for(lambda: all(r() is None for r in refs), what="every circuit freed by reference counting")
            assert _rss() < baseline + 64 * 2**20
        finally:
            gc.enable()
    no_tracebacks(caplog)


# ---- malformed traffic -------------------------------------------------------------------------


def _fuzz_cases(rng: random.Random, sid: int, n: int) -> list[bytes]:
    """``n`` malformed or hostile messages: valid ones with fields changed, truncated, or noise."""
    valid = [
        bytes(ca.ReadNotifyRequest(ChannelType.DOUBLE, 1, sid, 1)),
        bytes(ca.EventAddRequest(ChannelType.TIME_STRING, 1, sid, 7, 0, 0, 0, MASK)),
        bytes(ca.WriteNotifyRequest([1.0], ChannelType.DOUBLE, 1, sid, 2)),
        bytes(ca.CreateChanRequest("TEST:TEMP", 9, ca.DEFAULT_PROTOCOL_VERSION)),
        bytes(ca.EventCancelRequest(ChannelType.DOUBLE, sid, 7)),
        bytes(ca.ClearChannelRequest(sid, 1)),
    ]
    cases = []
    for _ in range(n):
        kind = rng.randrange(5)
        msg = bytearray(rng.choice(valid))
        if kind == 0:  # a random header field
            at = rng.randrange(0, 16, 2)
            msg[at : at + 2] = rng.randrange(65536).to_bytes(2, "big")
        elif kind == 1:  # random bytes anywhere
            for _ in range(rng.randint(1, 6)):
                msg[rng.randrange(len(msg))] = rng.randrange(256)
        elif kind == 2:  # an unknown command
            msg[0:2] = rng.choice([27, 29, 99, 0xFFFF]).to_bytes(2, "big")
        elif kind == 3:  # noise
            msg = bytearray(rng.randbytes(rng.randint(1, 200)))
        else:  # a bad sid or data type
            msg[4:6] = rng.choice([0xFFFF, 999, 40]).to_bytes(2, "big")
            msg[8:12] = rng.randrange(2**32).to_bytes(4, "big")
        cases.append(bytes(msg))
    return cases


async def test_malformed_traffic_is_logged_one_line_per_connection_without_tracebacks(ports, caproto_env, caplog):
    caplog.set_level(logging.DEBUG)
    rng = random.Random(17)
    async with serve(site_yaml(*ports)) as s:
        context = s.service.context
        sent = 0
        for _ in range(60):
            raw = await RawClient.open(s.service.tcp_port)
            chan = await raw.channel("TEST:TEMP")
            for case in _fuzz_cases(rng, chan.sid, 5):
                raw.writer.write(case)
                sent += 1
            raw.writer.write(bytes(ca.EchoRequest()))
            try:
                await raw.writer.drain()
            except ConnectionError:
                pass
            await raw.close()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(100):  # searches: noise and mutated search requests
            search = bytearray(bytes(ca.VersionRequest(0, 13)) + bytes(ca.SearchRequest("TEST:TEMP", 5, 13)))
            search[rng.randrange(len(search))] = rng.randrange(256)
            udp.sendto(
                bytes(search) if rng.random() < 0.5 else rng.randbytes(rng.randint(1, 100)), ("127.0.0.1", s.port)
            )
            sent += 1
        udp.close()
        assert sent == 400
        await wait_for(lambda: not context.circuits, timeout=TIMEOUT_S, what="every fuzzing client gone")
        async with client(s.port, caproto_env) as ctx:  # a normal client is still answered
            pv = await connect(ctx, "TEST:TEMP")
            assert (await pv.read()).data[0] == 10.0
        gc.collect()  # a task whose exception nobody retrieved says so when it is collected
    no_tracebacks(caplog)
    lines = [r for r in caplog.records if r.name == "labctl.ca" and r.levelno >= logging.WARNING]
    assert 0 < len(lines) <= 60 + 20  # at most one per bad connection (and the rate limit)
    assert all("Channel Access client" in r.getMessage() for r in lines)


def test_peer_log_writes_one_line_per_connection_and_kind_and_is_rate_limited(caplog):
    from labctl.server.peerlog import PeerLog

    peers = PeerLog(logging.getLogger("labctl.test"), burst=2, period_s=10.0)
    seen: set[Any] = set()
    assert peers.report("malformed", seen, "peer A", "bad header", now=0.0)
    assert not peers.report("malformed", seen, "peer A", "bad header", now=0.1)  # the same connection
    assert peers.report("malformed", set(), "peer B", "bad header", now=0.2)
    assert not peers.report("malformed", set(), "peer C", "bad header", now=0.3)  # over the burst
    assert peers.report("malformed", set(), "peer D", "bad header", now=10.5)  # the next window
    lines = [r.getMessage() for r in caplog.records if r.name == "labctl.test"]
    assert lines == ["peer A: bad header", "peer B: bad header", "peer D: bad header (and 1 similar line(s) held back)"]
