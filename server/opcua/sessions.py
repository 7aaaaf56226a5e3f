"""Per-session behaviour asyncua does not offer as a hook.

Theory of operation. asyncua's attribute ``read`` has no notion of the caller, but a
PV's UserAccessLevel must say what *this* user may do, and the Session variables must
show *this* session's user and last refusal. :class:`LabctlInternalServer` makes every
external session a :class:`LabctlSession`, whose ``read`` answers those attributes per
session after asyncua's read, and whose ``activate_session``:

* passes the secure channel's client certificate to the user manager only for an X.509
  identity token (asyncua passes it for every token, so an anonymous login over a signed
  channel would look like a certificate login);
* refuses a user name token whose password travels unencrypted over an unsecured
  channel (a client that ignores the endpoint's token policy);
* stamps the peer's address into the identity, so audit records say where a write came
  from, and audits logins (accepted and refused) through the database.

The internal server also carries the :class:`~labctl.server.opcua.writes.PVAttributeService`,
so every Write of every session goes through the core, and the
:class:`~labctl.server.opcua.calls.OpcUaControl`, which answers the control methods (locks,
jobs, alarms, interlocks, audit) for the calling session: asyncua's method service does
not know who calls, so :meth:`LabctlSession.call` hands those calls over with the session.

UserAccessLevel of a PV says whether this session may write it *now*: the PV is
writable, the user's roles allow its resource, and, on a lockable resource, the user
holds its lock (:meth:`labctl.ioc.database.Database.may_write`). It changes when the lock
changes hands; clients re-read it (it cannot be subscribed to per session).

When a session closes, :meth:`LabctlSession.close_session` tells the control layer,
which releases the session's leases only when the client closed the session itself
(CloseSession while its connection is open), and withdraws its queued lock requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from asyncua import ua
from asyncua.common.utils import ServiceError
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.internal_server import InternalServer
from asyncua.server.internal_session import InternalSession
from labctl.ioc.access import AuditRecord
from labctl.ioc.types import Identity
from labctl.server.opcua.users import ANONYMOUS, PROTOCOL, SessionUser, UserManager
from labctl.server.opcua.values import HISTORY_READ, READ, WRITE
from labctl.server.opcua.writes import PVAttributeService

if TYPE_CHECKING:
    from labctl.ioc.database import Database
    from labctl.server.opcua.address_space import SiteNodes
    from labctl.server.opcua.calls import OpcUaControl

log = logging.getLogger(__name__)


class LabctlInternalServer(InternalServer):
    """asyncua's internal server with labctl sessions and the PV attribute service."""

    def __init__(self, user_manager: UserManager) -> None:
        super().__init__(user_manager=user_manager)
        self.attribute_service: PVAttributeService = PVAttributeService(self.aspace)
        self.db: Database | None = None
        self.nodes: SiteNodes | None = None
        self.history = False
        self.control: OpcUaControl | None = None
        """The control methods' answers (None: a service without the control layer)."""
        self.stopping = False
        """Set when the service stops: the sessions it closes then did not close themselves."""

    def bind(self, db: Database, nodes: SiteNodes) -> None:
        """Serve ``nodes`` from ``db`` (called once the address space is built)."""
        self.db = db
        self.nodes = nodes
        self.attribute_service.bind(db, nodes)

    def create_session(self, name: str, user: User = User(role=UserRole.Anonymous), external: bool = False) -> InternalSession:  # noqa: B008 -- asyncua's signature
        """A new session; external ones are :class:`LabctlSession`."""
        if not external:
            return super().create_session(name, user, external)
        return LabctlSession(self, self.aspace, self.subscription_service, name, user=user, external=True)


class LabctlSession(InternalSession):
    """An external client's session (see the module docstring)."""

    iserver: LabctlInternalServer
    last_call_refusal: str = ""
    """``<Method>: <reason>`` of the session's last refused method call (read via Session/LastCallRefusal)."""

    @property
    def identity(self) -> Identity:
        """Who this session is (anonymous until activated)."""
        return self.user.identity if isinstance(self.user, SessionUser) else ANONYMOUS

    @property
    def host(self) -> str:
        """The client's address."""
        return str(self.name[0]) if isinstance(self.name, tuple) and self.name else ""

    def activate_session(self, params: ua.ActivateSessionParameters, peer_certificate: bytes | None) -> ua.ActivateSessionResult:
        """Authenticate the session's user (see the module docstring)."""
        token = params.UserIdentityToken
        if isinstance(token, ua.UserNameIdentityToken) and token.Password and not token.EncryptionAlgorithm and not peer_certificate:
            # no channel security (the None policy has an empty peer certificate) and no token encryption
            self._audit_login(Identity(token.UserName or "", frozenset(), PROTOCOL, self.host), False, "password sent unencrypted over an unsecured channel")
            raise ServiceError(ua.StatusCodes.BadIdentityTokenRejected)
        manager = self.iserver.user_manager
        try:
            result = super().activate_session(params, peer_certificate if isinstance(token, ua.X509IdentityToken) else None)
        except ServiceError:
            refusal = getattr(manager, "last_refusal", None)
            if refusal is not None:
                self._audit_login(Identity(refusal.user, frozenset(), PROTOCOL, self.host), False, refusal.reason)
            raise
        if isinstance(self.user, SessionUser):
            self.user = dataclasses.replace(self.user, identity=dataclasses.replace(self.user.identity, host=self.host))
            if self.user.identity.user != ANONYMOUS.user:
                self._audit_login(self.user.identity, True, "")
        return result

    def _audit_login(self, identity: Identity, accepted: bool, reason: str) -> None:
        db = self.iserver.db
        if db is None:
            return
        db.audit(AuditRecord.of(db.clock(), "login", identity, "session", accepted=accepted, reason=reason))

    async def read(self, params: ua.ReadParameters) -> list[ua.DataValue]:
        """asyncua's read, with UserAccessLevel and the Session variables answered for this session."""
        results = await super().read(params)
        nodes, db = self.iserver.nodes, self.iserver.db
        if nodes is None or db is None:
            return results
        for i, rv in enumerate(params.NodesToRead):
            if rv.AttributeId == ua.AttributeIds.UserAccessLevel:
                node = nodes.pv(rv.NodeId)
                if node is not None:
                    results[i] = ua.DataValue(ua.Variant(self.user_access_level(db, node.info), ua.VariantType.Byte))
            elif rv.AttributeId == ua.AttributeIds.Value:
                value = self._session_value(nodes, rv.NodeId)
                if value is not None:
                    results[i] = ua.DataValue(value)
        return results

    def user_access_level(self, db: Database, info: Any) -> int:
        """What this session's user may do with a PV now: read; write if writable, the roles allow it and any lock is held."""
        level = READ | (HISTORY_READ if self.iserver.history else 0)
        if db.may_write(info.name, self.identity):
            level |= WRITE
        return level

    async def call(self, params: list[ua.CallMethodRequest]) -> list[ua.CallMethodResult]:
        """The control methods answered for this session; any other method as asyncua does."""
        control = self.iserver.control
        errors = self.user.operation_errors if isinstance(self.user, SessionUser) else []
        errors.clear()
        if control is None or not any(control.handles(req) for req in params):
            return await super().call(params)
        results: list[ua.CallMethodResult] = []
        for req in params:
            if control.handles(req):
                result, error = await control.call(self, req)
                results.append(result)
                errors.append(error)
            else:
                results.extend(await super().call([req]))
                errors.append(None)
        return results

    async def close_session(self, delete_subs: bool = True) -> None:
        """Close the session; the control layer releases its leases if the client closed it itself."""
        control = self.iserver.control
        if control is not None and self.external and self.is_activated():
            try:
                control.session_closed(self, clean=self._closed_by_client())
            except Exception:  # never keep a session from closing
                log.exception("releasing the leases of a closing session failed")
        await super().close_session(delete_subs)

    def _closed_by_client(self) -> bool:
        """A CloseSession request on a live connection, not a lost connection, a timeout or the server stopping."""
        if self.iserver.stopping or asyncio.current_task() is self._timeout_task:
            return False
        return any(t.get_extra_info("peername") == self.name and not t.is_closing() for t in self.iserver.asyncio_transports)

    def _session_value(self, nodes: SiteNodes, nodeid: ua.NodeId) -> ua.Variant | None:
        if nodeid == nodes.session_user:
            return ua.Variant(self.identity.user, ua.VariantType.String)
        if nodeid == nodes.session_roles:
            return ua.Variant(sorted(self.identity.roles), ua.VariantType.String, is_array=True)
        if nodeid == nodes.session_refusal:
            text = self.user.last_refusal if isinstance(self.user, SessionUser) else ""
            return ua.Variant(text, ua.VariantType.String)
        if nodeid == nodes.session_call_refusal:
            return ua.Variant(self.last_call_refusal, ua.VariantType.String)
        if self.iserver.control is not None:
            return self.iserver.control.session_value(nodeid)
        return None
