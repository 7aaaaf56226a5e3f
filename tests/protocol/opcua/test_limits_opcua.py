"""Per-client limits of the OPC UA server (``server.opcua.limits``) and malformed traffic, over the wire."""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import struct
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua
from asyncua.ua.ua_binary import struct_to_binary
from labctl.ioc.errors import ConfigError
from labctl.server.app import Server
from labctl.server.site import parse_site

from tests.protocol.opcua.conftest import open_client, pv_node, site_text

LIMITS = "{sessions: 2, subscriptions_per_session: 2, monitored_items_per_session: 3}"


def limited_site(tmp_path: Path, limits: str = LIMITS) -> str:
    text = site_text(tmp_path / "state")
    return text.replace("trust: auto}", f"trust: auto, limits: {limits}}}", 1)


class Handler:
    def datachange_notification(self, node: Any, value: Any, data: Any) -> None:
        pass


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    """No server-side traceback (the fuzzing client's own complaints about replies it never asked for aside)."""
    bad = [
        r
        for r in caplog.records
        if (r.exc_info and not r.name.startswith("asyncua.client")) or "never retrieved" in r.getMessage()
    ]
    assert not bad, [f"{r.name}: {r.getMessage()}" for r in bad]


def test_a_bad_opcua_limit_is_refused_clearly(tmp_path):
    site = parse_site(limited_site(tmp_path), "lab.yaml")
    assert site.server.opcua.limits.sessions == 2 and site.server.opcua.limits.queue_size == 1000
    with pytest.raises(ConfigError) as err:
        parse_site(limited_site(tmp_path, "{sessions: 0}"), "lab.yaml")
    assert "server.opcua.limits.sessions" in str(err.value) and "greater than or equal to 1" in str(err.value)


async def test_sessions_subscriptions_and_monitored_items_are_limited_and_logged_once(tmp_path, caplog):
    server = Server(parse_site(limited_site(tmp_path), "lab.yaml"))
    await server.start()
    clients = []
    try:
        url = server.service("opcua").url  # type: ignore[attr-defined]
        clients = [await open_client(url), await open_client(url)]
        with pytest.raises(Exception) as err:  # noqa: PT011 -- asyncua raises its own or a ConnectionError
            clients.append(await open_client(url))
        assert "BadTooManySessions" in repr(err.value) or "TooManySessions" in str(err.value)

        client = clients[0]
        subs = [await client.create_subscription(100, Handler()) for _ in range(2)]
        with pytest.raises(ua.UaStatusCodeError) as err:
            await client.create_subscription(100, Handler())
        assert err.value.code == ua.StatusCodes.BadTooManySubscriptions

        nodes = [await pv_node(client, name) for name in ("LAB:TEMP", "LAB:COUNT", "LAB:VALVE", "LAB:MODE", "LAB:FLOW")]
        results = await subs[0].subscribe_data_change(nodes[:2])
        assert all(isinstance(r, int) for r in results)
        results = await subs[1].subscribe_data_change(nodes[2:])  # 2 held: one more fits, two do not
        assert isinstance(results[0], int)
        assert [r.value for r in results[1:]] == [ua.StatusCodes.BadTooManyMonitoredItems] * 2
        with pytest.raises(ua.UaStatusCodeError):
            await subs[1].subscribe_data_change(nodes[4])
        # The other session has its own allowance.
        other = await clients[1].create_subscription(100, Handler())
        assert all(isinstance(r, int) for r in await other.subscribe_data_change(nodes[:3]))
    finally:
        for c in clients:
            await c.disconnect()
        await server.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == "labctl.opcua"]
    assert sum("subscriptions_per_session" in m for m in lines) == 1
    assert sum("monitored_items_per_session" in m for m in lines) == 1
    assert sum("limits.sessions" in m for m in lines) == 1
    no_tracebacks(caplog)


def _mutate(rng: random.Random, data: bytes) -> bytes:
    msg = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        msg[rng.randrange(len(msg))] = rng.randrange(256)
    if rng.random() < 0.2:
        msg = msg[: rng.randrange(1, len(msg))]
    return bytes(msg)


def _hello(url: str) -> bytes:
    hello = ua.Hello()
    hello.EndpointUrl = url
    body = struct_to_binary(hello)
    return b"HELF" + struct.pack("<I", 8 + len(body)) + body


async def test_malformed_opcua_traffic_is_one_line_per_connection_and_no_traceback(service, caplog):
    caplog.set_level(logging.DEBUG)
    rng = random.Random(8)
    host, port = "127.0.0.1", service.port
    sent = 0
    # 1. Framing and channel layer: 150 connections, 2 messages each.
    for _ in range(150):
        reader, writer = await asyncio.open_connection(host, port)
        for _ in range(2):
            kind = rng.randrange(4)
            if kind == 0:
                data = rng.randbytes(rng.randint(1, 64))
            elif kind == 1:
                data = _mutate(rng, _hello(service.url))
            elif kind == 2:
                body = rng.randbytes(rng.randint(0, 80))
                data = (
                    rng.choice([b"OPNF", b"MSGF", b"CLOF", b"ERRF", b"ACKF"]) + struct.pack("<I", 8 + len(body)) + body
                )
            else:
                data = _hello(service.url) + _mutate(rng, b"OPNF" + struct.pack("<I", 40) + bytes(32))
            writer.write(data)
            sent += 1
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass
    # 2. Requests that do not decode, on an open secure channel and session: 150 messages.
    client = await open_client(service.url)
    try:
        proto = client.uaclient.protocol
        read = ua.ReadRequest()
        read.Parameters.NodesToRead = [ua.ReadValueId()]
        for _ in range(150):
            proto._setup_request_header(read.RequestHeader, 1)
            binary = struct_to_binary(read)
            keep = 4 + 30  # the type id and most of the request header stay valid
            body = binary[:keep] + _mutate(rng, binary[keep:] + rng.randbytes(8))
            proto._request_id += 1
            proto.transport.write(
                proto._connection.message_to_binary(
                    body, message_type=ua.MessageType.SecureMessage, request_id=proto._request_id
                )
            )
            sent += 1
    finally:
        try:
            await client.disconnect()
        except Exception:  # noqa: BLE001 -- the fuzzed session may be gone: not what is tested
            pass
    assert sent == 450
    # A normal client is answered afterwards.
    client = await open_client(service.url)
    try:
        assert await (await pv_node(client, "LAB:TEMP")).read_value() == pytest.approx(4.2)
    finally:
        await client.disconnect()
    gc.collect()  # a task whose exception nobody retrieved says so when it is collected
    no_tracebacks(caplog)
    lines = [r for r in caplog.records if r.name == "labctl.opcua"]
    assert 0 < len(lines) <= 151 + 20  # at most one per bad connection (plus one rate-limit note)
