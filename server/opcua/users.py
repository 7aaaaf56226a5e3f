"""OPC UA users: who a session is, from a password, a certificate, or nobody.

Theory of operation. The site file lists accounts (:class:`labctl.ioc.config.access.UserConfig`): a
name, roles, a salted scrypt hash (:mod:`labctl.server.passwords`) and/or an X.509 user
certificate. :class:`UserDirectory` turns a login into an :class:`~labctl.ioc.types.Identity`
whose roles the core's :class:`~labctl.ioc.access.RolePolicy` reads on every write; nothing in
the OPC UA adapter decides what a role may do.

* User name and password (:meth:`UserDirectory.login`, a coroutine): the password token is
  first opened by :func:`open_password_token`, which checks that it was made for *this*
  session (the server nonce the client appended must be the session's own: asyncua 2.1's
  ``decrypt_user_token`` strips it unchecked, so a token captured from one session would
  log in another). Then the password is checked against the hash in the
  :class:`~labctl.server.passwords.PasswordChecker`'s threads, never on the event loop, at most
  a few at a time and a bounded number waiting (per source address too). An unknown name
  is checked against a dummy hash, so both failures cost the same.
* Failed logins are throttled by :class:`LoginThrottle`, per source address and per
  (account, source address): after a few consecutive failures further attempts from that
  address (for that account) are refused *without hashing* for a back-off that doubles up
  to a maximum. An attempt refused that way counts against its address too, so an
  address that keeps trying while throttled soon has its *connections* held at the door
  (:data:`HOLD_PER_SOURCE`, :data:`MAX_HOLD_S`, in :mod:`labctl.server.opcua.processor`):
  nothing it sends is read until its back-off is over. A flood from one address therefore
  costs almost nothing after its first failures (neither CPU for the server nor a
  turn on the event loop that other clients wait behind), and never locks the real user
  out from another address. Other clients at the flooding address are delayed by the
  same hold, as fail2ban would block them. (An attacker with
  many addresses gets a few guesses per address: deploy OPC UA on networks you trust to
  that degree, and choose passwords accordingly.)
* Certificate: asyncua has verified the token's signature (the client holds the private
  key); the certificate must equal, byte for byte, the one configured for a user.
* Anonymous: an identity with no roles, which the role policy lets read and never
  write; refused altogether when the site sets ``server.opcua.anonymous: false``.

Where accounts come from. By default from the site file, once, at start. A server of a
site whose file says ``server.accounts: database`` takes them from the site's database
instead: :class:`labctl.server.accounts.AccountsService` reads them every few seconds and
hands them to :meth:`UserDirectory.replace_accounts`, which answers which accounts lost
their sessions' grounds -- disabled, removed, or given other roles (an identity's roles
are fixed at login) -- so the OPC UA service closes those sessions. A disabled account
is refused like a wrong password (after the same hashing, so it cannot be told from
one), with ``account disabled`` in the audit record.

asyncua only distinguishes Admin / User / Anonymous; every session here is its plain
``User`` role (never Admin, which asyncua lets write anything) carrying the labctl
identity in :class:`SessionUser`.
"""

from __future__ import annotations

import hmac
import logging
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asyncua import ua
from asyncua.crypto import uacrypto
from asyncua.crypto.permission_rules import User, UserRole
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from labctl.ioc.config.access import UserConfig
from labctl.ioc.errors import ConfigError, LabctlError
from labctl.ioc.types import Identity
from labctl.server.passwords import CheckerBusy, PasswordChecker, PasswordHashError, dummy_hash
from labctl.server.siteinfo import Account

log = logging.getLogger(__name__)

PROTOCOL = "opcua"
ANONYMOUS = Identity(user="anonymous", roles=frozenset(), protocol=PROTOCOL)
#: Consecutive failed logins of one account from one address before that address is slowed down for it.
FREE_FAILURES = 5
#: Consecutive failed logins from one address (any accounts) before the address is slowed down.
FREE_SOURCE_FAILURES = 15
#: Longest back-off after repeated failed logins.
MAX_BACKOFF_S = 60.0
#: Password checks one address may have waiting or running at once.
PENDING_PER_SOURCE = 4
#: New connections of a throttled address held unread at once; more are closed at once.
HOLD_PER_SOURCE = 8
#: Longest a new connection of a throttled address is held before it is served.
MAX_HOLD_S = 10.0
#: The password-token encryptions asyncua (and the OPC UA specification) know.
_TOKEN_DECRYPT = {
    "http://www.w3.org/2001/04/xmlenc#rsa-oaep": uacrypto.decrypt_rsa_oaep,
    "http://opcfoundation.org/UA/security/rsa-oaep-sha2-256": uacrypto.decrypt_rsa_oaep_sha256,
    "http://www.w3.org/2001/04/xmlenc#rsa-1_5": uacrypto.decrypt_rsa15,
}


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
    disabled: bool = False


@dataclass
class Refusal:
    """Why a login failed (for the audit log; clients see only :attr:`status`)."""

    user: str
    reason: str
    status: int = ua.StatusCodes.BadUserAccessDenied


class TokenRefused(Exception):
    """A user name token that cannot be accepted whatever its password (the reason is for the audit log)."""

    def __init__(self, reason: str, status: int = ua.StatusCodes.BadIdentityTokenRejected) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


def open_password_token(token: ua.UserNameIdentityToken, private_key: Any, session_nonce: bytes | None, channel_encrypted: bool) -> str:
    """The password of a user name token, checked to be unreadable on the wire and made for this session.

    An encrypted token (OPC UA Part 4, 7.36.3: length, password, server nonce, encrypted
    with the server's key) must end with the session's own nonce: a token captured from
    another session, or from an earlier activation of this one, is refused. A password in
    clear is accepted only over a SignAndEncrypt channel.

    Raises:
        TokenRefused: sent in clear over a channel that does not encrypt (BadIdentityTokenRejected),
            not made for this session (BadIdentityTokenRejected), or malformed (BadIdentityTokenInvalid).
    """
    data = token.Password or b""
    if not token.EncryptionAlgorithm:
        if data and not channel_encrypted:
            raise TokenRefused("password sent unencrypted over a channel that does not encrypt")
        return data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
    decrypt = _TOKEN_DECRYPT.get(token.EncryptionAlgorithm)
    if decrypt is None:
        raise TokenRefused(f"unknown password encryption {token.EncryptionAlgorithm!r}", ua.StatusCodes.BadIdentityTokenInvalid)
    if private_key is None or not session_nonce:
        raise TokenRefused("an encrypted password needs the server certificate and a session nonce", ua.StatusCodes.BadIdentityTokenInvalid)
    try:
        raw = decrypt(private_key, data)
    except ValueError:
        raise TokenRefused("the password token does not decrypt with the server key", ua.StatusCodes.BadIdentityTokenInvalid) from None
    if len(raw) < 4:
        raise TokenRefused("the password token is truncated", ua.StatusCodes.BadIdentityTokenInvalid)
    (length,) = struct.unpack_from("<I", raw)
    body = raw[4 : 4 + length]
    if length != len(raw) - 4 or length < len(session_nonce):
        raise TokenRefused("the password token's length is inconsistent", ua.StatusCodes.BadIdentityTokenInvalid)
    password, nonce = body[: -len(session_nonce)], body[-len(session_nonce) :]
    if not hmac.compare_digest(nonce, session_nonce):
        raise TokenRefused("the password token was not made for this session (replayed?)")
    return password.decode("utf-8", "replace")


@dataclass
class _Backoff:
    failures: int = 0
    blocked_until: float = 0.0


@dataclass
class LoginThrottle:
    """Failed logins slowed down per source address and per (account, source address).

    Each key allows ``free`` consecutive failures, then refuses attempts for a back-off
    that doubles with every further failure, up to ``max_backoff_s``; a success from an
    address clears that address's counts. At most ``max_entries`` keys are kept (expired
    ones are forgotten first), so a spray of names or addresses cannot grow memory.
    """

    free_failures: int = FREE_FAILURES
    free_source_failures: int = FREE_SOURCE_FAILURES
    max_backoff_s: float = MAX_BACKOFF_S
    max_entries: int = 10_000
    _keys: dict[tuple[str, str], _Backoff] = field(default_factory=dict, init=False)

    def check(self, account: str, source: str, now: float) -> str | None:
        """Why a login of ``account`` from ``source`` is refused without being checked, or None."""
        for key, what in (((source, ""), f"from {source}"), ((source, account), f"of {account!r} from {source}")):
            b = self._keys.get(key)
            if b is not None and now < b.blocked_until:
                return f"too many failed logins {what}; retry in {b.blocked_until - now:.0f} s"
        return None

    def source_blocked_for(self, source: str, now: float) -> float:
        """Seconds until ``source`` as a whole may try again (0: it may now)."""
        b = self._keys.get((source, ""))
        return max(0.0, b.blocked_until - now) if b is not None else 0.0

    def refused(self, source: str, now: float) -> None:
        """Count an attempt refused by :meth:`check` against its address (it kept trying while throttled)."""
        self._bump((source, ""), self.free_source_failures, now)

    def failed(self, account: str, source: str, now: float) -> int:
        """Count a failed login; the consecutive failures of ``account`` from ``source``."""
        self._bump((source, ""), self.free_source_failures, now)
        return self._bump((source, account), self.free_failures, now)

    def succeeded(self, account: str, source: str) -> None:
        """A successful login: ``source`` starts afresh."""
        self._keys.pop((source, ""), None)
        self._keys.pop((source, account), None)

    def _bump(self, key: tuple[str, str], free: int, now: float) -> int:
        b = self._keys.pop(key, None) or _Backoff()
        self._keys[key] = b  # most recent last
        b.failures += 1
        if b.failures >= free:
            b.blocked_until = now + min(2.0 ** (b.failures - free), self.max_backoff_s)
        if len(self._keys) > self.max_entries:
            self._prune(now)
        return b.failures

    def _prune(self, now: float) -> None:
        for key in [k for k, b in self._keys.items() if b.blocked_until <= now]:
            del self._keys[key]
        while len(self._keys) > self.max_entries // 2:
            del self._keys[next(iter(self._keys))]


@dataclass
class UserDirectory:
    """The site's accounts and the login rules."""

    users: Iterable[UserConfig]
    anonymous: bool = True
    base_dir: Path = Path(".")
    clock: Callable[[], float] = time.monotonic
    throttle: LoginThrottle = field(default_factory=LoginThrottle)
    checker: PasswordChecker = field(default_factory=PasswordChecker)
    pending_per_source: int = PENDING_PER_SOURCE
    accounts_source: str = "site file"
    """Where the accounts come from: ``site file``, or ``site database`` (:meth:`replace_accounts` while serving)."""
    _in_flight: Counter[str] = field(default_factory=Counter, init=False)
    _accounts: dict[str, _Account] = field(default_factory=dict, init=False)
    _by_certificate: dict[bytes, _Account] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        for u in self.users:
            self._accounts[u.name] = _Account(u.name, frozenset(u.roles), u.password_hash)

    @property
    def password_users(self) -> bool:
        """Whether any account can log in with a password (always, with accounts from the site database: they come and go)."""
        return self.accounts_source != "site file" or any(a.password_hash for a in self._accounts.values())

    def replace_accounts(self, accounts: Iterable[Account]) -> dict[str, str]:
        """Take ``accounts`` as the whole set of accounts (the site database's); return {user: why} whose sessions must end.

        Sessions end for an account that is now disabled or gone, or whose roles changed (a
        session keeps the roles it logged in with); a new password leaves them open. A
        certificate configured for an account stays with it.
        """
        old = self._accounts
        new: dict[str, _Account] = {}
        for a in accounts:
            before = old.get(a.name)
            certificate = before.certificate if before is not None else None
            new[a.name] = _Account(a.name, frozenset(a.roles), a.password_hash, certificate, a.disabled)
        ended: dict[str, str] = {}
        for name, before in old.items():
            after = new.get(name)
            if after is None:
                ended[name] = "the account was removed"
            elif after.disabled and not before.disabled:
                ended[name] = "the account was disabled"
            elif after.roles != before.roles:
                ended[name] = f"the account's roles changed to {', '.join(sorted(after.roles)) or '(none)'}"
        self._accounts = new
        self._by_certificate = {der: new[a.name] for der, a in self._by_certificate.items() if a.name in new}
        return ended

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

    def authenticate(self, certificate: bytes | None) -> Identity | Refusal:
        """The identity of a certificate or anonymous login (no password: cheap), or why it is refused."""
        if certificate is not None:
            account = self._by_certificate.get(_der(certificate))
            if account is None:
                return Refusal("<certificate>", f"no user has the certificate {_describe_certificate(certificate)}")
            if account.disabled:
                return Refusal(account.name, "account disabled")
            return Identity(account.name, account.roles, PROTOCOL)
        if not self.anonymous:
            return Refusal("anonymous", "anonymous access is disabled on this server")
        return ANONYMOUS

    async def login(self, username: str, password: str, source: str) -> Identity | Refusal:
        """The identity of a password login from ``source`` (an address), or why it is refused.

        Throttled first (no hashing for a throttled or over-busy source); the hash is checked
        in the password checker's threads, an unknown user against a dummy hash.
        """
        why = self.throttle.check(username, source, self.clock())
        if why is not None:
            self.throttle.refused(source, self.clock())
            return Refusal(username, why)
        if self._in_flight[source] >= self.pending_per_source:
            return Refusal(username, f"too many logins under way from {source}", ua.StatusCodes.BadTooManyOperations)
        account = self._accounts.get(username)
        known = account is not None and account.password_hash is not None
        self._in_flight[source] += 1
        try:
            ok = await self.checker.verify(password, account.password_hash if known else dummy_hash())  # type: ignore[union-attr]
        except CheckerBusy as e:
            return Refusal(username, f"server busy: {e}", ua.StatusCodes.BadTooManyOperations)
        except PasswordHashError as e:  # the schema validated the shape; the cost may still be refused
            log.error("a password hash in the site file is unusable: %s", e)
            ok = False
        finally:
            self._in_flight[source] -= 1
            if not self._in_flight[source]:
                del self._in_flight[source]
        if not (known and ok) or account.disabled:  # type: ignore[union-attr]
            failures = self.throttle.failed(username, source, self.clock())
            if account is None:
                return Refusal(username, "unknown user")
            if account.disabled:
                return Refusal(username, "account disabled")
            if not known:
                return Refusal(username, "the user has no password (certificate login only)")
            return Refusal(username, f"wrong password ({failures} consecutive failure(s) from {source})")
        self.throttle.succeeded(username, source)
        assert account is not None
        return Identity(account.name, account.roles, PROTOCOL)


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
    learns "no". A password login was decided before, off the event loop
    (:meth:`labctl.server.opcua.sessions.LabctlSession.prepare_activation`), and handed over in
    :attr:`decided` for that one synchronous call; certificate and anonymous logins are
    decided here. The refusal's reason is kept in :attr:`last_refusal` for the session to audit.
    """

    def __init__(self, directory: UserDirectory) -> None:
        self.directory = directory
        self.last_refusal: Refusal | None = None
        self.decided: Identity | Refusal | None = None

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None, certificate: Any = None) -> User | None:
        """The session's user, or None to refuse the login (BadUserAccessDenied)."""
        if self.decided is not None:
            result = self.decided
        elif username:  # a password login nobody checked off the loop: never hash here
            result = Refusal(username, "password login not prepared")
        else:
            result = self.directory.authenticate(certificate)
        if isinstance(result, Refusal):
            self.last_refusal = result
            return None
        self.last_refusal = None
        return SessionUser(role=UserRole.User, name=result.user, identity=result)
