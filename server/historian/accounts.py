"""Site-wide accounts in the site's PostgreSQL database, every change audited in the same transaction.

Theory of operation. ``site_user`` (:mod:`labctl.server.historian.directory`) holds one row
per account: its salted password hash (never a password), roles, disabled flag and who
changed it last. Each change here -- :func:`add_account`, :func:`set_password`,
:func:`set_roles`, :func:`set_disabled` -- runs in the caller's transaction together with
its record in the historian's audit trail (``audit_event``: action ``user.add``,
``user.passwd``, ``user.roles``, ``user.disable`` or ``user.enable``, target
``user:<name>``, old and new values without any hash), so a change is never made without
its record, nor recorded without being made. The row is locked while it changes, so two
administrators changing one account at once are serialised.

Servers read every account with :func:`load_accounts` (a site has tens or hundreds: one
small query) every ``server.directory.accounts_refresh_s``.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from labctl.server.historian.directory import DB_NOW_US, site_user
from labctl.server.historian.schema import audit_event
from labctl.server.siteinfo import Account, SiteDirectoryError
from sqlalchemy import insert, select, text, update
from sqlalchemy.engine import Connection


class AccountError(SiteDirectoryError):
    """An account change the database refuses: no such account, or it exists already."""


@dataclass(frozen=True)
class Actor:
    """Who changes accounts, as the audit trail names them: the operating-system user and host of the command."""

    user: str
    host: str
    protocol: str = "cli"

    def __str__(self) -> str:
        return f"{self.user}@{self.host}"


def _now(conn: Connection) -> int:
    return int(conn.execute(text(f"SELECT {DB_NOW_US}")).scalar_one())


def _account(row: Any) -> Account:
    return Account(
        name=row.name,
        roles=tuple(json.loads(row.roles)),
        password_hash=row.password_hash,
        disabled=bool(row.disabled),
        description=row.description or "",
        updated=row.updated_us / 1_000_000,
        updated_by=row.updated_by,
    )


def load_accounts(conn: Connection) -> list[Account]:
    """Every account of the site, by name."""
    return [_account(r) for r in conn.execute(select(site_user).order_by(site_user.c.name))]


def find_account(conn: Connection, name: str) -> Account | None:
    """One account, or None."""
    row = conn.execute(select(site_user).where(site_user.c.name == name)).first()
    return None if row is None else _account(row)


def require_account(conn: Connection, name: str, *, exists: bool = True) -> None:
    """Raise AccountError unless the account exists (``exists``) or does not (``exists=False``)."""
    found = find_account(conn, name) is not None
    if exists and not found:
        raise AccountError(f"no user {name!r} in the site database (`labctl user list` shows them; `labctl user add` adds one)")
    if found and not exists:
        raise AccountError(f"user {name!r} exists already in the site database (change it with `labctl user passwd|roles|enable`)")


def _locked(conn: Connection, name: str) -> Account:
    row = conn.execute(select(site_user).where(site_user.c.name == name).with_for_update()).first()
    if row is None:
        raise AccountError(f"no user {name!r} in the site database (`labctl user list` shows them; `labctl user add` adds one)")
    return _account(row)


def _audit(conn: Connection, now: int, actor: Actor, action: str, name: str, old: Any, new: Any, reason: str = "") -> None:
    conn.execute(
        insert(audit_event).values(
            uid=uuid.uuid4().hex, time_us=now, action=action, user_name=actor.user, protocol=actor.protocol, host=actor.host,
            target=f"user:{name}", old_value=None if old is None else json.dumps(old),
            new_value=None if new is None else json.dumps(new), accepted=True, reason=reason, inserted_us=now,
        )
    )  # fmt: skip


def add_account(
    conn: Connection, name: str, roles: tuple[str, ...], password_hash: str | None, description: str, actor: Actor
) -> Account:
    """A new account (audited as ``user.add``).

    Raises:
        AccountError: an account of that name exists.
    """
    now = _now(conn)
    require_account(conn, name, exists=False)
    conn.execute(
        insert(site_user).values(
            name=name, password_hash=password_hash, roles=json.dumps(list(roles)), disabled=False, description=description,
            created_us=now, updated_us=now, updated_by=str(actor),
        )
    )  # fmt: skip
    new = {"roles": list(roles), "password": password_hash is not None, "description": description}
    _audit(conn, now, actor, "user.add", name, None, new)
    return _locked(conn, name)


def set_password(conn: Connection, name: str, password_hash: str | None, actor: Actor) -> Account:
    """Replace an account's password hash (None: no password login); audited as ``user.passwd`` without the hash."""
    old = _locked(conn, name)
    now = _now(conn)
    conn.execute(update(site_user).where(site_user.c.name == name).values(password_hash=password_hash, updated_us=now, updated_by=str(actor)))
    _audit(conn, now, actor, "user.passwd", name, {"password": old.password_hash is not None}, {"password": password_hash is not None})
    return _locked(conn, name)


def set_roles(conn: Connection, name: str, roles: tuple[str, ...], actor: Actor) -> tuple[Account, Account]:
    """Replace an account's roles (audited as ``user.roles``); return (before, after)."""
    old = _locked(conn, name)
    now = _now(conn)
    conn.execute(update(site_user).where(site_user.c.name == name).values(roles=json.dumps(list(roles)), updated_us=now, updated_by=str(actor)))
    _audit(conn, now, actor, "user.roles", name, list(old.roles), list(roles))
    return old, _locked(conn, name)


def set_disabled(conn: Connection, name: str, disabled: bool, actor: Actor, reason: str = "") -> tuple[Account, bool]:
    """Disable or enable an account (audited as ``user.disable``/``user.enable``); return it and whether it changed.

    An account already in the asked state is left alone, and nothing is audited.
    """
    old = _locked(conn, name)
    if old.disabled == disabled:
        return old, False
    now = _now(conn)
    conn.execute(update(site_user).where(site_user.c.name == name).values(disabled=disabled, updated_us=now, updated_by=str(actor)))
    action = "user.disable" if disabled else "user.enable"
    _audit(conn, now, actor, action, name, {"disabled": old.disabled}, {"disabled": disabled}, reason)
    return _locked(conn, name), True
