"""The site directory service: this server's row and PV claims in its site's database, and ``labctl servers``.

Theory of operation. A server whose historian URL is PostgreSQL registers in the site
directory of that database (:mod:`labctl.server.siteinfo` says what a site is; the tables
and SQL are in :mod:`labctl.server.historian.directory`). :class:`SiteDirectoryService` is
the first service to start and the last to stop:

* ``start()`` creates or upgrades the schema and registers: this server's name
  (``server.name``, default the host name), its site, process, version and PV count, and
  a claim on its PVs: those of its site file, with the state PVs of its interlocks and
  the lock PVs of its lockable resources (so interlock and resource names, too, are
  unique in a site), but not its alarm summary (``ALARM:...``), which each server keeps
  for its own alarms. A PV owned by another server that is *up* stops
  the start-up with :class:`~labctl.server.siteinfo.PVsOwnedElsewhere`, naming the PV and
  both servers, before the historian archives anything or a protocol binds (``labctl
  serve`` exits 1); PVs of a server that is *down* are taken over (logged). If the
  database is unreachable the server starts anyway (it serves, and its historian spools):
  the PV ownership is then checked when the database returns, too late to refuse, so
  PVs that another server owns by then are left to it, logged as errors and reported as
  the health ``conflict``.
* once every service runs (``serving()``) and then every ``server.directory.heartbeat_s``
  it heartbeats: endpoints (OPC UA URL, Channel Access interfaces and ports, with
  ``server.directory.address`` in place of a wildcard interface), PV count, and health
  (``ok``; ``degraded`` with what is wrong: instruments not connected, samples waiting in
  the historian's spool; ``conflict``). Heartbeats run on a thread of their own, never on
  the event loop. A heartbeat that finds the database away is logged once; the first one
  that reaches it again registers anew (the database may be a new one, and other servers
  may have taken PVs over while this one looked down), and so does one that finds its
  previous heartbeat lapsed.
* ``stop()`` marks the server ``stopped`` (down at once; its PVs may be taken over).

Reading the directory. The service keeps the server's one copy of the site in memory,
for every part of the server that needs it (the Channel Access name service, the OPC UA
``Site`` folder and ``FindOwners``), so none of them queries the database for it:

* :attr:`SiteDirectoryService.servers`: the site's servers as of the last heartbeat (each
  heartbeat reads them in its transaction);
* :attr:`SiteDirectoryService.owners`: the *owner map*, PV name -> owning server, for
  every PV of the site. A heartbeat (or registration) reads it whole, in the same
  transaction as the servers, only when ownership may have changed: when a server's
  registration time or PV count differs from those of the last reading, or a server
  came or went (:func:`~labctl.server.siteinfo.ownership`), and until it was read once.
  While the database is away the last reading stays. :meth:`SiteDirectoryService.lookup_owners`
  reads the owners of a few names now and adds those found (the CA name service asks
  for names searched between two readings).

Listeners added with :meth:`SiteDirectoryService.add_listener` are called on the event
loop when a server comes, goes or changes, and when the owner map was read again;
:meth:`SiteDirectoryService.read_servers` and :meth:`SiteDirectoryService.read_owners`
ask the database now and change nothing. Other services reach the service as
``server.service("sitedir")``, typed by :class:`~labctl.server.siteinfo.SiteDirectory`.
Without a server, ``labctl servers`` and :func:`open_site_database` with
:mod:`labctl.server.historian.directory` read the same tables; the table it prints is
the client's (:func:`labctl.clients.cli.servers.format_servers`), so both ways of
``labctl servers`` print the same.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import json
import logging
import os
import socket
import sys
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

from labctl.ioc.alarms import SUMMARY_PVS
from labctl.ioc.errors import LabctlError
from labctl.server.historian import directory as sql
from labctl.server.historian.accounts import Actor
from labctl.server.historian.backend import Backend, is_unreachable, open_backend, short
from labctl.server.historian.ingest import now_us
from labctl.server.historian.schema import audit_event
from labctl.server.siteinfo import (
    HEALTH_CONFLICT,
    HEALTH_DEGRADED,
    HEALTH_OK,
    HEALTH_STARTING,
    Ownership,
    ServerEntry,
    SiteDirectoryError,
    check_server_name,
    default_server_name,
    is_site_database,
    ownership,
)
from sqlalchemy import insert, inspect

from labctl import __version__
from labctl.supervision import Supervisor

if TYPE_CHECKING:
    from labctl.clients.site import ServerInfo
    from labctl.server.app import Server

log = logging.getLogger(__name__)

T = TypeVar("T")
_WILDCARDS = ("0.0.0.0", "::", "")
#: Listeners are told when one of these fields of a server changes (not at every heartbeat).
_SHOWN = ("name", "up", "health", "detail", "opcua_endpoint", "ca_address", "ca_port", "ca_tcp_port", "pv_count", "started", "version")


@dataclass
class _Outcome:
    """What one heartbeat (or registration) found, handed from the worker thread to the loop."""

    claimed: sql.Claimed | None = None
    superseded: ServerEntry | None = None
    servers: list[ServerEntry] = field(default_factory=list)
    owners: dict[str, str] | None = None
    """The owner map, read whole because ownership changed (None: not read, unchanged)."""
    ownership: Ownership | None = None
    """:func:`~labctl.server.siteinfo.ownership` of ``servers``, when ``owners`` was read."""


class SiteDirectoryService:
    """Registers this server in its site's directory and heartbeats (see the module docstring)."""

    name = "sitedir"
    storage = True
    """Stopped after every other service: the server shows as up while it still serves."""

    def __init__(self, server: Server) -> None:
        self.server = server
        site = server.site
        self.config = site.server.directory
        if site.server.name is not None:
            self.server_name = site.server.name
        else:
            self.server_name = check_server_name(default_server_name(), "server.name (not set; the host name)")
        self.site_name = site.site
        self.url = site.historian.url.replace("{state_dir}", str(server.state_dir))
        self.instance = uuid.uuid4().hex
        """A random id of this process's registration: tells a restart from a second process of the same name."""
        self.host = socket.gethostname()
        self.servers: tuple[ServerEntry, ...] = ()
        """The site's servers as of the last heartbeat, by name (this one included)."""
        self.owners_loaded = False
        """Whether the owner map (:attr:`owners`) was read at least once."""
        self._owners: dict[str, str] = {}
        self._ownership: Ownership | None = None
        """What the owner map was last read for (:func:`~labctl.server.siteinfo.ownership` of the servers then)."""
        self.conflicts: list[tuple[str, ServerEntry]] = []
        """PVs of this server owned by other servers that are up (only after a start without the database)."""
        self.registered = False
        self.database_up = False
        """Whether the last attempt reached the database."""
        self.superseded_by: ServerEntry | None = None
        """Another process registered under this server's name since (this one stops heartbeating)."""
        self.refused = ""
        """Why registering again (after an outage) was refused, if it was (this one stops heartbeating)."""
        self._serving = False
        self._backend: Backend | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._supervisor: Supervisor | None = None
        self._lock = asyncio.Lock()
        self._listeners: list[Callable[[tuple[ServerEntry, ...]], None]] = []
        self._shown: tuple = ()
        self._schema_ready = False
        self._pv_names = [n for n in server.db.names() if n not in SUMMARY_PVS]  # fixed once the database is built
        """The PVs this server claims: all but its alarm summary (see the module docstring)."""

    # ---- Service -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Register and claim the PVs (refusing PVs owned by servers that are up); start heartbeating."""
        self._backend = open_backend(self.url, application_name=f"labctl site directory {self.server_name}", pool_size=1)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="site-directory")
        try:
            outcome = await self._call(self._register, self._ownership)
        except SiteDirectoryError:
            self._close()
            raise
        except Exception as e:
            if not is_unreachable(e):
                self._close()
                raise SiteDirectoryError(f"site directory {self._backend.display_url}: {short(e)}") from e
            self._went_down(e)
            log.warning(
                "site directory %s unreachable (%s): server %r serves without checking who owns its PVs; "
                "it registers when the database returns",
                self._backend.display_url, short(e), self.server_name,
            )  # fmt: skip
        else:
            self._apply(outcome, first=True)
        self._supervisor = Supervisor(f"site directory heartbeat of {self.server_name}", self._beat_loop, logger=log)
        self._supervisor.start()

    async def serving(self) -> None:
        """Every service runs: heartbeat now, with the endpoints and health ``ok`` (or what is wrong)."""
        self._serving = True
        await self.beat()

    async def stop(self) -> None:
        """Stop heartbeating and mark this server stopped (down at once)."""
        if self._supervisor is not None:
            await self._supervisor.stop()
            self._supervisor = None
        if self._backend is not None and self.registered and self.database_up and self.superseded_by is None and not self.refused:
            try:
                await self._call(self._mark_stopped)
            except Exception as e:  # the database went away meanwhile: the heartbeat simply lapses
                log.warning("site directory: cannot mark server %r stopped (%s); it shows as down once its heartbeat lapses",
                            self.server_name, short(e))
        self._close()

    def _close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._backend is not None:
            self._backend.dispose()
            self._backend = None

    def endpoints(self) -> list[str]:
        """Where the directory is, and this server's name in it."""
        shown = self._backend.display_url if self._backend is not None else "(not started)"
        return [
            f"site directory {shown}: server {self.server_name!r} of site {self.site_name!r} "
            f"(heartbeat every {self.config.heartbeat_s:g} s, down after {self.config.lapse_s:g} s)"
        ]

    # ---- reading the directory --------------------------------------------------------------------

    def add_listener(self, callback: Callable[[tuple[ServerEntry, ...]], None]) -> None:
        """Call ``callback(servers)`` on the event loop whenever a server of the site comes, goes, or changes."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[tuple[ServerEntry, ...]], None]) -> None:
        """Stop calling ``callback``."""
        self._listeners.remove(callback)

    @property
    def owners(self) -> Mapping[str, str]:
        """PV name -> owning server, for every PV of the site, as last read (see the module docstring); read-only."""
        return MappingProxyType(self._owners)

    async def lookup_owners(self, names: Iterable[str]) -> dict[str, str]:
        """The owners of ``names`` read now (those that have one), added to :attr:`owners`; raises if unreadable.

        For names the owner map lacks: a server that registered since the last heartbeat.
        """
        found = await self.read_owners(names)
        self._owners.update(found)
        return found

    @property
    def me(self) -> ServerEntry | None:
        """This server's entry as of the last heartbeat."""
        return next((e for e in self.servers if e.name == self.server_name), None)

    async def read_servers(self) -> list[ServerEntry]:
        """The site's servers now, from the database (raises if it is unreachable)."""
        return await self._call(self._read, sql.read_servers)

    async def read_owners(self, names: Iterable[str] | None = None) -> dict[str, str]:
        """PV name -> owning server's name, now, for every PV of the site (or those named)."""
        wanted = None if names is None else list(names)
        return await self._call(self._read, lambda conn: sql.read_owners(conn, wanted))

    # ---- heartbeat ------------------------------------------------------------------------------

    async def _beat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            await self.beat()

    async def beat(self) -> None:
        """One heartbeat now (registering again when it must; see the module docstring)."""
        if self.superseded_by is not None or self.refused:
            return
        async with self._lock:
            beat = self._beat_fields()
            try:
                outcome = await self._call(self._heartbeat, beat, self._ownership)
            except SiteDirectoryError as e:  # registering again was refused (the name, the site)
                self.refused = str(e)
                log.error("site directory: server %r no longer heartbeats: %s", self.server_name, e)
                return
            except Exception as e:
                if not is_unreachable(e):
                    raise
                if self.database_up:
                    log.warning("site directory %s unreachable (%s): server %r keeps serving; the directory catches up "
                                "when the database returns", self._display(), short(e), self.server_name)
                self._went_down(e)
                return
            if not self.database_up:
                log.info("site directory %s reachable again", self._display())
            self._apply(outcome, first=False)

    def _went_down(self, e: BaseException) -> None:
        self.database_up = False
        self._schema_ready = False  # it may come back as a new database

    def _apply(self, outcome: _Outcome, *, first: bool) -> None:
        self.database_up = True
        if outcome.superseded is not None:
            self.superseded_by = outcome.superseded
            log.error(
                "site directory: server name %r was registered by another process since (host %s, pid %d): this server "
                "no longer heartbeats and shows as that one; give each server its own server.name",
                self.server_name, outcome.superseded.host, outcome.superseded.pid,
            )  # fmt: skip
        claimed = outcome.claimed
        if claimed is not None:
            self.registered = True
            self.conflicts = claimed.conflicts
            self._report(claimed, first)
        self.servers = tuple(outcome.servers)
        if outcome.owners is not None:
            self._owners, self._ownership, self.owners_loaded = outcome.owners, outcome.ownership, True
            log.debug("site directory: %d PVs of %d servers", len(self._owners), len(set(self._owners.values())))
        shown = tuple(tuple(getattr(e, f) for f in _SHOWN) for e in self.servers)
        if shown != self._shown or outcome.owners is not None:
            self._shown = shown
            for callback in list(self._listeners):
                try:
                    callback(self.servers)
                except Exception:  # a listener's bug must not stop the heartbeat
                    log.exception("site directory listener %r failed", callback)

    def _report(self, claimed: sql.Claimed, first: bool) -> None:
        e = claimed.entry
        log.info("site directory %s: server %r of site %r registered with %d PVs%s", self._display(), e.name, e.site,
                 e.pv_count, "" if first else " again")
        if claimed.replaced is not None:
            log.info("site directory: server %r replaces its earlier run on this host (pid %d, last heartbeat %.1f s ago)",
                     e.name, claimed.replaced.pid, claimed.replaced.age_s)
        for owner, pvs in sorted(claimed.taken_over.items()):
            log.warning("site directory: took over %d PVs from server %r, which is down: %s", len(pvs), owner, _some(pvs))
        if claimed.dropped:
            log.info("site directory: %d PVs server %r served before are no longer in its site file; released", claimed.dropped, e.name)
        for pv, owner in claimed.conflicts[:10]:
            log.error("site directory: PV %r of server %r is owned by server %s; this server serves it too until restarted "
                      "(remove it from one of the site files)", pv, e.name, owner.describe())
        if len(claimed.conflicts) > 10:
            log.error("site directory: and %d more PVs of server %r are owned by other servers", len(claimed.conflicts) - 10, e.name)

    def _beat_fields(self) -> sql.Beat:
        """Endpoints, PV count and health, read on the event loop."""
        opcua, ca_address, ca_port, ca_tcp = "", "", None, None
        address = self.config.address
        for s in self.server.services:
            if s.name == "opcua" and getattr(s, "port", None) is not None:
                opcua = s.published_url  # type: ignore[attr-defined]  # the URL discovery servers get too
            elif s.name == "ca" and getattr(s, "context", None) is not None:
                try:
                    ca_port, ca_tcp = s.port, s.tcp_port  # type: ignore[attr-defined]
                except RuntimeError:  # stopped meanwhile
                    continue
                interfaces = s.context.interfaces  # type: ignore[attr-defined]
                ca_address = address or ",".join(dict.fromkeys(socket.gethostname() if i in _WILDCARDS else i for i in interfaces))
        health, detail = self._health()
        return sql.Beat(len(self._pv_names), health, detail, opcua, ca_address, ca_port, ca_tcp)

    def _health(self) -> tuple[str, str]:
        if not self._serving:
            return HEALTH_STARTING, ""
        problems = []
        if self.conflicts:
            problems.append(_conflict_detail(self.conflicts))
        down = sorted(name for name, link in self.server.db.links.items() if not link.connected)
        if down:
            problems.append(f"instruments not connected: {', '.join(down)}")
        for s in self.server.services:
            if s.name == "historian" and callable(getattr(s, "stats", None)):
                spooled = s.stats().get("spool_samples", 0)  # type: ignore[attr-defined]
                if spooled:
                    problems.append(f"{spooled} samples waiting in the historian's spool")
        if self.conflicts:
            return HEALTH_CONFLICT, "; ".join(problems)
        return (HEALTH_DEGRADED, "; ".join(problems)) if problems else (HEALTH_OK, "")

    # ---- on the directory's thread --------------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._pool is None:
            raise SiteDirectoryError("the site directory service is not running")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _display(self) -> str:
        return self._backend.display_url if self._backend is not None else self.url

    def _registration(self, pv_names: list[str], health: str) -> sql.Registration:
        return sql.Registration(
            name=self.server_name, site=self.site_name, instance=self.instance, host=self.host, pid=os.getpid(),
            version=__version__, pv_names=pv_names, heartbeat_s=self.config.heartbeat_s, lapse_s=self.config.lapse_s,
            health=health,
        )  # fmt: skip

    def _ensure_schema(self) -> None:
        assert self._backend is not None
        if self._schema_ready:
            return
        with self._backend.engine.begin() as conn:
            found, version = sql.ensure_site_schema(conn, now_us())
        if found != version:
            log.info("site directory: %s schema version %d in %s", "created" if found == 0 else f"upgraded from {found} to",
                     version, self._backend.display_url)
        self._schema_ready = True

    def _claim(self, conn: Any, refuse: bool, health: str) -> sql.Claimed:
        return sql.register(conn, self._registration(self._pv_names, health), refuse_conflicts=refuse)

    def _register(self, known: Ownership | None) -> _Outcome:
        """At start: register, refusing PVs owned by servers that are up, and read the site."""
        assert self._backend is not None
        self._ensure_schema()
        with self._backend.engine.begin() as conn:
            return _read_site(conn, known, claimed=self._claim(conn, True, HEALTH_STARTING))

    def _heartbeat(self, beat: sql.Beat, known: Ownership | None) -> _Outcome:
        assert self._backend is not None
        if self.registered and self.database_up:
            with self._backend.engine.begin() as conn:
                result, other = sql.heartbeat(conn, self.server_name, self.instance, beat)
                if result == "superseded":
                    return _read_site(conn, known, superseded=other)
                if result == "ok":
                    return _read_site(conn, known)
            # lapsed or missing: others may have taken PVs over, or this is a new database
            log.warning("site directory: the heartbeat of server %r had %s; registering again", self.server_name,
                        "lapsed" if result == "lapsed" else "no row")
        self._ensure_schema()
        with self._backend.engine.begin() as conn:
            claimed = self._claim(conn, False, beat.health)
        if claimed.conflicts:  # the health computed on the loop did not know them yet
            detail = "; ".join(d for d in (_conflict_detail(claimed.conflicts), beat.detail) if d)
            beat = dataclasses.replace(beat, health=HEALTH_CONFLICT, detail=detail)
        with self._backend.engine.begin() as conn:
            sql.heartbeat(conn, self.server_name, self.instance, beat)  # the endpoints, at once
            return _read_site(conn, known, claimed=claimed)

    def _mark_stopped(self) -> None:
        assert self._backend is not None
        with self._backend.engine.begin() as conn:
            sql.mark_stopped(conn, self.server_name, self.instance)

    def _read(self, fn: Callable[[Any], T]) -> T:
        assert self._backend is not None
        with self._backend.engine.connect() as conn:
            return fn(conn)


def _read_site(conn: Any, known: Ownership | None, **found: Any) -> _Outcome:
    """The site's servers, and the owner map if ownership changed since ``known`` (on the directory's thread)."""
    servers = sql.read_servers(conn)
    now = ownership(servers)
    if now == known:
        return _Outcome(servers=servers, **found)
    return _Outcome(servers=servers, owners=sql.read_owners(conn), ownership=now, **found)


def _conflict_detail(conflicts: list[tuple[str, ServerEntry]]) -> str:
    return f"{len(conflicts)} PVs owned by other servers: {_some([pv for pv, _ in conflicts])}"


def _some(names: list[str], n: int = 5) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" (and {len(names) - n} more)" if len(names) > n else "")


# ---- the commands' shared parts ----------------------------------------------------------------


def add_database_argument(p: argparse.ArgumentParser) -> None:
    """``--historian-url`` (LABCTL_HISTORIAN_URL), as ``labctl serve`` takes it."""
    p.add_argument(
        "--historian-url",
        default=os.environ.get("LABCTL_HISTORIAN_URL"),
        help="the site's database: postgresql+psycopg://... as the servers' historian.url (LABCTL_HISTORIAN_URL; "
        "keeps a password off the command line)",
    )


def open_site_database(url: str | None, command: str) -> Backend:
    """The engine of a site's database for a command, or a LabctlError saying what is wrong with ``url``."""
    if not url:
        raise LabctlError("name the site's database with --historian-url or LABCTL_HISTORIAN_URL (postgresql+psycopg://...)")
    if not is_site_database(url):
        raise LabctlError(
            f"{url.split(':', 1)[0]}: a site directory and site-wide accounts live in PostgreSQL "
            "(postgresql+psycopg://...); a server with a SQLite historian is a site of its own, with its users in its site file"
        )
    return open_backend(url, application_name=f"labctl {command}", pool_size=1)


def run_on_database(backend: Backend, fn: Callable[[Any], T], *, write: bool) -> T:
    """``fn(conn)`` in one transaction (``write``) or connection, with a database away as a one-line LabctlError."""
    try:
        with backend.engine.begin() if write else backend.engine.connect() as conn:
            return fn(conn)
    except LabctlError:
        raise
    except Exception as e:
        if is_unreachable(e):
            raise LabctlError(f"site database {backend.display_url} unreachable: {short(e)}") from None
        raise
    finally:
        backend.dispose()


def command_actor() -> Actor:
    """Who runs this command, for the audit trail: the operating-system user and this host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        user = f"uid:{os.getuid()}"
    return Actor(user, socket.gethostname())


def has_site_schema(conn: Any) -> bool:
    """Whether any server or command has created the site directory in this database."""
    return inspect(conn).has_table(sql.site_server.name)


# ---- ``labctl servers`` ------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``labctl servers`` to the ``labctl`` command."""
    from labctl.clients.cli.arguments import connection_options

    p = subparsers.add_parser(
        "servers",
        parents=[connection_options()],
        help="list the servers of a site: endpoints, version, PVs, heartbeat, up or down",
        description="List the servers registered in a site's directory: from its PostgreSQL database with "
        "--historian-url, else through the server at --url (its Site folder); "
        "or --forget one that is down for good (its PV claims go with it; audited; needs the database).",
    )
    add_database_argument(p)
    p.add_argument("--forget", metavar="NAME", help="remove a server that is down from the directory, with its PV claims")
    p.set_defaults(func=cmd_servers)


def cmd_servers(args: argparse.Namespace) -> int:
    """``labctl servers``."""
    if not args.historian_url and not args.forget:  # through a server: its Site folder
        from labctl.clients.cli.servers import cmd_servers as servers_through_opcua

        return servers_through_opcua(args)
    backend = open_site_database(args.historian_url, "servers")
    if args.forget:
        actor = command_actor()

        def forget(conn: Any) -> tuple[ServerEntry, int]:
            if not has_site_schema(conn):
                raise SiteDirectoryError(f"no server has registered in {backend.display_url}")
            entry, owned = sql.forget_server(conn, args.forget)
            now = now_us()
            conn.execute(
                insert(audit_event).values(
                    uid=uuid.uuid4().hex, time_us=now, action="server.forget", user_name=actor.user, protocol=actor.protocol,
                    host=actor.host, target=f"server:{entry.name}", old_value=json.dumps(entry.as_json()), new_value=None,
                    accepted=True, reason="", inserted_us=now,
                )
            )  # fmt: skip
            return entry, owned

        entry, owned = run_on_database(backend, forget, write=True)
        print(f"forgot server {entry.name!r} (last heartbeat {entry.age_s:.1f} s ago) and its {owned} PV claims")
        return 0
    servers = run_on_database(backend, lambda conn: sql.read_servers(conn) if has_site_schema(conn) else [], write=False)
    if args.json:
        print(json.dumps([e.as_json() for e in servers], indent=2))
        return 0
    if not servers:
        print(f"no server has registered in {backend.display_url}", file=sys.stderr)
        return 0
    print(format_servers(servers))
    return 0


def format_servers(servers: Sequence[ServerEntry]) -> str:
    """The ``labctl servers`` table of directory rows, their ages by the database's clock.

    The table is the client's (:func:`labctl.clients.cli.servers.format_servers`), so the
    command prints the same whether it reads the database or asks a server.
    """
    from labctl.clients.cli.servers import format_servers as table

    # every row of one reading was aged from the same database time; a heartbeat newer than it has age 0
    now = min((e.heartbeat + e.age_s for e in servers), default=0.0)
    return table([_server_info(e) for e in servers], now)


def _server_info(entry: ServerEntry) -> ServerInfo:
    """A directory row as a client sees a server in a ``Site`` folder (for the one ``labctl servers`` table)."""
    from labctl.clients.site import ServerInfo

    return ServerInfo(
        name=entry.name, endpoint=entry.opcua_endpoint, state=entry.state, health=entry.health, detail=entry.detail,
        version=entry.version, pv_count=entry.pv_count, host=entry.host, ca_address=entry.ca_address,
        ca_port=entry.ca_port, ca_tcp_port=entry.ca_tcp_port, started=entry.started, heartbeat=entry.heartbeat,
    )  # fmt: skip
