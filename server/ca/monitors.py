"""Monitor updates encoded once and written straight to each client's connection.

Theory of operation. caproto publishes a channel update by putting it on the server's
subscription queue; a task takes it off, builds an ``EventAddResponse`` object per
subscription, puts a weak reference to it on the circuit's queue, and the circuit's task
batches those (holding them up to ``HIGH_LOAD_TIMEOUT`` while more arrive) and runs each
through the protocol state machine to serialise it. That is several task switches and
tens of microseconds of Python per update per client, and the batching adds up to tens
of milliseconds of latency under a steady stream.

labctl sends the monitors of the common case directly: a subscription to a scalar
numeric or enum PV in the PV's own type -- plain, ``STS``, ``TIME``, ``GR`` or ``CTRL`` --
with no server-side channel filter (``.{"dbnd":...}`` and the like). For such a
subscription an :class:`EventEncoder` is made when it is created: caproto renders the
DBR metadata once (units, limits, precision, enum strings never change while a server
runs), and an update only packs status, severity, time stamp and value into a copy of
that template. One payload is encoded per update and data type, whatever the number of
subscribers; each subscriber gets it behind a 16-byte header with its subscription id.
The bytes are verified against caproto's own serialisation in the tests.

Each client circuit has an :class:`Outbox`. Messages are appended to it as updates are
published (never waiting: the database calls the service inline) and written to the
socket in one call when the event loop next runs, so updates posted together leave
together and nothing waits on a timer. The first message of an idle circuit (nothing
pending, nothing in the socket's buffer) is written at once, as Linux's TCP autocorking
sends the first segment of a burst: under a fan-out load a turn of the event loop takes
milliseconds, and a client that watches one PV (a write's read-back) would otherwise wait
for it; what follows in the same turn is batched as before. A client that does not read fast enough fills
its socket's send buffer; past :data:`HIGH_WATER_BYTES` the outbox keeps only the latest
message of each subscription (older values are dropped, the newest always gets through,
as caproto and RSRV do for a slow consumer) and retries every :data:`RETRY_S` until the
buffer has drained below :data:`LOW_WATER_BYTES`, so memory stays bounded by the number
of subscriptions. Before any other response is written on the circuit the outbox is
written first, so an update is never overtaken by the cancel of its subscription.

Everything else -- other data types, arrays, strings, channel filters, record fields --
keeps caproto's encoding (a response object per subscription, with its filters), but its
messages take the same outbox (:meth:`labctl.server.ca.context.LabctlContext._subscription_queue_send`):
caproto's own per-circuit queue waits on the socket and, once full, stalls the server-wide
subscription queue behind it, which then grows without bound while one client does not read.
The high-water mark is the site's ``server.ca.limits.send_queue_bytes``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
from collections.abc import Callable, Collection
from typing import Any

from caproto import ChannelType
from caproto._dbr import native_type

log = logging.getLogger("labctl.ca")

#: Seconds from the UNIX epoch (1970) to the EPICS epoch (1990).
EPICS_EPOCH_OFFSET = 631_152_000
#: ``CA_PROTO_EVENT_ADD`` and the ``ECA_NORMAL`` status of a monitor update.
CA_PROTO_EVENT_ADD = 1
ECA_NORMAL = 1
#: Past this many bytes waiting in a client's socket buffer, only the latest update of
#: each subscription is kept until it drains below :data:`LOW_WATER_BYTES`.
HIGH_WATER_BYTES = 4 * 2**20
LOW_WATER_BYTES = 256 * 2**10
#: How often a client that fell behind is offered its latest updates (seconds).
RETRY_S = 0.02

_HEADER_HEAD = struct.Struct(">HHHH")
_HEADER_TAIL = struct.Struct(">II")
_ALARM = struct.Struct(">hh")
_STAMP = struct.Struct(">II")

#: The value's wire format, by native type (the fast path's types).
_VALUE_FORMAT: dict[ChannelType, struct.Struct] = {
    ChannelType.DOUBLE: struct.Struct(">d"),
    ChannelType.LONG: struct.Struct(">i"),
    ChannelType.ENUM: struct.Struct(">H"),
}
_TIME_TYPES = {ChannelType.TIME_DOUBLE, ChannelType.TIME_LONG, ChannelType.TIME_ENUM}


def epics_stamp(timestamp: float) -> tuple[int, int]:
    """A UNIX time as EPICS (seconds since 1990, nanoseconds)."""
    whole = math.floor(timestamp)
    nsec = round((timestamp - whole) * 1e9)
    if nsec >= 1_000_000_000:
        whole, nsec = whole + 1, nsec - 1_000_000_000
    return max(0, int(whole) - EPICS_EPOCH_OFFSET), nsec


class EventEncoder:
    """Encodes one DBR type of one channel: the payload of a monitor update, from a template."""

    __slots__ = ("data_type", "data_count", "_template", "_value_at", "_value", "_alarm", "_stamp", "_head")

    def __init__(self, data_type: ChannelType, metadata: bytes) -> None:
        native = native_type(data_type)
        self.data_type = data_type
        self.data_count = 1
        self._value = _VALUE_FORMAT[native]
        self._value_at = len(metadata)
        size = len(metadata) + self._value.size
        padded = (size + 7) // 8 * 8
        self._template = bytes(metadata) + bytes(padded - len(metadata))
        self._alarm = data_type != native
        self._stamp = data_type in _TIME_TYPES
        self._head = _HEADER_HEAD.pack(CA_PROTO_EVENT_ADD, padded, int(data_type), 1)

    def payload(self, value: Any, status: int, severity: int, stamp: tuple[int, int]) -> bytes:
        """The DBR bytes of one update."""
        buf = bytearray(self._template)
        if self._alarm:
            _ALARM.pack_into(buf, 0, status, severity)
        if self._stamp:
            _STAMP.pack_into(buf, 4, *stamp)
        self._value.pack_into(buf, self._value_at, value)
        return bytes(buf)

    def header(self, subscriptionid: int) -> bytes:
        """The message header for subscription ``subscriptionid``."""
        return self._head + _HEADER_TAIL.pack(ECA_NORMAL, subscriptionid)


def fast_type(channel_type: ChannelType, max_length: int, data_type: ChannelType, data_count: int) -> bool:
    """Whether a subscription of ``data_type``/``data_count`` to a channel can take the direct path."""
    if max_length != 1 or data_count not in (0, 1) or channel_type not in _VALUE_FORMAT:
        return False
    try:
        return native_type(data_type) == channel_type
    except (KeyError, ValueError):
        return False


class Outbox:
    """Monitor messages waiting to be written to one client (see the module docstring)."""

    def __init__(
        self, transport: asyncio.WriteTransport, describe: Callable[[], str], high_water: int = HIGH_WATER_BYTES
    ) -> None:
        self._transport = transport
        self._describe = describe
        self.high_water = high_water
        """Bytes in the socket buffer past which only the latest message per subscription is kept."""
        self.low_water = min(LOW_WATER_BYTES, high_water // 4)
        """...until the buffer has drained below this."""
        self._pending: list[tuple[int, bytes]] = []
        self._latest: dict[int, bytes] | None = None
        """Latest message per subscription while the client is behind (else None)."""
        self._scheduled = False
        self._loop = asyncio.get_running_loop()
        self.sent = 0
        """Messages written."""
        self.dropped = 0
        """Messages replaced by a newer one of the same subscription before they were written."""
        self._closed = False

    def post(self, subscriptionid: int, message: bytes) -> None:
        """Queue a message (never waits)."""
        if self._closed:
            return
        latest = self._latest
        if latest is None:
            self._pending.append((subscriptionid, message))
        else:
            if latest.pop(subscriptionid, None) is not None:
                self.dropped += 1
            latest[subscriptionid] = message
        if not self._scheduled:
            self._scheduled = True
            if latest is None and len(self._pending) == 1 and not self._transport.is_closing():
                if self._transport.get_write_buffer_size() == 0:
                    self._write_pending()  # an idle circuit: this one leaves now, what follows is batched
            self._loop.call_soon(self._flush)

    def write_now(self, active: Callable[[], Collection[int]]) -> None:
        """Write what is pending before another response; behind, drop cancelled subscriptions'."""
        if self._latest is None:
            self._write_pending()
        elif self._latest:
            keep = active()
            for subid in [s for s in self._latest if s not in keep]:
                del self._latest[subid]

    def close(self) -> None:
        """Drop everything: the client is gone (and so is this outbox's hold on the circuit)."""
        self._closed = True
        self._pending.clear()
        self._latest = None
        self._describe = str

    @property
    def waiting(self) -> int:
        """Messages held here, not yet handed to the socket."""
        return len(self._pending) + len(self._latest or ())

    def _flush(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        if self._transport.is_closing():
            self.close()
            return
        buffered = self._transport.get_write_buffer_size()
        if self._latest is not None:
            if buffered > self.low_water:
                self._retry()
                return
            latest, self._latest = self._latest, None
            log.info(
                "Channel Access client %s caught up (%d older updates were dropped)", self._describe(), self.dropped
            )
            self._write(list(latest.values()))
            return
        if buffered > self.high_water:
            latest = {}
            for subid, message in self._pending:
                if subid in latest:
                    self.dropped += 1
                    del latest[subid]
                latest[subid] = message
            self._pending.clear()
            self._latest = latest
            log.warning(
                "Channel Access client %s is not reading fast enough; sending only the latest update of each monitor",
                self._describe(),
            )
            self._retry()
            return
        self._write_pending()

    def _retry(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_later(RETRY_S, self._flush)

    def _write_pending(self) -> None:
        if self._pending:
            messages = [m for _, m in self._pending]
            self._pending.clear()
            self._write(messages)

    def _write(self, messages: list[bytes]) -> None:
        if messages:
            self._transport.write(b"".join(messages))
            self.sent += len(messages)
