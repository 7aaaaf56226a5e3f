"""A site of several servers: the shapes and settings every part of the server shares.

Theory of operation. A *site* is one or more labctl servers sharing one PostgreSQL (or
TimescaleDB) database, the URL of their historian. Each server owns its PVs, as an EPICS
IOC or a Tango device server does; what they share lives in that database:

* the **site directory**: one row per server (:class:`ServerEntry`: name, endpoints,
  version, PV count, when it started, its last heartbeat, its health) and the owner of
  every PV. A server registers at start-up and then heartbeats every
  ``server.directory.heartbeat_s``; it counts as *down* once its last heartbeat is older
  than its ``server.directory.lapse_s`` by the database's clock (so the servers' own
  clocks never matter), or at once when it stopped cleanly. A server refuses to start
  when a PV of its site file is owned by another server that is up; the PVs of a server
  that is down are taken over (:mod:`labctl.server.sitedir`);
* **accounts** (:class:`Account`): user names, salted password hashes, roles and a
  disabled flag, managed with ``labctl user`` and read by every server whose site file
  says ``server.accounts: database`` (:mod:`labctl.server.accounts`);
* the archive and the audit trail of the historian.

A site with a SQLite historian is a single server: it has no directory, and its accounts
are the site file's ``users``.

This module holds only plain data, settings and errors, with no database code, so the
protocol adapters can read the directory through the services that keep it without
depending on the historian (:mod:`labctl.server.historian.directory` holds the tables):
:class:`SiteDirectory` is what they read of the directory service, which keeps the one
copy of the site's servers and of the PV -> owner map that every adapter answers from.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from labctl.ioc.config.base import Model, PositiveSeconds
from labctl.ioc.errors import LabctlError
from pydantic import Field

#: A server name: a letter or digit, then letters, digits, ``_``, ``-`` or ``.`` (at most 63 characters).
SERVER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")

#: Where a server's OPC UA accounts come from (``server.accounts``).
AccountSource = Literal["site_file", "database"]

#: Health of a server as its heartbeat reports it.
HEALTH_STARTING = "starting"
"""Registered; its services are starting."""
HEALTH_OK = "ok"
"""Serving, nothing to report."""
HEALTH_DEGRADED = "degraded"
"""Serving with a problem (instruments not connected, samples waiting in the spool): see the detail."""
HEALTH_CONFLICT = "conflict"
"""Serving PVs the directory gives to another server (the database was away when the server started)."""
HEALTH_STOPPED = "stopped"
"""Stopped cleanly: down at once, its PVs free to be taken over."""


class DirectoryConfig(Model):
    """The site directory (``server.directory``): used when the historian's URL is PostgreSQL."""

    enabled: bool = True
    """Register this server in the site directory of its PostgreSQL historian database (a SQLite
    historian has none). ``false``: the server neither registers nor checks PV ownership."""
    heartbeat_s: PositiveSeconds = 2.0
    """Seconds between two heartbeats of this server."""
    lapse_s: PositiveSeconds = 10.0
    """A server whose last heartbeat is older than this (by the database's clock) is down, and its
    PVs may be taken over. At least twice ``heartbeat_s``."""
    accounts_refresh_s: PositiveSeconds = 2.0
    """With ``server.accounts: database``: seconds between two readings of the site's accounts, so
    an account disabled anywhere is refused here within this time."""
    jobs_refresh_s: PositiveSeconds = 2.0
    """With a PostgreSQL historian: seconds between two readings of the other servers' jobs, which
    are listed and read through this server too."""
    address: str | None = Field(None, min_length=1)
    """The host name or address other servers and clients reach this server at, published in the
    directory (default: the bound interface, or this host's name when bound to all interfaces)."""


@dataclass(frozen=True)
class ServerEntry:
    """One server of the site as the directory knows it."""

    name: str
    site: str
    """The ``site`` of its site file."""
    host: str
    """The host it runs on, and its process id."""
    pid: int
    version: str
    """labctl's version."""
    opcua_endpoint: str
    """``opc.tcp://host:port`` ("" when it serves no OPC UA, or before it serves)."""
    ca_address: str
    """Channel Access interface(s), comma-separated ("" when it serves no CA)."""
    ca_port: int | None
    """The Channel Access server (UDP search) port."""
    ca_tcp_port: int | None
    """The TCP port of its Channel Access circuits (the server port unless that was taken)."""
    pv_count: int
    started: float
    """When it registered, UNIX seconds (the database's clock)."""
    heartbeat: float
    """Its last heartbeat, UNIX seconds (the database's clock)."""
    heartbeat_s: float
    lapse_s: float
    health: str
    """``starting``, ``ok``, ``degraded``, ``conflict`` or ``stopped`` (the ``HEALTH_*`` constants)."""
    detail: str
    """What is degraded or in conflict ("" when nothing)."""
    age_s: float
    """Seconds since its last heartbeat when the directory was read (the database's clock)."""

    @property
    def up(self) -> bool:
        """Whether it serves: not stopped, and its last heartbeat is within its lapse."""
        return self.health != HEALTH_STOPPED and self.age_s <= self.lapse_s

    @property
    def state(self) -> str:
        """``up`` or ``down``."""
        return "up" if self.up else "down"

    def describe(self) -> str:
        """``'rack-a' (opc.tcp://rack-a:4840, up, last heartbeat 0.4 s ago)``, for messages."""
        where = self.opcua_endpoint or (f"ca {self.ca_address}:{self.ca_port}" if self.ca_address else f"host {self.host}")
        return f"{self.name!r} ({where}, {self.state}, last heartbeat {self.age_s:.1f} s ago)"

    def as_json(self) -> dict[str, Any]:
        """A JSON object: every field, with ``state`` and times as ISO 8601 UTC."""
        doc = asdict(self)
        doc["started"] = iso_utc(self.started)
        doc["heartbeat"] = iso_utc(self.heartbeat)
        doc["age_s"] = round(self.age_s, 3)
        doc["state"] = self.state
        return doc


#: Each server's (name, registration time, PV count): see :func:`ownership`.
Ownership = tuple[tuple[str, float, int], ...]


def ownership(servers: Iterable[ServerEntry]) -> Ownership:
    """What changes when PVs may have changed hands: each server's registration time and PV count.

    A server registers (taking over PVs of servers that are down, dropping PVs no longer in
    its site file) when it starts and when its heartbeat had lapsed, and each registration
    sets ``started``; a server forgotten with ``labctl servers --forget`` leaves the tuple.
    """
    return tuple(sorted((e.name, e.started, e.pv_count) for e in servers))


class SiteDirectory(Protocol):
    """What the protocol adapters read from the site directory service (``server.service("sitedir")``).

    The service (:class:`labctl.server.sitedir.SiteDirectoryService`) keeps the site's
    servers and the owner map in memory, on the event loop; the adapters answer from
    these and never query the database for them.
    """

    server_name: str
    """This server's name in the directory."""
    servers: tuple[ServerEntry, ...]
    """The site's servers as of the last heartbeat, by name."""
    config: DirectoryConfig
    """``server.directory`` of the site file."""
    owners_loaded: bool
    """Whether the owner map was read at least once."""

    @property
    def owners(self) -> Mapping[str, str]:
        """PV name -> owning server, for every PV of the site, as last read (read-only)."""
        ...

    def add_listener(self, callback: Callable[[tuple[ServerEntry, ...]], None]) -> None:
        """Call ``callback(servers)`` on the event loop when a server comes, goes or changes, or the owners were read."""
        ...

    def remove_listener(self, callback: Callable[[tuple[ServerEntry, ...]], None]) -> None:
        """Stop calling ``callback``."""
        ...

    async def lookup_owners(self, names: Iterable[str]) -> dict[str, str]:
        """The owners of ``names`` read now (off the event loop), added to :attr:`owners`; raises if unreadable."""
        ...


@dataclass(frozen=True)
class Account:
    """A site-wide account (``server.accounts: database``)."""

    name: str
    roles: tuple[str, ...]
    password_hash: str | None
    """``scrypt$N$r$p$salt$hash`` (:mod:`labctl.server.passwords`); None: no password login."""
    disabled: bool = False
    """A disabled account cannot log in; its open sessions are closed."""
    description: str = ""
    updated: float = 0.0
    """When it last changed, UNIX seconds."""
    updated_by: str = ""
    """Who changed it last (``user@host``)."""

    def as_json(self) -> dict[str, Any]:
        """A JSON object without the password hash (only whether there is one)."""
        return {
            "name": self.name,
            "roles": list(self.roles),
            "password": self.password_hash is not None,
            "disabled": self.disabled,
            "description": self.description,
            "updated": iso_utc(self.updated),
            "updated_by": self.updated_by,
        }


class SiteDirectoryError(LabctlError):
    """The site directory refuses what this server (or command) asked."""


class PVsOwnedElsewhere(SiteDirectoryError):
    """PVs of this server's site file are owned by other servers of the site that are up."""

    def __init__(self, server: str, conflicts: list[tuple[str, ServerEntry]]) -> None:
        self.server = server
        self.conflicts = conflicts
        """(PV name, the server that owns it), by PV name."""
        shown = "; ".join(f"PV {pv!r} is served by {owner.describe()}" for pv, owner in conflicts[:10])
        more = f"; and {len(conflicts) - 10} more PVs" if len(conflicts) > 10 else ""
        super().__init__(
            f"server {server!r} cannot serve {len(conflicts)} PV(s) of its site file that other servers of the site own: "
            f"{shown}{more}. Rename or remove them in this site file, or stop the other server "
            f"(its PVs are taken over once it is down)"
        )


class ServerNameTaken(SiteDirectoryError):
    """Another server that is up, on another host, registered under this server's name."""


class SiteMismatch(SiteDirectoryError):
    """The database holds the directory of another site."""


def default_server_name() -> str:
    """This host's name up to its first dot (the default of ``server.name``)."""
    return socket.gethostname().split(".", 1)[0]


def check_server_name(name: str, key: str = "server.name") -> str:
    """``name`` if it is a valid server name, else a SiteDirectoryError saying what is allowed."""
    if not SERVER_NAME.match(name):
        raise SiteDirectoryError(
            f"{key}: {name!r} is not a valid server name (a letter or digit, then letters, digits, '_', '-' or '.', "
            "at most 63 characters)"
        )
    return name


def is_site_database(url: str) -> bool:
    """Whether a historian URL names a PostgreSQL database (one that can hold a site directory)."""
    scheme = url.split(":", 1)[0].split("+", 1)[0].lower()
    return scheme in ("postgresql", "postgres")


def iso_utc(t: float) -> str:
    """UNIX seconds as ISO 8601 in UTC with its zone."""
    return datetime.fromtimestamp(t, UTC).isoformat()
