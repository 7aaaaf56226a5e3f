"""Opening the historian's database: URL checks, engine settings, error classes.

Theory of operation. The historian URL picks the backend: ``sqlite:///path`` (the
embedded default, in WAL mode so queries read while the ingest thread writes) or
``postgresql://`` / ``postgresql+psycopg://`` (psycopg 3; TimescaleDB is detected later,
on connection). :func:`open_backend` only builds the engine -- it does not connect, so a
server starts while its database is away and spools until it returns.

Failures are sorted in two: :func:`is_unreachable` errors (connection refused or lost,
server shutting down, SQLite database locked or disk I/O) mean *try again later, spool
meanwhile*; anything else means the batch itself was refused (a bug or bad data) and it
is quarantined instead of retried forever.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from labctl.server.archive import HistorianError
from labctl.server.historian.timescale import PLAIN, TimescaleInfo
from sqlalchemy import create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Engine, make_url

from labctl.extras import MissingExtra, require

log = logging.getLogger(__name__)

#: Seconds a connection attempt to PostgreSQL may take before the database counts as away.
CONNECT_TIMEOUT_S = 5
#: Seconds SQLite waits for a lock before giving up (a reader never blocks the WAL writer).
SQLITE_BUSY_TIMEOUT_S = 10


@dataclass
class Backend:
    """An engine and what is known about the database behind it."""

    engine: Engine
    kind: str
    """``sqlite`` or ``postgresql``."""
    url: URL
    timescale: TimescaleInfo = field(default=PLAIN)
    """Set once connected (PostgreSQL only)."""

    @property
    def display_url(self) -> str:
        """The URL with its password hidden."""
        return self.url.render_as_string(hide_password=True)

    def describe(self) -> str:
        """``SQLite (WAL)``, ``PostgreSQL without TimescaleDB`` or ``TimescaleDB 2.19.3 (apache edition)``."""
        return "SQLite (WAL)" if self.kind == "sqlite" else self.timescale.describe()

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


def open_backend(url: str, *, application_name: str = "labctl historian", pool_size: int = 4) -> Backend:
    """Build the engine for a historian URL (no connection is made).

    ``application_name`` and ``pool_size`` (PostgreSQL): how the connections show in
    ``pg_stat_activity``, and how many are kept (as many again may open under load).

    Raises:
        HistorianError: the URL is malformed or names a backend or driver labctl does not use.
    """
    try:
        u = make_url(url)
    except sa_exc.ArgumentError as e:
        raise HistorianError(f"historian.url {url!r} is not a database URL: {e}") from None
    backend, _, driver = u.drivername.partition("+")
    if backend == "sqlite":
        if driver not in ("", "pysqlite"):
            raise HistorianError(f"historian.url: SQLite driver {driver!r} is not supported; write sqlite:///path")
        if not u.database or u.database == ":memory:":
            raise HistorianError(
                "historian.url: an in-memory SQLite historian would lose its archive on every restart; "
                "give a file, e.g. sqlite:///{state_dir}/history.sqlite"
            )
        Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(u.set(drivername="sqlite+pysqlite"), connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
        event.listen(engine, "connect", _sqlite_pragmas)
        return Backend(engine, "sqlite", u)
    if backend in ("postgresql", "postgres"):
        if driver not in ("", "psycopg"):
            raise HistorianError(
                f"historian.url: PostgreSQL driver {driver!r} is not supported; write postgresql+psycopg://..."
            )
        try:
            require("postgres")
        except MissingExtra as e:
            raise HistorianError(f"historian.url: {e}") from None
        u = u.set(drivername="postgresql+psycopg")
        engine = create_engine(
            u,
            pool_pre_ping=True,  # a pooled connection that died with the server is replaced, not used
            pool_size=pool_size,
            max_overflow=pool_size,
            connect_args={
                "connect_timeout": CONNECT_TIMEOUT_S,
                "application_name": application_name,
                # JIT compiles each big aggregate for tens of milliseconds to seconds before running
                # it; the historian's queries are index range scans that finish faster than that.
                # psycopg prepares a statement after 5 runs, and PostgreSQL may then switch it to a
                # generic plan: with the times as unknowns it cannot exclude chunks or see how
                # narrow a range is. Plan each execution for its actual times instead.
                "options": "-c jit=off -c plan_cache_mode=force_custom_plan",
                # notice a server that vanished without closing the socket (a cut network) within ~30 s
                "keepalives": 1,
                "keepalives_idle": 10,
                "keepalives_interval": 5,
                "keepalives_count": 3,
            },
        )
        return Backend(engine, "postgresql", u)
    raise HistorianError(
        f"historian.url: backend {backend!r} is not supported; use sqlite:///path or postgresql+psycopg://user@host/db"
    )


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer and vice versa
        cur.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; safe from corruption in WAL mode
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
    finally:
        cur.close()


_SQLITE_UNREACHABLE = ("database is locked", "disk i/o error", "unable to open database", "database or disk is full", "readonly")


def is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` means the database is away (retry later) rather than refusing the data."""
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        exc = exc.orig if exc.orig is not None else exc
    psycopg = sys.modules.get("psycopg")  # loaded only by a PostgreSQL historian
    if psycopg is not None and isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
        return True
    if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError, sa_exc.TimeoutError)):
        return True
    if type(exc).__module__ == "sqlite3" and type(exc).__name__ == "OperationalError":
        return any(s in str(exc).lower() for s in _SQLITE_UNREACHABLE)
    return isinstance(exc, (ConnectionError, TimeoutError))


def short(exc: BaseException) -> str:
    """The first line of an error's message, for log lines."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
