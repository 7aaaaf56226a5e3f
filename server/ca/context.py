"""caproto's asyncio server, started, stopped and answering puts the labctl way.

Theory of operation. caproto's ``Context.run()`` binds its sockets from the environment
(``EPICS_CA_SERVER_PORT``, not ``EPICS_CAS_SERVER_PORT``), runs until cancelled, and
leaves client connections and listening servers open when it is. :class:`LabctlContext`
keeps caproto's protocol machinery (search replies, circuits, subscriptions) but owns the
life cycle: :meth:`LabctlContext.start` binds the addresses of a
:class:`~labctl.server.ca.env.CASettings` and returns once the server answers, and
:meth:`LabctlContext.stop` closes listeners and client connections and awaits every task
it started, so nothing outlives the service.

The server port is used as in an IOC: UDP name searches on it, and TCP on it when free;
if another server on the host holds the TCP port, a free one is taken and announced in
search replies (EPICS does the same). Port 0 picks a port free for both.

Puts. :class:`LabctlCircuit` handles ``WRITE`` and ``WRITE_NOTIFY`` itself: it awaits the
channel's ``auth_write`` (the core write path) in a task, and answers a put-callback
with the outcome. A refusal is mapped through :data:`PUT_STATUS` to an ECA code --
ECA_NOWTACCESS when the client may not write (role, lock, read-only), ECA_PUTFAIL when
the value or the instrument failed -- and sent as the WRITE_NOTIFY status, which libca
passes to the put callback, or for a plain put as a CA error message carrying the
refusal's sentence. Refusals are expected: the core has audited and logged them, so
they get no traceback here; anything else is a bug, logged once with its traceback and
answered ECA_INTERNAL.

Gets. :class:`LabctlCircuit` answers ``READ_NOTIFY`` (and the old ``READ``) itself, as an
IOC answers them: a request for ``n`` elements gets ``n`` (an array holding fewer, its
NORD, is padded with zeros; :func:`padded`), a request for 0 gets the elements held, and
a value that cannot be converted to the requested type is answered ECA_GETFAIL with a
zeroed value (:func:`failed_read`; a monitor update the same way, :func:`failed_event`),
which libca reports to that request alone. A long string's ``NAME.VAL$`` read as another
type than DBR_CHAR gives its bytes as that type, as an lsi record's.

A write the instrument took but whose read-back failed
(:class:`~labctl.ioc.errors.WrittenUnconfirmed`) was neither refused nor failed, so it is
not ECA_PUTFAIL (which tells the client the write did not happen, and invites a second
one). It is answered **ECA_IOINPROGRESS** ("IO operations are in progress"): a status of
INFO severity with the success bit set, so libca and pyepics report no failure, yet it is
not ECA_NORMAL, so a client that checks the put-callback's status (``args.status`` in libca)
learns the value was sent but its completion is not confirmed. A plain put (no
callback) gets it as a CA error message carrying the sentence ("written, not confirmed:
the read-back failed: ..."), which libca hands to the client's exception handler. The
PV itself reads INVALID (READ or TIMEOUT) until the instrument is read again, which is
what an EPICS record whose device support failed would show.

Access rights. Channel Access sends a channel's rights when it is created. Rights here
depend on locks that change hands, so :meth:`LabctlContext.refresh_access_rights`
re-evaluates open channels and sends CA_PROTO_ACCESS_RIGHTS for those whose rights
changed (the protocol allows it at any time; libca updates its channel and calls the
client's access-rights handler). Each circuit sends its refreshes in one task of its
own (:meth:`LabctlCircuit.schedule_rights_refresh`), so a client that stops reading its
connection delays no other client's new rights. A lock is held by a circuit, not a user
name, so rights are evaluated per circuit (:meth:`LabctlCircuit.access_of`, also for the
rights a new channel is created with).

Name searches over TCP. A client whose ``EPICS_CA_NAME_SERVERS`` names this server
searches on a circuit (:meth:`LabctlCircuit._search`): a name served here is answered as
over UDP, and in a site a name another server owns is answered with that server's
address (:mod:`labctl.server.ca.names`). libca repeats its UDP search frames on such a
circuit, each headed by a VERSION message whose priority field is a sequence flag;
VERSION messages after the first are ignored (caproto would take them for a change of
the circuit's priority and close the connection).

Hosts. A client's reported host name goes to the access rules unless
``check_client_ip`` is set: then the circuit's peer address stands in for it.

Limits (``server.ca.limits``, :class:`~labctl.server.ca.config.CALimits`). Everything a client
can make the server hold is bounded:

* a message whose header announces a payload above ``max_array_bytes`` closes the
  connection as soon as the header is in (caproto would buffer all of it first), so at
  most one read (4 KiB) of its data is ever held;
* requests received but not yet processed: the circuit's queue holds
  ``requests_per_client``; past that the server stops reading the connection;
* monitor updates waiting for a client, on every path (:mod:`labctl.server.ca.monitors`):
  caproto's monitors, which it would queue per circuit behind a socket that does not drain
  (and then stall the server-wide queue behind that one), are encoded by caproto but
  posted to the same :class:`~labctl.server.ca.monitors.Outbox` as direct ones, which keeps
  only the latest per subscription beyond ``send_queue_bytes``;
* channels and subscriptions per client (further ones fail: CreateChFail, ECA_ALLOCMEM),
  and client connections (further ones are closed as they connect).

Exceeding a limit is logged once per client. Memory is given back when a client goes:
a closed circuit is part of reference cycles (caproto's circuit, its tasks, its
subscriptions and outbox all point back at it) that only a full collection would free,
and the server raises the collector's threshold so that one rarely runs;
:meth:`LabctlCircuit.release` clears what the circuit holds instead.

Malformed traffic. What a client sends that caproto cannot parse or that breaks the
protocol's state machine is logged as one WARNING line per connection (peer and reason,
rate-limited server-wide by :class:`~labctl.server.peerlog.PeerLog`), without a traceback, and
the connection is closed; caproto's own logging of it (a traceback per message) is
replaced, and no task of a circuit ends with an exception nobody retrieves.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import struct
import time
from collections import ChainMap
from collections.abc import Collection
from typing import Any, NoReturn

import caproto as ca
import numpy as np
from caproto import CAStatus, ChannelType, apply_arr_filter, backend
from caproto._commands import bytes_needed_for_command
from caproto._dbr import DBR_TYPES, DbrStringArray, _LongStringChannelType, native_type, native_types
from caproto._utils import apply_deadband_filter
from caproto.asyncio.server import Context, VirtualCircuit
from caproto.asyncio.utils import (
    _create_udp_socket,
    _DatagramProtocol,
    _TransportWrapper,
    _UdpTransportWrapper,
)
from caproto.server.common import WRITE_LOCK_TIMEOUT, DisconnectedCircuit, LoopExit, host_endian
from labctl.ioc.errors import DriverError, Forbidden, LabctlError, LockedBy, Refused, UnknownPV, WrittenUnconfirmed
from labctl.server.ca.channels import NOT_CONVERTED, STRING_BYTES
from labctl.server.ca.config import CALimits
from labctl.server.ca.convert import NoConversion
from labctl.server.ca.env import MIN_ARRAY_BYTES, CASettings
from labctl.server.ca.monitors import Outbox
from labctl.server.ca.names import NameService
from labctl.server.peerlog import PeerLog

log = logging.getLogger("labctl.ca")

#: How refused or failed puts are reported (the first class in the error's MRO wins).
PUT_STATUS: dict[type[Exception], CAStatus] = {
    Forbidden: CAStatus.ECA_NOWTACCESS,  # PermissionDenied, NotWritable, and lock/job commands refused by role
    LockedBy: CAStatus.ECA_NOWTACCESS,
    UnknownPV: CAStatus.ECA_PUTFAIL,
    Refused: CAStatus.ECA_PUTFAIL,  # WrongType, OutOfRange, Interlocked, a lock command the arbiter refused...
    WrittenUnconfirmed: CAStatus.ECA_IOINPROGRESS,  # sent, read-back failed: not a failure (module docstring)
    DriverError: CAStatus.ECA_PUTFAIL,  # DriverFault, DriverTimeout, DriverFailed
}

#: Beacons start this often and back off (doubling) to the configured period (CA spec).
MIN_BEACON_PERIOD_S = 0.02
#: Bytes read from a client's connection at a time (as caproto does).
RECV_BYTES = 4096
#: What caproto raises on bytes it cannot take as a CA request (beyond its own protocol errors).
_MALFORMED = (ca.CaprotoError, ValueError, KeyError, IndexError, TypeError, struct.error, UnicodeError, OverflowError)

#: How long :meth:`LabctlContext.refresh_access_rights` waits for a client to take its
#: new access rights (one that does not read its connection gets them when it does).
RIGHTS_SEND_TIMEOUT_S = 5.0


class CAStartError(LabctlError):
    """The Channel Access server could not bind its addresses."""


def put_status(error: BaseException) -> CAStatus:
    """The ECA code a put that raised ``error`` is answered with."""
    for cls in type(error).__mro__:
        status = PUT_STATUS.get(cls)
        if status is not None:
            return status
    return CAStatus.ECA_INTERNAL


class _Hosts:
    """caproto's search ignore list, matched on the host of an (address, port) pair."""

    def __init__(self, hosts: Collection[str]) -> None:
        self.hosts = frozenset(hosts)

    def __contains__(self, address: object) -> bool:
        host = address[0] if isinstance(address, tuple) else address
        return host in self.hosts


class LabctlCircuit(VirtualCircuit):
    """One client connection: caproto's circuit with labctl's put handling and host policy."""

    context: LabctlContext

    def __init__(self, circuit: Any, client: Any, context: LabctlContext) -> None:
        super().__init__(circuit, client, context)
        self.peer_address: str = circuit.address[0]
        self.reported_host: str | None = None
        self._rights_pending: set[str] = set()
        self._rights_all = False
        self._rights_task: asyncio.Task[int] | None = None
        if context.check_client_ip:
            self.client_hostname = self.peer_address
        limits = context.limits
        self.command_queue = asyncio.Queue(limits.requests_per_client)
        self.outbox = Outbox(client.writer.transport, self._describe, limits.send_queue_bytes)
        """Monitor updates waiting to be written, from both paths (:mod:`labctl.server.ca.monitors`)."""
        self.subscription_ids: set[int] = set()
        """This client's subscriptions (for ``limits.subscriptions_per_client``)."""
        self.reported: set[str] = set()
        """The kinds of misbehaviour already logged for this client (each is logged once)."""
        self._loop_task: asyncio.Task[None] | None = None

    def _describe(self) -> str:
        return f"{self.client_username}@{self.client_hostname} ({self.peer_address})"

    def report(self, kind: str, reason: str) -> None:
        """Log the client's misbehaviour ``kind`` once for this connection (rate-limited server-wide)."""
        port = self.circuit.address[1] if isinstance(self.circuit.address, tuple) else 0
        peer = f"Channel Access client {self.client_username or '?'}@{self.peer_address}:{port}"
        self.context.peer_log.report(kind, self.reported, peer, reason)

    # ---- reading the connection ---------------------------------------------------------

    async def run(self) -> None:
        """Start processing requests (monitor updates take the outbox: no caproto batching task)."""
        self.events_on.set()
        self._loop_task = self.tasks.create(self.command_queue_loop())

    async def recv(self) -> None:
        """Read from the connection and queue the requests; refuse an oversized message at its header.

        Raises DisconnectedCircuit when the client is gone or was disconnected.
        """
        try:
            data = await self.client.recv(RECV_BYTES)
        except OSError:
            data = b""
        if not data:
            # The client closed: what it sent before (a put, say) is still processed.
            task = self._loop_task
            if task is not None and not task.done():
                await self.command_queue.put(ca.DISCONNECTED)
                await asyncio.wait([task])
            raise DisconnectedCircuit()
        try:
            commands, needed = self.circuit.recv(data)
        except _MALFORMED as e:
            await self.drop("malformed", f"sent a malformed message ({_first_line(e)}); disconnected")
        if needed:
            header, _ = bytes_needed_for_command(self.circuit._data, ca.CLIENT)
            limit = self.context.max_array_bytes
            if header is not None and header.payload_size > limit:
                await self.drop(
                    "payload",
                    f"announced a {header.payload_size}-byte message (command {header.command}); "
                    f"the limit is {limit} (server.ca.limits.max_array_bytes); disconnected",
                )
        for command in commands:
            await self.command_queue.put(command)  # waits while requests_per_client are queued

    async def drop(self, kind: str, reason: str) -> NoReturn:
        """Log ``reason`` once, close the connection and raise DisconnectedCircuit."""
        self.report(kind, reason)
        self.circuit._data = bytearray()
        await self._on_disconnect()
        raise DisconnectedCircuit()

    async def command_queue_loop(self) -> None:
        """caproto's request loop; a client's protocol error ends it with one line, a bug with one traceback."""
        try:
            await super().command_queue_loop()
        except DisconnectedCircuit:
            pass
        except _MALFORMED as e:
            self.report("protocol", f"broke the protocol ({_first_line(e)}); disconnected")
        except Exception:  # nobody awaits this task: this is the boundary that reports it
            log.exception("Channel Access request loop of %s failed", self._describe())
        finally:
            if self.connected:
                await self._on_disconnect()
                self.client.close()

    async def _command_queue_iteration(self, command: Any) -> Any:
        """caproto's, with a client's errors logged once and without a traceback."""
        if command is ca.DISCONNECTED:
            raise DisconnectedCircuit()
        if isinstance(command, ca.VersionRequest) and self.circuit.priority is not None:
            # A search frame's header (libca's EPICS_CA_NAME_SERVERS searches: see
            # labctl.server.ca.names): its priority field holds a sequence flag, not the
            # circuit's priority, which the first VERSION set. No answer, as from an IOC.
            return None
        try:
            self.circuit.process_command(command)
        except ca.RemoteProtocolError as e:
            self.report("protocol", f"broke the protocol ({_first_line(e)}); disconnected")
            raise LoopExit("protocol error") from None
        try:
            return await self._process_command(command)
        except _MALFORMED as e:
            if not self.connected:
                raise LoopExit("client gone") from None
            self.report("request", f"sent a request the server cannot take ({_first_line(e)})")
            cid = getattr(command, "cid", None)
            if cid is None:
                channel = self.circuit.channels_sid.get(getattr(command, "sid", None))
                cid = None if channel is None else channel.cid
            if cid is None:
                return None
            return [ca.ErrorResponse(command, cid, status=CAStatus.ECA_BADTYPE, error_message=_first_line(e))]

    def post_event(self, sub: Any, sub_spec: Any, message: bytes) -> None:
        """Queue a monitor update of a direct subscription (never waits)."""
        if not self.connected:
            return
        if not self.events_on.is_set():
            # The client turned events off: it gets the latest value when it turns them on.
            waiting = self.subscriptions_to_resend.setdefault(sub_spec, [])
            if sub not in waiting:
                waiting.append(sub)
            return
        self.outbox.post(sub.subscriptionid, message)

    def _active_subscriptions(self) -> set[int]:
        return {sub.subscriptionid for subs in self.subscriptions.values() for sub in subs}

    async def send(self, *commands: Any) -> None:
        """Write queued monitor updates first, then ``commands`` (so no update follows its cancel)."""
        if self.connected:
            self.outbox.write_now(self._active_subscriptions)
        await super().send(*commands)

    async def _on_disconnect(self) -> None:
        self.outbox.close()
        await super()._on_disconnect()

    def release(self) -> None:
        """Drop what this closed circuit holds, so it is freed without a garbage collection.

        Called by the context once the connection is gone: clears the cycles through the
        circuit (caproto's circuit and channels, subscriptions, queues, tasks, the outbox),
        the context's per-subscription filter state, and any partly received message.
        """
        self.outbox.close()
        for subs in self.subscriptions.values():
            for sub in subs:
                self.context.last_dead_band.pop(sub, None)
                self.context.last_sync_edge_update.pop(sub, None)
        self.subscriptions.clear()
        self.subscriptions_to_resend.clear()
        self.unexpired_updates.clear()
        self.subscription_ids.clear()
        while not self.command_queue.empty():
            self.command_queue.get_nowait()
        circuit = self.circuit
        circuit._data = bytearray()
        circuit.channels.clear()
        circuit.channels_sid.clear()
        circuit.event_add_commands.clear()
        circuit.event_cancel_commands.clear()
        # Puts in progress finish on their own (and then let go of the circuit).
        for task in (self._loop_task, self._rights_task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()

    async def _process_command(self, command: Any) -> Any:
        if isinstance(command, ca.HostNameRequest):
            self.reported_host = command.name
            if not self.context.check_client_ip:
                self.client_hostname = command.name
            return []
        if isinstance(command, ca.SearchRequest):
            return self._search(command)
        if isinstance(command, (ca.WriteRequest, ca.WriteNotifyRequest)):
            return await self._put(command)
        if isinstance(command, (ca.ReadNotifyRequest, ca.ReadRequest)):
            return await self._get(command)
        limits = self.context.limits
        if isinstance(command, ca.CreateChanRequest) and len(self.circuit.channels_sid) >= limits.channels_per_client:
            self.report(
                "channels",
                f"asked for more than {limits.channels_per_client} channels (server.ca.limits.channels_per_client); "
                f"refused {command.name!r} and any further ones",
            )
            return [ca.CreateChFailResponse(cid=command.cid)]
        if isinstance(command, ca.EventAddRequest):
            if command.subscriptionid not in self.subscription_ids:
                if len(self.subscription_ids) >= limits.subscriptions_per_client:
                    self.report(
                        "subscriptions",
                        f"asked for more than {limits.subscriptions_per_client} monitors "
                        "(server.ca.limits.subscriptions_per_client); further ones are answered ECA_ALLOCMEM",
                    )
                    chan = self.circuit.channels_sid[command.sid]
                    return [
                        ca.ErrorResponse(
                            command,
                            chan.cid,
                            status=CAStatus.ECA_ALLOCMEM,
                            error_message=f"more than {limits.subscriptions_per_client} monitors on one connection",
                        )
                    ]
                self.subscription_ids.add(command.subscriptionid)
        response = await super()._process_command(command)
        if isinstance(command, ca.CreateChanRequest) and response:
            try:
                entry = self.context[command.name]
            except KeyError:
                return response
            for i, msg in enumerate(response):  # caproto asked check_access, which knows no circuit
                if isinstance(msg, ca.AccessRightsResponse):
                    response[i] = ca.AccessRightsResponse(cid=msg.cid, access_rights=self.access_of(entry))
        return response

    def _search(self, command: Any) -> list[Any]:
        """A name search on this connection (a client's ``EPICS_CA_NAME_SERVERS``).

        A name this server serves is answered as over UDP (address 255.255.255.255: the
        client creates the channel on this connection's server). In a site, a name another
        server owns is answered with that server's address and TCP port
        (:mod:`labctl.server.ca.names`). Otherwise no answer, or NOT_FOUND if asked for one.
        """
        version = ca.DEFAULT_PROTOCOL_VERSION
        try:
            own = self.context[command.name] is not None
        except _MALFORMED:  # KeyError: not served; the others: a name caproto cannot parse, not served either
            own = False
        if own:
            return [ca.SearchResponse(self.context.port, None, command.cid, version)]
        names = self.context.names
        redirect = names.resolve(command.name) if names is not None else None
        if redirect is not None:
            log.debug("name search for %r by %s: served by %r at %s:%d", command.name, self._describe(), redirect.server,
                      redirect.address, redirect.port)
            return [ca.SearchResponse(redirect.port, redirect.address, command.cid, version)]
        if command.reply == ca.DO_REPLY:
            return [ca.NotFoundResponse(version=version, cid=command.cid)]
        return []

    def access_of(self, entry: Any) -> ca.AccessRights:
        """This circuit's access rights on a served entry (per circuit where the entry knows how: locks are per circuit)."""
        per_circuit = getattr(entry, "circuit_access", None)
        if per_circuit is not None:
            return per_circuit(self.client_hostname, self.client_username, self.circuit.address)
        return entry.check_access(self.client_hostname, self.client_username)

    async def _cull_subscriptions(self, db_entry: Any, func: Any) -> Any:
        removed = await super()._cull_subscriptions(db_entry, func)
        for _, sub in removed:
            self.subscription_ids.discard(sub.subscriptionid)
        return removed

    async def _get(self, command: Any) -> list[Any]:
        """A get, answered as an IOC answers it (caproto's, with its element counts and failures).

        A request for ``n`` elements gets ``n``: an array holding fewer (NORD) is padded with
        zeros; a request for 0 elements (a client of protocol 4.13+ asking for "what it
        holds") gets the elements held. A value that cannot be converted to the requested
        type is answered ECA_GETFAIL with a zeroed value (in a plain get's error message),
        which libca reports to that request alone.
        """
        chan, db_entry = self._get_db_entry_from_command(command)
        try:
            data_type = command.data_type
        except ValueError:
            raise ca.RemoteProtocolError("Invalid data type") from None
        await self.write_event.wait(timeout=WRITE_LOCK_TIMEOUT)  # a put in progress may finish first
        read_data_type = data_type
        chars = False
        if chan.name.endswith("$"):
            try:
                read_data_type = _LongStringChannelType(read_data_type)
            except ValueError:  # another type than DBR_CHAR of a long string: its bytes as that type
                chars = hasattr(db_entry, "read_chars")
        notify = isinstance(command, ca.ReadNotifyRequest)
        count = command.data_count
        try:
            if chars:
                metadata, data = await db_entry.read_chars(read_data_type)
            else:
                metadata, data = await db_entry.auth_read(
                    self.client_hostname, self.client_username, read_data_type, user_address=self.circuit.address
                )
        except NoConversion as e:
            log.debug("get of %s as %s by %s: %s", chan.name, ChannelType(data_type).name, self._describe(), e)
            if not notify:
                return [ca.ErrorResponse(command, chan.cid, status=CAStatus.ECA_GETFAIL, error_message=str(e))]
            return [failed_read(chan, command)]
        data = apply_arr_filter(chan.channel_filter.arr, data)
        if count > 0 or self.circuit.protocol_version < 13:  # (before 4.13, 0 meant none)
            data = padded(data, count, data_type)
        if chan.channel_filter.ts and data_type in ca.time_types:  # the timestamp filter: the time of the read
            time_type = type(metadata)
            now = ca.TimeStamp.from_unix_timestamp(time.time())
            metadata = time_type(**ChainMap({"stamp": now}, {f: getattr(metadata, f) for f, _ in time_type._fields_}))
        return [
            chan.read(
                data=data,
                data_type=data_type,
                data_count=element_count(data_type, data, db_entry),
                status=1,
                ioid=command.ioid,
                metadata=metadata,
                notify=notify,
            )
        ]

    async def _put(self, command: Any) -> list[Any]:
        chan, db_entry = self._get_db_entry_from_command(command)
        notify = isinstance(command, ca.WriteNotifyRequest)
        hostname, username = self.client_hostname, self.client_username

        async def handle_write() -> None:
            try:
                await db_entry.auth_write(
                    hostname,
                    username,
                    command.data,
                    command.data_type,
                    command.metadata,
                    user_address=self.circuit.address,
                )
            except Exception as ex:  # the boundary where a put's outcome becomes a CA status
                status = put_status(ex)
                if status is CAStatus.ECA_INTERNAL:
                    log.exception("put to %s by %s@%s failed", chan.name, username, hostname)
                else:
                    log.debug("put to %s by %s@%s: %s: %s", chan.name, username, hostname, status.name, ex)
                if notify:
                    response = chan.write(ioid=command.ioid, status=status, data_count=db_entry.length)
                else:
                    response = ca.ErrorResponse(command, chan.cid, status=status, error_message=str(ex))
            else:
                response = (
                    chan.write(ioid=command.ioid, status=CAStatus.ECA_NORMAL, data_count=db_entry.length)
                    if notify
                    else None
                )
            finally:
                self.write_event.set()
            if response is not None:
                try:
                    await self.send(response)
                except DisconnectedCircuit:
                    log.debug("%s@%s left before its put to %s completed", username, hostname, chan.name)

        self.write_event.clear()
        await self._start_write_task(handle_write)
        return []

    def schedule_rights_refresh(self, pvs: Collection[str] | None = None) -> asyncio.Task[int]:
        """Queue a refresh of this client's channels (of ``pvs``, or all); return the task sending it.

        One task per circuit sends queued refreshes in order; a refresh queued while it
        runs joins it (so a client that stops reading holds one task, never a pile).
        """
        if pvs is None:
            self._rights_all = True
        else:
            self._rights_pending.update(pvs)
        if self._rights_task is None or self._rights_task.done():
            self._rights_task = self.tasks.create(self._send_rights())
        return self._rights_task

    async def _send_rights(self) -> int:
        sent = 0
        while self._rights_all or self._rights_pending:
            pvs = None if self._rights_all else self._rights_pending
            self._rights_all, self._rights_pending = False, set()
            try:
                sent += await self.refresh_access_rights(pvs)
            except DisconnectedCircuit:
                break
            except Exception:  # nobody awaits this task to report it: this is the boundary
                log.exception("sending access rights to %s@%s failed", self.client_username, self.client_hostname)
                break
        return sent

    async def refresh_access_rights(self, pvs: Collection[str] | None = None) -> int:
        """Send new access rights for this client's open channels whose rights changed."""
        sent = 0
        for chan in list(self.circuit.channels_sid.values()):
            try:
                entry = self.context[chan.name]
            except KeyError:
                continue
            info = getattr(entry, "info", None)
            if info is None or (pvs is not None and info.name not in pvs):
                continue  # record fields are always read-only
            rights = self.access_of(entry)
            if rights != chan.access_rights:
                await self.send(ca.AccessRightsResponse(cid=chan.cid, access_rights=rights))
                sent += 1
        return sent


class LabctlContext(Context):
    """caproto's asyncio server context, bound from :class:`CASettings`, with a clean stop."""

    CircuitClass = LabctlCircuit

    def __init__(
        self,
        pvdb: dict[str, Any],
        settings: CASettings,
        *,
        check_client_ip: bool = False,
        limits: CALimits | None = None,
        max_array_bytes: int | None = None,
    ) -> None:
        super().__init__(pvdb, list(settings.interfaces))
        self.settings = settings
        self.limits = limits or CALimits()
        """Per-client limits (``server.ca.limits``)."""
        self.max_array_bytes: int = settings.max_array_bytes or max_array_bytes or MIN_ARRAY_BYTES
        """Largest payload a client may announce (site file, environment, else the service's default)."""
        self.peer_log = PeerLog(log)
        """One line per misbehaving client connection, rate-limited."""
        self.names: NameService | None = None
        """In a site: answers TCP name searches for the PVs of other servers (set by the service)."""
        self.circuit_listeners: list[Any] = []
        """``fn(hostname, username, address)`` once a client connection is gone (the arbiter withdraws its queued requests)."""
        self._udp_reported: set[Any] = set()
        self.check_client_ip = check_client_ip
        self.ca_server_port = settings.port
        self.ignore_addresses = _Hosts(settings.ignore_hosts)
        self._tasks: list[asyncio.Task[Any]] = []
        self._servers: list[asyncio.Server] = []
        self._beacons: list[tuple[tuple[str, int], socket.socket]] = []
        self._beacon_errors: dict[tuple[str, int], str] = {}

    # ---- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Bind every address and start answering; raise CAStartError if an address is unusable."""
        try:
            await self._bind()
        except BaseException:
            await self.stop()
            raise
        self._spawn(self.broadcaster_receive_loop(), "search receiver")
        self._spawn(self.broadcaster_queue_loop(), "search replies")
        self._spawn(self.subscription_queue_loop(), "subscriptions")
        self._spawn(self._beacon_loop(), "beacons")

    async def _bind(self) -> None:
        if self.ca_server_port == 0:
            self.ca_server_port = _free_udp_port(self.interfaces[0])
        for interface in self.interfaces:
            try:
                await self._create_broadcaster_transport(interface)
            except OSError as e:
                raise CAStartError(
                    f"Channel Access: cannot bind UDP {interface}:{self.ca_server_port}: {e.strerror or e}"
                ) from None
        try:
            self.port, self.tcp_sockets = await self._bind_tcp_sockets_with_consistent_port_number(_bound_tcp_socket)
        except ca.CaprotoRuntimeError:
            raise CAStartError(
                f"Channel Access: cannot bind a TCP port on {', '.join(self.interfaces)} (tried {self.ca_server_port} and 100 others)"
            ) from None
        if self.port != self.ca_server_port:
            log.info("TCP port %d is taken; serving Channel Access circuits on TCP %d", self.ca_server_port, self.port)
        for interface, sock in self.tcp_sockets.items():
            self._servers.append(await asyncio.start_server(self._accept, sock=sock))
            self.broadcaster.server_addresses.append((interface, self.port))
        for address in self.settings.beacon_addresses:
            sock = _create_udp_socket()
            try:
                sock.connect(address)
            except OSError as e:
                sock.close()
                log.warning("Channel Access beacons to %s:%d disabled: %s", *address, e.strerror or e)
                continue
            self._beacons.append((address, sock))

    async def _create_broadcaster_transport(self, interface: str) -> None:
        """Bind the UDP search socket of ``interface`` (caproto's leaks the socket when bind fails)."""
        old = self.udp_socks.pop(interface, None)
        if old is not None:
            old.close()
        sock = _create_udp_socket()
        try:
            sock.bind((interface, self.ca_server_port))
            transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
                functools.partial(
                    _DatagramProtocol, parent=self, identifier=interface, queue=self.broadcaster_datagram_queue
                ),
                sock=sock,
            )
        except BaseException:
            sock.close()
            raise
        self.udp_socks[interface] = _UdpTransportWrapper(transport)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Small messages leave at once, as from an IOC: asyncio sets TCP_NODELAY only on
        # sockets made with proto IPPROTO_TCP, and Nagle's algorithm would hold a monitor
        # update until the client's delayed ACK (up to 40 ms).
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport = _TransportWrapper(reader, writer)
        if len(self.circuits) >= self.limits.clients:
            peer = transport.getpeername()
            self.peer_log.report(
                "clients",
                set(),
                f"Channel Access client at {peer[0]}:{peer[1]}",
                f"refused: {self.limits.clients} clients are connected (server.ca.limits.clients)",
            )
            writer.close()
            return
        self.server_tasks.create(self.tcp_handler(transport, transport.getpeername()))

    async def tcp_handler(self, client: Any, addr: Any) -> None:
        """Serve one client connection until it closes; then release what it held (caproto's, bounded)."""
        circuit = self.CircuitClass(ca.VirtualCircuit(ca.SERVER, addr, None), client, self)
        self.circuits.add(circuit)
        log.debug("Channel Access client connected from %s:%d (%d connected)", *addr, len(self.circuits))
        try:
            await circuit.run()
            while True:
                await circuit.recv()
        except DisconnectedCircuit:
            pass
        except Exception:  # nobody awaits this task: this is the boundary that reports it
            log.exception("Channel Access connection from %s:%d failed", *addr)
        finally:
            self.circuits.discard(circuit)
            if circuit.connected:
                await circuit._on_disconnect()
            client.close()
            for fn in self.circuit_listeners:
                try:
                    fn(circuit.client_hostname, circuit.client_username, circuit.circuit.address)
                except Exception:  # a listener's bug must not keep a connection's memory
                    log.exception("a listener of closed Channel Access connections failed")
            circuit.release()
        log.debug("Channel Access client at %s:%d left (%d connected)", *addr, len(self.circuits))

    async def circuit_disconnected(self, circuit: Any) -> None:
        """A circuit's request loop saw its client go: forget it (its connection handler releases it)."""
        self.circuits.discard(circuit)

    async def _broadcaster_recv_datagram(self, bytes_received: bytes, address: Any) -> None:
        """caproto's, with a malformed datagram logged as one line per sender (no traceback)."""
        try:
            commands = self.broadcaster.recv(bytes_received, address)
        except _MALFORMED as e:
            if len(self._udp_reported) > 1024:
                self._udp_reported.clear()
            host = address[0] if isinstance(address, tuple) else str(address)
            self.peer_log.report(
                host,
                self._udp_reported,
                f"Channel Access search from {host}",
                f"malformed datagram ({_first_line(e)}); ignored",
            )
            return
        await self.command_bundle_queue.put((address, commands))

    async def subscription_queue_loop(self) -> None:
        """caproto's loop over published updates, keeping no reference to the last one while it waits.

        (caproto's keeps the last item in its locals: a circuit gone since would stay alive
        until the next update.)
        """
        queue = self.subscription_queue
        while True:
            item = await queue.get()
            await self._subscription_queue_iteration(*item)
            del item

    async def _subscription_queue_send(self, sub_spec: Any, sub: Any, metadata: Any, values: Any, flags: int) -> None:
        """caproto's, except that the update goes to the circuit's outbox (never waits, bounded)."""
        circuit = sub.circuit
        if not circuit.connected:
            return
        if values is NOT_CONVERTED:  # the value cannot be read as this subscription's type (as an IOC: ECA_GETFAIL)
            circuit.post_event(sub, sub_spec, bytes(failed_event(sub)))
            return
        values = apply_arr_filter(sub_spec.channel_filter.arr, values)
        data_count = sub.data_count or element_count(sub.data_type, values, sub.db_entry)
        values = padded(values, data_count, sub.data_type)  # a count asked for is the count sent
        command = sub.channel.subscribe(
            data=values,
            metadata=metadata,
            data_type=sub.data_type,
            data_count=data_count,
            subscriptionid=sub.subscriptionid,
            status=1,
        )
        if sub.channel_filter.dbnd is not None:
            tracked = apply_deadband_filter(
                previous_value=self.last_dead_band.get(sub),
                new_value=values,
                sub=sub,
                flags=flags,
                host_endian=host_endian,
            )
            if tracked is None:
                return
            self.last_dead_band[sub] = tracked
        sync = sub.channel_filter.sync
        if sync is not None:
            last = self.last_sync_edge_update[sub][sync.s].get(sync.m)
            if last and last == command:
                return
            self.last_sync_edge_update[sub][sync.s][sync.m] = command
        circuit.post_event(sub, sub_spec, bytes(command))

    def _spawn(self, coro: Any, what: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=f"ca {what}"))

    async def stop(self) -> None:
        """Close listeners and client connections; await every task; release every socket."""
        for server in self._servers:
            server.close()
        for circuit in list(self.circuits):
            circuit.client.close()
        tasks = [*self._tasks, *self.server_tasks.tasks]
        for circuit in list(self.circuits):
            tasks.extend(circuit.tasks.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        for transport in self.udp_socks.values():
            transport.close()
        for _, sock in self._beacons:
            sock.close()
        self._tasks.clear()
        self._servers.clear()
        self._beacons.clear()
        self.udp_socks.clear()
        self.circuits.clear()

    # ---- beacons ------------------------------------------------------------------------

    async def _beacon_loop(self) -> None:
        period = MIN_BEACON_PERIOD_S
        while True:
            for address, sock in self._beacons:
                beacon = ca.Beacon(ca.DEFAULT_PROTOCOL_VERSION, self.port, self.beacon_count, "0.0.0.0")
                try:
                    sock.send(self.broadcaster.send(beacon))
                except OSError as e:
                    # Nobody listening (no CA repeater on a loopback address) is normal;
                    # say so once per address and keep beaconing.
                    text = e.strerror or str(e)
                    if self._beacon_errors.get(address) != text:
                        log.debug("beacon to %s:%d not delivered: %s", *address, text)
                        self._beacon_errors[address] = text
            self.beacon_count += 1
            period = min(self.settings.beacon_period_s, period * 2)
            await asyncio.sleep(period)

    # ---- access rights --------------------------------------------------------------------

    def schedule_access_rights(self, pvs: Collection[str] | None = None) -> list[asyncio.Task[int]]:
        """Queue a re-evaluation of open channels' rights (of ``pvs``, or all) on every circuit.

        Never waits (the arbiter's listeners call it inline). Each circuit sends its own
        changes in its own task, so a client that does not read its connection delays
        no one else's new rights. Returns the circuits' tasks.
        """
        return [circuit.schedule_rights_refresh(pvs) for circuit in list(self.circuits)]

    async def refresh_access_rights(self, pvs: Collection[str] | None = None) -> int:
        """Re-evaluate the access rights of open channels (of ``pvs``, or all); send changes.

        Returns how many CA_PROTO_ACCESS_RIGHTS messages were sent, not counting clients
        that did not take them within :data:`RIGHTS_SEND_TIMEOUT_S` (theirs stay queued).
        """
        tasks = self.schedule_access_rights(pvs)
        if not tasks:
            return 0
        done, late = await asyncio.wait(tasks, timeout=RIGHTS_SEND_TIMEOUT_S)
        if late:
            log.warning("%d Channel Access client(s) did not take their new access rights yet", len(late))
        return sum(task.result() for task in done if not task.cancelled())  # cancelled: its client left


async def _bound_tcp_socket(interface: str, port: int) -> socket.socket:
    """A listening-ready TCP socket bound to (interface, port); closed again if the bind fails."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setblocking(False)
        sock.bind((interface, port))
    except BaseException:
        sock.close()
        raise
    return sock


def element_count(data_type: Any, values: Any, db_entry: Any) -> int:
    """The element count of an answer: DBR_STSACK_STRING holds its first value in its struct."""
    if data_type == ChannelType.STSACK_STRING:
        return 1 + len(values) // STRING_BYTES
    if data_type == ChannelType.CLASS_NAME:
        return 1
    return db_entry.calculate_length(values)


def padded(values: Any, count: int, data_type: Any) -> Any:
    """``values`` cut or padded with zeros (empty strings) to ``count`` elements, as an IOC sends them."""
    data_type = ChannelType(data_type)
    if data_type == ChannelType.CLASS_NAME:
        return values
    if data_type == ChannelType.STSACK_STRING:  # strings of 40 bytes after the first, which is in the struct
        return bytes(values[: (count - 1) * STRING_BYTES]).ljust((count - 1) * STRING_BYTES, b"\0")
    n = len(values)
    if n == count:
        return values
    if n > count:
        return values[:count]
    if isinstance(values, np.ndarray):
        return np.concatenate([values, np.zeros(count - n, dtype=values.dtype)])
    if isinstance(values, bytes | bytearray):
        return bytes(values) + bytes(count - n)
    if native_type(data_type) == ChannelType.STRING:
        return DbrStringArray([*values, *([b""] * (count - n))])
    return [*values, *([0] * (count - n))]


def _zeroed(data_type: ChannelType, count: int) -> tuple[Any, Any]:
    """The metadata and ``count`` values of ``data_type``, all zero: a failed read's payload."""
    native = native_type(data_type)
    metadata = b"" if data_type in native_types else DBR_TYPES[_STS_LAYOUT.get(data_type, data_type)]()
    if native == ChannelType.STRING:
        return metadata, DbrStringArray([b""] * count)
    return metadata, np.zeros(count, dtype=backend.type_map[native])


#: DBR_GR_STRING and DBR_CTRL_STRING have DBR_STS_STRING's layout.
_STS_LAYOUT = {ChannelType.GR_STRING: ChannelType.STS_STRING, ChannelType.CTRL_STRING: ChannelType.STS_STRING}


def failed_read(chan: Any, command: Any) -> Any:
    """The ECA_GETFAIL answer to a READ_NOTIFY whose value cannot be converted: zeroed, its count as asked.

    As an IOC: a request for 0 elements (autosized) gets 0.
    """
    data_type = ChannelType(command.data_type)
    metadata, data = _zeroed(data_type, command.data_count)
    return chan.read(
        data=data,
        data_type=data_type,
        data_count=command.data_count,
        status=CAStatus.ECA_GETFAIL,
        ioid=command.ioid,
        metadata=metadata,
        notify=True,
    )


def failed_event(sub: Any) -> Any:
    """The ECA_GETFAIL monitor update of a subscription whose value cannot be converted to its type."""
    data_type = ChannelType(sub.data_type)
    metadata, data = _zeroed(data_type, sub.data_count)
    return sub.channel.subscribe(
        data=data,
        metadata=metadata,
        data_type=data_type,
        data_count=sub.data_count,
        subscriptionid=sub.subscriptionid,
        status=CAStatus.ECA_GETFAIL,
    )


def _first_line(error: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def _free_udp_port(interface: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((interface, 0))
        return s.getsockname()[1]
