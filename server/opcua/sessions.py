"""Per-session behaviour asyncua does not offer as a hook.

Theory of operation. asyncua's attribute ``read`` has no notion of the caller, but a
PV's UserAccessLevel must say what *this* user may do, and the Session variables must
show *this* session's user and last refusal. :class:`LabctlInternalServer` makes every
external session a :class:`LabctlSession`, whose ``read`` answers those attributes per
session after asyncua's read, and whose ``activate_session``:

* passes the secure channel's client certificate to the user manager only for an X.509
  identity token (asyncua passes it for every token, so an anonymous login over a signed
  channel would look like a certificate login);
* takes a password login decided beforehand, off the event loop, by
  :meth:`LabctlSession.prepare_activation` (below);
* stamps the peer's address into the identity, so audit records say where a write came
  from, and audits logins (accepted and refused) through the database.

The internal server also carries the :class:`~labctl.server.opcua.writes.PVAttributeService`,
so every Write of every session goes through the core, and the
:class:`~labctl.server.opcua.calls.OpcUaControl`, which answers the control methods (locks,
jobs, alarms, interlocks, audit) for the calling session: asyncua's method service does
not know who calls, so :meth:`LabctlSession.call` hands those calls over with the session.

Password logins and the event loop. asyncua's ``InternalSession.activate_session`` is
synchronous, and its processor calls it inline while answering ActivateSession, with the
user manager's ``get_user`` inside: a password check there (one scrypt, tens of ms)
would stop every client of every protocol for its duration, and a flood of bad logins
would stall the server. Moving the hash to a thread and waiting for it there would still
block the loop. So labctl's processor (:mod:`labctl.server.opcua.processor`), which is
asynchronous, first awaits :meth:`LabctlSession.prepare_activation` for an ActivateSession
request: it refuses a throttled source without any work, opens the token
(:func:`~labctl.server.opcua.users.open_password_token`: decryption with the server key and
the check that the token carries this session's nonce, so a captured token cannot be
replayed in another session; a password in clear only over SignAndEncrypt) in a worker
thread, and checks the password in the directory's bounded password checker. The
decision is kept with the token it was made for; the synchronous ``activate_session``
that follows only looks it up (a token it was not prepared for is refused), so asyncua's
own state handling (session states, nonce renewal, connection counts) stays as it is.
asyncua's ``decrypt_user_token`` is never used for labctl sessions.

Client application certificates: before CreateSession and ActivateSession the processor
asks :meth:`LabctlInternalServer.check_channel_certificate` about the secure channel's
certificate (the one the channel proved the key of, not the one a client may put in
CreateSession), against the trust list (:mod:`labctl.server.opcua.trust`); a refusal is
logged and audited as a refused login.

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
import weakref
from collections import Counter
from typing import TYPE_CHECKING, Any

from asyncua import ua
from asyncua.common.utils import ServiceError
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.internal_server import InternalServer
from asyncua.server.internal_session import InternalSession, SessionState
from labctl.ioc.access import AuditRecord
from labctl.ioc.types import Identity
from labctl.server.opcua.arguments import client_id
from labctl.server.opcua.config import OpcUaLimits
from labctl.server.opcua.subscriptions import LabctlSubscriptionService
from labctl.server.opcua.trust import CertificateRefused, TrustList
from labctl.server.opcua.users import (
    ANONYMOUS,
    PROTOCOL,
    Refusal,
    SessionUser,
    TokenRefused,
    UserManager,
    open_password_token,
)
from labctl.server.opcua.values import HISTORY_READ, READ, WRITE
from labctl.server.opcua.writes import PVAttributeService
from labctl.server.peerlog import PeerLog

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
        self.subscription_service = LabctlSubscriptionService(self.aspace, iserver=self)  # before any session holds asyncua's
        self.isession.subscription_service = self.subscription_service
        self.db: Database | None = None
        self.nodes: SiteNodes | None = None
        self.history = False
        self.control: OpcUaControl | None = None
        """The control methods' answers (None: a service without the control layer)."""
        self.stopping = False
        """Set when the service stops: the sessions it closes then did not close themselves."""
        self.trust: TrustList | None = None
        """The client certificate trust list (None: every certificate is accepted)."""
        self.limits = OpcUaLimits()
        """Per-client limits (``server.opcua.limits``); the service applies the site's."""
        self.peer_log = PeerLog(logging.getLogger("labctl.opcua"))
        """One line per misbehaving connection or session, rate-limited."""
        self.held: Counter[str] = Counter()
        """New connections held unread per throttled address (:class:`labctl.server.opcua.processor.LabctlProtocol`)."""
        self.sessions: weakref.WeakSet[LabctlSession] = weakref.WeakSet()
        """External sessions not yet closed (for ``limits.sessions``)."""

    def bind(self, db: Database, nodes: SiteNodes) -> None:
        """Serve ``nodes`` from ``db`` (called once the address space is built)."""
        self.db = db
        self.nodes = nodes
        self.attribute_service.bind(db, nodes)

    def decrypt_user_token(self, isession: Any, token: ua.UserNameIdentityToken) -> tuple[str, str]:
        """Never decrypts: labctl sessions open password tokens in :meth:`LabctlSession.prepare_activation`."""
        return token.UserName or "", ""

    def check_channel_certificate(self, certificate: bytes | None, host: str) -> None:
        """Accept a secure channel's client certificate, or log, audit and raise ServiceError."""
        if not certificate or self.trust is None:  # the None policy has no (an empty) certificate
            return
        try:
            self.trust.check(certificate)
        except CertificateRefused as e:
            log.warning("OPC UA: refused the client certificate of %s: %s", host, e.reason)
            if self.db is not None:
                identity = Identity("<certificate>", frozenset(), PROTOCOL, host)
                self.db.audit(AuditRecord.of(self.db.clock(), "login", identity, "session", accepted=False, reason=e.reason))
            raise ServiceError(e.status) from None

    def create_session(self, name: str, user: User = User(role=UserRole.Anonymous), external: bool = False) -> InternalSession:  # noqa: B008 -- asyncua's signature
        """A new session; external ones are :class:`LabctlSession`."""
        if not external:
            return super().create_session(name, user, external)
        live = [s for s in self.sessions if s.state != SessionState.Closed]
        if len(live) >= self.limits.sessions:
            peer = f"OPC UA client {name[0]}:{name[1]}" if isinstance(name, tuple) and len(name) > 1 else "OPC UA client"
            self.peer_log.report("sessions", set(), peer, f"refused a session: {self.limits.sessions} are open (server.opcua.limits.sessions)")
            raise ServiceError(ua.StatusCodes.BadTooManySessions)
        session = LabctlSession(self, self.aspace, self.subscription_service, name, user=user, external=True)
        self.sessions.add(session)
        return session


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

    _prepared: tuple[Any, Any, Identity | Refusal] | None = None

    def _report(self, kind: str, reason: str) -> None:
        reported = self.__dict__.setdefault("_reported", set())
        self.iserver.peer_log.report(kind, reported, f"OPC UA session of {self.identity.user or '?'}@{self.host}", reason)

    def _own_subscriptions(self) -> list[Any]:
        return [sub for sub in self.subscription_service.subscriptions.values() if sub.session_id == self.session_id]

    async def create_subscription(self, params: ua.CreateSubscriptionParameters, callback: Any, request_callback: Any = None) -> ua.CreateSubscriptionResult:
        """asyncua's, refused beyond ``limits.subscriptions_per_session`` (BadTooManySubscriptions)."""
        limit = self.iserver.limits.subscriptions_per_session
        if len(self._own_subscriptions()) >= limit:
            self._report("subscriptions", f"asked for more than {limit} subscriptions (server.opcua.limits.subscriptions_per_session)")
            raise ServiceError(ua.StatusCodes.BadTooManySubscriptions)
        return await super().create_subscription(params, callback, request_callback=request_callback)

    async def create_monitored_items(self, params: ua.CreateMonitoredItemsParameters) -> list[ua.MonitoredItemCreateResult]:
        """asyncua's, with items beyond ``limits.monitored_items_per_session`` answered BadTooManyMonitoredItems."""
        limits = self.iserver.limits
        held = sum(len(sub.monitored_item_srv._monitored_items) for sub in self._own_subscriptions())
        room = max(0, limits.monitored_items_per_session - held)
        items = list(params.ItemsToCreate)
        if len(items) <= room:
            return await super().create_monitored_items(params)
        self._report("monitored items", f"asked for more than {limits.monitored_items_per_session} monitored items (server.opcua.limits.monitored_items_per_session)")
        params.ItemsToCreate = items[:room]
        results = await super().create_monitored_items(params) if room else []
        refused = ua.MonitoredItemCreateResult()
        refused.StatusCode = ua.StatusCode(ua.StatusCodes.BadTooManyMonitoredItems)
        return [*results, *(refused for _ in items[room:])]
    """(user name, password bytes, decision) of the password login being activated."""

    async def prepare_activation(self, params: ua.ActivateSessionParameters, channel_encrypted: bool) -> None:
        """Decide a password login off the event loop, for :meth:`activate_session` to take (see the module docstring)."""
        self._prepared = None
        token = params.UserIdentityToken
        manager = self.iserver.user_manager
        if not isinstance(token, ua.UserNameIdentityToken) or not isinstance(manager, UserManager):
            return
        directory = manager.directory
        username, source = token.UserName or "", self.host
        decision: Identity | Refusal
        why = directory.throttle.check(username, source, directory.clock())
        if why is not None:
            directory.throttle.refused(source, directory.clock())
            decision = Refusal(username, why)
        else:
            try:
                password = await asyncio.to_thread(open_password_token, token, self.iserver.private_key, self.nonce, channel_encrypted)
            except TokenRefused as e:
                directory.throttle.failed(username, source, directory.clock())
                decision = Refusal(username, e.reason, e.status)
            else:
                decision = await directory.login(username, password, source)
        self._prepared = (token.UserName, token.Password, decision)

    def activate_session(self, params: ua.ActivateSessionParameters, peer_certificate: bytes | None) -> ua.ActivateSessionResult:
        """Authenticate the session's user (see the module docstring)."""
        token = params.UserIdentityToken
        manager = self.iserver.user_manager
        prepared, self._prepared = self._prepared, None
        decided: Identity | Refusal | None = None
        if isinstance(token, ua.UserNameIdentityToken):
            if prepared is not None and prepared[:2] == (token.UserName, token.Password):
                decided = prepared[2]
            else:
                decided = Refusal(token.UserName or "", "password login not prepared")
            if isinstance(decided, Refusal) and decided.status != ua.StatusCodes.BadUserAccessDenied:
                self._audit_login(Identity(decided.user, frozenset(), PROTOCOL, self.host), False, decided.reason)
                raise ServiceError(decided.status)
        if isinstance(manager, UserManager):
            manager.decided = decided
        try:
            result = super().activate_session(params, peer_certificate if isinstance(token, ua.X509IdentityToken) else None)
        except ServiceError:
            refusal = getattr(manager, "last_refusal", None)
            if refusal is not None:
                self._audit_login(Identity(refusal.user, frozenset(), PROTOCOL, self.host), False, refusal.reason)
            raise
        finally:
            if isinstance(manager, UserManager):
                manager.decided = None
        if isinstance(self.user, SessionUser):
            # The identity names this session as its lock client: a lease belongs to the session that took it.
            self.user = dataclasses.replace(self.user, identity=dataclasses.replace(self.user.identity, host=self.host, client=client_id(self)))
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
