"""The client commands' output for people and programs: tables, JSON, times and durations.

Theory of operation. Output is a table for people (:func:`print_table`: columns as wide
as their widest cell), or JSON with ``--json`` (:func:`print_json`). Tables show local
times (:func:`format_time` to the millisecond, :func:`format_clock` to the second) and
compact durations (:func:`format_span`: ``42s``, ``5m07s``, ``2h05m``).

JSON is strict, for programs: :func:`plain` turns dataclasses into objects, tuples into
lists and non-finite floats (NaN, infinities) into ``null``, and :func:`print_json`
refuses anything else (``allow_nan=False``). Every time is ISO 8601 in UTC with its zone
(:func:`iso_time`: ``2026-12-07T00:32:31.565000+00:00``), never UNIX seconds; a time
that is not known is ``null``. Durations stay numbers of seconds, named ``..._s``.

A failure with ``--json`` is one JSON object on standard error (standard output carries
results only), made by :func:`error_object`: ``kind`` (forbidden, not_found, conflict,
invalid, unavailable, connection, timeout, usage), ``error`` (the error's type name),
``action``, ``target``, ``fields`` and ``message``; ``status`` too when the server
answered with a StatusCode.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import time
from collections.abc import Sequence
from typing import Any

from labctl.clients.errors import KINDS


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print rows under a header, in columns."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    for row in (header, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())


def format_time(ts: float) -> str:
    """A UNIX time as local date and time to the millisecond."""
    return _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def format_clock(ts: float | None) -> str:
    """A UNIX time as local date and time to the second (``-`` for None)."""
    return "-" if ts is None else _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def iso_time(ts: float | None) -> str | None:
    """A UNIX time as ISO 8601 in UTC (``2026-12-07T00:32:31.565000+00:00``); None for None or a non-finite time."""
    if ts is None or not math.isfinite(ts):
        return None
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).isoformat(timespec="microseconds")


def plain(value: Any) -> Any:
    """A value as strict JSON data: dataclasses as objects, tuples as lists, NaN and infinities as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(x) for x in value]
    return value


def with_times(record: dict[str, Any], *keys: str) -> dict[str, Any]:
    """``record`` with the UNIX times under ``keys`` as ISO 8601 UTC (:func:`iso_time`)."""
    return {k: (iso_time(v) if k in keys else v) for k, v in record.items()}


def json_text(value: Any, *, indent: int | None = 2) -> str:
    """Strict JSON of ``value`` (see :func:`plain`); raises ValueError for what JSON cannot say."""
    return json.dumps(plain(value), indent=indent, allow_nan=False)


def print_json(value: Any, *, indent: int | None = 2) -> None:
    """Print a value as strict JSON (see :func:`plain`)."""
    print(json_text(value, indent=indent), flush=True)


def error_object(error: Exception) -> dict[str, Any]:
    """A failure as data: kind, error, action, target, fields, message (and status when known)."""
    kind = getattr(error, "kind", "unavailable")
    out: dict[str, Any] = {
        "kind": kind if kind in KINDS else "unavailable",
        "error": getattr(error, "error", "") or type(error).__name__,
        "action": getattr(error, "action", ""),
        "target": getattr(error, "target", ""),
        "fields": plain(getattr(error, "fields", None) or {}),
        "message": str(error),
    }
    status = getattr(error, "status", "")
    if status:
        out["status"] = status
    return out


def format_time_left(ts: float | None) -> str:
    """`` (in 5m07s)`` until a UNIX time, `` (lapsed)`` after it, empty for None."""
    if ts is None:
        return ""
    left = ts - time.time()
    return f" (in {format_span(left)})" if left > 0 else " (lapsed)"


def format_span(seconds: float) -> str:
    """A duration as ``42s``, ``5m07s`` or ``2h05m``."""
    if seconds < 60:
        return f"{max(seconds, 0.0):.3g}s"
    h, rest = divmod(round(seconds), 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def format_plain(value: Any) -> str:
    """A value of a job result or an audit record as text (compact floats, arrays in brackets)."""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, tuple):
        return "[" + ", ".join(format_plain(x) for x in value) + "]"
    return str(value)
