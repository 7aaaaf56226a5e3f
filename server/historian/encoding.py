"""How the historian stores a PV value and a time: value columns, array packing, microseconds.

Theory of operation. Every backend stores the same encodings, so SQLite and PostgreSQL
(with or without TimescaleDB) give identical results (tables in
:mod:`labctl.server.historian.schema`):

Time
    A sample's ``time_us`` (and every other ``*_us`` column) is the source timestamp in
    integer microseconds since the UNIX epoch: exact, the same on every backend, and cheap
    to COPY. :func:`to_us` takes float seconds or an aware datetime (a naive one is
    ambiguous and refused); :func:`from_us` gives float seconds back.
Values
    A sample's value sits in the column of its type: ``float_val`` (float64; NaN is stored
    as NULL, which both backends treat alike), ``num_val`` (int, bool as 0/1, enum state
    index), ``str_val`` or ``array_val`` (float64[]: ``DOUBLE PRECISION[]`` on PostgreSQL,
    packed little-endian doubles on SQLite). :func:`encode_value` and :func:`decode_value`
    convert between a PV value and those columns; :func:`value_decoder` is the decoder of
    one type, for reading many rows fast. Numeric types (:data:`AGGREGATABLE`) also feed
    aggregates, through :func:`numeric_value`.
"""

from __future__ import annotations

import datetime as dt
import math
import struct
from collections.abc import Callable, Iterable
from typing import Any

from labctl.ioc.types import PVType
from labctl.server.archive import HistorianError

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
