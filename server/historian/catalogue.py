"""The PV catalogue: which PVs the archive knows, their ids, and their metadata history.

Theory of operation. Two tables of :mod:`labctl.server.historian.schema` hold it:

``pv``
    The catalogue: one row per PV ever archived, with its current metadata (type, unit,
    description, resource...) in columns and, complete, as canonical JSON in ``meta``.
``pv_meta``
    The metadata history: a row whenever a PV's metadata differs from what was recorded
    last, so old samples can be read with the unit and limits they had.

At every start the server registers its PVs (:func:`register_catalogue`): new PVs are
inserted, a PV whose metadata (:func:`pv_metadata`, compared as :func:`canonical_json`)
changed gets its columns updated and a new ``pv_meta`` row, and every registered PV's
``seen_us`` is set -- in a few statements whatever the number of PVs. Samples spooled
under an older site file may name PVs known only by name and type; :func:`ensure_pvs`
catalogues those.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from labctl.ioc.pv import PVInfo
from labctl.server.historian.schema import pv
from sqlalchemy import select
from sqlalchemy.engine import Connection


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


#: The fields of :class:`~labctl.ioc.pv.PVInfo` that :func:`pv_metadata` reads (all but name and initial).
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
