"""The historian's tables (SQLAlchemy Core) and schema upgrades.

Theory of operation. One schema serves SQLite and PostgreSQL (with or without
TimescaleDB); only :mod:`labctl.server.historian.timescale` adds engine-specific DDL on top.
The shape follows the EPICS archivers (the Phoebus TimescaleDB archive, HDB++):

``pv``
    The catalogue: one row per PV ever archived, with its current metadata (type, unit,
    description, resource...) in columns and, complete, as canonical JSON in ``meta``.
``pv_meta``
    The metadata history: a row whenever a PV's metadata differs from what was recorded
    last, so old samples can be read with the unit and limits they had. Both are kept by
    :mod:`labctl.server.historian.catalogue`.
``sample``
    One row per archived update, keyed ``(pv_id, time_us, seq)``. ``time_us`` is the source
    timestamp in integer microseconds since the UNIX epoch (exact, the same on every
    backend, and cheap to COPY); ``seq`` tells apart updates of one PV that carry the
    same microsecond (0 for nearly all rows). The value sits in the column of its type:
    ``float_val``, ``num_val``, ``str_val`` or ``array_val`` (encodings in
    :mod:`labctl.server.historian.encoding`). Every row carries EPICS ``severity`` and
    ``status``, so an INVALID reading is archived as such. As in HDB++, ``received_us`` (when the historian got the update) and
    ``inserted_us`` (when the row was written) make archiving lag and back-filled outages
    visible. The unique key is also what makes writes idempotent: a batch replayed from
    the spool inserts ``ON CONFLICT DO NOTHING``.
``sample_rollup``
    Pre-computed aggregates of valid numeric samples per PV and fixed cell (60 s, aligned
    to the epoch): count, min, max, sum, first and last. Maintained in the same
    transaction as the samples they summarise, so downsampling a month of 1 Hz data reads
    43 200 cells instead of 2.6 million rows. More widths are a new ``width_s``.
``alarm_event``
    Alarm-state transitions (severity/status changes), keyed like samples.
``audit_event``
    Audit records (:class:`labctl.ioc.access.AuditRecord`): writes accepted and refused, lock and
    alarm actions. ``uid`` is generated when the record is captured, so a replay is a no-op.
``job``, ``job_log``, ``job_result``
    Submitted jobs (:class:`labctl.ioc.jobs.Job`) as records that survive a restart: one row per
    job with its current state (updated in place), its log lines and the values it read
    (both append-only, keyed ``(job_id, n)`` so a replay is a no-op). Results are found by
    job id; a value is stored as JSON, with its severity, status and label. Since version 3
    each job row names the ``server`` that runs it (a server restores only its own jobs),
    and in PostgreSQL job ids are unique in the site: each server numbers its jobs within
    blocks of ids it reserved from the sequence ``job_id_seq``, recorded in
    ``job_id_block`` (:mod:`labctl.server.historian.jobids`). SQLite keeps one server's jobs,
    numbered from 1.
``alarm_state``
    The alarm state of each alarmed PV (:class:`labctl.ioc.alarms.Alarm`: latched severity,
    acknowledged, shelved until...), one row per source updated in place, so
    acknowledgements and shelving survive a restart. The transitions themselves are in
    ``alarm_event`` (severity changes) and ``audit_event`` (acknowledge, shelve).
``historian_schema``
    The schema version of each component: ``historian`` (these tables) and, in a site's
    PostgreSQL database, ``site`` (the site directory, :mod:`labctl.server.historian.directory`).
    :func:`ensure_schema` creates or upgrades the schema under an advisory lock
    (PostgreSQL), idempotently, at every start.

A view ``sample_named`` joins samples to PV names with a readable time, for people and
tools that query the database directly (Grafana, psql, sqlite3).
"""

from __future__ import annotations

from collections.abc import Callable

from labctl.server.archive import HistorianError, SchemaTooNew
from labctl.server.historian.encoding import pack_array, unpack_array
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Double,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Table,
    Text,
    TypeDecorator,
    inspect,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

#: The schema version this code writes and reads (see :data:`MIGRATIONS`).
SCHEMA_VERSION = 3
#: Key of the advisory lock serialising schema changes of several servers on one PostgreSQL.
_SCHEMA_LOCK_KEY = 0x6C616263746C  # "labctl"


class FloatArray(TypeDecorator):
    """A float64[] value: ``DOUBLE PRECISION[]`` on PostgreSQL, packed doubles elsewhere."""

    impl = LargeBinary
    cache_ok = True

    def load_dialect_impl(self, dialect):  # noqa: D102 - SQLAlchemy hook
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.ARRAY(Double()))
        return dialect.type_descriptor(LargeBinary())

    def process_bind_param(self, value, dialect):  # noqa: D102 - SQLAlchemy hook
        if value is None:
            return None
        return list(value) if dialect.name == "postgresql" else pack_array(value)

    def process_result_value(self, value, dialect):  # noqa: D102 - SQLAlchemy hook
        if value is None:
            return None
        return tuple(value) if dialect.name == "postgresql" else unpack_array(value)


metadata = MetaData()

schema_version = Table(
    "historian_schema",
    metadata,
    Column("component", String(32), primary_key=True),
    Column("version", Integer, nullable=False),
    Column("updated_us", BigInteger, nullable=False),
)

pv = Table(
    "pv",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", Text, nullable=False, unique=True),
    Column("type", String(16), nullable=False),
    Column("unit", Text, nullable=False, default=""),
    Column("precision", SmallInteger),
    Column("description", Text, nullable=False, default=""),
    Column("resource", Text),
    Column("instrument", Text),
    Column("states", Text),
    Column("meta", Text, nullable=False, comment="complete metadata as canonical JSON"),
    Column("created_us", BigInteger, nullable=False),
    Column("updated_us", BigInteger, nullable=False, comment="when the metadata last changed"),
    Column("seen_us", BigInteger, nullable=False, comment="when a server last registered the PV"),
)

pv_meta = Table(
    "pv_meta",
    metadata,
    Column("pv_id", Integer, nullable=False),
    Column("time_us", BigInteger, nullable=False),
    Column("meta", Text, nullable=False),
    PrimaryKeyConstraint("pv_id", "time_us"),
)

sample = Table(
    "sample",
    metadata,
    Column("pv_id", Integer, nullable=False),
    Column("time_us", BigInteger, nullable=False, comment="source timestamp, microseconds since the UNIX epoch"),
    Column("seq", SmallInteger, nullable=False, default=0),
    Column("float_val", Double),
    Column("num_val", BigInteger),
    Column("str_val", Text),
    Column("array_val", FloatArray),
    Column("severity", SmallInteger, nullable=False),
    Column("status", SmallInteger, nullable=False),
    Column("received_us", BigInteger, nullable=False),
    Column("inserted_us", BigInteger, nullable=False),
    PrimaryKeyConstraint("pv_id", "time_us", "seq"),
    sqlite_with_rowid=False,  # clustered by (pv, time): range scans read contiguous pages
)

#: Columns of ``sample`` in the order the writers send them.
SAMPLE_COLUMNS = tuple(c.name for c in sample.columns)

sample_rollup = Table(
    "sample_rollup",
    metadata,
    Column("pv_id", Integer, nullable=False),
    Column("width_s", Integer, nullable=False),
    Column("start_us", BigInteger, nullable=False),
    Column("count", Integer, nullable=False),
    Column("min", Double),
    Column("max", Double),
    Column("sum", Double),
    Column("first_us", BigInteger, nullable=False),
    Column("first_seq", SmallInteger, nullable=False),
    Column("first_val", Double),
    Column("last_us", BigInteger, nullable=False),
    Column("last_seq", SmallInteger, nullable=False),
    Column("last_val", Double),
    PrimaryKeyConstraint("pv_id", "width_s", "start_us"),
    sqlite_with_rowid=False,
)

alarm_event = Table(
    "alarm_event",
    metadata,
    Column("pv_id", Integer, nullable=False),
    Column("time_us", BigInteger, nullable=False),
    Column("seq", SmallInteger, nullable=False, default=0),
    Column("severity", SmallInteger, nullable=False),
    Column("status", SmallInteger, nullable=False),
    PrimaryKeyConstraint("pv_id", "time_us", "seq"),
    sqlite_with_rowid=False,
)

audit_event = Table(
    "audit_event",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("uid", String(32), nullable=False, unique=True, comment="generated at capture: replays are no-ops"),
    Column("time_us", BigInteger, nullable=False),
    Column("action", Text, nullable=False),
    Column("user_name", Text, nullable=False),
    Column("protocol", Text, nullable=False),
    Column("host", Text, nullable=False),
    Column("target", Text, nullable=False),
    Column("old_value", Text, comment="JSON"),
    Column("new_value", Text, comment="JSON"),
    Column("accepted", Boolean, nullable=False),
    Column("reason", Text, nullable=False, default=""),
    Column("inserted_us", BigInteger, nullable=False),
    Index("audit_event_time", "time_us"),
    Index("audit_event_target_time", "target", "time_us"),
)

# ---- version 2: jobs and alarm state ------------------------------------------------------

job = Table(
    "job",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("procedure", Text, nullable=False),
    Column("owner", Text, nullable=False),
    Column("roles", Text, nullable=False, comment="JSON list: the owner's roles at submission"),
    Column("params", Text, nullable=False, comment="JSON object"),
    Column("priority", Integer, nullable=False),
    Column("resources", Text, nullable=False, comment="JSON list"),
    Column("state", String(16), nullable=False),
    Column("paused", Boolean, nullable=False),
    Column("submitted_us", BigInteger, nullable=False),
    Column("started_us", BigInteger),
    Column("ended_us", BigInteger),
    Column("error", Text, nullable=False, default=""),
    Column("updated_us", BigInteger, nullable=False),
    # version 3 (last, so a row tuple of version 2 is a prefix of one of version 3)
    Column("server", Text, nullable=False, default="", server_default="", comment="the server that runs the job"),
    Index("job_owner", "owner", "id"),
    Index("job_server", "server", "id"),
)

job_log = Table(
    "job_log",
    metadata,
    Column("job_id", BigInteger, nullable=False),
    Column("n", Integer, nullable=False, comment="line number within the job, from 0"),
    Column("time_us", BigInteger, nullable=False),
    Column("line", Text, nullable=False),
    PrimaryKeyConstraint("job_id", "n"),
)

job_result = Table(
    "job_result",
    metadata,
    Column("job_id", BigInteger, nullable=False),
    Column("n", Integer, nullable=False, comment="result number within the job, from 0"),
    Column("time_us", BigInteger, nullable=False),
    Column("pv", Text, nullable=False),
    Column("value", Text, comment="JSON"),
    Column("severity", SmallInteger, nullable=False),
    Column("status", SmallInteger, nullable=False),
    Column("label", Text, nullable=False, default=""),
    PrimaryKeyConstraint("job_id", "n"),
)

alarm_state = Table(
    "alarm_state",
    metadata,
    Column("source", Text, primary_key=True),
    Column("current", SmallInteger, nullable=False),
    Column("status", SmallInteger, nullable=False),
    Column("latched", SmallInteger, nullable=False),
    Column("acked", Boolean, nullable=False),
    Column("value", Text, comment="JSON"),
    Column("since_us", BigInteger, nullable=False),
    Column("message", Text, nullable=False, default=""),
    Column("shelved_until_us", BigInteger),
    Column("shelved_by", Text, nullable=False, default=""),
    Column("shelve_reason", Text, nullable=False, default=""),
    Column("updated_us", BigInteger, nullable=False),
)

# ---- version 3: jobs of a site -----------------------------------------------------------

job_id_block = Table(
    "job_id_block",
    metadata,
    Column("first_id", BigInteger, primary_key=True, autoincrement=False),
    Column("last_id", BigInteger, nullable=False),
    Column("server", Text, nullable=False),
    Column("reserved_us", BigInteger, nullable=False),
    Index("job_id_block_server", "server", "first_id"),
)

#: Tables of each schema version (a migration creates exactly its own).
V1_TABLES = (schema_version, pv, pv_meta, sample, sample_rollup, alarm_event, audit_event)
V2_TABLES = (job, job_log, job_result, alarm_state)
V3_TABLES = (job_id_block,)
#: Job ids a server reserves at a time in a PostgreSQL database (the sequence's increment).
JOB_ID_BLOCK = 1000


# ---- dialect helpers ----------------------------------------------------------------------


def insert(kind: str, table: Table):
    """The dialect's INSERT construct (with ``on_conflict_do_nothing/update``)."""
    return (postgresql.insert if kind == "postgresql" else sqlite.insert)(table)


# ---- schema creation and upgrades -----------------------------------------------------


def _create_v1(conn: Connection, kind: str) -> None:
    metadata.create_all(conn, tables=list(V1_TABLES), checkfirst=True)
    if kind == "postgresql":
        time_expr = "to_timestamp(s.time_us / 1000000.0)"
        create = "CREATE OR REPLACE VIEW"
    else:
        time_expr = "strftime('%Y-%m-%dT%H:%M:%fZ', s.time_us / 1000000.0, 'unixepoch')"
        create = "CREATE VIEW IF NOT EXISTS"
    conn.execute(
        text(
            f"{create} sample_named AS SELECT p.name AS pv, {time_expr} AS time, s.time_us, s.seq, "
            "s.float_val, s.num_val, s.str_val, s.array_val, s.severity, s.status, s.received_us, s.inserted_us "
            "FROM sample s JOIN pv p ON p.id = s.pv_id"
        )
    )


def _create_v2(conn: Connection, kind: str) -> None:
    """Jobs and alarm state (labctl's control layer keeps its records in the archive)."""
    metadata.create_all(conn, tables=list(V2_TABLES), checkfirst=True)


def _create_v3(conn: Connection, kind: str) -> None:
    """Jobs of a site: each job names its server; PostgreSQL hands out site-unique job ids in blocks.

    The sequence starts above every job id already archived, so ids of a version-2
    archive are never handed out again.
    """
    columns = {c["name"] for c in inspect(conn).get_columns(job.name)}
    if "server" not in columns:
        conn.execute(text("ALTER TABLE job ADD COLUMN server TEXT NOT NULL DEFAULT ''"))
    next(i for i in job.indexes if i.name == "job_server").create(conn, checkfirst=True)
    metadata.create_all(conn, tables=list(V3_TABLES), checkfirst=True)
    if kind == "postgresql":
        start = int(conn.execute(text("SELECT COALESCE(MAX(id), 0) + 1 FROM job")).scalar_one())
        conn.execute(text(f"CREATE SEQUENCE IF NOT EXISTS job_id_seq INCREMENT BY {JOB_ID_BLOCK} MINVALUE 1 START WITH {start}"))


#: version -> step that brings a database from version-1 to it. Each step is idempotent
#: (``checkfirst``), so a step cut short by a crash simply runs again.
MIGRATIONS: dict[int, Callable[[Connection, str], None]] = {1: _create_v1, 2: _create_v2, 3: _create_v3}


def ensure_schema(conn: Connection, kind: str, now_us: int) -> tuple[int, int]:
    """Create or upgrade the schema in the caller's transaction; return (found, now) versions.

    Safe to run at every start and by several servers at once (PostgreSQL serialises them
    with an advisory lock held until the transaction ends).

    Raises:
        SchemaTooNew: the database was written by a newer labctl.
    """
    if kind == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEMA_LOCK_KEY})
    schema_version.create(conn, checkfirst=True)
    found = conn.execute(select(schema_version.c.version).where(schema_version.c.component == "historian")).scalar()
    found = int(found or 0)
    if found > SCHEMA_VERSION:
        raise SchemaTooNew(found, SCHEMA_VERSION)
    for version in range(found + 1, SCHEMA_VERSION + 1):
        MIGRATIONS[version](conn, kind)
    stmt = insert(kind, schema_version).values(component="historian", version=SCHEMA_VERSION, updated_us=now_us)
    if found != SCHEMA_VERSION:
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["component"], set_={"version": SCHEMA_VERSION, "updated_us": now_us}
            )
        )
    return found, SCHEMA_VERSION


def check_backend_kind(kind: str) -> None:
    """Refuse an engine the schema was not written for."""
    if kind not in ("sqlite", "postgresql"):
        raise HistorianError(f"historian backend {kind!r} is not supported; use sqlite or postgresql")
