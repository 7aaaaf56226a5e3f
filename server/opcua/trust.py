"""The trust list of client application certificates, and the ``labctl pki`` command.

Theory of operation. Basic256Sha256 channels (Sign, SignAndEncrypt) carry the client's
application certificate; the channel proves the client holds its private key, and the
trust list decides whether this server talks to that application at all (users still
log in separately). The list is kept as OPC UA servers keep theirs (UA-.NET, open62541),
under ``<state_dir>/pki/``::

    trusted/certs/   certificates trusted directly (self-signed applications) or CAs trusted as anchors
    trusted/crl/     revocation lists of the trusted CAs
    issuers/certs/   CA certificates that complete a chain but are not trusted by themselves
    issuers/crl/     their revocation lists
    rejected/certs/  certificates that were refused, kept for an administrator to approve

:meth:`TrustList.check` refuses, with the status code OPC UA names for the case:
a certificate that does not parse (BadCertificateInvalid), one outside its validity
period (BadCertificateTimeInvalid), one revoked by a CRL of its issuer
(BadCertificateRevoked), and one that is neither in ``trusted/certs`` nor issued (through
``issuers/certs``) by a CA that is (BadCertificateUntrusted) -- that one is saved in
``rejected/certs`` (at most :data:`MAX_REJECTED` files, one per certificate), where
``labctl pki list`` shows it and ``labctl pki trust THUMBPRINT`` moves it to
``trusted/certs``. The server re-reads the folders whenever one of them changes (one
``stat`` per folder per check), so approving takes effect at the next connection.

With ``server.opcua.trust: auto`` (a demo, a test site) an unknown certificate that is
within its validity period is copied to ``trusted/certs`` and accepted, with a warning
in the log: any application that can reach the port may then open a secure channel;
users still authenticate, but nothing vouches for the client program.

Certificates are named as UA-.NET names them, ``<common name> [<SHA-1 thumbprint>].der``;
the thumbprint (OPC UA's CertificateThumbprint) identifies them on the command line,
where any unambiguous prefix of at least 8 hex digits will do.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from asyncua import ua
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

log = logging.getLogger(__name__)

#: Refused certificates kept in ``rejected/certs`` at most (older ones stay; newer are not saved).
MAX_REJECTED = 200
#: Longest issuer chain followed.
MAX_CHAIN = 6
FOLDERS = ("trusted/certs", "trusted/crl", "issuers/certs", "issuers/crl", "rejected/certs")


class CertificateRefused(Exception):
    """A client certificate this server does not accept: :attr:`status` is the OPC UA code."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def thumbprint(der: bytes) -> str:
    """OPC UA's certificate thumbprint: the SHA-1 of the DER, as hex digits."""
    return hashlib.sha1(der, usedforsecurity=False).hexdigest()


def file_name(cert: x509.Certificate) -> str:
    """``<common name> [<thumbprint>].der``."""
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    cn = re.sub(r"[^A-Za-z0-9 ._-]", "_", str(cns[0].value) if cns else "certificate")[:64]
    return f"{cn} [{thumbprint(cert.public_bytes(Encoding.DER))}].der"


def load_certificate(data: bytes) -> x509.Certificate:
    """A certificate from PEM or DER bytes (ValueError if neither)."""
    return x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)


def _load_crl(data: bytes) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(data) if b"-----BEGIN" in data else x509.load_der_x509_crl(data)


def _files(folder: Path) -> Iterable[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_file())
    except FileNotFoundError:
        return []


@dataclass
class _Loaded:
    trusted: dict[str, x509.Certificate]
    issuers: dict[str, x509.Certificate]
    crls: list[x509.CertificateRevocationList]


class TrustList:
    """The ``pki`` folders of a server (see the module docstring)."""

    def __init__(self, pki_dir: Path, auto_accept: bool = False, clock: Callable[[], _dt.datetime] | None = None) -> None:
        self.pki_dir = Path(pki_dir)
        self.auto_accept = auto_accept
        self.clock = clock or (lambda: _dt.datetime.now(_dt.UTC))
        self._stamp: tuple[int, ...] | None = None
        self._loaded = _Loaded({}, {}, [])
        self._warned: set[str] = set()

    def create(self) -> None:
        """Make the folders (blocking: call from a thread at start-up)."""
        for f in FOLDERS:
            (self.pki_dir / f).mkdir(parents=True, exist_ok=True)

    def folder(self, name: str) -> Path:
        """One of :data:`FOLDERS`."""
        return self.pki_dir / name

    def check(self, der: bytes) -> None:
        """Accept a client's application certificate, or raise :class:`CertificateRefused`."""
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            raise CertificateRefused(ua.StatusCodes.BadCertificateInvalid, "the client certificate does not parse") from None
        now = self.clock()
        if cert.not_valid_before_utc > now:
            raise CertificateRefused(ua.StatusCodes.BadCertificateTimeInvalid, f"{_describe(cert)} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
        if cert.not_valid_after_utc < now:
            raise CertificateRefused(ua.StatusCodes.BadCertificateTimeInvalid, f"{_describe(cert)} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
        loaded = self._load()
        chain = self._chain(cert, loaded)
        if chain is None:
            if self.auto_accept:
                self._save(cert, "trusted/certs")
                self._stamp = None
                log.warning("OPC UA: trusting the new client certificate %s automatically (server.opcua.trust: auto)", _describe(cert))
                return
            self._save(cert, "rejected/certs")
            raise CertificateRefused(ua.StatusCodes.BadCertificateUntrusted, f"{_describe(cert)} is not trusted (saved in {self.folder('rejected/certs')}; approve it with `labctl pki trust`)")
        for child, issuer in zip(chain, chain[1:], strict=False):
            if self._revoked(child, issuer, loaded):
                raise CertificateRefused(ua.StatusCodes.BadCertificateRevoked, f"{_describe(child)} is revoked by its issuer {_describe(issuer)}")

    def _chain(self, cert: x509.Certificate, loaded: _Loaded) -> list[x509.Certificate] | None:
        """The chain from ``cert`` up to a trusted certificate, or None."""
        chain = [cert]
        current = cert
        for _ in range(MAX_CHAIN):
            if thumbprint(current.public_bytes(Encoding.DER)) in loaded.trusted:
                return chain
            issuer = self._issuer_of(current, loaded)
            if issuer is None or issuer in chain:
                return None
            chain.append(issuer)
            current = issuer
        return None

    @staticmethod
    def _issuer_of(cert: x509.Certificate, loaded: _Loaded) -> x509.Certificate | None:
        if cert.issuer == cert.subject:
            return None  # self-signed and not trusted itself
        for ca in (*loaded.trusted.values(), *loaded.issuers.values()):
            if ca.subject != cert.issuer or not _is_ca(ca):
                continue
            try:
                cert.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return ca
        return None

    @staticmethod
    def _revoked(cert: x509.Certificate, issuer: x509.Certificate, loaded: _Loaded) -> bool:
        for crl in loaded.crls:
            if crl.issuer != issuer.subject:
                continue
            try:
                if not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
                    continue
            except TypeError:
                continue
            if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
                return True
        return False

    def _load(self) -> _Loaded:
        stamp = tuple(_mtime(self.folder(f)) for f in FOLDERS[:4])
        if stamp != self._stamp:
            self._loaded = _Loaded(self._certs("trusted/certs"), self._certs("issuers/certs"), self._crls())
            self._stamp = stamp
        return self._loaded

    def _certs(self, name: str) -> dict[str, x509.Certificate]:
        certs = {}
        for path in _files(self.folder(name)):
            try:
                cert = load_certificate(path.read_bytes())
            except (OSError, ValueError) as e:
                self._warn_once(str(path), f"OPC UA trust list: ignoring {path}: not a certificate ({e})")
                continue
            certs[thumbprint(cert.public_bytes(Encoding.DER))] = cert
        return certs

    def _crls(self) -> list[x509.CertificateRevocationList]:
        crls = []
        for name in ("trusted/crl", "issuers/crl"):
            for path in _files(self.folder(name)):
                try:
                    crls.append(_load_crl(path.read_bytes()))
                except (OSError, ValueError) as e:
                    self._warn_once(str(path), f"OPC UA trust list: ignoring {path}: not a CRL ({e})")
        return crls

    def _save(self, cert: x509.Certificate, name: str) -> None:
        folder = self.folder(name)
        path = folder / file_name(cert)
        if path.exists():
            return
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if name == "rejected/certs" and sum(1 for _ in folder.iterdir()) >= MAX_REJECTED:
                self._warn_once("rejected-full", f"OPC UA trust list: {folder} holds {MAX_REJECTED} certificates; further ones are not saved")
                return
            path.write_bytes(cert.public_bytes(Encoding.DER))
        except OSError as e:
            self._warn_once(f"save:{name}", f"OPC UA trust list: cannot save a certificate in {folder}: {e}")

    def _warn_once(self, key: str, text: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", text)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _mtime(path: Path) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return 0


def _describe(cert: x509.Certificate) -> str:
    return f"{cert.subject.rfc4514_string() or '(no subject)'} [{thumbprint(cert.public_bytes(Encoding.DER))[:16]}]"


# ---- the ``labctl pki`` command ---------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``labctl pki`` to the ``labctl`` command."""
    p = subparsers.add_parser(
        "pki",
        help="list, trust or reject OPC UA client certificates",
        description=(
            "Manage the OPC UA trust list under <state_dir>/pki: `list` shows trusted, issuer and rejected "
            "certificates; `trust` approves a rejected certificate (by thumbprint prefix) or a certificate file; "
            "`reject` withdraws trust from a certificate (by thumbprint prefix or file). A running server sees "
            "the change at the next connection."
        ),
    )
    p.add_argument("action", choices=("list", "trust", "reject"))
    p.add_argument("target", nargs="?", help="thumbprint (or an unambiguous prefix of >= 8 hex digits) or a certificate file (PEM or DER)")
    p.add_argument("--state-dir", type=Path, default=Path("var"), help="the server's state directory (default: ./var, the demo's)")
    p.set_defaults(func=cmd_pki)


def cmd_pki(args: argparse.Namespace) -> int:
    """Run ``labctl pki``."""
    trust = TrustList(args.state_dir / "pki")
    try:
        if args.action == "list":
            return _list(trust)
        if not args.target:
            print(f"labctl pki {args.action}: give a thumbprint or a certificate file", file=sys.stderr)
            return 2
        return _move(trust, args.action, args.target)
    except (OSError, ValueError) as e:
        print(f"labctl pki {args.action}: {e}", file=sys.stderr)
        return 1


def _list(trust: TrustList) -> int:
    for name in ("trusted/certs", "issuers/certs", "rejected/certs"):
        entries = []
        for path in _files(trust.folder(name)):
            try:
                cert = load_certificate(path.read_bytes())
            except ValueError:
                entries.append(f"  (unreadable) {path.name}")
                continue
            uris = _uris(cert)
            entries.append(
                f"  {thumbprint(cert.public_bytes(Encoding.DER))}  {cert.subject.rfc4514_string()}"
                f"  valid {cert.not_valid_before_utc:%Y-%m-%d} .. {cert.not_valid_after_utc:%Y-%m-%d}" + (f"  {' '.join(uris)}" if uris else "")
            )
        print(f"{name.split('/')[0]} ({trust.folder(name)}): {len(entries)}")
        for line in entries:
            print(line)
    return 0


def _uris(cert: x509.Certificate) -> list[str]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        return []


def _move(trust: TrustList, action: str, target: str) -> int:
    src, dst = ("rejected/certs", "trusted/certs") if action == "trust" else ("trusted/certs", "rejected/certs")
    path = Path(target)
    if path.is_file():
        cert = load_certificate(path.read_bytes())
        tp = thumbprint(cert.public_bytes(Encoding.DER))
        matches = [p for p in _files(trust.folder(src)) if tp in p.name]
        if not matches:  # a file from elsewhere: place a copy where it belongs
            (trust.folder(dst)).mkdir(parents=True, exist_ok=True)
            (trust.folder(dst) / file_name(cert)).write_bytes(cert.public_bytes(Encoding.DER))
            _drop(trust.folder(src), tp)
            print(f"{action}ed {cert.subject.rfc4514_string()} [{tp}]")
            return 0
    else:
        prefix = target.lower()
        if not re.fullmatch(r"[0-9a-f]{8,40}", prefix):
            raise ValueError(f"{target!r} is neither a file nor a thumbprint (8 to 40 hex digits)")
        matches = [p for p in _files(trust.folder(src)) if re.search(rf"\[{prefix}[0-9a-f]*\]", p.name)]
        if not matches:
            raise ValueError(f"no certificate in {trust.folder(src)} has a thumbprint starting with {prefix}")
        if len(matches) > 1:
            raise ValueError(f"{prefix} matches {len(matches)} certificates: give more digits")
    trust.folder(dst).mkdir(parents=True, exist_ok=True)
    for p in matches:
        shutil.move(str(p), str(trust.folder(dst) / p.name))
        print(f"{action}ed {p.name}")
    return 0


def _drop(folder: Path, tp: str) -> None:
    for p in _files(folder):
        if f"[{tp}]" in p.name:
            p.unlink()
