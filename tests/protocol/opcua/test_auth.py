"""Logins and channel security: passwords, certificates, anonymous access, Basic256Sha256."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from asyncua import Client, ua
from asyncua.ua.uaerrors import UaStatusCodeError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from labctl.clients.connection import application_certificate
from labctl.ioc.types import Identity
from labctl.server.app import Server
from labctl.server.opcua.users import FREE_FAILURES, Refusal, UserDirectory

from .conftest import PASSWORDS, SITE, AuditLog, make_site, ns, password_hash, pv_node


async def whoami(client: Client) -> tuple[str, list[str]]:
    idx = await ns(client)
    user = await client.get_node(ua.NodeId(f"/{SITE}/Session/User", idx)).read_value()
    roles = await client.get_node(ua.NodeId(f"/{SITE}/Session/Roles", idx)).read_value()
    return user, roles


async def test_password_login(connect):
    for user in PASSWORDS:
        assert (await whoami(await connect(user)))[0] == user


@pytest.mark.parametrize(("user", "password"), [("operator", "wrong"), ("nobody", "operator-pw"), ("operator", "")])
async def test_bad_logins_are_refused_and_audited(server, connect, user, password):
    log = AuditLog()
    server.db.add_audit_sink(log.append)
    with pytest.raises(UaStatusCodeError) as e:
        await connect(user, password=password)
    assert e.value.code == ua.StatusCodes.BadUserAccessDenied
    (record,) = log.of("login")
    assert (record.user, record.accepted, record.host) == (user, False, "127.0.0.1")
    assert ("unknown user" if user == "nobody" else "wrong password") in record.reason


async def test_good_logins_are_audited(server, connect):
    log = AuditLog()
    server.db.add_audit_sink(log.append)
    await connect("expert")
    await connect()  # anonymous logins are not worth a record each
    (record,) = log.of("login")
    assert (record.user, record.accepted, record.protocol) == ("expert", True, "opcua")


@pytest.mark.parametrize("security", ["Sign", "SignAndEncrypt"])
async def test_basic256sha256_sessions(connect, security):
    client = await connect("operator", security=security)
    assert client.security_policy.Mode == getattr(ua.MessageSecurityMode, security)
    assert (await whoami(client)) == ("operator", ["operator"])
    node = await pv_node(client, "LAB:TEMP")
    await node.write_value(ua.DataValue(ua.Variant(8.0, ua.VariantType.Double)))
    assert await node.read_value() == 8.0


async def test_endpoints_follow_the_site_file(tmp_path, connect_to):
    srv = Server(make_site(tmp_path, security=["Basic256Sha256_SignAndEncrypt"], anonymous=False))
    await srv.start()
    try:
        url = srv.service("opcua").url
        probe = Client(url)
        endpoints = await probe.connect_and_get_server_endpoints()
        offered = {(e.SecurityPolicyUri.rsplit("#", 1)[-1], e.SecurityMode) for e in endpoints}
        assert offered == {("Basic256Sha256", ua.MessageSecurityMode.SignAndEncrypt)}
        tokens = {t.TokenType for e in endpoints for t in e.UserIdentityTokens}
        assert tokens == {ua.UserTokenType.UserName}, "no anonymous token when the site disables it"
        with pytest.raises(UaStatusCodeError):
            await connect_to(url, security="SignAndEncrypt")  # anonymous
        client = await connect_to(url, "viewer", security="SignAndEncrypt")
        assert (await whoami(client))[0] == "viewer"
    finally:
        await srv.stop()


async def test_unencrypted_password_over_unsecured_channel_is_refused(tmp_path, connect_to):
    srv = Server(make_site(tmp_path, security=["None"]))
    log = AuditLog()
    srv.db.add_audit_sink(log.append)
    await srv.start()
    try:
        url = srv.service("opcua").url
        with pytest.raises(UaStatusCodeError) as e:
            await connect_to(url, "operator")
        assert e.value.code == ua.StatusCodes.BadIdentityTokenRejected
        assert "unencrypted" in log.of("login")[0].reason
        assert (await whoami(await connect_to(url)))[0] == "anonymous"
    finally:
        await srv.stop()


def _user_certificate(tmp_path, name: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key, str(path)


async def test_certificate_login(tmp_path, connect_to):
    robot_cert, robot_key, robot_path = _user_certificate(tmp_path, "robot")
    stranger_cert, stranger_key, _ = _user_certificate(tmp_path, "stranger")
    app_cert_path = tmp_path / "app.der"
    app_cert_path.write_bytes(application_certificate()[0])
    users = (
        "users:\n"
        f'  - {{name: robot, roles: [operator], certificate: "{robot_path}"}}\n'
        f'  - {{name: appuser, roles: [admin], certificate: "{app_cert_path}"}}\n'
        f'  - {{name: viewer, roles: [viewer], password_hash: "{password_hash("viewer")}"}}\n'
    )
    srv = Server(make_site(tmp_path, users=users))
    await srv.start()
    try:
        url = srv.service("opcua").url
        for cert, key, expected in ((robot_cert, robot_key, "robot"), (stranger_cert, stranger_key, None)):
            client = Client(url, timeout=10)
            client.session_timeout = 600_000
            client.user_certificate, client.user_private_key = cert, key
            if expected is None:
                with pytest.raises(UaStatusCodeError) as e:
                    await client.connect()
                assert e.value.code == ua.StatusCodes.BadUserAccessDenied
                await client.disconnect()
                continue
            await client.connect()
            try:
                assert (await whoami(client)) == ("robot", ["operator"])
            finally:
                await client.disconnect()
        # The channel's application certificate is not a user login: anonymous stays anonymous.
        client = await connect_to(url, security="SignAndEncrypt")
        assert (await whoami(client))[0] == "anonymous"
    finally:
        await srv.stop()


async def test_repeated_failures_slow_down_one_account_from_one_address():
    now = [1000.0]
    directory = UserDirectory(make_site_users(), clock=lambda: now[0])
    for _ in range(FREE_FAILURES):
        assert isinstance(await directory.login("operator", "guess", "10.0.0.9"), Refusal)
    blocked = await directory.login("operator", PASSWORDS["operator"], "10.0.0.9")
    assert isinstance(blocked, Refusal) and "too many failed logins" in blocked.reason
    assert isinstance(await directory.login("viewer", PASSWORDS["viewer"], "10.0.0.9"), Identity), "other accounts are unaffected"
    assert isinstance(await directory.login("operator", PASSWORDS["operator"], "10.0.0.2"), Identity), "other addresses are unaffected"
    now[0] += 1.5
    identity = await directory.login("operator", PASSWORDS["operator"], "10.0.0.9")
    assert isinstance(identity, Identity) and identity.roles == frozenset({"operator"})
    assert isinstance(await directory.login("operator", "guess", "10.0.0.9"), Refusal)
    assert isinstance(await directory.login("operator", PASSWORDS["operator"], "10.0.0.9"), Identity), "a success resets the count"


def test_anonymous_can_be_disabled():
    assert isinstance(UserDirectory(make_site_users(), anonymous=False).authenticate(None), Refusal)
    anon = UserDirectory(make_site_users()).authenticate(None)
    assert isinstance(anon, Identity) and anon.roles == frozenset()


def make_site_users():
    return make_site(Path("/nonexistent")).users  # parsed only; nothing is created there
