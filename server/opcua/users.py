"""OPC UA users: who a session is, from a password, a certificate, or nobody.

Theory of operation. The site file lists accounts (:class:`labctl.ioc.config.access.UserConfig`): a
name, roles, a salted scrypt hash (:mod:`labctl.server.passwords`) and/or an X.509 user
certificate. :class:`UserDirectory` turns a login into an :class:`~labctl.ioc.types.Identity`
whose roles the core's :class:`~labctl.ioc.access.RolePolicy` reads on every write; nothing in
the OPC UA adapter decides what a role may do.

* User name and password: checked against the hash; an unknown name is checked against
  a dummy hash so both failures take the same time. After :data:`FREE_FAILURES`
  consecutive failures for one account, further attempts are refused without hashing
  for a back-off that doubles up to :data:`MAX_BACKOFF_S`, so guessing is slow and a
  flood of bad logins cannot monopolise the event loop (asyncua checks logins
  synchronously on the loop; a scrypt check costs tens of milliseconds).
* Certificate: asyncua has verified the token's signature (the client holds the private
  key); the certificate must equal, byte for byte, the one configured for a user.
* Anonymous: an identity with no roles, which the role policy lets read and never
  write; refused altogether when the site sets ``server.opcua.anonymous: false``.

asyncua only distinguishes Admin / User / Anonymous; every session here is its plain
``User`` role (never Admin, which asyncua lets write anything) carrying the labctl
identity in :class:`SessionUser`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asyncua.crypto import uacrypto
from asyncua.crypto.permission_rules import User, UserRole
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from labctl.ioc.config.access import UserConfig
from labctl.ioc.errors import ConfigError, LabctlError
from labctl.ioc.types import Identity
from labctl.server.passwords import PasswordHashError, dummy_hash, verify_password

log = logging.getLogger(__name__)

PROTOCOL = "opcua"
ANONYMOUS = Identity(user="anonymous", roles=frozenset(), protocol=PROTOCOL)
#: Failed logins of one account allowed before attempts are slowed down.
FREE_FAILURES = 5
#: Longest back-off after repeated failed logins.
MAX_BACKOFF_S = 60.0


@dataclass
class SessionUser(User):
    """The asyncua user of one session: the labctl identity, and what the session was last refused."""

    identity: Identity = ANONYMOUS
    last_refusal: str = ""
    """``<PV>: write refused: <reason>`` of the session's last refused write (read via Session/LastWriteRefusal)."""
    operation_errors: list[LabctlError | None] = field(default_factory=list)
    """The refusal (or failure) of each operation of the request being answered (a Write's nodes,
    a Call's methods), None where it succeeded: returned as DiagnosticInfos with the response."""


@dataclass
class _Account:
    name: str
    roles: frozenset[str]
    password_hash: str | None
    certificate: bytes | None = None
    failures: int = 0
    blocked_until: float = 0.0


@dataclass
class Refusal:
    """Why a login failed (for the audit log only; clients just see BadUserAccessDenied)."""

    user: str
    reason: str


@dataclass
class UserDirectory:
    """The site's accounts and the login rules."""

    users: Iterable[UserConfig]
    anonymous: bool = True
    base_dir: Path = Path(".")
    clock: Callable[[], float] = time.monotonic
    _accounts: dict[str, _Account] = field(default_factory=dict, init=False)
    _by_certificate: dict[bytes, _Account] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        for u in self.users:
            self._accounts[u.name] = _Account(u.name, frozenset(u.roles), u.password_hash)

    @property
    def password_users(self) -> bool:
        """Whether any account can log in with a password."""
        return any(a.password_hash for a in self._accounts.values())

    @property
    def certificate_users(self) -> bool:
        """Whether any account can log in with a certificate (after :meth:`load_certificates`)."""
        return bool(self._by_certificate)

    def load_certificates(self, configs: Iterable[UserConfig], source: str = "site file") -> None:
        """Read the users' certificates (PEM or DER, relative to the site file's directory)."""
        problems = []
        for u in configs:
            if u.certificate is None:
                continue
            path = Path(u.certificate)
            if not path.is_absolute():
                path = self.base_dir / path
            try:
                data = path.read_bytes()
                cert = x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
            except (OSError, ValueError) as e:
                problems.append(f"{source} users.{u.name}.certificate: cannot read an X.509 certificate from {path}: {e}")
                continue
            der = cert.public_bytes(Encoding.DER)
            account = self._accounts[u.name]
            account.certificate = der
            self._by_certificate[der] = account
        if problems:
            raise ConfigError(source, problems)

    def authenticate(self, username: str | None, password: str | None, certificate: bytes | None) -> Identity | Refusal:
        """The identity of a login, or why it is refused."""
        if username:
            return self._password_login(username, password or "")
        if certificate is not None:
            account = self._by_certificate.get(_der(certificate))
            if account is None:
                return Refusal("<certificate>", f"no user has the certificate {_describe_certificate(certificate)}")
            return Identity(account.name, account.roles, PROTOCOL)
        if not self.anonymous:
            return Refusal("anonymous", "anonymous access is disabled on this server")
        return ANONYMOUS

    def _password_login(self, username: str, password: str) -> Identity | Refusal:
        account = self._accounts.get(username)
        if account is None or account.password_hash is None:
            _safe_verify(password, dummy_hash())
            why = "unknown user" if account is None else "the user has no password (certificate login only)"
            return Refusal(username, why)
        now = self.clock()
        if now < account.blocked_until:
            return Refusal(username, f"too many failed logins; retry in {account.blocked_until - now:.0f} s")
        if not _safe_verify(password, account.password_hash):
            account.failures += 1
            if account.failures >= FREE_FAILURES:
                account.blocked_until = now + min(2.0 ** (account.failures - FREE_FAILURES), MAX_BACKOFF_S)
            return Refusal(username, f"wrong password ({account.failures} consecutive failure(s))")
        account.failures = 0
        account.blocked_until = 0.0
        return Identity(account.name, account.roles, PROTOCOL)


def _safe_verify(password: str, encoded: str) -> bool:
    try:
        return verify_password(password, encoded)
    except PasswordHashError as e:  # the schema validated the shape; the cost may still be refused
        log.error("a password hash in the site file is unusable: %s", e)
        return False


def _der(certificate: Any) -> bytes:
    if isinstance(certificate, bytes):
        return uacrypto.der_from_x509(uacrypto.x509_from_der(certificate))
    return uacrypto.der_from_x509(certificate)


def _describe_certificate(certificate: bytes) -> str:
    try:
        return repr(uacrypto.x509_from_der(certificate).subject.rfc4514_string())
    except ValueError:
        return "(unreadable)"


class UserManager:
    """asyncua's user manager hook over a :class:`UserDirectory`.

    asyncua calls :meth:`get_user` synchronously while activating a session and only
    learns "no"; the refusal's reason is kept in :attr:`last_refusal` for the session
    to audit (:class:`labctl.server.opcua.sessions.LabctlSession`).
    """

    def __init__(self, directory: UserDirectory) -> None:
        self.directory = directory
        self.last_refusal: Refusal | None = None

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None, certificate: Any = None) -> User | None:
        """The session's user, or None to refuse the login (BadUserAccessDenied)."""
        result = self.directory.authenticate(username, password, certificate)
        if isinstance(result, Refusal):
            self.last_refusal = result
            return None
        self.last_refusal = None
        return SessionUser(role=UserRole.User, name=result.user, identity=result)
