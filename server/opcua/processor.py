"""The OPC UA server's message processing, with the refusals of each operation returned as data.

Theory of operation. asyncua answers a Write or Call request with one StatusCode per
operation and never fills the response's ``DiagnosticInfos``. labctl's sessions note the
refusal (or failure) of each operation as they answer it
(:attr:`labctl.server.opcua.users.SessionUser.operation_errors`); :class:`LabctlProcessor`,
asyncua's per-connection message processor with two small overrides, remembers whether
the request asked for operation-level diagnostics (RequestHeader.ReturnDiagnostics) and, when it sends
the response of such a request in which an operation was refused, adds one
DiagnosticInfo per operation (:func:`labctl.server.opcua.refusals.diagnostic`: the refusal
as JSON in AdditionalInfo; empty for an operation that succeeded). A connection's
requests are processed one after the other, so the notes of a session belong to the
request being answered.

asyncua builds the processor inside ``BinaryServer``'s protocol, which ``Server.start``
creates; :class:`LabctlServer` starts a :class:`LabctlBinaryServer` whose protocol
uses the processor. The overridden start is asyncua 2.1's (pinned), with that one class
changed.

Before asyncua answers CreateSession or ActivateSession, the processor has the secure
channel's client certificate checked against the trust list, and before ActivateSession
it awaits the session's password decision, made off the event loop
(:meth:`labctl.server.opcua.sessions.LabctlSession.prepare_activation`; why there: the
docstring of :mod:`labctl.server.opcua.sessions`).

Throttled addresses. A new connection from an address whose failed logins have it
throttled (:meth:`labctl.server.opcua.users.LoginThrottle.source_blocked_for`) is held at
the door: the server reads nothing from it until the address's back-off is over (at most
:data:`~labctl.server.opcua.users.MAX_HOLD_S`), and at most
:data:`~labctl.server.opcua.users.HOLD_PER_SOURCE` are held per address (more are closed
at once). A login flood thus stops costing the server anything at all, where refusing
each attempt after decoding it still costs a secure channel, a session and a refusal
(about 1.5 ms of the event loop each, hundreds a second from a few clients).

Malformed traffic. asyncua logs every message it cannot parse or decode with an ERROR
traceback (megabytes of log for a fuzzer's few thousand messages). Here a message that
fails to parse (:meth:`LabctlProtocol.data_received`), to be taken by the secure
channel (:meth:`LabctlProtocol._process_received_message_loop`), or to decode as a
request (:meth:`LabctlProcessor.process_message`: the exception passed through asyncua's
binary decoder, a ``*from_binary`` function of ``asyncua.ua.ua_binary``) is the client's fault: one WARNING line per connection with the
peer and the reason (rate-limited, :class:`~labctl.server.peerlog.PeerLog`), and the
connection is closed, except for a request body that fails to decode, which is answered
BadDecodingError as the specification asks. Any other exception while answering a
request is a bug: one traceback on labctl's logger, BadInternalError to the client.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import traceback
from typing import Any

from asyncua import Server, ua
from asyncua.common.utils import Buffer, NotEnoughData, ServiceError
from asyncua.crypto import uacrypto
from asyncua.server.binary_server_asyncio import BinaryServer, OPCUAProtocol
from asyncua.server.uaprocessor import UaProcessor
from asyncua.ua.ua_binary import header_from_binary, nodeid_from_binary, struct_from_binary
from labctl.server.opcua.refusals import OPERATION_ADDITIONAL_INFO, diagnostic
from labctl.server.opcua.sessions import LabctlInternalServer, LabctlSession
from labctl.server.opcua.users import HOLD_PER_SOURCE, MAX_HOLD_S, SessionUser, UserManager

log = logging.getLogger(__name__)

_ANSWERED = (ua.WriteResponse, ua.CallResponse)
_CREATE = ua.NodeId(ua.ObjectIds.CreateSessionRequest_Encoding_DefaultBinary)
_ACTIVATE = ua.NodeId(ua.ObjectIds.ActivateSessionRequest_Encoding_DefaultBinary)
#: Discovery-server services: asyncua answers them without a session and keeps every
#: server registered in an unbounded table that FindServers then lists. A labctl server is
#: not a discovery server (it registers with one, :mod:`labctl.server.opcua.discovery`).
_REGISTER = (
    ua.NodeId(ua.ObjectIds.RegisterServerRequest_Encoding_DefaultBinary),
    ua.NodeId(ua.ObjectIds.RegisterServer2Request_Encoding_DefaultBinary),
)


def _decoding(error: BaseException) -> bool:
    """Whether ``error`` was raised while decoding what a client sent (in asyncua's ``ua`` modules)."""
    if isinstance(error, (NotEnoughData, UnicodeDecodeError)):
        return True
    codec = f"{os.sep}asyncua{os.sep}ua{os.sep}ua_binary.py"
    return any(f.filename.endswith(codec) and "from_binary" in f.name for f in traceback.extract_tb(error.__traceback__))


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


class LabctlProcessor(UaProcessor):
    """asyncua's processor that returns the DiagnosticInfos of refused Write and Call operations."""

    _return_diagnostics = 0
    reported: set[str]
    """What this connection's misbehaviour was already logged as (each kind once)."""

    def report(self, kind: str, reason: str) -> None:
        """Log the client's misbehaviour ``kind`` once for this connection (rate-limited server-wide)."""
        reported = self.__dict__.setdefault("reported", set())
        peer = f"OPC UA client {self.name[0]}:{self.name[1]}" if self.name else "OPC UA client"
        if isinstance(self.iserver, LabctlInternalServer):
            self.iserver.peer_log.report(kind, reported, peer, reason)

    async def process_message(self, seqhdr: Any, body: Any) -> Any:
        """asyncua 2.1's, with a request the server cannot decode logged as one line (module docstring)."""
        typeid = nodeid_from_binary(body)
        requesthdr = struct_from_binary(ua.RequestHeader, body)
        try:
            return await self._process_message(typeid, requesthdr, seqhdr, body)
        except (ServiceError, ua.uaerrors.UaStatusCodeError) as e:
            response = ua.ServiceFault()
            response.ResponseHeader.ServiceResult = ua.StatusCode(e.code)
            self.send_response(requesthdr.RequestHandle, seqhdr, response)
            return True
        except Exception as e:  # the boundary where a request's outcome becomes a status
            if _decoding(e):
                self.report("decoding", f"sent a request that does not decode ({_first_line(e)})")
                status = ua.StatusCodes.BadDecodingError
            else:
                log.exception("OPC UA request %s failed", typeid)
                status = ua.StatusCodes.BadInternalError
            response = ua.ServiceFault()
            response.ResponseHeader.ServiceResult = ua.StatusCode(status)
            self.send_response(requesthdr.RequestHandle, seqhdr, response)
            return True

    async def _process_message(self, typeid: ua.NodeId, requesthdr: ua.RequestHeader, seqhdr: Any, body: Any) -> Any:
        self._return_diagnostics = requesthdr.ReturnDiagnostics if requesthdr is not None else 0
        if typeid in _REGISTER:
            self.report("register", "asked to register a server here (this is no discovery server): BadServiceUnsupported")
            raise ua.uaerrors.BadServiceUnsupported
        if typeid in (_CREATE, _ACTIVATE) and isinstance(self.iserver, LabctlInternalServer):
            policy = self._connection.security_policy
            self.iserver.check_channel_certificate(policy.peer_certificate, str(self.name[0]) if self.name else "")
            if typeid == _ACTIVATE:
                session = self.session or self.iserver.lookup_external_session(requesthdr.AuthenticationToken)
                if isinstance(session, LabctlSession):
                    params = struct_from_binary(ua.ActivateSessionParameters, Buffer(bytes(body)))
                    await session.prepare_activation(params, getattr(policy, "Mode", None) == ua.MessageSecurityMode.SignAndEncrypt)
        return await super()._process_message(typeid, requesthdr, seqhdr, body)

    def send_response(self, requesthandle: int, seqhdr: Any, response: Any, msgtype: ua.MessageType = ua.MessageType.SecureMessage) -> None:
        """Send a response; a Write's or Call's with the DiagnosticInfos of its refused operations, if asked for."""
        if self._return_diagnostics & OPERATION_ADDITIONAL_INFO and isinstance(response, _ANSWERED):
            user = getattr(self.session, "user", None)
            errors = user.operation_errors if isinstance(user, SessionUser) else []
            if any(e is not None for e in errors):
                response.DiagnosticInfos = [diagnostic(e) if e is not None else ua.DiagnosticInfo() for e in errors]
        super().send_response(requesthandle, seqhdr, response, msgtype)


class LabctlProtocol(OPCUAProtocol):
    """asyncua's connection protocol with a :class:`LabctlProcessor`."""

    _hold: asyncio.TimerHandle | None = None
    _held_source: str | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if self.processor is not None:  # None: refused at max_connections
            self.processor = LabctlProcessor(self.iserver, self.transport, self.limits)
            self.processor.set_policies(self.policies)
            self._hold_if_throttled()

    def connection_lost(self, ex: BaseException | None) -> None:
        if self._hold is not None:
            self._hold.cancel()
            self._hold = None
        self._unhold()
        super().connection_lost(ex)

    def _hold_if_throttled(self) -> None:
        """Hold a new connection from a throttled address unread (module docstring)."""
        iserver, manager = self.iserver, self.iserver.user_manager
        if not isinstance(iserver, LabctlInternalServer) or not isinstance(manager, UserManager) or self.transport is None:
            return
        source = str(self.peer_name[0]) if self.peer_name else ""
        directory = manager.directory
        wait = directory.throttle.source_blocked_for(source, directory.clock())
        if wait <= 0:
            return
        if iserver.held[source] >= HOLD_PER_SOURCE:
            self._bad("held", f"refused a connection: {HOLD_PER_SOURCE} of this address are already held after too many failed logins")
            return
        iserver.held[source] += 1
        self._held_source = source
        self.transport.pause_reading()
        hold = min(wait, MAX_HOLD_S)
        self._hold = asyncio.get_running_loop().call_later(hold, self._release)
        if isinstance(self.processor, LabctlProcessor):
            self.processor.report("held", f"held for {hold:.1f} s before it is served: too many failed logins from this address")

    def _unhold(self) -> None:
        source, self._held_source = self._held_source, None
        if source is not None and isinstance(self.iserver, LabctlInternalServer):
            held = self.iserver.held
            held[source] -= 1
            if held[source] <= 0:
                del held[source]

    def _release(self) -> None:
        self._hold = None
        self._unhold()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _bad(self, kind: str, reason: str) -> None:
        """Log one line for this connection and close it."""
        if isinstance(self.processor, LabctlProcessor):
            self.processor.report(kind, reason)
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        """asyncua 2.1's framing, with a malformed message closing the connection after one line."""
        self._buffer += data
        while self._buffer:
            buf = Buffer(self._buffer)
            try:
                header = header_from_binary(buf)
            except NotEnoughData:
                return
            except Exception as e:  # what the client sent is not an OPC UA message header
                self._buffer = b""
                self._bad("malformed", f"sent a malformed message header ({_first_line(e)}); disconnected")
                return
            if header.header_size + header.body_size <= header.header_size:
                self._buffer = b""
                self._bad("malformed", f"sent a message header announcing {header.body_size} bytes; disconnected")
                return
            if len(buf) < header.body_size:
                return
            try:
                self.messages.put_nowait((header, buf))
            except asyncio.QueueFull:
                self._buffer = b""
                self._bad("backlog", f"sent more than {self.messages.maxsize} requests ahead of the server; disconnected")
                return
            self._buffer = self._buffer[(header.header_size + header.body_size) :]

    async def _process_received_message_loop(self) -> None:
        """asyncua's loop, with a message the channel cannot take closing the connection after one line."""
        while True:
            header, buf = await self.messages.get()
            if header is None and buf is None:
                break
            try:
                if not await self._process_one_msg(header, buf):
                    break
            except Exception as e:  # requests are answered inside: this is what the channel layer refused
                self._bad("malformed", f"sent a message the secure channel cannot take ({_first_line(e)}); disconnected")
                break


class LabctlBinaryServer(BinaryServer):
    """asyncua's TCP server with :class:`LabctlProtocol` connections."""

    def _make_protocol(self) -> OPCUAProtocol:
        return LabctlProtocol(
            iserver=self.iserver,
            policies=self._policies,
            clients=self.clients,
            closing_tasks=self.closing_tasks,
            limits=self.limits,
        )


class LabctlServer(Server):
    """asyncua's server, started with a :class:`LabctlBinaryServer`."""

    async def start(self) -> None:
        """asyncua 2.1's ``Server.start``, with labctl's binary server."""
        if self.iserver.certificate is not None:
            uacrypto.check_certificate(self.iserver.certificate, self._application_uri, socket.gethostname())
        await self._setup_server_nodes()
        await self.iserver.start()
        try:
            ipaddress, port = self._get_bind_socket_info()
            self.bserver = LabctlBinaryServer(self.iserver, ipaddress, port, self.limits)
            self.bserver.set_policies(self._policies)
            await self.bserver.start()
        except Exception:
            await self.iserver.stop()
            raise
