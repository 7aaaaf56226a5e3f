"""Registration with OPC UA discovery servers (Part 12 Local Discovery Servers).

Theory of operation. A site file may list discovery servers (``server.opcua.discovery``:
:class:`~labctl.server.opcua.config.DiscoveryConfig`). Once the server serves,
:class:`DiscoveryRegistrar` registers it with each of them and again every ``period_s``
(a discovery server forgets a server that has not registered within 10 minutes), and on a
clean stop tells each one it registered with that it is offline (``IsOnline`` false), so
FindServers stops listing it. What it registers (:class:`Registration`) is the server's own
ApplicationUri (``urn:labctl:<site>:<server name>``, distinct for every server of a site),
its ApplicationName, the product URI, and as its discovery URL the endpoint the site
directory publishes: clients then ask the server itself for its endpoints (GetEndpoints),
as Part 4 intends.

Each registration is one short exchange, made with asyncua's client: a TCP connection,
a secure channel (``discovery.security``: by default Basic256Sha256 SignAndEncrypt with
the server's own application certificate, whose ApplicationUri the discovery server
checks against the registered one; the discovery server's certificate is taken from its
GetEndpoints answer, as the registration carries no secret), RegisterServer2 with an
``MdnsDiscoveryConfiguration`` (the name and the capabilities: DA, plus HD with history
and AC with alarms), then the channel closes. A discovery server that answers
RegisterServer2 with BadServiceUnsupported (an older one) gets RegisterServer from then
on, as Part 4 asks. No session is created and no user credential is ever sent.

Why not asyncua's ``Server.register_to_discovery``: it awaits the first registration
(an unreachable discovery server would hold up or fail the start), registers the
configured endpoint rather than the bound one (``0.0.0.0``, or port 0), renews all
discovery servers in one loop that stops at the first one failing and logs every
failed renewal, has no way to register over a secure channel, and its client sends
RegisterServer2 and then RegisterServer both.

A discovery server never stops or slows serving: every discovery URL has its own task
(supervised: :class:`labctl.supervision.Supervisor`), each exchange is bounded by
``timeout_s``, and the server's requests are never waited on. An exchange that fails is
logged once as a WARNING naming the URL and the error (the following failures of the same
outage are DEBUG lines), tried again next period, and the first success after it is logged
once at INFO. The offline registration at stop goes only to discovery servers this server
registered with, all at once, bounded by ``timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from asyncua import Client, ua
from asyncua.crypto import uacrypto
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from labctl.server.opcua.config import DiscoveryConfig

from labctl.supervision import Supervisor

log = logging.getLogger(__name__)

#: Answers of a discovery server that does not know RegisterServer2 (it then gets RegisterServer).
_NO_REGISTER_SERVER2 = (ua.StatusCodes.BadServiceUnsupported, ua.StatusCodes.BadNotImplemented, ua.StatusCodes.BadNotSupported)

#: What can go wrong talking to a discovery server: the network, a timeout, an OPC UA refusal or protocol error.
_PEER_ERRORS = (OSError, TimeoutError, ua.UaError)

_MODES = {
    "Basic256Sha256_Sign": ua.MessageSecurityMode.Sign,
    "Basic256Sha256_SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt,
}


@dataclass(frozen=True)
class Registration:
    """What the server tells a discovery server about itself."""

    application_uri: str
    application_name: str
    product_uri: str
    discovery_urls: tuple[str, ...]
    """Where clients reach the server (its published endpoint)."""
    capabilities: tuple[str, ...] = ("DA",)
    """Server capability identifiers (Part 12, Annex A): DA data access, HD history, AC alarms."""

    def registered_server(self, online: bool) -> ua.RegisteredServer:
        """The RegisteredServer structure, online or not."""
        server = ua.RegisteredServer()
        server.ServerUri = self.application_uri
        server.ProductUri = self.product_uri
        server.ServerNames = [ua.LocalizedText(self.application_name)]
        server.ServerType = ua.ApplicationType.Server
        server.DiscoveryUrls = list(self.discovery_urls)
        server.IsOnline = online
        return server

    def mdns_configuration(self) -> ua.MdnsDiscoveryConfiguration:
        """RegisterServer2's discovery configuration: the name to announce and the capabilities."""
        config = ua.MdnsDiscoveryConfiguration()
        config.MdnsServerName = self.application_name[:63]  # an mDNS label holds at most 63 bytes
        config.ServerCapabilities = list(self.capabilities)
        return config


@dataclass
class DiscoveryStatus:
    """How registering with one discovery server goes."""

    url: str
    attempts: int = 0
    """Registrations tried so far (each a complete exchange, successful or not)."""
    registered: bool = False
    """Whether the latest attempt succeeded."""
    ever_registered: bool = False
    """Whether any attempt succeeded (the server then says it is offline when it stops)."""
    error: str = ""
    """The latest failure ("" after a success)."""
    legacy: bool = False
    """The discovery server answered RegisterServer2 with BadServiceUnsupported: RegisterServer is used."""


@dataclass
class DiscoveryRegistrar:
    """Registers one server with the discovery servers of ``config`` (see the module docstring)."""

    config: DiscoveryConfig
    registration: Registration
    certificate: Path
    """The server's application certificate (DER), for the secure channel."""
    private_key: Path
    """Its private key (PEM)."""
    status: dict[str, DiscoveryStatus] = field(init=False)
    """Per discovery URL, in the order of the site file."""
    _supervisors: list[Supervisor] = field(init=False, default_factory=list)
    _progress: asyncio.Event = field(init=False, default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.status = {url: DiscoveryStatus(url) for url in self.config.urls}

    def start(self) -> None:
        """Start registering, in the background (returns at once)."""
        for url in self.config.urls:
            name = f"OPC UA registration with the discovery server {url}"
            sup = Supervisor(name, lambda url=url: self._keep_registered(url), logger=log)
            sup.start()
            self._supervisors.append(sup)

    async def stop(self) -> None:
        """Stop registering and tell the discovery servers this server registered with that it is offline."""
        supervisors, self._supervisors = self._supervisors, []
        for sup in supervisors:
            await sup.stop()
        urls = [s.url for s in self.status.values() if s.ever_registered]
        if urls:
            await asyncio.gather(*(self._unregister(url) for url in urls))

    async def wait_attempts(self, count: int) -> None:
        """Return once every discovery server has been tried at least ``count`` times."""
        while min(s.attempts for s in self.status.values()) < count:
            await self._progress.wait()

    # ---- one discovery server ---------------------------------------------------------------

    async def _keep_registered(self, url: str) -> None:
        while True:
            await self._attempt(url)
            await asyncio.sleep(self.config.period_s)

    async def _attempt(self, url: str) -> None:
        state = self.status[url]
        try:
            await asyncio.wait_for(self._exchange(url, online=True), self.config.timeout_s)
        except _PEER_ERRORS as e:
            self._failed(state, describe_error(e, self.config.timeout_s))
        else:
            self._registered(state)
        finally:
            state.attempts += 1
            self._progress.set()  # wake the waiters, then arm for the next attempt
            self._progress = asyncio.Event()

    def _registered(self, state: DiscoveryStatus) -> None:
        uri = self.registration.application_uri
        if state.error:
            log.info("OPC UA: registered with the discovery server %s again (as %s)", state.url, uri)
        elif not state.ever_registered:
            log.info("OPC UA: registered with the discovery server %s as %s (again every %g s)", state.url, uri, self.config.period_s)
        else:
            log.debug("OPC UA: registered with the discovery server %s", state.url)
        state.registered = state.ever_registered = True
        state.error = ""

    def _failed(self, state: DiscoveryStatus, error: str) -> None:
        if state.error:
            log.debug("OPC UA: registering with the discovery server %s failed again: %s", state.url, error)
        else:
            log.warning(
                "OPC UA: cannot register with the discovery server %s: %s; serving goes on, retrying every %g s",
                state.url, error, self.config.period_s,
            )  # fmt: skip
        state.registered = False
        state.error = error

    async def _unregister(self, url: str) -> None:
        try:
            await asyncio.wait_for(self._exchange(url, online=False), self.config.timeout_s)
        except _PEER_ERRORS as e:
            log.warning(
                "OPC UA: cannot tell the discovery server %s that this server stops: %s; it lists this server until "
                "the registration lapses", url, describe_error(e, self.config.timeout_s),
            )  # fmt: skip
        else:
            log.info("OPC UA: told the discovery server %s that this server is offline", url)

    async def _exchange(self, url: str, *, online: bool) -> None:
        """One registration: a secure channel to ``url``, RegisterServer2 (or RegisterServer), closed."""
        client = Client(url, timeout=self.config.timeout_s)
        client.application_uri = self.registration.application_uri  # the certificate's, checked by asyncua
        mode = _MODES.get(self.config.security)
        if mode is not None:  # GetEndpoints, over a channel of its own, gives the discovery server's certificate
            endpoint = _endpoint(await client.connect_and_get_server_endpoints(), mode, self.config.security)
            peer = uacrypto.der_from_x509(uacrypto.x509_from_der(endpoint.ServerCertificate))
            await client.set_security(
                SecurityPolicyBasic256Sha256, str(self.certificate), str(self.private_key), server_certificate=peer, mode=mode
            )
        await client.connect_socket()
        try:
            await client.send_hello()
            await client.open_secure_channel()
            await self._register(client, self.status[url], online)
            with contextlib.suppress(*_PEER_ERRORS):  # registered: the socket closes below whatever happens here
                await client.close_secure_channel()
        finally:
            client.disconnect_socket()

    async def _register(self, client: Client, state: DiscoveryStatus, online: bool) -> None:
        server = self.registration.registered_server(online)
        if not state.legacy:
            params = ua.RegisterServer2Parameters()
            params.Server = server
            params.DiscoveryConfiguration = [self.registration.mdns_configuration()]
            try:
                results = await client.uaclient.register_server2(params)
            except ua.UaStatusCodeError as e:
                if e.code not in _NO_REGISTER_SERVER2:
                    raise
                log.info("OPC UA: the discovery server %s does not support RegisterServer2 (%s); using RegisterServer",
                         state.url, ua.StatusCode(e.code).name)
                state.legacy = True
            else:
                _log_configuration_results(state.url, results or [])
                return
        await client.uaclient.register_server(server)


def _endpoint(endpoints: Sequence[ua.EndpointDescription], mode: ua.MessageSecurityMode, name: str) -> ua.EndpointDescription:
    """The discovery server's endpoint of the Basic256Sha256 policy in ``mode``, else a ua.UaError saying what it offers."""
    for ep in endpoints:
        if ep.SecurityPolicyUri == SecurityPolicyBasic256Sha256.URI and ep.SecurityMode == mode and ep.ServerCertificate:
            return ep
    offered = sorted({_policy_name(ep) for ep in endpoints})
    raise ua.UaError(f"it offers no {name} endpoint (it offers: {', '.join(offered) or 'none'}); set discovery.security to one of those")


def _policy_name(ep: ua.EndpointDescription) -> str:
    """An endpoint's security as the site file names it (``None``, ``Basic256Sha256_Sign``...)."""
    policy = (ep.SecurityPolicyUri or "").rsplit("#", 1)[-1] or "None"
    return policy if ep.SecurityMode == ua.MessageSecurityMode.None_ else f"{policy}_{ep.SecurityMode.name}"


def _log_configuration_results(url: str, results: Sequence[ua.StatusCode]) -> None:
    """A discovery server that registered the server but not its mDNS configuration says so per configuration."""
    for status in results:
        if not status.is_good():
            log.debug("OPC UA: the discovery server %s did not take the mDNS configuration: %s", url, status.name)


def describe_error(error: BaseException, timeout_s: float) -> str:
    """A failed exchange with a discovery server, in a few words for the log."""
    if isinstance(error, TimeoutError):
        return f"no answer within {timeout_s:g} s"
    if isinstance(error, ua.UaStatusCodeError):
        return f"{ua.StatusCode(error.code).name}: {error}"
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
