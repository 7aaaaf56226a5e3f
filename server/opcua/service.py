"""The OPC UA service: the site's process database served with asyncua.

Theory of operation. :class:`OpcUaService` is a :class:`labctl.server.app.Service`. ``start``
creates an asyncua server around :class:`~labctl.server.opcua.sessions.LabctlInternalServer`,
sets the ApplicationUri (:func:`~labctl.server.opcua.address_space.application_uri`:
``urn:labctl:<site>:<server name>`` for a server of a site, or one whose site file names
it, so that every server of a site is its own application; ``urn:labctl:<site>:server``
for a single server without a name), the security policies and identity
tokens the site file asks for (:class:`labctl.server.opcua.config.OpcUaConfig`), loads or creates the
server certificate, whose subject alternative names carry that ApplicationUri
(:mod:`labctl.server.opcua.pki`), registers the namespace
``urn:labctl:<site>``, builds one node per PV (:mod:`labctl.server.opcua.address_space`),
subscribes once to the database (:mod:`labctl.server.opcua.publisher`) and binds (port 0 picks
a free port, read back into :attr:`port`). The garbage collector is paused during all
that (:func:`labctl.server.tuning.gc_paused`): the heap grows by millions of objects, all long-lived,
and the full collections the growth would trigger cost more than the build; the server
then exempts them from later collections once every service has started
(:func:`labctl.server.tuning.freeze_long_lived`).

Identity tokens offered: user name when any account has a password hash, certificate
when any has a certificate, anonymous unless the site disables it. Passwords offered
over the None and Sign policies are encrypted with the server's certificate (asyncua's
token policy) together with the session's nonce; a token that is not for this session,
or a password in clear over a channel that does not encrypt, is refused
(:mod:`labctl.server.opcua.users`). Passwords are checked in a small pool of threads with
a bounded queue, and failed logins are throttled per address and per account there.

Client application certificates are checked against the trust list under
``<state_dir>/pki`` (:mod:`labctl.server.opcua.trust`; ``server.opcua.trust``).

With the server's control layer (``server.control``), :mod:`labctl.server.opcua.calls` adds
the lock objects of the resources (Part 100 LockingServices, :mod:`labctl.server.opcua.locking`,
in the DI namespace registered after the site's), the ``Control`` object with the jobs,
alarm, interlock and audit methods (:mod:`labctl.server.opcua.methods`), and the control
events (:mod:`labctl.server.opcua.control_events`).

Site: on a server of a site (it has a site directory service, :mod:`labctl.server.sitedir`),
``Objects/<site>/Site`` lists the site's servers and answers ``FindOwners``
(:mod:`labctl.server.opcua.site`), and HistoryRead also answers for the PVs of the other
servers, which the shared archive holds.

Discovery: with ``server.opcua.discovery`` in the site file, once every service serves
(:meth:`OpcUaService.serving`) the server registers with those discovery servers and keeps
its registration fresh; :meth:`OpcUaService.stop` tells them it is offline first
(:mod:`labctl.server.opcua.discovery`).

History: when the server also runs a historian, :func:`labctl.server.app.build_services` calls
:meth:`OpcUaService.serve_history_from`; ``start`` then makes every PV Historizing with the
HistoryRead access bit, and answers HistoryRead (raw and processed) from the historian
(:mod:`labctl.server.opcua.history`) before the first client connects.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from asyncua import ua
from labctl.ioc.access import AuditRecord
from labctl.ioc.errors import LabctlError
from labctl.server.opcua.address_space import (
    SiteNodes,
    application_uri,
    build,
    mark_historizing,
    namespace_uri,
    store_readings,
)
from labctl.server.opcua.calls import OpcUaControl
from labctl.server.opcua.discovery import DiscoveryRegistrar, Registration
from labctl.server.opcua.history import HistorianStorage
from labctl.server.opcua.history import install as install_history
from labctl.server.opcua.locking import DI_NAMESPACE
from labctl.server.opcua.pki import CertificateMismatch, ensure_certificate
from labctl.server.opcua.processor import LabctlServer
from labctl.server.opcua.publisher import Publisher, install_copy_fastpath
from labctl.server.opcua.sessions import LabctlInternalServer
from labctl.server.opcua.site import ArchivedPVs, SiteDirectory, SiteFolder
from labctl.server.opcua.trust import TrustList
from labctl.server.opcua.users import LoginThrottle, UserDirectory, UserManager
from labctl.server.passwords import PasswordChecker, dummy_hash
from labctl.server.tuning import gc_paused

if TYPE_CHECKING:
    from labctl.server.app import Server

log = logging.getLogger(__name__)

#: Addresses that mean "every interface": the published endpoint names the host instead.
_WILDCARDS = ("0.0.0.0", "::", "")

#: The ProductUri of every labctl server.
PRODUCT_URI = "urn:labctl"

POLICIES: dict[str, ua.SecurityPolicyType] = {
    "None": ua.SecurityPolicyType.NoSecurity,
    "Basic256Sha256_Sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
    "Basic256Sha256_SignAndEncrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
}


class OpcUaService:
    """Serves the site's PVs over OPC UA (see the module docstring)."""

    name = "opcua"

    def __init__(self, server: Server) -> None:
        self.db = server.db
        self.site = server.site
        self.control_service = getattr(server, "control", None)
        """The server's control layer (arbiter, jobs, alarms, interlocks), if it has one."""
        self.control: OpcUaControl | None = None
        self.config = server.site.server.opcua
        self.state_dir = Path(server.state_dir)
        cfg = self.config
        self.users = UserDirectory(
            server.site.users,
            anonymous=cfg.anonymous,
            base_dir=Path(server.base_dir),
            throttle=LoginThrottle(cfg.login_free_failures, 3 * cfg.login_free_failures, cfg.login_max_backoff_s),
            checker=PasswordChecker(cfg.login_workers, cfg.login_pending),
        )
        self.trust = TrustList(self.state_dir / "pki", auto_accept=cfg.trust == "auto")
        self.users.load_certificates(server.site.users)
        self.host = self.config.host
        self.port: int | None = None
        """The bound TCP port once started (the real one when the site asks for port 0)."""
        self.nodes: SiteNodes | None = None
        self.ua_server: LabctlServer | None = None
        self._iserver: LabctlInternalServer | None = None
        self._publisher: Publisher | None = None
        self._history_source: Any = None
        self._host = server
        self.site_folder: SiteFolder | None = None
        """``Objects/<site>/Site`` (None: a server that is not part of a site)."""
        self.application_uri = application_uri(self.site.site, self.site.server.name)
        """This server's ApplicationUri (in its endpoints, its certificate and its discovery registrations);
        set again at start, when the site directory's name for this server is known."""
        self.application_name = ""
        """Its ApplicationName: ``labctl <site> <server name>`` (``labctl <site>`` without a name); set at start."""
        self.discovery: DiscoveryRegistrar | None = None
        """Registration with the discovery servers of ``server.opcua.discovery`` (None: none configured, or not serving)."""
        self._certificate: tuple[Path, Path] | None = None

    @property
    def url(self) -> str:
        """The endpoint URL clients connect to."""
        host = self.host if self.host not in _WILDCARDS else socket.gethostname()
        return f"opc.tcp://{host}:{self.port if self.port is not None else self.config.port}"

    @property
    def published_url(self) -> str:
        """The endpoint URL others are told (as the site directory publishes it): ``server.directory.address``
        if set, else the bound address, or this host's name for a server on every interface."""
        address = self.site.server.directory.address
        host = address or (socket.gethostname() if self.host in _WILDCARDS else self.host)
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        return f"opc.tcp://{host}:{self.port if self.port is not None else self.config.port}"

    async def start(self) -> None:
        """Build the address space, bind and serve (with the garbage collector paused)."""
        with gc_paused():
            await self._start()

    async def _start(self) -> None:
        install_copy_fastpath()
        library_log = logging.getLogger("asyncua")
        if library_log.level == logging.NOTSET:  # unless configured: it logs every request at INFO
            library_log.setLevel(logging.WARNING)
        site = self.site.site
        name = self._server_name()
        self.application_uri = application_uri(site, name)
        self.application_name = f"labctl {site} {name}" if name else f"labctl {site}"
        iserver = LabctlInternalServer(UserManager(self.users))
        limits = iserver.limits = self.config.limits  # sessions, subscriptions and items per session: sessions.py
        iserver.max_connections = limits.connections
        iserver.max_monitored_item_queue_size = limits.queue_size
        ua_server = LabctlServer(iserver=iserver)
        ua_server.limits.max_message_size = limits.max_message_bytes
        ua_server.limits.max_chunk_count = limits.max_message_bytes // ua_server.limits.max_recv_buffer + 1
        await ua_server.init()
        # no trailing "/": clients compare endpoint URLs with the one they dialled (node-opcua strictly)
        ua_server.set_endpoint(f"opc.tcp://{self.host}:{self.config.port}")
        ua_server.set_server_name(self.application_name)
        ua_server.product_uri = PRODUCT_URI
        ua_server.manufacturer_name = "labctl"
        ua_server.allow_remote_admin(False)
        await ua_server.set_application_uri(self.application_uri)
        try:
            cert, key = await asyncio.to_thread(ensure_certificate, self.state_dir / "pki", self.application_uri, self.application_name)
        except CertificateMismatch:
            await self._teardown()
            raise
        self._certificate = (cert, key)
        await asyncio.to_thread(self.trust.create)
        await asyncio.to_thread(dummy_hash)  # made once, off the loop: unknown users are checked against it
        iserver.trust = self.trust
        await ua_server.load_certificate(str(cert))
        await ua_server.load_private_key(str(key))
        ua_server.set_security_policy([POLICIES[p] for p in self.config.security])
        ua_server.set_identity_tokens(self._identity_tokens())
        idx = await ua_server.register_namespace(namespace_uri(site))

        db = self.db
        # Seconds for 100 000 PVs: off the loop, which keeps serving the other services;
        # nothing else touches this server before it starts.
        nodes = await asyncio.to_thread(build, iserver, idx, site, db.infos())
        iserver.bind(db, nodes)
        if self.control_service is not None:
            di_idx = await ua_server.register_namespace(DI_NAMESPACE)
            self.control = OpcUaControl(self.control_service, iserver, nodes, site, di_idx)
            self.control.build()
            iserver.control = self.control
        # Current values, then the subscription, with no await in between: no update is lost.
        store_readings(nodes, db.read)
        publisher = Publisher(db, nodes.pvs)
        publisher.start()
        self.nodes, self.ua_server, self._iserver, self._publisher = nodes, ua_server, iserver, publisher
        directory = self._site_directory()
        if directory is not None:
            self.site_folder = SiteFolder(iserver, nodes, site, directory)
            self.site_folder.build()
        if self._history_source is not None:
            storage = HistorianStorage(self._history_source, nodes)
            if directory is not None:  # the archive is the site's: other servers' PVs too
                storage.foreign = ArchivedPVs(self._history_source, idx).resolve
            self.enable_history(storage)
        try:
            await ua_server.start()
        except OSError as e:
            await self._teardown()
            raise LabctlError(f"OPC UA: cannot listen on {self.host}:{self.config.port}: {e.strerror or e}") from None
        except BaseException:
            await self._teardown()
            raise
        assert ua_server.bserver is not None
        self.port = ua_server.bserver.port
        if self.control is not None:
            self.control.start()
        if self.site_folder is not None:
            await self.site_folder.start()
        if self.config.port == 0:
            _announce_port(ua_server, self.port)
        self._warn_about_configuration()
        log.info("OPC UA: %d PVs in namespace %s (ns=%d) at %s", len(nodes.pvs), namespace_uri(site), idx, self.url)

    async def serving(self) -> None:
        """Every service serves: register with the discovery servers of the site file (in the background)."""
        discovery = self.config.discovery
        if discovery is None or self._certificate is None or self.ua_server is None:
            return
        capabilities = ["DA"]
        if self._iserver is not None and self._iserver.history:
            capabilities.append("HD")
        if self.control is not None:
            capabilities.append("AC")
        registration = Registration(
            self.application_uri, self.application_name, PRODUCT_URI, (self.published_url,), tuple(capabilities)
        )
        self.discovery = DiscoveryRegistrar(discovery, registration, *self._certificate)
        self.discovery.start()

    def _server_name(self) -> str | None:
        """This server's name: its name in the site directory, else ``server.name`` (None: neither)."""
        directory = self._site_directory()
        if directory is not None:
            return directory.server_name
        return self.site.server.name

    def _site_directory(self) -> SiteDirectory | None:
        """The server's site directory service, when it is one of a site's servers."""
        find = getattr(self._host, "service", None)
        if find is None:
            return None
        try:
            return find("sitedir")
        except KeyError:  # a single server: no directory
            return None

    def _identity_tokens(self) -> list[type]:
        tokens: list[type] = []
        if self.config.anonymous:
            tokens.append(ua.AnonymousIdentityToken)
        if self.users.password_users:
            tokens.append(ua.UserNameIdentityToken)
        if self.users.certificate_users:
            tokens.append(ua.X509IdentityToken)
        return tokens

    def _warn_about_configuration(self) -> None:
        if not self._identity_tokens():
            log.warning("OPC UA: anonymous access is disabled and no user has a password or certificate: nobody can log in")
        if self.config.security == ("None",) and self.users.password_users:
            log.warning("OPC UA: only the None security policy is offered; passwords cannot be encrypted and are refused")
        if "None" in self.config.security and self.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("OPC UA: the None security policy is offered on %s; drop it outside a localhost demo", self.host)
        if self.users.password_users and "Basic256Sha256_SignAndEncrypt" not in self.config.security:
            log.warning("OPC UA: Basic256Sha256_SignAndEncrypt is not offered: passwords over None cannot be encrypted and are refused")
        if self.config.trust == "auto" and self.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("OPC UA: server.opcua.trust is auto on %s: any client certificate is trusted on first use", self.host)

    async def stop(self) -> None:
        """Stop serving and release the port."""
        await self._teardown()

    async def _teardown(self) -> None:
        if self.discovery is not None:  # first: discovery servers stop listing a server that goes
            await self.discovery.stop()
            self.discovery = None
        if self._iserver is not None:
            self._iserver.stopping = True  # closing sessions now is not their clients' doing: leases lapse
        if self.control is not None:
            await self.control.stop()
        if self.site_folder is not None:
            await self.site_folder.stop()
        if self._publisher is not None:
            await self._publisher.stop()
            self._publisher = None
        if self.ua_server is not None:
            await _stop_clock(self.ua_server)
            await self.ua_server.stop()
            # asyncua's stop() closes the connections but not the sessions: their timeout
            # watchdogs and subscription loops would run on.
            for session in list(self.ua_server.iserver._external_sessions.values()):
                await session.close_session(True)
            self.ua_server = None
        self.users.checker.close()

    async def end_sessions(self, users: Mapping[str, str]) -> int:
        """Close every open session of the users in ``users`` (user -> why), each audited as a ``logout``; return how many.

        Called when the site's accounts change (:mod:`labctl.server.accounts`): the client's
        next request is refused (BadSessionNotActivated, or BadSessionIdInvalid), and a new
        login is checked against the accounts as they are now.
        """
        if self._iserver is None or not users:
            return 0
        closed = 0
        for session in list(self._iserver.sessions):
            who = session.identity
            why = users.get(who.user)
            if why is None or not session.is_activated():
                continue
            log.warning("OPC UA: closing the session of %s from %s: %s", who.user, session.host, why)
            self.db.audit(AuditRecord.of(self.db.clock(), "logout", who, "session", reason=why))
            await session.close_session(True)
            closed += 1
        return closed

    def endpoints(self) -> list[str]:
        """The endpoint URL and its security policies."""
        return [f"{self.url} (OPC UA; security: {', '.join(self.config.security)})"]

    def banner(self) -> list[str]:
        """Lines for the start-up banner: who may log in, and how."""
        lines = [f"OPC UA anonymous access: {'read-only' if self.config.anonymous else 'disabled'}"]
        if self.config.trust == "auto":
            lines.append("OPC UA client certificates: any is trusted on first use (server.opcua.trust: auto)")
        else:
            lines.append(f"OPC UA client certificates: those in {self.trust.folder('trusted/certs')} (approve others with `labctl pki trust`)")
        for u in self.site.users:
            how = " and ".join(k for k, v in (("password", u.password_hash), ("certificate", u.certificate)) if v)
            extra = f" -- {u.description}" if u.description else ""
            lines.append(f"OPC UA user {u.name} [{', '.join(u.roles)}] ({how or 'no login'}){extra}")
        return lines

    def serve_history_from(self, historian: Any) -> None:
        """Answer HistoryRead from ``historian`` (a started :class:`labctl.server.historian.Historian`
        by the time this service starts); call before :meth:`start`."""
        self._history_source = historian

    def enable_history(self, storage: Any) -> None:
        """Serve HistoryRead of every PV from ``storage`` (an asyncua ``HistoryStorageInterface``;
        a :class:`~labctl.server.opcua.history.HistorianStorage` answers raw and processed reads in full).

        Sets Historizing and the HistoryRead access bit on every PV node; UserAccessLevel
        follows. Needs the address space: :meth:`start` calls it for :meth:`serve_history_from`.
        """
        if self._iserver is None or self.nodes is None:
            raise RuntimeError("enable_history() needs a started OPC UA service")
        install_history(self._iserver, storage)
        self._iserver.history = True
        mark_historizing(self._iserver, self.nodes)


def _announce_port(ua_server: LabctlServer, port: int) -> None:
    """Put the port bound for "port 0" into the endpoint descriptions (they were made before binding)."""

    def with_port(url: str) -> str:
        parts = urlparse(url)
        host = parts.hostname or ""
        return parts._replace(netloc=f"[{host}]:{port}" if ":" in host else f"{host}:{port}").geturl()

    for edp in ua_server.iserver.endpoints:
        edp.EndpointUrl = with_port(edp.EndpointUrl)
        edp.Server.DiscoveryUrls = [with_port(u) for u in edp.Server.DiscoveryUrls]


async def _stop_clock(ua_server: LabctlServer) -> None:
    """Cancel asyncua's once-a-second ServerStatus clock, which ``stop()`` would wait up to 1 s for."""
    task = ua_server.iserver.time_task
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        ua_server.iserver.time_task = None
