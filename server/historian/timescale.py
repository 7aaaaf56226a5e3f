"""TimescaleDB specifics: detection, the hypertable, time_bucket, retention, compression.

Theory of operation. On PostgreSQL the historian asks, at every start, whether the
``timescaledb`` extension is in the database, and if not whether the server has it
(``pg_available_extensions``) and lets it be created. Without it the historian runs on
plain PostgreSQL and says so in the log. With it:

* ``sample`` becomes a hypertable on ``time_us`` (integer microseconds, one-day chunks,
  no extra default index: the primary key ``(pv_id, time_us, seq)`` serves every query),
  migrating rows already there. Integer time needs an "integer now" function
  (``labctl_now_us()``) for retention and compression policies.
* Downsampling of raw rows uses ``time_bucket(width, time_us, origin)``.
* The edition decides the rest (``timescaledb.license``): the Community ("timescale")
  edition gets native compression (segmented by PV, ordered by time) and a retention
  policy run by TimescaleDB's job scheduler. The Apache edition -- the one Debian ships --
  has neither policies nor compression nor continuous aggregates; the historian then logs
  that once and applies retention itself with ``drop_chunks`` (Apache-licensed).
  Rollups (``sample_rollup``) are maintained by the historian on every backend, so
  downsampled reads are fast and identical whatever the edition.

Every statement here is idempotent and runs inside the caller's transaction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from labctl.server.historian.schema import _SCHEMA_LOCK_KEY
from sqlalchemy import text
from sqlalchemy.engine import Connection

log = logging.getLogger(__name__)

#: Chunk interval of the sample hypertable: one day in microseconds.
CHUNK_US = 86_400 * 1_000_000
#: Chunks older than this are compressed (Community edition only).
COMPRESS_AFTER_US = 7 * CHUNK_US


@dataclass(frozen=True)
class TimescaleInfo:
    """What the database offers."""

    version: str | None
    """Extension version, or None on plain PostgreSQL."""
    edition: str | None
    """``apache`` or ``timescale`` (Community), None without the extension."""

    @property
    def enabled(self) -> bool:
        """The extension is installed in the database."""
        return self.version is not None

    @property
    def community(self) -> bool:
        """Compression, policies and continuous aggregates are available."""
        return self.edition == "timescale"

    def describe(self) -> str:
        """For the start-up banner: ``TimescaleDB 2.19.3 (apache edition)`` or ``PostgreSQL``."""
        if not self.enabled:
            return "PostgreSQL without TimescaleDB"
        return f"TimescaleDB {self.version} ({self.edition} edition)"


PLAIN = TimescaleInfo(None, None)


def detect(conn: Connection, *, create: bool = True) -> TimescaleInfo:
    """Find (and, if the server offers it and ``create``, create) the extension."""
    version = conn.execute(text("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")).scalar()
    if version is None and create:
        available = conn.execute(text("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'")).scalar()
        # The preloaded loader registers its settings; reading shared_preload_libraries needs privileges.
        preloaded = conn.execute(text("SELECT 1 FROM pg_settings WHERE name = 'timescaledb.disable_load'")).scalar()
        if available and not preloaded:
            # CREATE EXTENSION would fail *and* end the session; say what to change instead.
            log.warning(
                "historian: the server has TimescaleDB installed but not in shared_preload_libraries; "
                "using plain PostgreSQL (add shared_preload_libraries = 'timescaledb' and restart it to get hypertables)"
            )
        elif available:
            # Servers of a site starting at once would race to create it: serialise them with the
            # schema's transaction-scoped lock, and look again once it is held.
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEMA_LOCK_KEY})
            version = conn.execute(text("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")).scalar()
            if version is None:
                version = _create(conn)
    if version is None:
        return PLAIN
    edition = conn.execute(text("SELECT current_setting('timescaledb.license', true)")).scalar() or "apache"
    return TimescaleInfo(str(version), str(edition))


def _create(conn: Connection) -> str | None:
    """CREATE EXTENSION; its version, or None when refused."""
    # The library must be preloaded for CREATE EXTENSION to work; probe in a savepoint
    # so a refusal (not preloaded, no privilege) leaves the transaction usable.
    nested = conn.begin_nested()
    try:
        conn.execute(text("CREATE EXTENSION IF NOT EXISTS timescaledb"))
        nested.commit()
    except Exception as e:  # noqa: BLE001 -- any refusal means: run on plain PostgreSQL
        nested.rollback()
        log.warning("historian: the server has TimescaleDB but it cannot be enabled here (%s); using plain PostgreSQL",
                    str(e).splitlines()[0])
    return conn.execute(text("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")).scalar()


def configure(conn: Connection, info: TimescaleInfo, retention_days: float | None, *, announce: bool = True) -> None:
    """Hypertable, integer-now function, and the edition's compression/retention policies.

    ``announce``: log what the edition offers (once per start, not at every reconnection).
    """
    if not info.enabled:
        return
    conn.execute(
        text(
            "CREATE OR REPLACE FUNCTION labctl_now_us() RETURNS BIGINT LANGUAGE SQL STABLE AS "
            "$$ SELECT (extract(epoch FROM now()) * 1000000)::bigint $$"
        )
    )
    conn.execute(
        text(
            "SELECT create_hypertable('sample', 'time_us', chunk_time_interval => CAST(:chunk AS BIGINT), "
            "if_not_exists => TRUE, create_default_indexes => FALSE, migrate_data => TRUE)"
        ),
        {"chunk": CHUNK_US},
    )
    conn.execute(text("SELECT set_integer_now_func('sample', 'labctl_now_us', replace_if_exists => TRUE)"))
    if not info.community:
        if not announce:
            return
        log.info(
            "historian: %s: compression, retention policies and continuous aggregates need the Community edition; "
            "using uncompressed chunks, retention by drop_chunks from labctl, and labctl's own rollups",
            info.describe(),
        )
        return
    compressed = conn.execute(
        text("SELECT compression_enabled FROM timescaledb_information.hypertables WHERE hypertable_name = 'sample'")
    ).scalar()
    if not compressed:
        conn.execute(
            text(
                "ALTER TABLE sample SET (timescaledb.compress, timescaledb.compress_segmentby = 'pv_id', "
                "timescaledb.compress_orderby = 'time_us DESC, seq DESC')"
            )
        )
    conn.execute(
        text("SELECT add_compression_policy('sample', CAST(:after AS BIGINT), if_not_exists => TRUE)"),
        {"after": COMPRESS_AFTER_US},
    )
    conn.execute(text("SELECT remove_retention_policy('sample', if_exists => TRUE)"))
    if retention_days is not None:
        conn.execute(
            text("SELECT add_retention_policy('sample', CAST(:keep AS BIGINT), if_not_exists => TRUE)"),
            {"keep": round(retention_days * 86_400e6)},
        )
    if announce:
        log.info("historian: %s: compression after 7 days%s", info.describe(),
                 f", retention {retention_days:g} days by policy" if retention_days else "")


def retention_by_policy(info: TimescaleInfo) -> bool:
    """Whether TimescaleDB's own job drops old samples (else the historian does)."""
    return info.community


def drop_chunks(conn: Connection, cutoff_us: int) -> int:
    """Drop whole sample chunks older than ``cutoff_us``; return how many were dropped."""
    rows = conn.execute(text("SELECT drop_chunks('sample', older_than => CAST(:cutoff AS BIGINT))"), {"cutoff": cutoff_us}).all()
    return len(rows)


def bucket_sql(info: TimescaleInfo, column: str) -> str:
    """SQL for the start of the bucket holding ``column``, buckets of ``:w`` from origin ``:o``.

    ``column`` is never below ``:o`` in the historian's queries, so the integer division
    of the portable form is a floor, exactly as ``time_bucket`` computes it.
    """
    if info.enabled:
        return f"time_bucket(CAST(:w AS BIGINT), {column}, CAST(:o AS BIGINT))"
    return f"(CAST(:o AS BIGINT) + (({column} - CAST(:o AS BIGINT)) / CAST(:w AS BIGINT)) * CAST(:w AS BIGINT))"
