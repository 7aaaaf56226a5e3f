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
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from asyncua import Server, ua
from asyncua.crypto import uacrypto
from asyncua.server.binary_server_asyncio import BinaryServer, OPCUAProtocol
from asyncua.server.uaprocessor import UaProcessor
from labctl.server.opcua.refusals import OPERATION_ADDITIONAL_INFO, diagnostic
from labctl.server.opcua.users import SessionUser

log = logging.getLogger(__name__)

_ANSWERED = (ua.WriteResponse, ua.CallResponse)


class LabctlProcessor(UaProcessor):
    """asyncua's processor that returns the DiagnosticInfos of refused Write and Call operations."""

    _return_diagnostics = 0

    async def _process_message(self, typeid: ua.NodeId, requesthdr: ua.RequestHeader, seqhdr: Any, body: Any) -> Any:
        self._return_diagnostics = requesthdr.ReturnDiagnostics if requesthdr is not None else 0
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

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if self.processor is not None:  # None: refused at max_connections
            self.processor = LabctlProcessor(self.iserver, self.transport, self.limits)
            self.processor.set_policies(self.policies)


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
