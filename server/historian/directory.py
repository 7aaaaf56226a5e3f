"""The site directory's tables in the site's PostgreSQL database: servers, PV owners, accounts.

Theory of operation. Several labctl servers pointed at one PostgreSQL (or TimescaleDB)
database form a site (:mod:`labctl.server.siteinfo`). Beside the historian's tables
(:mod:`labctl.server.historian.schema`) the database then holds:

``site_server``
    One row per server name: its site, the process registered under it (``instance``, a
    random id per start, ``host``, ``pid``), labctl's ``version``, its endpoints
    (``opcua_endpoint``, ``ca_address``, ``ca_port``, ``ca_tcp_port``), ``pv_count``,
    ``started_us`` and ``heartbeat_us`` (microseconds since the epoch *by the database's
    clock*), its ``heartbeat_s`` and ``lapse_s``, and ``health`` with ``detail``. A server is
    up while ``health <> 'stopped'`` and its last heartbeat is at most ``lapse_s`` old.
``site_pv``
    The owner of every PV of the site: ``name`` (primary key: one owner per name), ``server``
    (references ``site_server``; deleting a server deletes its claims) and ``claimed_us``.
``site_user``
    Site-wide accounts: ``name``, ``password_hash`` (salted scrypt, or NULL), ``roles`` (a
    JSON list), ``disabled``, ``description``, ``created_us``, ``updated_us``, ``updated_by``.
    Kept by :mod:`labctl.server.historian.accounts`.

Their version is the ``site`` component of ``historian_schema`` (the historian's is
``historian``). :func:`ensure_site_schema` creates or upgrades both in the caller's
transaction under the historian's transaction-scoped advisory lock, so servers and
commands starting at once serialise their migrations and the loser finds the work done.

Registration (:func:`register`) runs in one transaction under a second advisory lock, so
two servers claiming PVs at the same moment are serialised too: the PV names go by COPY
into a temporary table; names owned by another server that is up are conflicts (refused
at start-up: :class:`~labctl.server.siteinfo.PVsOwnedElsewhere`), names owned by a server
that is down are taken over; the server's row is written, then its claims, and claims of
PVs it no longer serves are dropped. :func:`heartbeat` updates the row (only while it
still belongs to the same process) and tells whether the previous heartbeat had lapsed, in
which case the server registers again (another server may have taken its PVs meanwhile).
Every time is read from the database's clock, so clocks of the servers' hosts never
decide who is up.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from labctl.server.archive import SchemaTooNew
from labctl.server.historian.schema import _SCHEMA_LOCK_KEY, ensure_schema, insert, schema_version
from labctl.server.siteinfo import (
    HEALTH_STOPPED,
    PVsOwnedElsewhere,
    ServerEntry,
    ServerNameTaken,
    SiteDirectoryError,
    SiteMismatch,
)
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    delete,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection

#: The site directory's schema version (the ``site`` component of ``historian_schema``).
SITE_SCHEMA_VERSION = 1
SITE_COMPONENT = "site"
#: Key of the advisory lock serialising registrations (PV claims) of the servers of a site.
_REGISTER_LOCK_KEY = 0x6C6162736974  # "labsit"
#: The database's clock in integer microseconds since the epoch.
DB_NOW_US = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT)"

metadata = MetaData()

site_server = Table(
    "site_server",
    metadata,
    Column("name", Text, primary_key=True),
    Column("site", Text, nullable=False),
    Column("instance", Text, nullable=False, comment="random id of the process registered under this name"),
    Column("host", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("version", Text, nullable=False),
    Column("opcua_endpoint", Text, nullable=False, default=""),
    Column("ca_address", Text, nullable=False, default=""),
    Column("ca_port", Integer),
    Column("ca_tcp_port", Integer),
    Column("pv_count", Integer, nullable=False),
    Column("started_us", BigInteger, nullable=False, comment="database clock"),
    Column("heartbeat_us", BigInteger, nullable=False, comment="database clock"),
    Column("heartbeat_s", Double, nullable=False),
    Column("lapse_s", Double, nullable=False, comment="down once the last heartbeat is older"),
    Column("health", Text, nullable=False),
    Column("detail", Text, nullable=False, default=""),
)

site_pv = Table(
    "site_pv",
    metadata,
    Column("name", Text, primary_key=True),
    Column("server", Text, ForeignKey("site_server.name", ondelete="CASCADE"), nullable=False),
    Column("claimed_us", BigInteger, nullable=False),
    Index("site_pv_server", "server"),
)

site_user = Table(
    "site_user",
    metadata,
    Column("name", Text, primary_key=True),
    Column("password_hash", Text),
    Column("roles", Text, nullable=False, comment="JSON list"),
    Column("disabled", Boolean, nullable=False, default=False),
    Column("description", Text, nullable=False, default=""),
    Column("created_us", BigInteger, nullable=False),
    Column("updated_us", BigInteger, nullable=False),
    Column("updated_by", Text, nullable=False, comment="user@host of the last change"),
)

SITE_TABLES = (site_server, site_pv, site_user)


# ---- schema ---------------------------------------------------------------------------------


def _create_v1(conn: Connection) -> None:
    metadata.create_all(conn, tables=list(SITE_TABLES), checkfirst=True)


#: version -> step from version-1; each idempotent (``checkfirst``).
SITE_MIGRATIONS = {1: _create_v1}


def ensure_site_schema(conn: Connection, now_us: int) -> tuple[int, int]:
    """Create or upgrade the historian's schema and the site directory's in the caller's transaction.

    Returns the site component's (found, now) versions. Safe when several servers and
    commands run it at once (a transaction-scoped advisory lock serialises them).

    Raises:
        SchemaTooNew: the database was written by a newer labctl.
    """
    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEMA_LOCK_KEY})
    ensure_schema(conn, "postgresql", now_us)
    found = conn.execute(select(schema_version.c.version).where(schema_version.c.component == SITE_COMPONENT)).scalar()
    found = int(found or 0)
    if found > SITE_SCHEMA_VERSION:
        raise SchemaTooNew(found, SITE_SCHEMA_VERSION)
    for version in range(found + 1, SITE_SCHEMA_VERSION + 1):
        SITE_MIGRATIONS[version](conn)
    if found != SITE_SCHEMA_VERSION:
        stmt = insert("postgresql", schema_version).values(component=SITE_COMPONENT, version=SITE_SCHEMA_VERSION, updated_us=now_us)
        conn.execute(
            stmt.on_conflict_do_update(index_elements=["component"], set_={"version": SITE_SCHEMA_VERSION, "updated_us": now_us})
        )
    return found, SITE_SCHEMA_VERSION


def db_now_us(conn: Connection) -> int:
    """The database's clock, microseconds since the epoch."""
    return int(conn.execute(text(f"SELECT {DB_NOW_US}")).scalar_one())


# ---- reading ----------------------------------------------------------------------------------


def _entry(row: Any, now_us: int) -> ServerEntry:
    return ServerEntry(
        name=row.name,
        site=row.site,
        host=row.host,
        pid=int(row.pid),
        version=row.version,
        opcua_endpoint=row.opcua_endpoint or "",
        ca_address=row.ca_address or "",
        ca_port=row.ca_port,
        ca_tcp_port=row.ca_tcp_port,
        pv_count=int(row.pv_count),
        started=row.started_us / 1_000_000,
        heartbeat=row.heartbeat_us / 1_000_000,
        heartbeat_s=float(row.heartbeat_s),
        lapse_s=float(row.lapse_s),
        health=row.health,
        detail=row.detail or "",
        age_s=max(0.0, (now_us - row.heartbeat_us) / 1_000_000),
    )


def read_servers(conn: Connection, names: Iterable[str] | None = None) -> list[ServerEntry]:
    """The site's servers (or those named), by name, with up/down judged by the database's clock now."""
    now = db_now_us(conn)
    q = select(site_server).order_by(site_server.c.name)
    if names is not None:
        q = q.where(site_server.c.name.in_(list(names)))
    return [_entry(r, now) for r in conn.execute(q)]


def read_owners(conn: Connection, names: Iterable[str] | None = None) -> dict[str, str]:
    """PV name -> the name of the server that owns it (every PV of the site, or those named that have an owner)."""
    q = select(site_pv.c.name, site_pv.c.server)
    if names is not None:
        q = q.where(site_pv.c.name.in_(list(names)))
    return {r.name: r.server for r in conn.execute(q)}


# ---- registration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Registration:
    """What a server tells the directory about itself when it registers."""

    name: str
    site: str
    instance: str
    host: str
    pid: int
    version: str
    pv_names: Sequence[str]
    heartbeat_s: float
    lapse_s: float
    health: str
    detail: str = ""


@dataclass
class Claimed:
    """The outcome of a registration."""

    entry: ServerEntry
    """The server's row as written."""
    conflicts: list[tuple[str, ServerEntry]] = field(default_factory=list)
    """PVs of the site file owned by other servers that are up (not claimed)."""
    taken_over: dict[str, list[str]] = field(default_factory=dict)
    """server name -> PVs taken over from it (it was down)."""
    replaced: ServerEntry | None = None
    """The earlier process registered under this name (a restart), if it was up."""
    dropped: int = 0
    """Claims of PVs this server no longer serves, dropped."""


def register(conn: Connection, reg: Registration, *, refuse_conflicts: bool = True) -> Claimed:
    """Register ``reg`` and claim its PVs in the caller's transaction (see the module docstring).

    ``refuse_conflicts``: raise when another server that is up owns one of the PVs (at
    start-up); otherwise leave those PVs to it, claim the rest and report them in
    :attr:`Claimed.conflicts` (a registration caught up after a database outage).

    Raises:
        PVsOwnedElsewhere: a PV is owned by another server that is up (``refuse_conflicts``).
        ServerNameTaken: a server on another host that is up is registered under this name.
        SiteMismatch: the database holds the directory of another site.
    """
    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _REGISTER_LOCK_KEY})
    now = db_now_us(conn)
    others = conn.execute(select(site_server.c.name, site_server.c.site).where(site_server.c.site != reg.site)).all()
    if others:
        raise SiteMismatch(
            f"the site database holds the directory of site {others[0].site!r} (server {others[0].name!r}); "
            f"this server's site file is site {reg.site!r}: one database holds one site "
            f"(remove servers of another site with `labctl servers --forget NAME`)"
        )
    replaced = None
    row = conn.execute(select(site_server).where(site_server.c.name == reg.name).with_for_update()).first()
    if row is not None and row.instance != reg.instance:
        earlier = _entry(row, now)
        if earlier.up and row.host != reg.host:
            raise ServerNameTaken(
                f"server name {reg.name!r} is in use by a server that is up on host {row.host!r} (pid {row.pid}, "
                f"{earlier.describe()}); give this server another server.name"
            )
        replaced = earlier if earlier.up else None
    _stage_names(conn, reg.pv_names)
    owned = conn.execute(
        text("SELECT c.name AS pv, p.server FROM labctl_claim c JOIN site_pv p ON p.name = c.name WHERE p.server <> :me ORDER BY c.name"),
        {"me": reg.name},
    ).all()
    servers = {e.name: e for e in read_servers(conn, {r.server for r in owned})} if owned else {}
    conflicts = [(r.pv, servers[r.server]) for r in owned if servers[r.server].up]
    if conflicts and refuse_conflicts:
        raise PVsOwnedElsewhere(reg.name, conflicts)
    taken_over: dict[str, list[str]] = {}
    for r in owned:
        if not servers[r.server].up:
            taken_over.setdefault(r.server, []).append(r.pv)
    if conflicts:
        conn.execute(text("DELETE FROM labctl_claim WHERE name = ANY(:names)"), {"names": [pv for pv, _ in conflicts]})
    values = {
        "site": reg.site, "instance": reg.instance, "host": reg.host, "pid": reg.pid, "version": reg.version,
        "opcua_endpoint": "", "ca_address": "", "ca_port": None, "ca_tcp_port": None,
        "pv_count": len(reg.pv_names) - len(conflicts), "started_us": now, "heartbeat_us": now,
        "heartbeat_s": reg.heartbeat_s, "lapse_s": reg.lapse_s, "health": reg.health, "detail": reg.detail,
    }  # fmt: skip
    stmt = insert("postgresql", site_server).values(name=reg.name, **values)
    conn.execute(stmt.on_conflict_do_update(index_elements=["name"], set_=values))
    conn.execute(
        text(
            "INSERT INTO site_pv (name, server, claimed_us) SELECT name, :me, :now FROM labctl_claim "
            "ON CONFLICT (name) DO UPDATE SET server = EXCLUDED.server, claimed_us = EXCLUDED.claimed_us "
            "WHERE site_pv.server <> EXCLUDED.server"
        ),
        {"me": reg.name, "now": now},
    )
    dropped = conn.execute(
        text(
            "DELETE FROM site_pv p WHERE p.server = :me AND NOT EXISTS (SELECT 1 FROM labctl_claim c WHERE c.name = p.name)"
        ),
        {"me": reg.name},
    ).rowcount
    (entry,) = read_servers(conn, [reg.name])
    return Claimed(entry, conflicts, taken_over, replaced, dropped)


def _stage_names(conn: Connection, names: Sequence[str]) -> None:
    """The PV names of a registration into the temporary table ``labctl_claim`` (by COPY)."""
    conn.execute(text("CREATE TEMP TABLE IF NOT EXISTS labctl_claim (name TEXT PRIMARY KEY) ON COMMIT DROP"))
    raw = conn.connection.driver_connection
    with raw.cursor() as cur, cur.copy("COPY labctl_claim (name) FROM STDIN") as copy:
        for name in names:
            copy.write_row((name,))


@dataclass(frozen=True)
class Beat:
    """What a heartbeat reports besides the time."""

    pv_count: int
    health: str
    detail: str
    opcua_endpoint: str
    ca_address: str
    ca_port: int | None
    ca_tcp_port: int | None


def heartbeat(conn: Connection, name: str, instance: str, beat: Beat) -> tuple[str, ServerEntry | None]:
    """Record a heartbeat of server ``name`` (the process ``instance``) in the caller's transaction.

    Returns (outcome, row): ``ok``; ``lapsed`` (recorded, but the previous heartbeat was
    older than the lapse: others saw the server down and may have taken its PVs, so it
    registers again); ``missing`` (no row: a new database, or the server was forgotten:
    register again); ``superseded`` (another process registered under the name since: the
    row is theirs and is left alone; it is returned).
    """
    row = conn.execute(select(site_server).where(site_server.c.name == name).with_for_update()).first()
    if row is None:
        return "missing", None
    now = db_now_us(conn)
    if row.instance != instance:
        return "superseded", _entry(row, now)
    lapsed = row.health == HEALTH_STOPPED or now - row.heartbeat_us > row.lapse_s * 1_000_000
    conn.execute(
        update(site_server)
        .where(site_server.c.name == name)
        .values(
            heartbeat_us=now, pv_count=beat.pv_count, health=beat.health, detail=beat.detail,
            opcua_endpoint=beat.opcua_endpoint, ca_address=beat.ca_address, ca_port=beat.ca_port,
            ca_tcp_port=beat.ca_tcp_port,
        )
    )  # fmt: skip
    return ("lapsed" if lapsed else "ok"), None


def mark_stopped(conn: Connection, name: str, instance: str) -> bool:
    """Record that server ``name`` stopped cleanly (down at once); False if the row is not this process's."""
    result = conn.execute(
        update(site_server)
        .where(site_server.c.name == name, site_server.c.instance == instance)
        .values(health=HEALTH_STOPPED, detail="", heartbeat_us=text(DB_NOW_US))
    )
    return result.rowcount == 1


def forget_server(conn: Connection, name: str) -> tuple[ServerEntry, int]:
    """Delete a server that is down from the directory, with its PV claims; return its entry and how many PVs it owned.

    Raises:
        SiteDirectoryError: no server has that name, or it is up.
    """
    (entry,) = read_servers(conn, [name]) or (None,)
    if entry is None:
        known = [e.name for e in read_servers(conn)]
        raise SiteDirectoryError(f"no server {name!r} in the site directory; servers: {', '.join(known) or '(none)'}")
    if entry.up:
        raise SiteDirectoryError(f"server {entry.describe()} is up: stop it before forgetting it")
    owned = conn.execute(delete(site_pv).where(site_pv.c.server == name)).rowcount
    conn.execute(delete(site_server).where(site_server.c.name == name))
    return entry, owned
