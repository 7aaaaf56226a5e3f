"""The historian's tables (SQLAlchemy Core), value and time encodings, schema upgrades.

Theory of operation. One schema serves SQLite and PostgreSQL (with or without
TimescaleDB); only :mod:`server.historian.timescale` adds engine-specific DDL on top.
The shape follows the EPICS archivers (the Phoebus TimescaleDB archive, HDB++):

``pv``
    The catalogue: one row per PV ever archived, with its current metadata (type, unit,
    description, resource...) in columns and, complete, as canonical JSON in ``meta``.
``pv_meta``
    The metadata history: a row whenever a PV's metadata differs from what was recorded
    last, so old samples can be read with the unit and limits they had.
``sample``
    One row per archived update, keyed ``(pv_id, time_us, seq)``. ``time_us`` is the source
    timestamp in integer microseconds since the UNIX epoch (exact, the same on every
    backend, and cheap to COPY); ``seq`` tells apart updates of one PV that carry the
    same microsecond (0 for nearly all rows). The value sits in the column of its type:
    ``float_val`` (float64; NaN is stored as NULL, which both backends treat alike),
    ``num_val`` (int, bool as 0/1, enum state index), ``str_val`` or ``array_val``
    (float64[]: ``DOUBLE PRECISION[]`` on PostgreSQL, packed little-endian doubles on
    SQLite). Every row carries EPICS ``severity`` and ``status``, so an INVALID reading is
    archived as such. As in HDB++, ``received_us`` (when the historian got the update) and
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
    Audit records (:class:`ioc.access.AuditRecord`): writes accepted and refused, lock and
    alarm actions. ``uid`` is generated when the record is captured, so a replay is a no-op.
``job``, ``job_log``, ``job_result``
    Submitted jobs (:class:`ioc.jobs.Job`) as records that survive a restart: one row per
    job with its current state (updated in place), its log lines and the values it read
    (both append-only, keyed ``(job_id, n)`` so a replay is a no-op). Results are found by
    job id; a value is stored as JSON, with its severity, status and label.
``alarm_state``
    The alarm state of each alarmed PV (:class:`ioc.alarms.Alarm`: latched severity,
    acknowledged, shelved until...), one row per source updated in place, so
    acknowledgements and shelving survive a restart. The transitions themselves are in
    ``alarm_event`` (severity changes) and ``audit_event`` (acknowledge, shelve).
``historian_schema``
    The schema version. :func:`ensure_schema` creates or upgrades the schema under an
    advisory lock (PostgreSQL), idempotently, at every start.

A view ``sample_named`` joins samples to PV names with a readable time, for people and
tools that query the database directly (Grafana, psql, sqlite3).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import operator
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

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
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from ioc.pv import PVInfo
from ioc.types import PVType
from server.historian.errors import HistorianError, SchemaTooNew

#: The schema version this code writes and reads (see :data:`MIGRATIONS`).
SCHEMA_VERSION = 2
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
    Index("job_owner", "owner", "id"),
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

#: Tables of each schema version (a migration creates exactly its own).
V1_TABLES = (schema_version, pv, pv_meta, sample, sample_rollup, alarm_event, audit_event)
V2_TABLES = (job, job_log, job_result, alarm_state)


# ---- time -------------------------------------------------------------------------------

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def to_us(t: float | dt.datetime) -> int:
    """Seconds since the epoch (or an aware datetime) as integer microseconds."""
    if isinstance(t, dt.datetime):
        if t.tzinfo is None:
            raise HistorianError(f"naive datetime {t.isoformat()} is ambiguous: give a timezone (e.g. UTC)")
        return (t - _EPOCH) // dt.timedelta(microseconds=1)
    if not math.isfinite(t):
        raise HistorianError(f"time {t!r} is not a finite number of seconds")
    return round(t * 1_000_000)


def from_us(us: int) -> float:
    """Integer microseconds as float seconds since the epoch."""
    return us / 1_000_000


def utc_text(us: int) -> str:
    """Microseconds as an ISO 8601 UTC string (for log lines)."""
    return (_EPOCH + dt.timedelta(microseconds=us)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---- values -----------------------------------------------------------------------------


def pack_array(values: Iterable[float]) -> bytes:
    """float64[] as packed little-endian doubles (the SQLite representation)."""
    seq = list(values)
    return struct.pack(f"<{len(seq)}d", *seq)


def unpack_array(data: bytes) -> tuple[float, ...]:
    """Inverse of :func:`pack_array`."""
    return struct.unpack(f"<{len(data) // 8}d", data)


def encode_value(pv_type: PVType, value: Any) -> tuple[float | None, int | None, str | None, tuple[float, ...] | None]:
    """A PV value as ``(float_val, num_val, str_val, array_val)``; see the module docstring."""
    if pv_type is PVType.FLOAT64:
        f = float(value)
        return (None if math.isnan(f) else f), None, None, None
    if pv_type in (PVType.INT, PVType.BOOL, PVType.ENUM):
        return None, int(value), None, None
    if pv_type is PVType.STRING:
        # PostgreSQL text cannot hold NUL; both backends store U+FFFD so they stay identical.
        return None, None, str(value).replace("\x00", "\ufffd"), None
    return None, None, None, tuple(float(x) for x in value)


def decode_value(pv_type: PVType, float_val: Any, num_val: Any, str_val: Any, array_val: Any) -> Any:
    """Inverse of :func:`encode_value`, giving the PV's canonical Python type."""
    if pv_type is PVType.FLOAT64:
        return math.nan if float_val is None else float(float_val)
    if pv_type is PVType.INT or pv_type is PVType.ENUM:
        return None if num_val is None else int(num_val)
    if pv_type is PVType.BOOL:
        return None if num_val is None else bool(num_val)
    if pv_type is PVType.STRING:
        return str_val
    return None if array_val is None else tuple(array_val)


def value_decoder(pv_type: PVType) -> Callable[[Any, Any, Any, Any], Any]:
    """:func:`decode_value` specialised for one type (for reading many rows fast)."""
    if pv_type is PVType.FLOAT64:
        return lambda f, n, s, a: math.nan if f is None else f
    if pv_type is PVType.INT or pv_type is PVType.ENUM:
        return lambda f, n, s, a: n
    if pv_type is PVType.BOOL:
        return lambda f, n, s, a: None if n is None else bool(n)
    if pv_type is PVType.STRING:
        return lambda f, n, s, a: s
    return lambda f, n, s, a: None if a is None else tuple(a)


def numeric_value(float_val: float | None, num_val: int | None) -> float | None:
    """The number a sample contributes to aggregates (None: it contributes nothing)."""
    if float_val is not None:
        return float_val
    return None if num_val is None else float(num_val)


#: PV types whose samples are aggregated (processed history, rollups).
AGGREGATABLE = frozenset({PVType.FLOAT64, PVType.INT, PVType.BOOL, PVType.ENUM})


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


#: version -> step that brings a database from version-1 to it. Each step is idempotent
#: (``checkfirst``), so a step cut short by a crash simply runs again.
MIGRATIONS: dict[int, Callable[[Connection, str], None]] = {1: _create_v1, 2: _create_v2}


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


# ---- the PV catalogue ---------------------------------------------------------------------


def pv_metadata(info: PVInfo) -> dict[str, Any]:
    """The metadata of a PV that the archive keeps (and versions), as plain JSON data."""
    return {
        "type": info.type.value,
        "unit": info.unit,
        "precision": info.precision,
        "description": info.description,
        "resource": info.resource,
        "instrument": info.instrument,
        "channel": info.channel,
        "display": list(info.display) if info.display else None,
        "drive": list(info.drive) if info.drive else None,
        "alarm": info.alarm.model_dump(mode="json") if info.alarm else None,
        "deadband": {"monitor": info.monitor_deadband, "archive": info.archive_deadband},
        "writable": info.writable,
        "states": list(info.states),
        "length": info.length,
        "allow_nan": info.allow_nan,
        "scan_s": info.scan_s,
        "expr": info.expr,
        "inputs": dict(info.inputs),
    }


#: The fields of :class:`~ioc.pv.PVInfo` that :func:`pv_metadata` reads (all but name and initial).
_META_KEY = operator.attrgetter(
    "type", "unit", "precision", "description", "resource", "instrument", "channel", "display", "drive", "alarm",
    "monitor_deadband", "archive_deadband", "writable", "states", "length", "allow_nan", "scan_s", "expr", "inputs",
)


def canonical_json(data: Any) -> str:
    """Compact JSON with sorted keys: equal data gives equal text."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=repr)


def catalogue_metadata(infos: Iterable[PVInfo]) -> dict[str, tuple[Mapping[str, Any], str]]:
    """``{name: (metadata, canonical JSON)}`` of ``infos``.

    PVs that differ only by name (numbered channels of one kind) share one metadata dict
    and one text: it is computed once per distinct description.
    """
    seen: dict[tuple, tuple[Mapping[str, Any], str]] = {}
    out: dict[str, tuple[Mapping[str, Any], str]] = {}
    for info in infos:
        key = _META_KEY(info)
        try:
            entry = seen.get(key)
        except TypeError:  # an unhashable field: no sharing for this PV
            meta = pv_metadata(info)
            out[info.name] = (meta, canonical_json(meta))
            continue
        if entry is None:
            meta = pv_metadata(info)
            entry = seen[key] = (meta, canonical_json(meta))
        out[info.name] = entry
    return out


def _catalogue_row(meta: Mapping[str, Any], meta_json: str) -> dict[str, Any]:
    return {
        "type": meta.get("type") or "",
        "unit": meta.get("unit") or "",
        "precision": meta.get("precision"),
        "description": meta.get("description") or "",
        "resource": meta.get("resource"),
        "instrument": meta.get("instrument"),
        "states": json.dumps(meta["states"]) if meta.get("states") else None,
        "meta": meta_json,
    }


#: PV ids per ``UPDATE ... WHERE id IN (...)`` statement (well under every backend's parameter limit).
_ID_CHUNK = 5000


def register_catalogue(conn: Connection, kind: str, infos: Iterable[PVInfo], now_us: int) -> dict[str, int]:
    """Insert new PVs, version changed metadata, and return ``{name: pv_id}`` for ``infos``."""
    return _register(conn, kind, catalogue_metadata(infos), now_us, versioned=True)


def ensure_pvs(conn: Connection, kind: str, types: Mapping[str, str], now_us: int) -> dict[str, int]:
    """Catalogue entries for PVs known only by name and type (spooled by an older site file)."""
    rows = conn.execute(select(pv.c.name, pv.c.id).where(pv.c.name.in_(list(types)))).all()
    ids = {r.name: r.id for r in rows}
    missing = {}
    for n, t in types.items():
        if n not in ids:
            meta = {"type": t}
            missing[n] = (meta, canonical_json(meta))
    if missing:
        ids.update(_register(conn, kind, missing, now_us, versioned=False))
    return ids


def _register(
    conn: Connection, kind: str, wanted: Mapping[str, tuple[Mapping[str, Any], str]], now_us: int, versioned: bool
) -> dict[str, int]:
    """The catalogue work of one start, in a few statements whatever the number of PVs.

    One read of the whole catalogue; one multi-row insert of the new PVs and one of their
    first metadata versions; an update per PV whose metadata changed; ``seen_us`` of every
    registered PV in one statement (a few when only some catalogued PVs are registered).
    """
    known = {name: (pv_id, meta) for pv_id, name, meta in conn.execute(select(pv.c.id, pv.c.name, pv.c.meta))}
    new = [name for name in wanted if name not in known]
    history: list[tuple[int, int, str]] = []
    if new:
        rows = []
        for n in new:
            row = _catalogue_row(*wanted[n])
            rows.append((n, *(row[c] for c in _CATALOGUE_COLUMNS), now_us, now_us, now_us))
        _insert_rows(conn, kind, "pv", ("name", *_CATALOGUE_COLUMNS, "created_us", "updated_us", "seen_us"), ("name",), rows)
        known = {name: (pv_id, meta) for pv_id, name, meta in conn.execute(select(pv.c.id, pv.c.name, pv.c.meta))}
        history = [(known[n][0], now_us, wanted[n][1]) for n in new]
    fresh = set(new)
    if versioned:
        for name, (meta, meta_json) in wanted.items():
            pv_id, recorded = known[name]
            if name not in fresh and recorded != meta_json:
                conn.execute(
                    pv.update().where(pv.c.id == pv_id).values(**_catalogue_row(meta, meta_json), updated_us=now_us, seen_us=now_us)
                )
                history.append((pv_id, now_us, meta_json))
        if len(wanted) == len(known):  # every catalogued PV is registered (the usual start)
            conn.execute(pv.update().values(seen_us=now_us))
        else:
            ids = [known[name][0] for name in wanted]
            for k in range(0, len(ids), _ID_CHUNK):
                conn.execute(pv.update().where(pv.c.id.in_(ids[k : k + _ID_CHUNK])).values(seen_us=now_us))
    if history:
        _insert_rows(conn, kind, "pv_meta", ("pv_id", "time_us", "meta"), ("pv_id", "time_us"), history)
    return {name: known[name][0] for name in wanted}


_CATALOGUE_COLUMNS = ("type", "unit", "precision", "description", "resource", "instrument", "states", "meta")


def _insert_rows(
    conn: Connection, kind: str, table: str, columns: Sequence[str], key: Sequence[str], rows: list[tuple]
) -> None:
    """``INSERT ... ON CONFLICT (key) DO NOTHING`` of many plain tuples through the driver's executemany.

    Many rows at once (a whole catalogue): the SQL construct's per-row parameter
    processing would cost more than the database's work.
    """
    mark = "%s" if kind == "postgresql" else "?"
    names = ", ".join(f'"{c}"' for c in columns)
    sql = (
        f"INSERT INTO {table} ({names}) VALUES ({', '.join([mark] * len(columns))}) "
        f"ON CONFLICT ({', '.join(key)}) DO NOTHING"
    )
    conn.exec_driver_sql(sql, rows)


def check_backend_kind(kind: str) -> None:
    """Refuse an engine the schema was not written for."""
    if kind not in ("sqlite", "postgresql"):
        raise HistorianError(f"historian backend {kind!r} is not supported; use sqlite or postgresql")
