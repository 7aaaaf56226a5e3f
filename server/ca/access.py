"""Channel Access security: who a CA client is, and what it may do.

Theory of operation. A Channel Access client *reports* its user and host names (as in
EPICS, where an IOC's access security trusts them); nothing authenticates them. So a CA
client gets no role by default -- it may read everything and write nothing -- and the
site file grants roles by explicit rules, in the spirit of an EPICS access security file
(ACF)::

    server:
      ca:
        access:
          user_groups: {operators: [alice, bob]}
          host_groups: {control_room: [cr-ws*, 10.0.1.*]}
          rules:
            - {users: [operators], hosts: [control_room], roles: [operator]}

A client matches a rule when its user matches one entry of ``users`` and its host one
entry of ``hosts``; an entry is a group name (a key of ``user_groups``/``host_groups``)
or a name pattern (``fnmatch`` globs; host names compare case-insensitively, as DNS
names do). Every matching rule adds its roles. A client that reported no user (or no
host) name matches no rule. With ``check_client_ip`` the host entries are matched
against the client's IP address as the server sees it, which a client cannot forge on a
TCP connection, instead of the name it reports (EPICS ``asCheckClientIP``); the server's
circuit then hands the address over as the client's host (see :mod:`labctl.server.ca.context`).

Locks. A lease belongs to the client that took it (:mod:`labctl.ioc.arbiter`), and a CA
client is its *circuit* -- its TCP connection, ``ca:<user>@<host>/<ip>:<port>``
(:attr:`Client.circuit`). A second connection reporting the same user name, from the same
host or another, is another client: it is refused while the first holds the lock, and
sees READ only on the resource's channels. A circuit's lease is not carried over to a
reconnection: it lapses at its expiry (or is taken again).

A CA identity is never internal (``Identity.internal``, which only the server's own
actors carry): a client that reports the internal actors' user name (``labctl``) gets
what the rules grant that name and nothing more -- it neither bypasses a check nor owns
an internal actor's lease -- and the site loader refuses rules that grant a reserved role.

The roles then go through the same :class:`~labctl.ioc.access.RolePolicy` and lock checks as
every other protocol: the access rights of a channel are READ|WRITE exactly when
:meth:`~labctl.ioc.database.Database.may_write` says this identity may write that PV now, and
READ otherwise. The rights depend on the PV, the client and the moment (lock holders
change), so :func:`access_rights` is evaluated per channel and may be re-evaluated later
for channels already open (see :meth:`labctl.server.ca.context.LabctlContext.refresh_access_rights`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from caproto import AccessRights
from labctl.ioc.database import Database
from labctl.ioc.types import Identity
from labctl.server.ca.config import CAAccessConfig

#: The ``protocol`` of every identity this adapter builds.
PROTOCOL = "ca"


@dataclass(frozen=True, slots=True)
class Client:
    """What a CA client told us about itself, and where it connects from."""

    user: str | None
    """The user name it reported (None if it sent none)."""
    host: str | None
    """The host name it reported (None if it sent none); with ``check_client_ip``, its address."""
    address: str | None = None
    """Its IP address as the server sees it."""
    port: int | None = None
    """Its TCP port as the server sees it: with the address, which circuit (connection) it is."""

    @classmethod
    def of(cls, hostname: str | None, username: str | None, user_address: Any = None) -> Client:
        """From caproto's hook arguments (``user_address``: the circuit's peer ``(ip, port)``, if known)."""
        if user_address:
            return cls(username, hostname, str(user_address[0]), int(user_address[1]) if len(user_address) > 1 else None)
        return cls(username, hostname)

    @property
    def circuit(self) -> str:
        """The arbiter's client of this CA client: ``ca:<user>@<host>/<ip>:<port>``, one per circuit."""
        where = f"/{self.address}:{self.port}" if self.address is not None and self.port is not None else ""
        return f"ca:{self.user or ''}@{self.host or ''}{where}"


class AccessRules:
    """The site's CA access rules, compiled: client -> roles -> :class:`Identity`."""

    def __init__(self, cfg: CAAccessConfig) -> None:
        self.cfg = cfg
        self.check_client_ip = cfg.check_client_ip
        self._rules = [
            (
                _expand(rule.users, cfg.user_groups, fold=False),
                _expand(rule.hosts, cfg.host_groups, fold=True),
                frozenset(rule.roles),
            )
            for rule in cfg.rules
        ]
        # The same few clients ask again and again (one identity per channel and write).
        self.roles_for = lru_cache(maxsize=1024)(self._roles_for)

    def _roles_for(self, user: str | None, host: str | None) -> frozenset[str]:
        """The roles granted to ``user`` on ``host`` (empty: read-only)."""
        if not user or not host:
            return frozenset()
        folded = host.lower()
        roles: set[str] = set()
        for users, hosts, granted in self._rules:
            if _matches(user, users) and _matches(folded, hosts):
                roles |= granted
        return frozenset(roles)

    def identity(self, client: Client) -> Identity:
        """The identity a request from ``client`` is made with."""
        return Identity(  # never internal=True: only the server's own actors are
            user=client.user or "",
            roles=self.roles_for(client.user, client.host),
            protocol=PROTOCOL,
            host=client.host or client.address or "",
            client=client.circuit,
        )


def access_rights(db: Database, pv: str, identity: Identity) -> AccessRights:
    """READ|WRITE if ``identity`` may write ``pv`` now, else READ (reads are never refused)."""
    if db.may_write(pv, identity):
        return AccessRights.READ | AccessRights.WRITE
    return AccessRights.READ


def _expand(entries: Iterable[str], groups: dict[str, tuple[str, ...]], *, fold: bool) -> tuple[str, ...]:
    """Replace group names by their members; keep other entries as patterns."""
    out: list[str] = []
    for entry in entries:
        out.extend(groups.get(entry, (entry,)))
    return tuple(p.lower() for p in out) if fold else tuple(out)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)
