"""The client commands' output for people and programs: tables, JSON, times and durations.

Theory of operation. Output is a table for people (:func:`print_table`: columns as wide
as their widest cell), or JSON with ``--json`` (:func:`print_json`: dataclasses as
objects). Times are local (:func:`format_time` to the millisecond, :func:`format_clock`
to the second), durations compact (:func:`format_span`: ``42s``, ``5m07s``, ``2h05m``).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import time
from collections.abc import Sequence
from typing import Any


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


def print_json(value: Any) -> None:
    """Print a value as indented JSON (dataclasses as objects)."""
    print(json.dumps(value, indent=2, default=_json_default))


def _json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return repr(value)


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
