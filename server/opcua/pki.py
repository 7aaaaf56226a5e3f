"""The server's application instance certificate: made on first start, kept afterwards.

Theory of operation. Basic256Sha256 (Sign and SignAndEncrypt) needs a certificate and
private key for the server; clients pin the certificate once they trust it, so it must
survive restarts. :func:`ensure_certificate` keeps them under ``<state_dir>/pki/``
(``server_key.pem``, readable by the owner only, and ``server_cert.der``). It creates a
new key only when there is none, and a new certificate only when there is none, when it
has expired, or when it no longer names the server's ApplicationUri (the site was
renamed); each of those is logged because clients will have to trust it again.

The certificate is self-signed, valid for :data:`VALIDITY_DAYS`, for both server and
client authentication, with the ApplicationUri, the host name, ``localhost`` and the
loopback address in its subject alternative names (OPC UA Part 6, 6.2.2).
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import logging
import os
import socket
from pathlib import Path

from asyncua.crypto.cert_gen import dump_private_key_as_pem, generate_private_key, generate_self_signed_app_certificate
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID

log = logging.getLogger(__name__)

VALIDITY_DAYS = 5 * 365
KEY_FILE = "server_key.pem"
CERT_FILE = "server_cert.der"


def ensure_certificate(pki_dir: Path, application_uri: str, name: str) -> tuple[Path, Path]:
    """Paths of the server's (certificate, key), creating them if needed (blocking: run in a thread)."""
    pki_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(pki_dir, 0o700)
    key_path, cert_path = pki_dir / KEY_FILE, pki_dir / CERT_FILE
    if key_path.exists():
        key = load_pem_private_key(key_path.read_bytes(), password=None)
    else:
        log.info("creating the OPC UA server key %s", key_path)
        key = generate_private_key()
        _write_private(key_path, dump_private_key_as_pem(key))
        if cert_path.exists():
            cert_path.unlink()  # a certificate for another key is useless
    reason = _needs_new_certificate(cert_path, application_uri, key)
    if reason == "none yet":
        log.info("creating the OPC UA server certificate %s", cert_path)
    elif reason:
        log.warning("creating a new OPC UA server certificate %s (%s); clients must trust it again", cert_path, reason)
    if reason:
        host = socket.gethostname()
        names = [x509.UniformResourceIdentifier(application_uri), x509.DNSName(host)]
        if host != "localhost":
            names.append(x509.DNSName("localhost"))
        names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        cert = generate_self_signed_app_certificate(
            key,  # type: ignore[arg-type]
            name,
            {"organizationName": "labctl"},
            names,
            extended=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
            days=VALIDITY_DAYS,
        )
        cert_path.write_bytes(cert.public_bytes(Encoding.DER))
    return cert_path, key_path


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _needs_new_certificate(cert_path: Path, application_uri: str, key: object) -> str:
    if not cert_path.exists():
        return "none yet"
    try:
        cert = x509.load_der_x509_certificate(cert_path.read_bytes())
    except ValueError:
        return "the old one is unreadable"
    if cert.public_key() != key.public_key():  # type: ignore[attr-defined]
        return "the old one is for another key"
    if cert.not_valid_after_utc <= _dt.datetime.now(_dt.UTC):
        return f"the old one expired on {cert.not_valid_after_utc:%Y-%m-%d}"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "the old one has no subject alternative names"
    if application_uri not in san.get_values_for_type(x509.UniformResourceIdentifier):
        return f"the old one is not for {application_uri}"
    return ""
