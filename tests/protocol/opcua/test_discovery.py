"""Each server its own ApplicationUri, and registration with OPC UA discovery servers (Part 12).

The discovery server here is asyncua's server, which answers RegisterServer, RegisterServer2
and FindServers. Two things it does not do as a Local Discovery Server must, so
:class:`DiscoveryServer` adds them: it forgets a server that registers with IsOnline false
(asyncua would list it on), and it refuses a registration whose ServerUri is not the
ApplicationUri of a certificate that opened a signed secure channel to it (Part 4,
RegisterServer). FindServers is asked by an independent asyncua client, sessionless, as
discovery clients do.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, Server, ua
from asyncua.crypto.cert_gen import dump_private_key_as_pem, generate_private_key, generate_self_signed_app_certificate
from asyncua.server.internal_server import InternalServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from labctl.ioc.errors import ConfigError
from labctl.server.app import Server as LabctlServer
from labctl.server.opcua import OpcUaService
from labctl.server.opcua.address_space import application_uri
from labctl.server.opcua.pki import CERT_FILE, KEY_FILE, CertificateMismatch, certificate_uris, ensure_certificate
from labctl.server.site import parse_site

from tests.helpers import free_port

from .conftest import SITE, make_site, open_client, pv_node

DISCOVERY_LOG = "labctl.server.opcua.discovery"
NOW = dt.datetime.now(dt.UTC)
POLICIES = [
    ua.SecurityPolicyType.NoSecurity,
    ua.SecurityPolicyType.Basic256Sha256_Sign,
    ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
]


# ---- a Local Discovery Server -----------------------------------------------------------


class DiscoveryServer:
    """A Local Discovery Server on 127.0.0.1 (see the module docstring).

    ``register2=False`` answers RegisterServer2 with BadServiceUnsupported, as a discovery
    server that knows only RegisterServer does.
    """

    def __init__(self, pki: Path, *, port: int = 0, register2: bool = True) -> None:
        self.pki = pki
        self.port = port
        self.register2 = register2
        self.registrations: list[tuple[str, ua.RegisteredServer]] = []
        """(service, what was registered), in order: ``RegisterServer2`` or ``RegisterServer``."""
        self.channel_uris: set[str] = set()
        """ApplicationUris of the certificates that opened signed secure channels."""
        self._changed = asyncio.Event()
        self.server = Server()

    @property
    def url(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.port}"

    async def start(self) -> None:
        lds = self.server
        await lds.init()
        lds.set_endpoint(f"opc.tcp://127.0.0.1:{self.port}")
        lds.set_server_name("test discovery server")
        await lds.set_application_uri("urn:test:lds")
        lds.application_type = ua.ApplicationType.DiscoveryServer
        lds.disable_clock()  # its once-a-second clock would hold up stop() for a second
        cert, key = self._certificate()
        await lds.load_certificate(str(cert))
        await lds.load_private_key(str(key))
        lds.set_security_policy(POLICIES)
        iserver = lds.iserver
        iserver.register_server = self._register  # type: ignore[method-assign]
        iserver.register_server2 = self._register2  # type: ignore[method-assign]
        await lds.start()
        assert lds.bserver is not None
        self.port = lds.bserver.port
        for factory in lds._policies:  # note who opens a signed channel: the certificate's ApplicationUri
            factory.create = self._noting(factory.create)  # type: ignore[method-assign]

    async def stop(self) -> None:
        await self.server.stop()

    def _certificate(self) -> tuple[Path, Path]:
        self.pki.mkdir(parents=True, exist_ok=True)
        key = generate_private_key()
        names = [x509.UniformResourceIdentifier("urn:test:lds"), x509.DNSName(socket.gethostname())]
        cert = generate_self_signed_app_certificate(
            key, "test discovery server", {}, names, extended=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        )
        cert_path, key_path = self.pki / "lds.der", self.pki / "lds.pem"
        cert_path.write_bytes(cert.public_bytes(Encoding.DER))
        key_path.write_bytes(dump_private_key_as_pem(key))
        return cert_path, key_path

    def _noting(self, create: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def noted(peer_certificate: Any) -> Any:
            if peer_certificate:
                self.channel_uris.update(certificate_uris(x509.load_der_x509_certificate(peer_certificate)))
            return create(peer_certificate)

        return noted

    def _register2(self, params: ua.RegisterServer2Parameters) -> list[ua.StatusCode]:
        if not self.register2:
            raise ua.uaerrors.BadServiceUnsupported()
        self._take("RegisterServer2", params.Server, params.DiscoveryConfiguration)
        return [ua.StatusCode() for _ in params.DiscoveryConfiguration or []]

    def _register(self, server: ua.RegisteredServer, conf: Any = None) -> None:
        self._take("RegisterServer", server, conf)

    def _take(self, service: str, server: ua.RegisteredServer, conf: Any) -> None:
        if server.ServerUri not in self.channel_uris:
            raise ua.uaerrors.BadSecurityChecksFailed()
        self.registrations.append((service, server))
        if server.IsOnline:
            InternalServer.register_server(self.server.iserver, server, conf)
        else:
            self.server.iserver._known_servers.pop(server.ServerUri, None)
        self._changed.set()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait for registrations until ``predicate()`` holds."""

        async def wait() -> None:
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), timeout)

    def registered(self, uri: str, *, online: bool = True) -> bool:
        """Whether the latest registration of ``uri`` is online (or offline)."""
        latest = [s for _, s in self.registrations if s.ServerUri == uri]
        return bool(latest) and latest[-1].IsOnline is online

    async def find_servers(self) -> dict[str, ua.ApplicationDescription]:
        """FindServers, as a discovery client asks it: the labctl servers it lists, by ApplicationUri."""
        found = await Client(self.url, timeout=10).connect_and_find_servers()
        return {s.ApplicationUri: s for s in found if s.ApplicationUri.startswith("urn:labctl:")}


@pytest.fixture
async def lds(tmp_path: Path) -> AsyncIterator[DiscoveryServer]:
    server = DiscoveryServer(tmp_path / "lds")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


# ---- servers ---------------------------------------------------------------------------


def server_site(state_dir: Path, *, name: str | None, discovery: str = "", historian: str = "{enabled: false}") -> str:
    """A server's site file: OPC UA on loopback port 0, no Channel Access, two soft PVs."""
    prefix = (name or "single").upper()
    return f"""
site: {SITE}
server:
  state_dir: "{state_dir}"
  {f"name: {name}" if name else ""}
  opcua: {{host: 127.0.0.1, port: 0, trust: auto, security: [None, Basic256Sha256_SignAndEncrypt]{discovery}}}
  ca: {{enabled: false}}
historian: {historian}
autosave: {{enabled: false}}
pvs:
  - {{name: "{prefix}:TEMP", type: float64, unit: K, initial: 4.2}}
  - {{name: "{prefix}:SET", type: float64, initial: 1.0, writable: true}}
"""


def discovery(*urls: str, **settings: Any) -> str:
    """``, discovery: {...}`` for the opcua flow mapping of :func:`server_site`."""
    items = ", ".join([f"urls: [{', '.join(urls)}]", *(f"{k}: {v}" for k, v in settings.items())])
    return f", discovery: {{{items}}}"


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """``await serve(name, **server_site kwargs)`` -> a started server; those still running stop at the end."""
    started: list[LabctlServer] = []

    async def start(name: str | None, **kw: Any) -> LabctlServer:
        text = server_site(tmp_path / (name or "single"), name=name, **kw)
        server = LabctlServer(parse_site(text, f"{name}.yaml"), base_dir=tmp_path)
        await server.start()
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        if not server._stopped.is_set():
            await server.stop()


def opcua(server: LabctlServer) -> OpcUaService:
    return server.service("opcua")  # type: ignore[return-value]


def discovery_lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == DISCOVERY_LOG and r.levelno == level]


# ---- the ApplicationUri ----------------------------------------------------------------


async def test_certificate_names_the_application_uri_of_the_endpoints(tmp_path, serve):
    named = await serve("rack-a")
    single = LabctlServer(make_site(tmp_path / "single"))  # a single server without a name: as before
    await single.start()
    try:
        for server, uri in ((named, f"urn:labctl:{SITE}:rack-a"), (single, f"urn:labctl:{SITE}:server")):
            endpoints = await Client(opcua(server).url, timeout=10).connect_and_get_server_endpoints()
            assert {e.Server.ApplicationUri for e in endpoints} == {uri}
            for e in endpoints:
                cert = x509.load_der_x509_certificate(e.ServerCertificate)
                assert certificate_uris(cert) == [uri], e.SecurityPolicyUri
            client = await open_client(opcua(server).url)
            try:  # the namespace is the site's, whatever the server's name
                assert await client.get_namespace_index(f"urn:labctl:{SITE}") >= 1
            finally:
                await client.disconnect()
    finally:
        await single.stop()


async def test_a_certificate_made_for_the_shared_uri_is_made_anew(tmp_path, serve, caplog):
    pki = tmp_path / "rack-a" / "pki"
    ensure_certificate(pki, application_uri(SITE), f"labctl {SITE}")  # what an older labctl made for every server
    old_key = (pki / KEY_FILE).read_bytes()
    with caplog.at_level(logging.WARNING, logger="labctl.server.opcua.pki"):
        await serve("rack-a")
    cert = x509.load_der_x509_certificate((pki / CERT_FILE).read_bytes())
    assert certificate_uris(cert) == [f"urn:labctl:{SITE}:rack-a"]
    assert (pki / KEY_FILE).read_bytes() == old_key, "the key stays"
    [line] = [r.getMessage() for r in caplog.records if r.name == "labctl.server.opcua.pki"]
    assert f"is for urn:labctl:{SITE}:server, not this server's ApplicationUri urn:labctl:{SITE}:rack-a" in line
    assert "clients must trust it again" in line


def supplied_certificate(pki: Path, uri: str) -> bytes:
    """An operator's certificate for ``uri``, issued by a CA, with its key, in place of labctl's; its bytes."""
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lab CA")])
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rack-a")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri), x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pki.mkdir(parents=True)
    data = cert.public_bytes(Encoding.DER)
    (pki / CERT_FILE).write_bytes(data)
    (pki / KEY_FILE).write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    return data


async def test_a_supplied_certificate_for_another_uri_is_refused_not_replaced(tmp_path, serve):
    pki = tmp_path / "rack-a" / "pki"
    data = supplied_certificate(pki, application_uri(SITE))
    with pytest.raises(CertificateMismatch) as refused:
        await serve("rack-a")
    message = str(refused.value)
    assert f"is for urn:labctl:{SITE}:server, not this server's ApplicationUri urn:labctl:{SITE}:rack-a" in message
    assert str(pki / CERT_FILE) in message
    assert (pki / CERT_FILE).read_bytes() == data, "the operator's certificate is left alone"


async def test_a_supplied_certificate_for_the_uri_is_used(tmp_path, serve):
    pki = tmp_path / "rack-a" / "pki"
    data = supplied_certificate(pki, f"urn:labctl:{SITE}:rack-a")
    server = await serve("rack-a")
    endpoints = await Client(opcua(server).url, timeout=10).connect_and_get_server_endpoints()
    assert {e.ServerCertificate for e in endpoints} == {data}
    assert (pki / CERT_FILE).read_bytes() == data


# ---- registration ----------------------------------------------------------------------


async def test_the_servers_of_a_site_register_and_a_stopped_one_goes(pg_database, lds, serve):
    historian = f'{{url: "{pg_database.url}", batch_age_s: 0.05}}'
    servers = {
        name: await serve(name, historian=historian, discovery=discovery(lds.url))
        for name in ("rack-a", "rack-b")
    }
    uris = {name: f"urn:labctl:{SITE}:{name}" for name in servers}
    assert {name: opcua(s).application_uri for name, s in servers.items()} == uris
    await lds.wait_until(lambda: all(lds.registered(uri) for uri in uris.values()))

    found = await lds.find_servers()
    assert set(found) == set(uris.values()), "two servers of one site, two registrations"
    for name, server in servers.items():
        entry = found[uris[name]]
        assert entry.DiscoveryUrls == [f"opc.tcp://127.0.0.1:{opcua(server).port}"]
        assert entry.ApplicationName.Text == f"labctl {SITE} {name}"
        assert entry.ApplicationType == ua.ApplicationType.Server and entry.ProductUri == "urn:labctl"
    kinds = {(service, s.ServerUri) for service, s in lds.registrations}
    assert kinds == {("RegisterServer2", uri) for uri in uris.values()}, "RegisterServer2 only, never both"
    assert set(uris.values()) <= lds.channel_uris, "over secure channels opened with the servers' own certificates"

    await servers["rack-a"].stop()
    assert lds.registered(uris["rack-a"], online=False), "a clean stop registers IsOnline=false"
    assert set(await lds.find_servers()) == {uris["rack-b"]}
    client = await open_client(opcua(servers["rack-b"]).url)
    try:
        assert await (await pv_node(client, "RACK-B:TEMP")).read_value() == 4.2
    finally:
        await client.disconnect()


async def test_registration_is_renewed_every_period(lds, serve):
    server = await serve("rack-a", discovery=discovery(lds.url, period_s=0.05, security="Basic256Sha256_Sign"))
    uri = opcua(server).application_uri
    await lds.wait_until(lambda: sum(s.ServerUri == uri for _, s in lds.registrations) >= 3)
    assert all(s.IsOnline for _, s in lds.registrations)


async def test_an_unreachable_discovery_server_is_logged_once_and_serving_goes_on(serve, caplog):
    port = free_port()  # nothing listens there: connections are refused
    url = f"opc.tcp://127.0.0.1:{port}"
    with caplog.at_level(logging.DEBUG, logger=DISCOVERY_LOG):
        server = await serve("rack-a", discovery=discovery(url, period_s=0.02))
        registrar = opcua(server).discovery
        assert registrar is not None
        await asyncio.wait_for(registrar.wait_attempts(4), 10)
        client = await open_client(opcua(server).url)
        try:
            assert await (await pv_node(client, "RACK-A:TEMP")).read_value() == 4.2
        finally:
            await client.disconnect()
        await server.stop()
    [warning] = discovery_lines(caplog, logging.WARNING)
    assert f"cannot register with the discovery server {url}: " in warning
    assert "Connect call failed" in warning and "retrying every 0.02 s" in warning
    assert not discovery_lines(caplog, logging.INFO), "nothing registered, so nothing to unregister at stop"
    assert registrar.status[url].attempts >= 4 and not registrar.status[url].ever_registered


async def test_a_discovery_server_that_comes_back_is_registered_with_and_logged_once(tmp_path, serve, caplog):
    lds = DiscoveryServer(tmp_path / "lds", port=free_port())
    with caplog.at_level(logging.INFO, logger=DISCOVERY_LOG):
        server = await serve("rack-a", discovery=discovery(lds.url, period_s=0.02))
        registrar = opcua(server).discovery
        assert registrar is not None
        await asyncio.wait_for(registrar.wait_attempts(2), 10)
        await lds.start()
        try:
            await lds.wait_until(lambda: len(lds.registrations) >= 3)
            assert set(await lds.find_servers()) == {f"urn:labctl:{SITE}:rack-a"}
        finally:
            await server.stop()
            await lds.stop()
    assert len(discovery_lines(caplog, logging.WARNING)) == 1
    infos = discovery_lines(caplog, logging.INFO)
    assert infos == [
        f"OPC UA: registered with the discovery server {lds.url} again (as urn:labctl:{SITE}:rack-a)",
        f"OPC UA: told the discovery server {lds.url} that this server is offline",
    ]


async def test_a_discovery_server_without_register_server2_gets_register_server(tmp_path, serve, caplog):
    lds = DiscoveryServer(tmp_path / "lds", register2=False)
    await lds.start()
    try:
        with caplog.at_level(logging.INFO, logger=DISCOVERY_LOG):
            server = await serve("rack-a", discovery=discovery(lds.url, period_s=0.05))
            uri = opcua(server).application_uri
            await lds.wait_until(lambda: len(lds.registrations) >= 2)
            assert set(await lds.find_servers()) == {uri}
            await server.stop()
        assert {service for service, _ in lds.registrations} == {"RegisterServer"}
        assert lds.registered(uri, online=False)
        assert sum("does not support RegisterServer2" in line for line in discovery_lines(caplog, logging.INFO)) == 1
    finally:
        await lds.stop()


async def test_a_registration_the_discovery_server_refuses_is_a_warning(lds, serve, caplog):
    with caplog.at_level(logging.WARNING, logger=DISCOVERY_LOG):
        server = await serve("rack-a", discovery=discovery(lds.url, security="None"))
        registrar = opcua(server).discovery
        assert registrar is not None
        await asyncio.wait_for(registrar.wait_attempts(1), 10)
    [warning] = discovery_lines(caplog, logging.WARNING)
    assert "BadSecurityChecksFailed" in warning, "unsigned: the discovery server cannot check the ApplicationUri"
    assert not lds.registrations


# ---- the site file ---------------------------------------------------------------------


KEY = "server.opcua.discovery"


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("{urls: [http://lds.lab]}", f"{KEY}.urls[0]: expected an opc.tcp:// URL of a discovery server, got 'http://lds.lab'"),
        ("{urls: []}", f"{KEY}.urls: list at least one discovery server URL (or leave discovery out)"),
        ("{period_s: 60}", f"{KEY}.urls: required key is missing"),
        ("{urls: [opc.tcp://lds:4840, opc.tcp://LDS]}", f"{KEY}.urls: 'opc.tcp://lds:4840' is listed twice"),
        ("{urls: [opc.tcp://lds], period_s: 3600}", f"{KEY}.period_s: input should be less than or equal to 600, got 3600"),
        ("{urls: [opc.tcp://lds], timeout_s: 0}", f"{KEY}.timeout_s: input should be greater than 0, got 0"),
        ("{urls: [opc.tcp://lds], user: x}", f"{KEY}.user: unknown key"),
    ],
)
def test_discovery_settings_are_checked(tmp_path, setting, expected):
    text = server_site(tmp_path, name="rack-a", discovery=f", discovery: {setting}")
    with pytest.raises(ConfigError) as e:
        parse_site(text, "site.yaml")
    assert any(expected in line for line in e.value.problems), e.value.problems


def test_discovery_defaults(tmp_path):
    site = parse_site(server_site(tmp_path, name="rack-a", discovery=discovery("opc.tcp://lds.lab")), "site.yaml")
    config = site.server.opcua.discovery
    assert config is not None
    assert (config.urls, config.period_s, config.timeout_s, config.security) == (
        ("opc.tcp://lds.lab:4840",), 60.0, 5.0, "Basic256Sha256_SignAndEncrypt"
    )


# ---- a labctl server is no discovery server -----------------------------------------------------


async def test_a_labctl_server_refuses_registrations_and_lists_only_itself(serve):
    """asyncua would keep any server an anonymous client registers, without bound, and list it in FindServers."""
    server = await serve("rack-a")
    url = opcua(server).url
    evil = ua.RegisteredServer()
    evil.ServerUri, evil.ProductUri, evil.IsOnline = "urn:evil", "urn:evil", True
    evil.ServerNames = [ua.LocalizedText("evil")]
    evil.ServerType = ua.ApplicationType.Server
    evil.DiscoveryUrls = ["opc.tcp://evil.example:4840"]
    client = Client(url, timeout=10)
    await client.connect_socket()
    try:
        await client.send_hello()
        await client.open_secure_channel()
        with pytest.raises(ua.uaerrors.BadServiceUnsupported):
            await client.uaclient.register_server(evil)
        params = ua.RegisterServer2Parameters()
        params.Server = evil
        params.DiscoveryConfiguration = [ua.MdnsDiscoveryConfiguration(MdnsServerName="evil", ServerCapabilities=["DA"])]
        with pytest.raises(ua.uaerrors.BadServiceUnsupported):
            await client.uaclient.register_server2(params)
        found = await client.find_servers()
    finally:
        await client.close_secure_channel()
        client.disconnect_socket()
    assert [s.ApplicationUri for s in found] == [f"urn:labctl:{SITE}:rack-a"]
    read = await open_client(url)  # and it serves on
    try:
        assert await (await pv_node(read, "RACK-A:TEMP")).read_value() == pytest.approx(4.2)
    finally:
        await read.disconnect()
