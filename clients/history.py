"""PV history in the client: NumPy arrays, a pandas DataFrame, and ``labctl history``.

Theory of operation. :func:`read_history` (what :meth:`labctl.clients.session.Session.history`
calls) asks the server for a PV's archived history with OPC UA HistoryRead, which a
labctl server answers from its historian:

* **raw** (``every=None``): ReadRawModifiedDetails over ``[since, until)``, oldest first,
  :data:`PAGE_SIZE` values per request, following continuation points until the range is
  exhausted. Severity and status come as for live reads: a Bad StatusCode is INVALID
  (:func:`labctl.clients.values.quality`), and the rest from the PV's ``AlarmState``
  variable, whose history the same request reads (the same samples, so one alarm state
  per value); an INVALID value is NaN (numbers) or None.
  By default (``bounds=True``) the read asks for ReturnBounds and keeps the start bound:
  the value in force at ``since`` (the last one archived before it, with its own time)
  comes first, so a PV that did not change in the range still shows its value; the end
  bound (at or after ``until``) is dropped, and so is a bound the server did not find.
* **processed** (``every`` seconds): ReadProcessedDetails with the TimeAverage2,
  Minimum, Maximum, Count and StartBound aggregates of the same node in one request per
  page -- one bucket per ``every`` from ``since``, the last one cut at ``until``. The
  archive's values are stepped (a value holds until the next one), so a bucket carries
  the value in force: its mean is weighted by time (TimeAverage2), its min and max
  include the value held from its start (StartBound) as well as the samples inside
  (Minimum, Maximum), and ``count`` is the number of samples inside. A bucket is INVALID
  only where the PV had no valid value at all in it (status UDF when nothing was known,
  else the status of the INVALID reading in force); elsewhere its severity is NO_ALARM.

On a site, the history of any PV is read through the connected server (the archive is
shared): a PV's metadata comes from its own server, or, while that server is down, from
the archived values (:func:`labctl.clients.site.archived_metadata`: the type, not the unit).

The result is a :class:`History`: ``times`` (UNIX seconds, float64), ``values`` (float64
for numeric PVs -- int, bool and enum included -- else objects), ``severities`` and
``statuses`` (small ints of :class:`labctl.ioc.types.Severity`/:class:`labctl.ioc.types.Status`), and
for processed history ``minimum``, ``maximum`` and ``counts``. :meth:`History.to_dataframe`
gives a pandas DataFrame indexed by UTC time.

The command ``labctl history PV --since 1h [--until ...] [--every 1m] [--no-bounds]
[--format table|csv|json]`` prints one.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from asyncua import ua
from labctl.clients.errors import ClientError, ServerDown
from labctl.clients.site import archived_metadata
from labctl.clients.values import Metadata, alarm_node_name, format_number, format_value, quality, reading_of
from labctl.ioc.types import PVType, Severity, Status

if TYPE_CHECKING:
    import pandas
    from labctl.clients.session import Session

#: Values asked for per raw HistoryRead request.
PAGE_SIZE = 10_000
#: The aggregates of a processed read, in the order they are requested.
AGGREGATES = (
    ua.ObjectIds.AggregateFunction_TimeAverage2,
    ua.ObjectIds.AggregateFunction_Minimum,
    ua.ObjectIds.AggregateFunction_Maximum,
    ua.ObjectIds.AggregateFunction_Count,
    ua.ObjectIds.AggregateFunction_StartBound,
)
#: HistorianBits Interpolated (Part 4 7.39): a StartBound that is the value held from before the bucket.
_INTERPOLATED = 0x2
_NUMERIC = (PVType.FLOAT64, PVType.INT, PVType.BOOL, PVType.ENUM)
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)


@dataclass(frozen=True, eq=False)
class History:
    """A PV's history as arrays (see the module docstring)."""

    name: str
    meta: Metadata
    times: np.ndarray
    """UNIX seconds (float64): a value's source time, or a bucket's start."""
    values: np.ndarray
    """The values (raw) or bucket means (processed): float64 for numeric PVs (NaN: invalid or empty), else objects."""
    severities: np.ndarray
    """:class:`~labctl.ioc.types.Severity` of each value (int8)."""
    statuses: np.ndarray
    """:class:`~labctl.ioc.types.Status` of each value (int16)."""
    every: float | None = None
    """The bucket width in seconds, or None for raw history."""
    minimum: np.ndarray | None = None
    """Per bucket (processed only)."""
    maximum: np.ndarray | None = None
    """Per bucket (processed only)."""
    counts: np.ndarray | None = None
    """Valid samples per bucket (processed only)."""

    def __len__(self) -> int:
        return len(self.times)

    @property
    def processed(self) -> bool:
        """Buckets rather than raw values."""
        return self.every is not None

    def to_dataframe(self) -> pandas.DataFrame:
        """A DataFrame indexed by UTC time (``time``): ``value``, ``severity``, ``status`` (and
        ``state`` for enums) for raw history; ``mean``, ``min``, ``max``, ``count``, ``severity``,
        ``status`` for processed history."""
        from labctl.extras import require

        require("notebook")
        import pandas as pd

        index = pd.DatetimeIndex(pd.to_datetime(self.times, unit="s", utc=True), name="time")
        severity = pd.Categorical.from_codes(self.severities.astype(int), [s.name for s in Severity])
        status = [Status(int(s)).name for s in self.statuses]
        if self.processed:
            columns: dict[str, Any] = {"mean": self.values, "min": self.minimum, "max": self.maximum, "count": self.counts}
        else:
            columns = {"value": self.values}
            if self.meta.type is PVType.ENUM and self.meta.states:
                states = self.meta.states
                columns["state"] = [
                    states[int(v)] if isinstance(v, float) and not math.isnan(v) and 0 <= v < len(states) else None
                    for v in self.values
                ]
        columns.update(severity=severity, status=status)
        return pd.DataFrame(columns, index=index)


def _seconds(t: float | _dt.datetime) -> float:
    if isinstance(t, _dt.datetime):
        if t.tzinfo is None:
            raise ValueError(f"naive datetime {t.isoformat()} is ambiguous: give a timezone (e.g. UTC)")
        return t.timestamp()
    return float(t)


def _utc(t: float) -> _dt.datetime:
    return _EPOCH + _dt.timedelta(microseconds=round(t * 1_000_000))


def _unix(d: _dt.datetime | None) -> float:
    if d is None:
        return math.nan
    return (d if d.tzinfo is not None else d.replace(tzinfo=_dt.UTC)).timestamp()


async def read_history(
    session: Session, name: str, since: float | _dt.datetime, until: float | _dt.datetime | None = None, every: float | None = None,
    *, bounds: bool = True,
) -> History:
    """A PV's history from ``since`` to ``until`` (default: now), raw or in ``every``-second buckets.

    ``bounds`` (raw only): start with the value in force at ``since`` (see the module docstring).

    Raises:
        NoSuchPV: the server has no such PV.
        ValueError: the range or ``every`` is not usable.
        HistoryUnavailable: the server refused the read (the StatusCode says why).
    """
    start = _seconds(since)
    end = time.time() if until is None else _seconds(until)
    if not (math.isfinite(start) and math.isfinite(end)) or end <= start:
        raise ValueError(f"the history range must end after it starts (since {start}, until {end})")
    if every is not None and not (math.isfinite(every) and every > 0):
        raise ValueError(f"every must be a positive number of seconds, got {every!r}")
    try:
        meta = await session.info(name)
    except ServerDown:  # the archive is the site's: its history is still read through this server
        meta = Metadata(name, None, historizing=True)
    if every is None:
        return await _raw(session, meta, start, end, bounds)
    if meta.type is None:
        meta = archived_metadata(name, ())
    if meta.type not in _NUMERIC:
        raise ValueError(f"{name} is a {meta.type.value if meta.type else 'non-numeric'} PV; buckets need a number")
    return await _processed(session, meta, start, end, every)


class HistoryUnavailable(ClientError):
    """The server refused a history read; ``status`` is its StatusCode name."""

    def __init__(self, name: str, status: str, doc: str) -> None:
        self.name = name
        self.status = status
        super().__init__(f"{name}: history not available ({status}): {doc}")


def _refused(name: str, code: ua.StatusCode) -> HistoryUnavailable:
    return HistoryUnavailable(name, code.name, code.doc)


async def _history_read(session: Session, details: Any, items: list[tuple[ua.NodeId, bytes | None]]) -> list[ua.HistoryReadResult]:
    params = ua.HistoryReadParameters()
    params.HistoryReadDetails = details
    params.TimestampsToReturn = ua.TimestampsToReturn.Source
    params.ReleaseContinuationPoints = False
    for nid, cont in items:
        item = ua.HistoryReadValueId()
        item.NodeId = nid
        item.ContinuationPoint = cont
        params.NodesToRead.append(item)
    return await session._call(session.client.uaclient.history_read(params))  # noqa: SLF001 -- the session's request wrapper


async def _raw(session: Session, meta: Metadata, start: float, end: float, bounds: bool) -> History:
    details = ua.ReadRawModifiedDetails()
    details.IsReadModified = False
    details.StartTime, details.EndTime = _utc(start), _utc(end)
    details.NumValuesPerNode = PAGE_SIZE
    details.ReturnBounds = bounds
    nid = session._node_id(meta.name)  # noqa: SLF001 -- NodeIds are the session's
    alarm_nid = session._node_id(alarm_node_name(meta.name))  # noqa: SLF001
    values: list[ua.DataValue] = []
    alarms: list[ua.DataValue] = []
    pending: dict[ua.NodeId, bytes | None] = {nid: None, alarm_nid: None}
    first = True
    while first or pending:
        first = False
        order = list(pending)
        results = await _history_read(session, details, [(n, pending[n]) for n in order])
        for n, result in zip(order, results, strict=True):
            if result.StatusCode is not None and result.StatusCode.is_bad():
                if n == alarm_nid:  # a server without AlarmState history: severities from the StatusCodes alone
                    del pending[n]
                    continue
                raise _refused(meta.name, result.StatusCode)
            if result.HistoryData is not None:
                (values if n == nid else alarms).extend(result.HistoryData.DataValues)
            if result.ContinuationPoint:
                pending[n] = result.ContinuationPoint
            else:
                del pending[n]
    if meta.type is None:  # its server is down: the type its archived values carry
        meta = archived_metadata(meta.name, values)
    readings = [
        reading_of(meta, dv, alarm)
        for dv, alarm in _paired(values, alarms)
        if not (bounds and dv.StatusCode is not None and dv.StatusCode.value == ua.StatusCodes.BadBoundNotFound)
    ]
    if bounds and readings and readings[-1].timestamp >= end:
        readings.pop()  # the end bound: outside [since, until)
    numeric = meta.type in _NUMERIC
    values = np.array(
        [(math.nan if r.value is None else float(r.value)) for r in readings] if numeric else [r.value for r in readings],
        dtype=np.float64 if numeric else object,
    )
    return History(
        name=meta.name,
        meta=meta,
        times=np.array([r.timestamp for r in readings], dtype=np.float64),
        values=values,
        severities=np.array([int(r.severity) for r in readings], dtype=np.int8),
        statuses=np.array([int(r.status) for r in readings], dtype=np.int16),
    )


def _paired(values: list[ua.DataValue], alarms: list[ua.DataValue]) -> list[tuple[ua.DataValue, ua.DataValue | None]]:
    """Each value with the alarm state of its sample: the one at the same place, else the last one at or before its time."""
    if len(alarms) == len(values) and all(a.SourceTimestamp == v.SourceTimestamp for a, v in zip(alarms, values, strict=True)):
        return list(zip(values, alarms, strict=True))
    out: list[tuple[ua.DataValue, ua.DataValue | None]] = []
    j, current = 0, None
    for v in values:
        while j < len(alarms) and (v.SourceTimestamp is None or (alarms[j].SourceTimestamp is not None and alarms[j].SourceTimestamp <= v.SourceTimestamp)):
            current = alarms[j]
            j += 1
        out.append((v, current))
    return out


async def _processed(session: Session, meta: Metadata, start: float, end: float, every: float) -> History:
    details = ua.ReadProcessedDetails()
    details.StartTime, details.EndTime = _utc(start), _utc(end)
    details.ProcessingInterval = every * 1000.0
    details.AggregateConfiguration = ua.AggregateConfiguration(UseServerCapabilitiesDefaults=True)
    nid = session._node_id(meta.name)  # noqa: SLF001 -- NodeIds are the session's
    columns: list[list[ua.DataValue]] = [[] for _ in AGGREGATES]
    pending: dict[int, bytes | None] = dict.fromkeys(range(len(AGGREGATES)))
    first = True
    while first or pending:
        order = sorted(pending)
        details.AggregateType = [ua.NodeId(AGGREGATES[i]) for i in order]
        results = await _history_read(session, details, [(nid, pending[i]) for i in order])
        first = False
        for i, result in zip(order, results, strict=True):
            if result.StatusCode is not None and result.StatusCode.is_bad():
                raise _refused(meta.name, result.StatusCode)
            if result.HistoryData is not None:
                columns[i] += result.HistoryData.DataValues
            if result.ContinuationPoint:
                pending[i] = result.ContinuationPoint
            else:
                del pending[i]
    mean, low, high, count, held = columns
    n = len(count)
    if not all(len(c) == n for c in columns):
        raise _refused(meta.name, ua.StatusCode(ua.StatusCodes.BadUnexpectedError))

    def numbers(dvs: list[ua.DataValue]) -> np.ndarray:
        return np.array(
            [float(dv.Value.Value) if not dv.StatusCode.is_bad() and dv.Value is not None and dv.Value.Value is not None else math.nan for dv in dvs],
            dtype=np.float64,
        )

    counts = np.array([int(dv.Value.Value) if dv.Value is not None and dv.Value.Value is not None else 0 for dv in count], dtype=np.int64)
    # The value held from before a bucket counts towards its min and max (a bound exactly at
    # the bucket's start is a sample inside it, already in Minimum and Maximum).
    carried = np.array(
        [float(dv.Value.Value) if dv.StatusCode.is_good() and dv.StatusCode.value & _INTERPOLATED and dv.Value.Value is not None
         else math.nan for dv in held],
        dtype=np.float64,
    )  # fmt: skip
    bad = np.array([dv.StatusCode.is_bad() for dv in mean], dtype=bool)
    severities = np.full(n, int(Severity.NO_ALARM), dtype=np.int8)
    statuses = np.full(n, int(Status.NO_ALARM), dtype=np.int16)
    for i in np.flatnonzero(bad):
        bound = held[i].StatusCode  # the reading in force at the bucket's start, when it was INVALID
        status = quality(bound.value)[1] if bound.is_bad() and bound.value != ua.StatusCodes.BadNoData else Status.UDF
        severities[i], statuses[i] = int(Severity.INVALID), int(status)
    with np.errstate(invalid="ignore"):
        minimum = np.fmin(numbers(low), carried)
        maximum = np.fmax(numbers(high), carried)
    return History(
        name=meta.name,
        meta=meta,
        times=np.array([_unix(dv.SourceTimestamp) for dv in count], dtype=np.float64),
        values=numbers(mean),
        severities=severities,
        statuses=statuses,
        every=every,
        minimum=minimum,
        maximum=maximum,
        counts=counts,
    )


# ---- labctl history ---------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add ``labctl history`` (``common``: the shared connection options)."""
    from labctl.clients.cli.arguments import parse_duration, parse_since

    p = subparsers.add_parser("history", parents=[common], help="a PV's archived values, raw or in time buckets")
    p.add_argument("pv", metavar="PV")
    p.add_argument("--since", type=parse_since, default=parse_since("1h"), metavar="WHEN",
                   help="a duration ago (1h, 30m) or a date and time (2024-05-01T12:00; local unless it says its zone); default 1h")  # fmt: skip
    p.add_argument("--until", type=parse_since, default=None, metavar="WHEN", help="as --since (default: now)")
    p.add_argument("--every", type=parse_duration, default=None, metavar="DURATION",
                   help="buckets of this width (1m, 10s...): mean, min, max and count of each")  # fmt: skip
    p.add_argument("--no-bounds", dest="bounds", action="store_false",
                   help="raw values inside the range only (default: first the value in force at --since)")  # fmt: skip
    p.add_argument("--format", choices=("table", "csv", "json"), default=None, help="output format (default table; --json is json)")
    p.set_defaults(func=cmd_history)


def cmd_history(args: argparse.Namespace) -> int:
    """Print a PV's history."""
    from labctl.clients.cli.arguments import UsageError
    from labctl.clients.cli.runner import run

    fmt = args.format or ("json" if args.json else "table")

    async def body(s: Session) -> int:
        try:
            h = await s.history(args.pv, args.since, args.until, args.every, bounds=args.bounds)
        except ValueError as e:
            raise UsageError(str(e)) from None
        print_history(h, fmt)
        return 0

    return run(args, body)


def rows(h: History) -> tuple[list[str], list[list[Any]]]:
    """Column names and rows of a history, values as plain Python data (times as ISO 8601 UTC)."""
    times = [_utc(t).isoformat(timespec="microseconds") for t in h.times]  # "+00:00", as every --json time
    sev = [Severity(int(s)).name for s in h.severities]
    sta = [Status(int(s)).name for s in h.statuses]

    def plain(x: Any) -> Any:
        if isinstance(x, (float, np.floating)):
            return float(x) if math.isfinite(x) else None  # strict JSON: no NaN or infinities
        if isinstance(x, (tuple, list)):
            return [plain(v) for v in x]
        return x

    if h.processed:
        assert h.minimum is not None and h.maximum is not None and h.counts is not None
        header = ["time", "mean", "min", "max", "count", "severity", "status"]
        body = [
            [t, plain(m), plain(lo), plain(hi), int(c), s1, s2]
            for t, m, lo, hi, c, s1, s2 in zip(times, h.values, h.minimum, h.maximum, h.counts, sev, sta, strict=True)
        ]
        return header, body
    header = ["time", "value", "severity", "status"]
    values = [plain(v) for v in h.values]
    if h.meta.type in (PVType.INT, PVType.ENUM):
        values = [None if v is None else int(v) for v in values]
    elif h.meta.type is PVType.BOOL:
        values = [None if v is None else bool(v) for v in values]
    return header, [[t, v, s1, s2] for t, v, s1, s2 in zip(times, values, sev, sta, strict=True)]


def print_history(h: History, fmt: str, out: Any = None) -> None:
    """Write a history as ``table``, ``csv`` or ``json`` to ``out`` (standard output)."""
    out = out or sys.stdout
    header, body = rows(h)
    if fmt == "json":
        doc = {"pv": h.name, "unit": h.meta.unit, "every": h.every, "rows": [dict(zip(header, r, strict=True)) for r in body]}
        if h.meta.type is PVType.ENUM and not h.processed:
            states = h.meta.states
            for row in doc["rows"]:  # the state's name beside its index, as `labctl get --json`
                v = row["value"]
                row["state"] = states[v] if isinstance(v, int) and 0 <= v < len(states) else None
        print(json.dumps(doc, indent=2, allow_nan=False), file=out)  # strict: NaN is already None
        return
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        for r in body:
            writer.writerow(["" if x is None else json.dumps(x) if isinstance(x, list) else x for x in r])
        return
    if not body:
        print(f"no archived values of {h.name} in that range", file=sys.stderr)
        return
    unit = f" [{h.meta.unit}]" if h.meta.unit else ""
    local = [_dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] for t in h.times]
    if h.processed:
        shown = [
            [t, _num(r[1], h.meta), _num(r[2], h.meta), _num(r[3], h.meta), str(r[4])] for t, r in zip(local, body, strict=True)
        ]
        _table(["TIME", f"MEAN{unit}", "MIN", "MAX", "COUNT"], shown, out)
        return
    shown = []
    for t, r, v in zip(local, body, h.values, strict=True):
        value = format_value(h.meta, None if r[1] is None else (v if h.meta.type not in _NUMERIC else r[1]))
        shown.append([t, value, r[2], r[3]])
    _table(["TIME", f"VALUE{unit}", "SEVERITY", "STATUS"], shown, out)


def _num(x: float | None, meta: Metadata) -> str:
    return "-" if x is None else format_number(float(x), meta.precision)


def _table(header: Sequence[str], rows_: Sequence[Sequence[str]], out: Any) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows_, strict=False)]
    for row in (header, *rows_):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip(), file=out)
