"""The server's application instance certificate: made on first start, kept afterwards.

Theory of operation. Basic256Sha256 (Sign and SignAndEncrypt) needs a certificate and
private key for the server; clients pin the certificate once they trust it, so it must
survive restarts. :func:`ensure_certificate` keeps them under ``<state_dir>/pki/``
(``server_key.pem``, readable by the owner only, and ``server_cert.der``). It creates a
new key only when there is none, and a new certificate only when there is none, when it
has expired, or when it no longer names the server's ApplicationUri (the site or the
server was renamed, or an older labctl made it for the URI every server of a site once
shared); each of those is logged with the reason, because clients will have to trust it
again.

The certificate labctl makes is self-signed, valid for :data:`VALIDITY_DAYS`, for both
server and client authentication (the server also uses it to register with discovery
servers), with the ApplicationUri, the host name, ``localhost`` and the loopback address
in its subject alternative names (OPC UA Part 6, 6.2.2): OPC UA requires the
ApplicationUri there, and discovery servers reject a registration without it.

A certificate labctl did not make (not self-signed by its own key with the organization
``labctl``: one the operator had issued and put in place of labctl's, with its key) is
never replaced or removed: if it does not fit -- another ApplicationUri, another key,
expired, or its key missing -- the server refuses to start with
:class:`CertificateMismatch`, naming the file and, for a wrong URI, both URIs.
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
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from labctl.ioc.errors import LabctlError

log = logging.getLogger(__name__)

VALIDITY_DAYS = 5 * 365
KEY_FILE = "server_key.pem"
CERT_FILE = "server_cert.der"
#: The organization of the certificates labctl makes (a self-signed one without it is the operator's).
ORGANIZATION = "labctl"


class CertificateMismatch(LabctlError):
    """The server certificate the operator supplied does not fit this server; labctl leaves it alone."""


def ensure_certificate(pki_dir: Path, application_uri: str, name: str) -> tuple[Path, Path]:
    """Paths of the server's (certificate, key), creating them if needed (blocking: run in a thread).

    Raises :class:`CertificateMismatch` for a supplied certificate (one labctl did not make)
    that does not fit ``application_uri`` or its key.
    """
    pki_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(pki_dir, 0o700)
    key_path, cert_path = pki_dir / KEY_FILE, pki_dir / CERT_FILE
    supplied = _supplied_certificate(cert_path)
    if supplied is not None:
        _check_supplied(supplied, cert_path, key_path, application_uri)
        return cert_path, key_path
    if key_path.exists():
        key = load_pem_private_key(key_path.read_bytes(), password=None)
    else:
        log.info("creating the OPC UA server key %s", key_path)
        key = generate_private_key()
        _write_private(key_path, dump_private_key_as_pem(key))
        if cert_path.exists():
            cert_path.unlink()  # labctl's own certificate for another key is useless
    reason = _needs_new_certificate(cert_path, application_uri, key)
    if reason == "none yet":
        log.info("creating the OPC UA server certificate %s for %s", cert_path, application_uri)
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
            {"organizationName": ORGANIZATION},
            names,
            extended=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
            days=VALIDITY_DAYS,
        )
        cert_path.write_bytes(cert.public_bytes(Encoding.DER))
    return cert_path, key_path


def certificate_uris(cert: x509.Certificate) -> list[str]:
    """The URIs among a certificate's subject alternative names (an OPC UA application's ApplicationUri)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def _supplied_certificate(cert_path: Path) -> x509.Certificate | None:
    """The certificate at ``cert_path`` if the operator supplied it (labctl did not make it), else None."""
    if not cert_path.exists():
        return None
    try:
        cert = x509.load_der_x509_certificate(cert_path.read_bytes())
    except ValueError:
        return None  # unreadable: labctl replaces it, as it always has
    return None if _made_by_labctl(cert) else cert


def _made_by_labctl(cert: x509.Certificate) -> bool:
    """Whether ``cert`` is one :func:`ensure_certificate` made: self-signed by its own key, organization labctl."""
    if cert.issuer != cert.subject:
        return False
    if [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)] != [ORGANIZATION]:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _check_supplied(cert: x509.Certificate, cert_path: Path, key_path: Path, application_uri: str) -> None:
    """Refuse a supplied certificate that does not fit this server (never replace it)."""
    keep = "labctl never replaces a certificate it did not make"
    uris = certificate_uris(cert)
    if application_uri not in uris:
        named = ", ".join(uris) if uris else "no URI"
        raise CertificateMismatch(
            f"OPC UA: the server certificate {cert_path} is for {named}, not this server's ApplicationUri "
            f"{application_uri}; have one issued for {application_uri} (a URI in its subject alternative names), "
            f"or remove {cert_path.name} and {key_path.name} to let labctl make its own ({keep})"
        )
    if cert.not_valid_after_utc <= _dt.datetime.now(_dt.UTC):
        raise CertificateMismatch(
            f"OPC UA: the server certificate {cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
            f"replace it ({keep})"
        )
    if not key_path.exists():
        raise CertificateMismatch(f"OPC UA: the server certificate {cert_path} has no private key {key_path} ({keep})")
    try:
        key = load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise CertificateMismatch(f"OPC UA: cannot read the server key {key_path}: {e}") from None
    if cert.public_key() != key.public_key():
        raise CertificateMismatch(f"OPC UA: the server certificate {cert_path} is not for the key {key_path} ({keep})")


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
    uris = certificate_uris(cert)
    if application_uri not in uris:
        was = f"is for {', '.join(uris)}" if uris else "names no ApplicationUri"
        return f"the old one {was}, not this server's ApplicationUri {application_uri}"
    return ""
