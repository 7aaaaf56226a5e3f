"""Site-wide accounts: served from the site's database to OPC UA logins, managed with ``labctl user``.

Theory of operation. A site whose servers share a PostgreSQL database keeps its accounts
there (``site_user``, :mod:`labctl.server.historian.accounts`), so every server agrees on
who is who. A server takes them from there when its site file says
``server.accounts: database`` (the file then has no ``users``); a server whose file says
``site_file`` (the default, and the only choice with a SQLite historian) keeps using the
file's ``users`` as before.

:class:`AccountsService` reads every account at start -- before the OPC UA service binds,
so the first login already knows them -- and then every
``server.directory.accounts_refresh_s`` (2 s), off the event loop. Each reading that
differs from the last replaces the accounts of the OPC UA user directory
(:meth:`labctl.server.opcua.users.UserDirectory.replace_accounts`): new logins are checked
against the accounts as they are now, and the open sessions of an account that was
disabled, removed or given other roles are closed and audited (``logout``), so a user
disabled on one server is refused on every server within that time. A changed password
leaves open sessions alone.

While the database is away the server keeps the accounts it read last; at a start
without the database it reads them from ``<state_dir>/accounts.json``, the copy it writes
(readable by its own user only, password *hashes* only) after each reading that changed
them. A server that never reached the database has no accounts: only anonymous access,
if the site allows it, until the database returns.

Role names are the site file's: an account's role that this server's site file does not
define grants nothing here (logged once).

``labctl user add|passwd|roles|disable|enable|list`` manages the accounts in the
database named by ``--historian-url`` (LABCTL_HISTORIAN_URL). Passwords are read from a
prompt (twice) or, with ``--stdin``, from the first line of standard input, never from
the command line, and stored as salted scrypt hashes. Every change is recorded in the
shared audit trail in the same transaction, naming the operating-system user and host
that ran the command.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from labctl.ioc.config.access import DEFAULT_ROLES
from labctl.ioc.config.base import IDENT
from labctl.ioc.errors import LabctlError
from labctl.ioc.types import RESERVED_NAMES, reserved
from labctl.server.historian import accounts as sql
from labctl.server.historian.backend import Backend, is_unreachable, open_backend, short
from labctl.server.historian.directory import ensure_site_schema
from labctl.server.historian.ingest import now_us
from labctl.server.passwords import hash_password
from labctl.server.sitedir import (
    add_database_argument,
    command_actor,
    has_site_schema,
    open_site_database,
    run_on_database,
)
from labctl.server.siteinfo import Account, iso_utc

from labctl.supervision import Supervisor

if TYPE_CHECKING:
    from labctl.server.app import Server

log = logging.getLogger(__name__)

_CACHE_FORMAT = "labctl-accounts"
_CACHE_VERSION = 1


class AccountTarget(Protocol):
    """What the accounts are served to: the OPC UA service (its user directory, and closing sessions)."""

    users: Any
    """A :class:`labctl.server.opcua.users.UserDirectory`."""

    async def end_sessions(self, users: Mapping[str, str]) -> int:
        """Close the sessions of these users (user -> why)."""
        ...


class AccountsService:
    """The site's accounts, read from its database for this server's logins (see the module docstring)."""

    name = "accounts"

    def __init__(self, server: Server) -> None:
        self.site = server.site
        self.url = server.site.historian.url.replace("{state_dir}", str(server.state_dir))
        self.refresh_s = server.site.server.directory.accounts_refresh_s
        self.cache_path = Path(server.state_dir) / "accounts.json"
        self.accounts: tuple[Account, ...] = ()
        """The accounts in force, as last read."""
        self.source = ""
        """Where they were last read from: ``database``, ``cache`` or "" (none yet)."""
        self.database_up = False
        self._roles = set(server.site.all_roles)
        self._warned: set[tuple[str, str]] = set()
        self._targets: list[AccountTarget] = []
        self._backend: Backend | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._supervisor: Supervisor | None = None
        self._refreshed = asyncio.Event()

    def attach(self, target: AccountTarget) -> None:
        """Serve the accounts to ``target`` (before it starts: its directory then offers password logins)."""
        target.users.accounts_source = "site database"
        self._targets.append(target)

    # ---- Service ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Read the accounts (the database's, else the saved copy), then re-read them periodically."""
        self._backend = open_backend(self.url, application_name="labctl accounts", pool_size=1)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="site-accounts")
        try:
            accounts = await self._call(self._load, True)
        except Exception as e:
            if not is_unreachable(e):
                self._close()
                raise LabctlError(f"site accounts in {self._backend.display_url}: {short(e)}") from e
            cached = await asyncio.to_thread(self._read_cache)
            log.warning(
                "site accounts: database %s unreachable (%s); %s until it returns",
                self._backend.display_url, short(e),
                f"using the {len(cached)} accounts saved in {self.cache_path}" if cached is not None
                else f"no accounts (none saved in {self.cache_path}): only anonymous logins",
            )  # fmt: skip
            if cached is not None:
                await self._apply(cached, "cache")
        else:
            self.database_up = True
            await self._apply(accounts, "database")
        self._supervisor = Supervisor("site accounts refresh", self._refresh_loop, logger=log)
        self._supervisor.start()

    async def stop(self) -> None:
        """Stop re-reading."""
        if self._supervisor is not None:
            await self._supervisor.stop()
            self._supervisor = None
        self._close()

    def _close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._backend is not None:
            self._backend.dispose()
            self._backend = None

    def endpoints(self) -> list[str]:
        """Where the accounts come from."""
        shown = self._backend.display_url if self._backend is not None else "(not started)"
        return [f"accounts from the site database {shown} (re-read every {self.refresh_s:g} s)"]

    def banner(self) -> list[str]:
        """A start-up line: how many accounts, from where."""
        disabled = sum(a.disabled for a in self.accounts)
        where = {"database": "the site database", "cache": f"the saved copy {self.cache_path}"}.get(self.source, "nowhere yet")
        return [f"accounts: {len(self.accounts)} from {where} ({disabled} disabled); manage them with `labctl user`"]

    # ---- refresh ------------------------------------------------------------------------------

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self.refresh()

    async def refresh(self) -> bool:
        """Read the accounts now and apply any change; False if the database is unreachable."""
        try:
            accounts = await self._call(self._load, False)
        except Exception as e:
            if not is_unreachable(e):
                raise
            if self.database_up:
                log.warning("site accounts: database %s unreachable (%s); keeping the %d accounts read last",
                            self._display(), short(e), len(self.accounts))
            self.database_up = False
            return False
        if not self.database_up:
            log.info("site accounts: database %s reachable again", self._display())
        self.database_up = True
        await self._apply(accounts, "database")
        self._refreshed.set()
        return True

    async def _apply(self, accounts: Sequence[Account], source: str) -> None:
        accounts = tuple(accounts)
        changed = accounts != self.accounts
        self.source = source
        if not changed:
            return
        self._check_roles(accounts)
        for target in self._targets:
            ended = target.users.replace_accounts(accounts)
            if ended:
                await target.end_sessions(ended)
        self.accounts = accounts
        if source == "database":
            try:
                await asyncio.to_thread(self._write_cache, accounts)
            except OSError as e:
                log.warning("site accounts: cannot save a copy in %s (%s); a start without the database will have no accounts",
                            self.cache_path, e)

    def _check_roles(self, accounts: Sequence[Account]) -> None:
        for a in accounts:
            for role in a.roles:
                if role not in self._roles and (a.name, role) not in self._warned:
                    self._warned.add((a.name, role))
                    log.warning("site accounts: user %r has role %r, which this server's site file does not define; "
                                "it grants nothing here (defined: %s)", a.name, role, ", ".join(sorted(self._roles)))

    # ---- on the accounts' thread ------------------------------------------------------------------

    async def _call(self, fn: Any, *args: Any) -> Any:
        if self._pool is None:
            raise LabctlError("the accounts service is not running")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _display(self) -> str:
        return self._backend.display_url if self._backend is not None else self.url

    def _load(self, ensure: bool) -> list[Account]:
        assert self._backend is not None
        with self._backend.engine.begin() as conn:
            if ensure:
                ensure_site_schema(conn, now_us())
            return sql.load_accounts(conn)

    def _write_cache(self, accounts: Sequence[Account]) -> None:
        doc = {
            "format": _CACHE_FORMAT, "version": _CACHE_VERSION, "site": self.site.site,
            "accounts": [
                {"name": a.name, "roles": list(a.roles), "password_hash": a.password_hash, "disabled": a.disabled,
                 "description": a.description, "updated": a.updated, "updated_by": a.updated_by}
                for a in accounts
            ],
        }  # fmt: skip
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_path.with_suffix(".json.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.cache_path)

    def _read_cache(self) -> list[Account] | None:
        try:
            doc = json.loads(self.cache_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.error("site accounts: cannot read the saved copy %s: %s", self.cache_path, e)
            return None
        if not isinstance(doc, dict) or doc.get("format") != _CACHE_FORMAT or doc.get("version") != _CACHE_VERSION:
            log.error("site accounts: %s is not a copy of the site's accounts written by this labctl; ignored", self.cache_path)
            return None
        if doc.get("site") != self.site.site:
            log.error("site accounts: %s holds the accounts of site %r, not %r; ignored", self.cache_path, doc.get("site"), self.site.site)
            return None
        try:
            return [
                Account(a["name"], tuple(a["roles"]), a["password_hash"], bool(a["disabled"]), a["description"],
                        float(a["updated"]), a["updated_by"])
                for a in doc["accounts"]
            ]  # fmt: skip
        except (KeyError, TypeError, ValueError) as e:
            log.error("site accounts: %s is damaged (%s); ignored", self.cache_path, e)
            return None


# ---- ``labctl user`` ------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``labctl user`` to the ``labctl`` command."""
    p = subparsers.add_parser(
        "user",
        help="manage the site-wide accounts in a site's database (server.accounts: database)",
        description=(
            "Add, change, disable and list the accounts every server of a site takes its OPC UA logins from "
            "(servers whose site file says server.accounts: database). Passwords are prompted for (twice) or read "
            "from the first line of standard input with --stdin, never taken from the command line; every change "
            "is recorded in the site's audit trail."
        ),
    )
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help: str) -> argparse.ArgumentParser:
        a = sub.add_parser(name, help=help, description=help)
        add_database_argument(a)
        return a

    a = action("add", "add an account (with a password unless --no-password)")
    a.add_argument("name", help="user name (letters, digits, '_' and '-', starting with a letter or '_')")
    a.add_argument("--roles", default="viewer", help="comma-separated roles (default: viewer)")
    a.add_argument("--description", default="", help="who this is, for people reading the list")
    a.add_argument("--no-password", action="store_true", help="an account without password login")
    a.add_argument("--stdin", action="store_true", help="read the password from the first line of standard input")
    a.add_argument("--site", type=Path, help="check the roles against this site file's roles")
    a.set_defaults(func=cmd_user_add)
    a = action("passwd", "set an account's password")
    a.add_argument("name")
    a.add_argument("--stdin", action="store_true", help="read the password from the first line of standard input")
    a.set_defaults(func=cmd_user_passwd)
    a = action("roles", "replace an account's roles (its open sessions are closed; it logs in again with the new roles)")
    a.add_argument("name")
    a.add_argument("roles", help="comma-separated roles")
    a.add_argument("--site", type=Path, help="check the roles against this site file's roles")
    a.set_defaults(func=cmd_user_roles)
    a = action("disable", "refuse an account's logins on every server of the site and close its sessions")
    a.add_argument("name")
    a.add_argument("--reason", default="", help="why, for the audit trail")
    a.set_defaults(func=cmd_user_disable)
    a = action("enable", "allow a disabled account to log in again")
    a.add_argument("name")
    a.add_argument("--reason", default="", help="why, for the audit trail")
    a.set_defaults(func=cmd_user_enable)
    a = action("list", "list the accounts (never their hashes)")
    a.add_argument("--json", action="store_true", help="one JSON array (times ISO 8601 UTC)")
    a.set_defaults(func=cmd_user_list)


def check_user_name(name: str) -> str:
    """``name`` if it can name an account, else a LabctlError saying why."""
    if not IDENT.match(name):
        raise LabctlError(f"user name {name!r} is not valid: letters, digits, '_' and '-', starting with a letter or '_'")
    if reserved(name):
        raise LabctlError(f"user name {name!r} is reserved for the server's internal actors (reserved: {sorted(RESERVED_NAMES)})")
    return name


def parse_roles(text: str, site_file: Path | None = None) -> tuple[str, ...]:
    """Comma-separated role names, checked (against ``site_file``'s roles when given), or a LabctlError naming the bad one.

    Without a site file, a role that is not one of the default roles is accepted with a
    warning: each server's site file must define it, or it grants nothing there.
    """
    roles = tuple(dict.fromkeys(r.strip() for r in text.split(",") if r.strip()))
    if not roles:
        raise LabctlError(f"no roles in {text!r}: give one or more, comma-separated (e.g. operator or viewer,expert)")
    for r in roles:
        if not IDENT.match(r):
            raise LabctlError(f"role name {r!r} is not valid: letters, digits, '_' and '-', starting with a letter or '_'")
        if reserved(r):
            raise LabctlError(f"role name {r!r} is reserved for the server's internal actors (reserved: {sorted(RESERVED_NAMES)})")
    if site_file is not None:
        from labctl.server.site import load_site  # the site model imports every adapter

        defined = load_site(site_file).all_roles
        unknown = [r for r in roles if r not in defined]
        if unknown:
            raise LabctlError(f"role {unknown[0]!r} is not defined in {site_file}; defined: {', '.join(sorted(defined))}")
    else:
        for r in roles:
            if r not in DEFAULT_ROLES:
                print(f"warning: role {r!r} is not a default role ({', '.join(DEFAULT_ROLES)}): every server's site file "
                      "must define it under roles, or it grants nothing there", file=sys.stderr)
    return roles


def read_new_password(from_stdin: bool) -> str:
    """A new password from the first line of standard input, or a prompt (twice); never empty."""
    if from_stdin or not sys.stdin.isatty():
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        if password.endswith("\r"):
            password = password[:-1]
    else:
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            raise LabctlError("the two passwords differ")
    if not password:
        raise LabctlError("the password is empty")
    return password


def _database(args: argparse.Namespace) -> Backend:
    return open_site_database(args.historian_url, "user")


def _write(backend: Backend, fn: Any) -> Any:
    def work(conn: Any) -> Any:
        ensure_site_schema(conn, now_us())
        return fn(conn)

    return run_on_database(backend, work, write=True)


def cmd_user_add(args: argparse.Namespace) -> int:
    """``labctl user add``."""
    name = check_user_name(args.name)
    roles = parse_roles(args.roles, args.site)
    backend = _database(args)
    _write(backend, lambda conn: sql.require_account(conn, name, exists=False))  # before asking for a password
    password_hash = None if args.no_password else hash_password(read_new_password(args.stdin))
    actor = command_actor()
    _write(backend, lambda conn: sql.add_account(conn, name, roles, password_hash, args.description, actor))
    how = "without password login" if password_hash is None else "with a password"
    print(f"added user {name!r} [{', '.join(roles)}] {how} to {backend.display_url}")
    return 0


def cmd_user_passwd(args: argparse.Namespace) -> int:
    """``labctl user passwd``."""
    name = check_user_name(args.name)
    backend = _database(args)
    _write(backend, lambda conn: sql.require_account(conn, name))  # before asking for a password
    password_hash = hash_password(read_new_password(args.stdin))
    _write(backend, lambda conn: sql.set_password(conn, name, password_hash, command_actor()))
    print(f"changed the password of user {name!r} in {backend.display_url}")
    return 0


def cmd_user_roles(args: argparse.Namespace) -> int:
    """``labctl user roles``."""
    name = check_user_name(args.name)
    roles = parse_roles(args.roles, args.site)
    backend = _database(args)
    before, after = _write(backend, lambda conn: sql.set_roles(conn, name, roles, command_actor()))
    print(f"user {name!r}: roles {', '.join(before.roles) or '(none)'} -> {', '.join(after.roles)}")
    return 0


def _set_disabled(args: argparse.Namespace, disabled: bool) -> int:
    name = check_user_name(args.name)
    backend = _database(args)
    _, changed = _write(backend, lambda conn: sql.set_disabled(conn, name, disabled, command_actor(), args.reason))
    state = "disabled" if disabled else "enabled"
    print(f"user {name!r} {state}" if changed else f"user {name!r} was already {state}; nothing changed")
    return 0


def cmd_user_disable(args: argparse.Namespace) -> int:
    """``labctl user disable``."""
    return _set_disabled(args, True)


def cmd_user_enable(args: argparse.Namespace) -> int:
    """``labctl user enable``."""
    return _set_disabled(args, False)


def cmd_user_list(args: argparse.Namespace) -> int:
    """``labctl user list``."""
    backend = _database(args)
    accounts = run_on_database(backend, lambda conn: sql.load_accounts(conn) if has_site_schema(conn) else [], write=False)
    if args.json:
        print(json.dumps([a.as_json() for a in accounts], indent=2))
        return 0
    head = ("NAME", "ROLES", "PASSWORD", "STATE", "UPDATED (UTC)", "BY", "DESCRIPTION")
    rows = [
        (a.name, ",".join(a.roles), "yes" if a.password_hash else "no", "disabled" if a.disabled else "enabled",
         iso_utc(a.updated)[:19].replace("T", " "), a.updated_by, a.description)
        for a in accounts
    ]  # fmt: skip
    if not rows:
        print(f"no accounts in {backend.display_url} (labctl user add NAME --roles ...)", file=sys.stderr)
        return 0
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0
