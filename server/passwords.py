"""Password hashes for the site file, and the ``labctl passwd`` command.

Theory of operation. A site file never holds a password, only a salted scrypt hash in
the form the schema validates (:data:`labctl.ioc.config.access.PASSWORD_HASH`)::

    scrypt$N$r$p$<salt: 16 bytes as 32 hex digits>$<key: 32 bytes as 64 hex digits>

scrypt (RFC 7914) is memory-hard, so guessing passwords on GPUs is expensive; the
cost parameters travel with each hash, so they can be raised later without breaking
existing accounts. The defaults (N=2**14, r=8, p=1: 16 MiB, some tens of milliseconds)
are the interactive-login parameters RFC 7914 recommends. :func:`verify_password`
compares in constant time and refuses parameters far beyond the defaults, so a hostile
hash in a site file cannot make a login exhaust the server's memory.

Checking a password costs one scrypt: tens of milliseconds of CPU and 16 MiB. A server
must never do that on its event loop, nor let a flood of logins queue without bound:
:class:`PasswordChecker` runs the checks in a small thread pool of its own (hashlib's
scrypt releases the GIL, so the loop keeps serving) and refuses a check outright when
too many are already waiting (:class:`CheckerBusy`), so pending logins are bounded.

``labctl passwd`` reads the password from a prompt (twice) or from standard input, never
from the command line, where it would land in the shell history and the process list.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import getpass
import hashlib
import hmac
import os
import sys
from concurrent.futures import ThreadPoolExecutor

#: scrypt CPU/memory cost (a power of two).
DEFAULT_N = 2**14
#: scrypt block size.
DEFAULT_R = 8
#: scrypt parallelism.
DEFAULT_P = 1
SALT_BYTES = 16
KEY_BYTES = 32
#: Refuse hashes that would need more memory than this to check (128 * N * r * p bytes).
MAX_MEMORY = 256 * 1024 * 1024


class PasswordHashError(ValueError):
    """A password hash is not in the ``scrypt$N$r$p$salt$hash`` form, or its cost is excessive."""


def hash_password(password: str, *, n: int = DEFAULT_N, r: int = DEFAULT_R, p: int = DEFAULT_P) -> str:
    """A new salted scrypt hash of ``password`` in the site-file format."""
    if not password:
        raise ValueError("the password is empty")
    salt = os.urandom(SALT_BYTES)
    key = _scrypt(password, salt, n, r, p)
    return f"scrypt${n}${r}${p}${salt.hex()}${key.hex()}"


def parse_hash(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    """Split a hash into (N, r, p, salt, key); raise PasswordHashError if malformed or too costly."""
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise PasswordHashError("expected scrypt$N$r$p$salt$hash")
    try:
        n, r, p = (int(x) for x in parts[1:4])
        salt, key = bytes.fromhex(parts[4]), bytes.fromhex(parts[5])
    except ValueError:
        raise PasswordHashError("N, r and p must be integers and salt and hash hex digits") from None
    if n < 2 or n & (n - 1) or r < 1 or p < 1:
        raise PasswordHashError(f"invalid scrypt parameters N={n} r={r} p={p} (N must be a power of two > 1)")
    if 128 * n * r * p > MAX_MEMORY:
        raise PasswordHashError(f"scrypt parameters N={n} r={r} p={p} need more than {MAX_MEMORY >> 20} MiB")
    if len(salt) != SALT_BYTES or len(key) != KEY_BYTES:
        raise PasswordHashError(f"expected a {SALT_BYTES}-byte salt and a {KEY_BYTES}-byte hash")
    return n, r, p, salt, key


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches ``encoded`` (constant-time comparison of the derived keys)."""
    n, r, p, salt, key = parse_hash(encoded)
    return hmac.compare_digest(_scrypt(password, salt, n, r, p), key)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    # maxmem must exceed 128*N*r*p by a margin, or OpenSSL refuses the default parameters.
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=KEY_BYTES, maxmem=MAX_MEMORY + (1 << 20))


@functools.cache
def dummy_hash() -> str:
    """A hash of a random password, made once per process.

    Checked against when a user name is unknown, so that a login for an unknown user
    takes as long as one for a known user with a wrong password (no user enumeration
    by timing).
    """
    return hash_password(os.urandom(16).hex())


class CheckerBusy(Exception):
    """Too many password checks are already waiting: the login is refused without hashing."""


class PasswordChecker:
    """Password checks off the event loop: at most ``workers`` at a time, ``max_pending`` waiting."""

    def __init__(self, workers: int = 2, max_pending: int = 32) -> None:
        self.workers = workers
        self.max_pending = max_pending
        self._pool: ThreadPoolExecutor | None = None
        self._pending = 0

    @property
    def pending(self) -> int:
        """Checks waiting or running now."""
        return self._pending

    async def verify(self, password: str, encoded: str) -> bool:
        """:func:`verify_password` in the checker's threads.

        Raises:
            CheckerBusy: ``max_pending`` checks are already waiting or running.
            PasswordHashError: ``encoded`` is malformed or too costly.
        """
        if self._pending >= self.max_pending:
            raise CheckerBusy(f"{self._pending} password checks pending")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="labctl-password")
        self._pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, verify_password, password, encoded)
        finally:
            self._pending -= 1

    def close(self) -> None:
        """Stop the threads (checks under way finish)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


# ---- the ``labctl passwd`` command ---------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``labctl passwd`` to the ``labctl`` command."""
    p = subparsers.add_parser(
        "passwd",
        help="print a password hash for a site file's users[].password_hash",
        description=(
            "Read a password (prompted twice, or one line from standard input with --stdin) and print "
            "its salted scrypt hash for the site file. The password is never taken from the command line."
        ),
    )
    p.add_argument("--stdin", action="store_true", help="read the password from the first line of standard input")
    p.set_defaults(func=cmd_passwd)


def cmd_passwd(args: argparse.Namespace) -> int:
    """Print the hash of a password read from a prompt or standard input."""
    if args.stdin or not sys.stdin.isatty():
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        if password.endswith("\r"):
            password = password[:-1]
    else:
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("labctl passwd: the two passwords differ", file=sys.stderr)
            return 1
    if not password:
        print("labctl passwd: the password is empty", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0
