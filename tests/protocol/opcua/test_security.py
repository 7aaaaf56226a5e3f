"""Security of OPC UA logins and channels: replayed and cleartext passwords, the client
certificate trust list (and ``labctl pki``), and login throttling per source address."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import types
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from asyncua import Client, ua
from asyncua.crypto import uacrypto
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from asyncua.ua.ua_binary import uatcp_to_binary
from asyncua.ua.uaerrors import UaStatusCodeError
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from labctl.ioc.types import Identity
from labctl.server.app import Server
from labctl.server.cli import main as labctl
from labctl.server.opcua.trust import CertificateRefused, TrustList, thumbprint
from labctl.server.opcua.users import FREE_FAILURES, HOLD_PER_SOURCE, LoginThrottle, Refusal, UserDirectory

from tests.helpers import wait_for

from .conftest import PASSWORDS, AuditLog, make_site
from .test_auth import whoami

S = ua.StatusCodes
NOW = dt.datetime.now(dt.UTC)


# ---- helpers ----------------------------------------------------------------------------


async def started(tmp_path: Path, **kw: Any) -> tuple[Server, AuditLog, str]:
    srv = Server(make_site(tmp_path, **kw))
    log = AuditLog()
    srv.db.add_audit_sink(log.append)
    await srv.start()
    return srv, log, srv.service("opcua").url


class CapturingClient(Client):
    """asyncua's client that keeps the user token it sent."""

    captured: Any = None

    def _add_user_auth(self, params: ua.ActivateSessionParameters, username: str | None, password: str | None) -> None:
        super()._add_user_auth(params, username, password)
        self.captured = params.UserIdentityToken


class CraftedTokenClient(Client):
    """asyncua's client that sends a given user token instead of making one."""

    token: Any = None

    def __init__(self, url: str, token: Any) -> None:
        super().__init__(url, timeout=10)
        self.token = token
        self.set_user(token.UserName)  # asyncua makes a user token only when a user is set

    def _add_user_auth(self, params: ua.ActivateSessionParameters, username: str | None, password: str | None) -> None:
        params.UserIdentityToken = self.token


def cleartext_token(user: str) -> ua.UserNameIdentityToken:
    return ua.UserNameIdentityToken(PolicyId="username", UserName=user, Password=PASSWORDS[user].encode(), EncryptionAlgorithm=None)


def application_certificate(
    tmp_path: Path, name: str, *, not_before: dt.datetime | None = None, not_after: dt.datetime | None = None, issuer: tuple[x509.Certificate, Any] | None = None
) -> tuple[Path, Path, x509.Certificate]:
    """A client application certificate and key (DER files), self-signed or issued by ``issuer``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - dt.timedelta(days=1))
        .not_valid_after(not_after or NOW + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"urn:test:{name}")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, True, True, True, False, False, False, False, False), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    cert_path, key_path = tmp_path / f"{name}.der", tmp_path / f"{name}.key.der"
    cert_path.write_bytes(cert.public_bytes(Encoding.DER))
    key_path.write_bytes(key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption()))
    return cert_path, key_path, cert


def ca_certificate(name: str) -> tuple[x509.Certificate, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


async def connect_with_certificate(url: str, cert: Path, key: Path, user: str | None = None, mode: ua.MessageSecurityMode = ua.MessageSecurityMode.Sign) -> Client:
    client = Client(url, timeout=10)
    client.application_uri = "urn:test:client"
    if user:
        client.set_user(user)
        client.set_password(PASSWORDS[user])
    await client.set_security(SecurityPolicyBasic256Sha256, uacrypto.CertProperties(cert, "der"), uacrypto.CertProperties(key, "der"), mode=mode)
    try:
        await client.connect()
    except BaseException:
        await _quiet_disconnect(client)
        raise
    return client


async def _quiet_disconnect(client: Client) -> None:
    try:
        await client.disconnect()
    except Exception:  # already broken
        pass


async def user_of(client: Client) -> str:
    return (await whoami(client))[0]


# ---- replay and cleartext ---------------------------------------------------------------


async def test_a_captured_user_token_is_refused_in_another_session(tmp_path):
    srv, log, url = await started(tmp_path)
    try:
        first = CapturingClient(url, timeout=10)
        first.set_user("operator")
        first.set_password(PASSWORDS["operator"])
        await first.connect()  # over None: the password is encrypted with the server certificate and the session nonce
        assert first.captured.EncryptionAlgorithm, "asyncua encrypts the password over None"
        assert await user_of(first) == "operator"
        await first.disconnect()

        replay = CraftedTokenClient(url, first.captured)
        with pytest.raises(UaStatusCodeError) as e:
            await replay.connect()
        await _quiet_disconnect(replay)
        assert e.value.code == S.BadIdentityTokenRejected
        refused = [r for r in log.of("login") if not r.accepted]
        assert len(refused) == 1 and refused[0].user == "operator" and "not made for this session" in refused[0].reason
    finally:
        await srv.stop()


async def test_a_cleartext_password_over_sign_is_refused_and_over_sign_and_encrypt_accepted(tmp_path):
    srv, log, url = await started(tmp_path)  # the test site trusts client certificates automatically
    cert, key, _ = application_certificate(tmp_path, "cleartext")
    try:
        for mode in (ua.MessageSecurityMode.Sign, ua.MessageSecurityMode.None_):
            client = CraftedTokenClient(url, cleartext_token("operator"))
            if mode != ua.MessageSecurityMode.None_:
                await client.set_security(SecurityPolicyBasic256Sha256, uacrypto.CertProperties(cert, "der"), uacrypto.CertProperties(key, "der"), mode=mode)
            with pytest.raises(UaStatusCodeError) as e:
                await client.connect()
            await _quiet_disconnect(client)
            assert e.value.code == S.BadIdentityTokenRejected, mode
        assert [r.reason for r in log.of("login")] == ["password sent unencrypted over a channel that does not encrypt"] * 2

        client = CraftedTokenClient(url, cleartext_token("operator"))
        await client.set_security(SecurityPolicyBasic256Sha256, uacrypto.CertProperties(cert, "der"), uacrypto.CertProperties(key, "der"), mode=ua.MessageSecurityMode.SignAndEncrypt)
        await client.connect()  # the channel encrypts it
        try:
            assert await user_of(client) == "operator"
        finally:
            await client.disconnect()
    finally:
        await srv.stop()


async def test_asyncua_clients_log_in_over_each_policy(tmp_path):
    srv, _, url = await started(tmp_path)
    cert, key, _ = application_certificate(tmp_path, "each")
    try:
        client = Client(url, timeout=10)
        client.set_user("viewer")
        client.set_password(PASSWORDS["viewer"])
        await client.connect()
        assert await user_of(client) == "viewer"
        await client.disconnect()
        for mode in (ua.MessageSecurityMode.Sign, ua.MessageSecurityMode.SignAndEncrypt):
            client = await connect_with_certificate(url, cert, key, "viewer", mode)
            assert await user_of(client) == "viewer"
            await client.disconnect()
    finally:
        await srv.stop()


# ---- client certificates ------------------------------------------------------------------


async def test_unknown_certificate_is_rejected_kept_and_accepted_after_labctl_pki_trust(tmp_path, capsys):
    srv, log, url = await started(tmp_path, trust="list")
    state = tmp_path / "state"
    rejected = state / "pki" / "rejected" / "certs"
    cert, key, x = application_certificate(tmp_path, "unknown-app")
    try:
        with pytest.raises(UaStatusCodeError) as e:
            await connect_with_certificate(url, cert, key, "operator")
        assert e.value.code == S.BadCertificateUntrusted
        assert [p.name for p in rejected.iterdir()] == [f"unknown-app [{thumbprint(x.public_bytes(Encoding.DER))}].der"]
        assert "is not trusted" in log.of("login")[-1].reason and not log.of("login")[-1].accepted

        assert labctl(["pki", "list", "--state-dir", str(state)]) == 0
        assert "rejected" in capsys.readouterr().out
        assert labctl(["pki", "trust", thumbprint(x.public_bytes(Encoding.DER))[:12], "--state-dir", str(state)]) == 0
        assert not list(rejected.iterdir())

        client = await connect_with_certificate(url, cert, key, "operator")
        try:
            assert await user_of(client) == "operator"
        finally:
            await client.disconnect()

        assert labctl(["pki", "reject", thumbprint(x.public_bytes(Encoding.DER))[:12], "--state-dir", str(state)]) == 0
        with pytest.raises(UaStatusCodeError) as e:
            await connect_with_certificate(url, cert, key)
        assert e.value.code == S.BadCertificateUntrusted
    finally:
        await srv.stop()


@pytest.mark.parametrize(
    ("not_before", "not_after"),
    [(NOW - dt.timedelta(days=30), NOW - dt.timedelta(days=1)), (NOW + dt.timedelta(days=1), NOW + dt.timedelta(days=30))],
    ids=["expired", "not-yet-valid"],
)
async def test_certificates_outside_their_validity_are_refused_even_when_trusted(tmp_path, not_before, not_after):
    srv, log, url = await started(tmp_path, trust="auto")  # auto-accept never accepts an invalid time
    cert, key, _ = application_certificate(tmp_path, "timely", not_before=not_before, not_after=not_after)
    trusted = tmp_path / "state" / "pki" / "trusted" / "certs"
    (trusted / "timely.der").write_bytes(cert.read_bytes())
    try:
        with pytest.raises(UaStatusCodeError) as e:
            await connect_with_certificate(url, cert, key, "operator")
        assert e.value.code == S.BadCertificateTimeInvalid
        assert not list((tmp_path / "state" / "pki" / "rejected" / "certs").iterdir())
        assert "valid" in log.of("login")[-1].reason or "expired" in log.of("login")[-1].reason
    finally:
        await srv.stop()


def test_trust_list_chains_and_revocation(tmp_path):
    trust = TrustList(tmp_path / "pki")
    trust.create()
    ca, ca_key = ca_certificate("lab CA")
    _, _, leaf = application_certificate(tmp_path, "issued", issuer=(ca, ca_key))
    leaf_der = leaf.public_bytes(Encoding.DER)
    with pytest.raises(CertificateRefused) as e:
        trust.check(leaf_der)
    assert e.value.status == S.BadCertificateUntrusted
    (trust.folder("trusted/certs") / "ca.der").write_bytes(ca.public_bytes(Encoding.DER))
    trust.check(leaf_der)  # issued by a trusted CA

    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(NOW - dt.timedelta(hours=1))
        .next_update(NOW + dt.timedelta(days=1))
        .add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(leaf.serial_number).revocation_date(NOW - dt.timedelta(hours=1)).build())
        .sign(ca_key, hashes.SHA256())
    )
    (trust.folder("trusted/crl") / "ca.crl").write_bytes(crl.public_bytes(Encoding.DER))
    with pytest.raises(CertificateRefused) as e:
        trust.check(leaf_der)
    assert e.value.status == S.BadCertificateRevoked

    # a CA in issuers/ completes a chain but is not an anchor by itself
    other_ca, other_key = ca_certificate("other CA")
    _, _, other_leaf = application_certificate(tmp_path, "other", issuer=(other_ca, other_key))
    (trust.folder("issuers/certs") / "other.der").write_bytes(other_ca.public_bytes(Encoding.DER))
    with pytest.raises(CertificateRefused):
        trust.check(other_leaf.public_bytes(Encoding.DER))


# ---- throttling -----------------------------------------------------------------------------


async def test_a_flood_from_one_address_does_not_lock_the_user_out_from_another(tmp_path):
    directory = UserDirectory(make_site(tmp_path).users, clock=lambda: 1000.0)
    for _ in range(50):
        assert isinstance(await directory.login("admin", "guess", "10.0.0.66"), Refusal)
        assert isinstance(await directory.login(f"nobody{_}", "guess", "10.0.0.66"), Refusal)
    blocked = await directory.login("admin", PASSWORDS["admin"], "10.0.0.66")
    assert isinstance(blocked, Refusal) and "too many failed logins" in blocked.reason
    assert isinstance(await directory.login("admin", PASSWORDS["admin"], "10.0.0.7"), Identity)


def test_throttle_backs_off_per_address_and_forgets_on_success():
    t = LoginThrottle(free_failures=3, free_source_failures=5, max_backoff_s=8)
    for _ in range(3):
        assert t.check("a", "h1", 0.0) is None
        t.failed("a", "h1", 0.0)
    assert "of 'a' from h1" in (t.check("a", "h1", 0.5) or "")
    assert t.check("b", "h1", 0.5) is None and t.check("a", "h2", 0.5) is None
    t.failed("b", "h1", 0.5)
    t.failed("c", "h1", 0.5)
    assert "from h1" in (t.check("z", "h1", 0.6) or ""), "the address as a whole"
    for _ in range(10):
        t.failed("a", "h1", 0.6)
    assert t.check("a", "h1", 8.7) is None, "the back-off is capped at 8 s"
    t.succeeded("a", "h1")
    assert t.check("a", "h1", 8.7) is None


async def test_unknown_and_known_users_both_cost_one_password_check(tmp_path):
    directory = UserDirectory(make_site(tmp_path).users)
    calls = []
    verify = directory.checker.verify

    async def counting(password: str, encoded: str) -> bool:
        calls.append(encoded.split("$")[0])
        return await verify(password, encoded)

    directory.checker.verify = counting  # type: ignore[method-assign]
    await directory.login("nobody", "x", "h")
    await directory.login("operator", "x", "h")
    assert calls == ["scrypt", "scrypt"]


async def test_password_checks_are_bounded(tmp_path):
    directory = UserDirectory(make_site(tmp_path).users, pending_per_source=2)
    results = await asyncio.gather(*(directory.login("operator", "x", "h") for _ in range(5)))
    busy = [r for r in results if isinstance(r, Refusal) and r.status == S.BadTooManyOperations]
    assert len(busy) == 3, "two checks at a time from one address; the rest refused without hashing"


async def test_over_the_wire_a_flood_from_one_address_leaves_another_address_in(tmp_path):
    srv, log, url = await started(tmp_path)
    try:
        for _ in range(FREE_FAILURES + 2):
            flood = Client(url, timeout=10)
            flood.set_user("admin")
            flood.set_password("guess")
            with pytest.raises(UaStatusCodeError):
                await flood.connect()
            await _quiet_disconnect(flood)
        assert "too many failed logins" in log.of("login")[-1].reason

        real = Client(url, timeout=10)
        real.set_user("admin")
        real.set_password(PASSWORDS["admin"])
        real.uaclient.connect_socket = types.MethodType(_connect_from_127_0_0_2, real.uaclient)
        await real.connect()
        try:
            assert await user_of(real) == "admin"
        finally:
            await real.disconnect()
        accepted = [r for r in log.of("login") if r.accepted]
        assert [(r.user, r.host) for r in accepted] == [("admin", "127.0.0.2")]
    finally:
        await srv.stop()


def test_an_address_that_keeps_trying_while_throttled_is_throttled_as_a_whole():
    t = LoginThrottle(free_failures=2, free_source_failures=4, max_backoff_s=8)
    for _ in range(2):
        t.failed("admin", "h1", 0.0)
    assert t.check("admin", "h1", 0.1) is not None and t.source_blocked_for("h1", 0.1) == 0.0
    for _ in range(2):  # refused without hashing, but counted against the address
        t.refused("h1", 0.1)
    assert t.source_blocked_for("h1", 0.2) > 0 and t.check("anyone", "h1", 0.2) is not None
    assert t.source_blocked_for("h2", 0.2) == 0.0


def _hello(url: str) -> bytes:
    hello = ua.Hello()
    hello.EndpointUrl = url
    return uatcp_to_binary(ua.MessageType.Hello, hello)


def _raw_from_127_0_0_2(url: str) -> socket.socket:
    u = urlparse(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=10, source_address=("127.0.0.2", 0))
    sock.sendall(_hello(url))
    return sock


async def test_a_throttled_address_is_held_at_the_door_and_other_addresses_are_served(tmp_path):
    srv, log, url = await started(tmp_path)
    directory = srv.service("opcua").users
    try:
        for _ in range(50):  # bounded: the address is throttled as a whole after 15 failures
            if directory.throttle.source_blocked_for("127.0.0.2", directory.clock()) > 0:
                break
            flood = Client(url, timeout=10)
            flood.uaclient.connect_socket = types.MethodType(_connect_from_127_0_0_2, flood.uaclient)
            flood.set_user("admin")
            flood.set_password("guess")
            with pytest.raises(UaStatusCodeError):
                await flood.connect()
            await _quiet_disconnect(flood)
        assert directory.throttle.source_blocked_for("127.0.0.2", directory.clock()) > 0
        for _ in range(5):  # it keeps trying: its back-off grows past this test's length
            directory.throttle.refused("127.0.0.2", directory.clock())

        held = [await asyncio.to_thread(_raw_from_127_0_0_2, url) for _ in range(HOLD_PER_SOURCE)]
        one_more = await asyncio.to_thread(_raw_from_127_0_0_2, url)
        try:
            one_more.settimeout(10)
            try:  # beyond the held connections, closed at once (reset: the Hello was never read)
                assert await asyncio.to_thread(one_more.recv, 64) == b""
            except ConnectionResetError:
                pass
            for sock in held:  # nothing was read from them: no Acknowledge
                sock.settimeout(0.3)
                with pytest.raises(TimeoutError):
                    sock.recv(64)
            assert srv.service("opcua")._iserver.held["127.0.0.2"] == HOLD_PER_SOURCE

            other = Client(url, timeout=10)  # another address is served at once
            await other.connect()
            try:
                assert await user_of(other) == "anonymous"
            finally:
                await other.disconnect()
        finally:
            for sock in [*held, one_more]:
                sock.close()
        await wait_for(lambda: not srv.service("opcua")._iserver.held, timeout=10)
    finally:
        await srv.stop()


async def _connect_from_127_0_0_2(self: Any, host: str, port: int) -> None:
    """asyncua's UaClient.connect_socket, bound to another loopback address."""
    from asyncua.client.ua_client import UaClientState

    self._set_state(UaClientState.CONNECTING)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().create_connection(self._make_protocol, host, port, local_addr=("127.0.0.2", 0)), self._timeout)
    except BaseException:
        self._set_state(UaClientState.DISCONNECTED)
        raise
    self._set_state(UaClientState.SOCKET_OPEN)
