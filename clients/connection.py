"""Opening the OPC UA connection to a labctl server: security, application certificate, login.

Theory of operation. :func:`open_client` opens an asyncua client session to a server's
endpoint as a user (or anonymously), with the security the caller asks for (``auto``
picks the most secure Basic256Sha256 mode the server offers, else None). Basic256Sha256
needs a client application certificate: the caller's, or one made once per process
(:func:`application_certificate`). Every failure -- no answer, connection refused, login
refused, security not offered -- becomes one :class:`~labctl.clients.errors.ConnectError`
whose sentence says which (a refused login is its subclass
:class:`~labctl.clients.errors.LoginRefused`), and the half-open client is disconnected.

:func:`labctl.clients.session.connect` builds a :class:`~labctl.clients.session.Session`
on the client this opens.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from asyncua import Client, ua
from asyncua.crypto import uacrypto
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from asyncua.ua.uaerrors import UaError, UaStatusCodeError
from labctl.clients.errors import ConnectError, LoginRefused
from labctl.clients.values import status_name

log = logging.getLogger(__name__)

CLIENT_URI = "urn:labctl:client"
#: Security choices: ``auto`` picks the most secure one the server offers.
SECURITY = ("auto", "None", "Sign", "SignAndEncrypt")
_MODES = {
    "Sign": ua.MessageSecurityMode.Sign,
    "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt,
    "Basic256Sha256_Sign": ua.MessageSecurityMode.Sign,
    "Basic256Sha256_SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt,
}

_S = ua.StatusCodes


def client_pki_dir() -> Path:
    """Where this user's client application certificate is kept: ``LABCTL_CLIENT_PKI``, else ``~/.config/labctl/pki``."""
    env = os.environ.get("LABCTL_CLIENT_PKI")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "labctl" / "pki"


@functools.cache
def application_certificate() -> tuple[bytes, bytes]:
    """This user's application certificate and key (DER): made once, then kept in :func:`client_pki_dir`.

    Basic256Sha256 needs a client application certificate, and a server that keeps a trust
    list (labctl's, UaExpert's...) trusts a certificate once: so the same one is used by every
    command and session of this user (``client_cert.der``, with its key ``client_key.der``
    readable by the user only), renewed when it is within a week of expiring. Where the
    folder cannot be written, one is made for this process only (and said so in the log).
    """
    from cryptography import x509

    folder = client_pki_dir()
    cert_path, key_path = folder / "client_cert.der", folder / "client_key.der"
    try:
        cert, key = cert_path.read_bytes(), key_path.read_bytes()
        expires = x509.load_der_x509_certificate(cert).not_valid_after_utc.timestamp()
        if expires - time.time() > 7 * 86400:
            return cert, key
    except (OSError, ValueError):
        pass
    cert, key = _new_certificate()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write(key_path, key, 0o600)
        _write(cert_path, cert, 0o644)
    except OSError as e:
        log.warning("cannot keep the client certificate in %s (%s); using one for this process only", folder, e)
    return cert, key


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _new_certificate() -> tuple[bytes, bytes]:
    from asyncua.crypto.cert_gen import generate_private_key, generate_self_signed_app_certificate
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = generate_private_key()
    names = [x509.UniformResourceIdentifier(CLIENT_URI), x509.DNSName(socket.gethostname())]
    cert = generate_self_signed_app_certificate(
        key, "labctl client", {"organizationName": "labctl"}, names, extended=[ExtendedKeyUsageOID.CLIENT_AUTH], days=365
    )
    return cert.public_bytes(Encoding.DER), key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())


async def open_client(
    url: str,
    user: str | None = None,
    password: str | None = None,
    security: str = "auto",
    *,
    timeout_s: float = 10.0,
    certificate: str | None = None,
    private_key: str | None = None,
) -> Client:
    """Open an asyncua client session to a server (arguments as :func:`labctl.clients.session.connect`).

    Raises:
        ConnectError: unreachable, login refused, or the security is not offered.
    """
    if security not in SECURITY and security not in _MODES:
        raise ConnectError(f"unknown security {security!r}; choose one of {', '.join(SECURITY)}")
    client = Client(url, timeout=timeout_s)
    client.name = client.description = "labctl client"
    client.application_uri = CLIENT_URI
    client.session_timeout = 600_000  # what labctl servers grant at most; avoids a revision warning
    if user:
        client.set_user(user)
        client.set_password(password or "")
    try:
        async with asyncio.timeout(timeout_s * 2):
            mode = await _choose_security(client, security)
            if mode is not None:
                if certificate is not None and private_key is not None:
                    cert: Any = uacrypto.CertProperties(certificate)
                    key: Any = uacrypto.CertProperties(private_key)
                else:
                    cert_der, key_der = await asyncio.to_thread(application_certificate)
                    cert, key = uacrypto.CertProperties(cert_der, "der"), uacrypto.CertProperties(key_der, "der")
                await client.set_security(SecurityPolicyBasic256Sha256, cert, key, mode=mode)
            await client.connect()
    except TimeoutError:
        await disconnect_quietly(client)
        raise ConnectError(f"{url}: no answer within {timeout_s * 2:g} s") from None
    except ConnectError:
        await disconnect_quietly(client)
        raise
    except UaStatusCodeError as e:
        await disconnect_quietly(client)
        raise _login_error(url, user, e) from None
    except ConnectionRefusedError:
        await disconnect_quietly(client)
        raise ConnectError(f"cannot connect to {url}: connection refused (is a labctl server running there?)") from None
    except (OSError, UaError) as e:
        await disconnect_quietly(client)
        raise ConnectError(f"cannot connect to {url}: {e}") from None
    return client


async def _choose_security(client: Client, security: str) -> ua.MessageSecurityMode | None:
    if security == "None":
        return None
    endpoints = await client.connect_and_get_server_endpoints()
    offered = {e.SecurityMode for e in endpoints if e.SecurityPolicyUri == SecurityPolicyBasic256Sha256.URI}
    has_none = any(e.SecurityMode == ua.MessageSecurityMode.None_ for e in endpoints)
    if security == "auto":
        for mode in (ua.MessageSecurityMode.SignAndEncrypt, ua.MessageSecurityMode.Sign):
            if mode in offered:
                return mode
        if has_none:
            return None
        raise ConnectError(f"{client.server_url.geturl()} offers neither None nor Basic256Sha256 security")
    mode = _MODES[security]
    if mode not in offered:
        raise ConnectError(f"{client.server_url.geturl()} does not offer Basic256Sha256 {mode.name}")
    return mode


def _login_error(url: str, user: str | None, e: UaStatusCodeError) -> ConnectError:
    """The error for a refused activation: LoginRefused when the credentials were refused."""
    code = e.code
    who = f"user {user!r}" if user else "anonymous login"
    if code in (_S.BadUserAccessDenied, _S.BadIdentityTokenInvalid, _S.BadIdentityTokenRejected):
        if user:
            return LoginRefused(f"{url}: login refused for {who} ({status_name(code)}): wrong user name or password, or the account is locked for a while")
        return LoginRefused(f"{url}: {who} refused ({status_name(code)}): the server requires a user name")
    return ConnectError(f"{url}: {status_name(code)}: {ua.StatusCode(code).doc}")


async def disconnect_quietly(client: Client) -> None:
    """Disconnect a client whose connection may already be broken."""
    try:
        await client.disconnect()
    except Exception as e:  # the connection is already broken; nothing more to release
        log.debug("disconnect after a failed connect: %s", e)

