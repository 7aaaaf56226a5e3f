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

Access rights. Channel Access sends a channel's rights when it is created. Rights here
depend on locks that change hands, so :meth:`LabctlContext.refresh_access_rights`
re-evaluates open channels and sends CA_PROTO_ACCESS_RIGHTS for those whose rights
changed (the protocol allows it at any time; libca updates its channel and calls the
client's access-rights handler). Each circuit sends its refreshes in one task of its
own (:meth:`LabctlCircuit.schedule_rights_refresh`), so a client that stops reading its
connection delays no other client's new rights.

Hosts. A client's reported host name goes to the access rules unless
``check_client_ip`` is set: then the circuit's peer address stands in for it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections.abc import Collection
from typing import Any

import caproto as ca
from caproto import CAStatus
from caproto.asyncio.server import Context, VirtualCircuit
from caproto.asyncio.utils import (
    _create_udp_socket,
    _DatagramProtocol,
    _TransportWrapper,
    _UdpTransportWrapper,
)
from caproto.server.common import DisconnectedCircuit
from labctl.ioc.errors import DriverError, Forbidden, LabctlError, LockedBy, Refused, UnknownPV
from labctl.server.ca.env import CASettings
from labctl.server.ca.monitors import Outbox

log = logging.getLogger("labctl.ca")

#: How refused or failed puts are reported (the first class in the error's MRO wins).
PUT_STATUS: dict[type[Exception], CAStatus] = {
    Forbidden: CAStatus.ECA_NOWTACCESS,  # PermissionDenied, NotWritable, and lock/job commands refused by role
    LockedBy: CAStatus.ECA_NOWTACCESS,
    UnknownPV: CAStatus.ECA_PUTFAIL,
    Refused: CAStatus.ECA_PUTFAIL,  # WrongType, OutOfRange, Interlocked, a lock command the arbiter refused...
    DriverError: CAStatus.ECA_PUTFAIL,  # DriverFault, DriverTimeout
}

#: Beacons start this often and back off (doubling) to the configured period (CA spec).
MIN_BEACON_PERIOD_S = 0.02
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
        self.outbox = Outbox(client.writer.transport, self._describe)
        """Monitor updates of direct subscriptions, waiting to be written (:mod:`labctl.server.ca.monitors`)."""

    def _describe(self) -> str:
        return f"{self.client_username}@{self.client_hostname} ({self.peer_address})"

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

    async def _process_command(self, command: Any) -> Any:
        if isinstance(command, ca.HostNameRequest):
            self.reported_host = command.name
            if not self.context.check_client_ip:
                self.client_hostname = command.name
            return []
        if isinstance(command, (ca.WriteRequest, ca.WriteNotifyRequest)):
            return await self._put(command)
        return await super()._process_command(command)

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
            rights = entry.check_access(self.client_hostname, self.client_username)
            if rights != chan.access_rights:
                await self.send(ca.AccessRightsResponse(cid=chan.cid, access_rights=rights))
                sent += 1
        return sent


class LabctlContext(Context):
    """caproto's asyncio server context, bound from :class:`CASettings`, with a clean stop."""

    CircuitClass = LabctlCircuit

    def __init__(self, pvdb: dict[str, Any], settings: CASettings, *, check_client_ip: bool = False) -> None:
        super().__init__(pvdb, list(settings.interfaces))
        self.settings = settings
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
        self.server_tasks.create(self.tcp_handler(transport, transport.getpeername()))

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


def _free_udp_port(interface: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((interface, 0))
        return s.getsockname()[1]
