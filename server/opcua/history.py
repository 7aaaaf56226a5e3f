"""HistoryRead of PVs over OPC UA, served from the historian.

Theory of operation. asyncua's server routes every HistoryRead request to
``InternalServer.history_manager`` (``asyncua/server/history.py``), which hands
ReadRawModifiedDetails to a ``HistoryStorageInterface`` and answers everything else --
ReadProcessedDetails included -- with BadNotImplemented. Its raw path also makes the
continuation point from the timestamp of the next value, which loses values that share
a timestamp, and it ignores ReturnBounds and ReleaseContinuationPoints. So labctl installs
two pieces (:meth:`labctl.server.opcua.service.OpcUaService.enable_history`):

* :class:`HistorianStorage`, an asyncua ``HistoryStorageInterface`` over the historian
  (:mod:`labctl.server.historian`). It implements that interface (``read_node_history``) so it
  also works behind asyncua's own manager, and adds :meth:`HistorianStorage.read`, which
  answers one node of a HistoryRead in full.
* :class:`HistoryManager`, asyncua's manager with ``read_history`` overridden to send
  every node to :meth:`HistorianStorage.read` (it falls back to asyncua's behaviour for
  any other storage). Archiving needs nothing from asyncua: the historian subscribes to
  the process database itself, so the storage's ``save_*`` hooks do nothing.

**Raw** (ReadRawModifiedDetails, Part 11 6.4.3). Values come in time order with their
SourceTimestamp and the StatusCode a live read would show (:func:`~labctl.server.opcua.
values.status_code`: Good, or Bad with the reason for an INVALID reading, which has no
value). A PV's ``AlarmState`` variable has the same history, from the same samples: each
sample's severity and status (:func:`~labctl.server.opcua.values.alarm_state`), Good, so
a client that reads both nodes in one request gets one alarm state per value, page for
page (the processed kinds answer BadAggregateInvalidInputs there). ``StartTime < EndTime`` reads ``[Start, End)`` forward,
``StartTime > EndTime`` reads ``(End, Start]`` newest first; with only StartTime the read
goes forward from it, with only EndTime backward from it (inclusive), and
NumValuesPerNode must then be given. NumValuesPerNode caps the values of one response
(for a one-sided range, the values of the whole read); the server also caps a response
at :data:`MAX_VALUES` values. Where more remain, the result carries a continuation point.
ReturnBounds adds the bounding values -- the last value at or before the start and the
first at or after the end of the range (for a backward read, the other way round) --
or, where there is none, a null value with BadBoundNotFound at the bound's time.
IsReadModified gets an empty HistoryModifiedData: the archive is never rewritten.

**Processed** (ReadProcessedDetails, Part 13) with the Average, Minimum, Maximum, Count,
Start and End aggregates over intervals of ProcessingInterval ms (0: one interval for
the whole range), computed by the historian from its valid samples (severity below
INVALID; rollup cells make long ranges cheap). An interval's value carries the
interval's start as SourceTimestamp (Start and End: the time of that sample), Good with
the HistorianBits Calculated (Average, Count) or Raw (the others), and Partial for the
last interval when it is cut short by EndTime. An interval without valid samples gives
BadNoData, except Count, which gives 0. These keep their Part 13 meaning: Average is the
plain mean of the raw values *inside* the interval, so an interval in which the PV did
not change has none.

The archive's values are *stepped* (a value holds until the next sample), and the
aggregates Part 13 defines over bounding values carry the value in force forward:
TimeAverage and TimeAverage2 give the mean weighted by how long each value held in the
interval (stepped bounds: the value in force at the interval's start counts from there),
over the time with a valid value -- Good when the PV was valid the whole interval,
UncertainDataSubNormal when only part of it (the INVALID time is left out, as
TimeAverage2's rule for Bad data says; labctl answers TimeAverage the same way, since
stepped interpolation gives both the same bounds), BadNoData when never.
Interpolative (Part 13's Interpolated) and StartBound give the value in force at the
interval's start (stepped interpolation: the last sample at or before it), HistorianBits
Raw when a sample lies exactly there and Interpolated otherwise; the StatusCode is that
of the reading in force when it was INVALID, BadNoData when nothing was archived before.
Each is stamped with the interval's start. ``StartTime > EndTime`` computes intervals
backward from StartTime, newest first, each stamped with its later time. Non-numeric PVs
answer BadAggregateInvalidInputs, other aggregates BadAggregateNotSupported. A response
holds at most :data:`MAX_INTERVALS` intervals per node; a continuation point gives the rest.

**Continuation points** are stateless: the position itself (the historian's keyset
token, or the next interval's index) with a fingerprint of the request, so nothing is
held for a client that never comes back and ReleaseContinuationPoints has nothing to
free. A continuation point replayed with another request is BadContinuationPointInvalid.

*Other servers' PVs.* On a server of a site, whose archive the site's servers share, a
node this server does not have may still be a PV of another server (``ns=<site>;s=<PV>``,
or its ``<PV>.AlarmState``): :attr:`HistorianStorage.foreign` finds it in the archive
(:class:`labctl.server.opcua.site.ArchivedPVs`) and the read is answered as for a PV of
this server, so the history of any PV of the site can be read through any of its servers.

Timestamps: the archive keeps each value's source timestamp; when a client asks for
server timestamps too, they carry the same time. TimestampsToReturn Neither is
BadTimestampsToReturnInvalid, as Part 11 requires.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import hashlib
import json
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from asyncua import ua
from asyncua.server.history import HistoryManager as UaHistoryManager
from asyncua.server.history import HistoryStorageInterface
from labctl.ioc.errors import UnknownPV
from labctl.ioc.pv import PVInfo
from labctl.ioc.types import PVType, Reading, Status
from labctl.server.archive import Bucket, HistorianError, HistorianUnavailable
from labctl.server.opcua.address_space import SiteNodes
from labctl.server.opcua.values import alarm_state, status_code, variant

log = logging.getLogger(__name__)

#: Most values of one node in one raw HistoryRead response.
MAX_VALUES = 10_000
#: Most intervals of one node in one processed HistoryRead response.
MAX_INTERVALS = 10_000

_S = ua.StatusCodes
_O = ua.ObjectIds

#: StatusCode info bits of a processed value (Part 4 7.39): InfoType DataValue, HistorianBits.
INFO_DATAVALUE = 0x400
CALCULATED = 0x1
PARTIAL = 0x4

#: Aggregate function NodeId -> (Bucket field, calculated?) of the aggregates served.
AGGREGATES: dict[int, tuple[str, bool]] = {
    _O.AggregateFunction_Average: ("mean", True),
    _O.AggregateFunction_Minimum: ("min", False),
    _O.AggregateFunction_Maximum: ("max", False),
    _O.AggregateFunction_Count: ("count", True),
    _O.AggregateFunction_Start: ("first", False),
    _O.AggregateFunction_End: ("last", False),
    _O.AggregateFunction_TimeAverage: ("time_mean", True),
    _O.AggregateFunction_TimeAverage2: ("time_mean", True),
    _O.AggregateFunction_Interpolative: ("held", False),
    _O.AggregateFunction_StartBound: ("held", False),
}
#: The aggregates that need the held values (the value in force; a walk of the raw rows).
HELD = frozenset({"time_mean", "held"})
#: HistorianBits Interpolated (Part 4 7.39): a bound that is not a raw value at the interval's start.
INTERPOLATED = 0x2

_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)
_CONTINUATION = b"labctl-history:"


class _Refused(Exception):
    """One node's HistoryRead ends with this StatusCode (a request the server cannot serve)."""

    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(ua.StatusCode(code).name)


def _specified(t: _dt.datetime | None) -> bool:
    """OPC UA's "unspecified" DateTime is 0, i.e. 1601-01-01 (asyncua decodes it so)."""
    if t is None:
        return False
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.UTC)
    return t > ua.uatypes.FILETIME_EPOCH_AS_UTC_DATETIME


def _to_us(t: _dt.datetime) -> int:
    if t.tzinfo is None:  # OPC UA DateTimes are UTC
        t = t.replace(tzinfo=_dt.UTC)
    return (t - _EPOCH) // _dt.timedelta(microseconds=1)


def _utc(us: int) -> _dt.datetime:
    return _EPOCH + _dt.timedelta(microseconds=us)


@dataclass(frozen=True)
class _Position:
    """Where a paged read goes on: the decoded continuation point."""

    phase: str = "start"
    """``start`` (the start bound is still owed), ``body``, ``end`` (only the end bound is owed)."""
    token: str | None = None
    """The historian's continuation in the body."""
    left: int | None = None
    """Values still owed in total (one-sided raw reads), None: no total."""
    index: int = 0
    """The next interval (processed reads)."""


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _encode(fingerprint: str, pos: _Position) -> bytes:
    doc = {"f": fingerprint, "p": pos.phase, "t": pos.token, "l": pos.left, "i": pos.index}
    return _CONTINUATION + json.dumps(doc, separators=(",", ":")).encode()


def _decode(fingerprint: str, data: bytes | None) -> _Position:
    if not data:
        return _Position()
    if not data.startswith(_CONTINUATION):
        raise _Refused(_S.BadContinuationPointInvalid)
    try:
        doc = json.loads(data[len(_CONTINUATION) :])
        pos = _Position(str(doc["p"]), doc["t"], doc["l"], int(doc["i"]))
    except (ValueError, KeyError, TypeError):
        raise _Refused(_S.BadContinuationPointInvalid) from None
    if doc["f"] != fingerprint or pos.phase not in ("start", "body", "end") or pos.index < 0:
        raise _Refused(_S.BadContinuationPointInvalid)
    if pos.token is not None and not isinstance(pos.token, str):
        raise _Refused(_S.BadContinuationPointInvalid)
    if pos.left is not None and (not isinstance(pos.left, int) or pos.left <= 0):
        raise _Refused(_S.BadContinuationPointInvalid)
    return pos


class HistorianStorage(HistoryStorageInterface):
    """HistoryRead of a site's PV nodes from a :class:`labctl.server.historian.Historian` (see the module docstring)."""

    def __init__(self, historian: Any, nodes: SiteNodes, *, max_values: int = MAX_VALUES, max_intervals: int = MAX_INTERVALS) -> None:
        super().__init__(max_values)
        self.historian = historian
        self.nodes = nodes
        self.max_values = max_values
        self.max_intervals = max_intervals
        self.foreign: Callable[[ua.NodeId], Awaitable[tuple[PVInfo, bool] | None]] | None = None
        """PVs this server does not serve but the shared archive holds: NodeId -> (PV, whether it is the
        ``AlarmState``) or None (set by :class:`labctl.server.opcua.site.ArchivedPVs` on a site's server)."""

    # ---- asyncua's HistoryStorageInterface ---------------------------------------------------

    async def init(self) -> None:
        """Nothing to prepare: the historian is started before the OPC UA service."""

    async def new_historized_node(self, node_id: ua.NodeId, period: Any, count: int = 0) -> None:
        """Nothing to do: the historian archives every PV by itself."""

    async def save_node_value(self, node_id: ua.NodeId, datavalue: ua.DataValue) -> None:
        """Nothing to do: the historian archives every PV by itself."""

    async def new_historized_event(self, source_id: ua.NodeId, evtypes: Any, period: Any, count: int = 0) -> None:
        """Events are not historized here."""

    async def save_event(self, event: Any) -> None:
        """Events are not historized here."""

    async def read_event_history(self, source_id, start, end, nb_values, evfilter) -> tuple[list, None]:  # noqa: ANN001 - asyncua's signature
        """No event history."""
        return [], None

    async def stop(self) -> None:
        """Nothing to release: the historian is stopped as a service of its own."""

    async def read_node_history(
        self, node_id: ua.NodeId, start: _dt.datetime | None, end: _dt.datetime | None, nb_values: int
    ) -> tuple[list[ua.DataValue], _dt.datetime | None]:
        """asyncua's raw read: values in time order and the timestamp to continue from.

        Only for asyncua's own :class:`asyncua.server.history.HistoryManager`; labctl's
        :class:`HistoryManager` uses :meth:`read`, which pages exactly.
        """
        node = self.nodes.pv(node_id)
        if node is None:
            return [], None
        has_start, has_end = _specified(start), _specified(end)
        if not (has_start or has_end):
            return [], None
        # asyncua's storages include both ends; without a start, a read runs backward from the end
        forward = has_start and (not has_end or start <= end)  # type: ignore[operator]
        if forward:
            lo, hi = _to_us(start), (_to_us(end) + 1 if has_end else 2**62)  # type: ignore[arg-type]
        else:
            lo = _to_us(end) if has_start else -(2**62)  # type: ignore[arg-type]
            hi = _to_us(start if has_start else end) + 1  # type: ignore[arg-type]
        cap = min(nb_values or self.max_values, self.max_values)
        page = await self.historian.read_raw(node.info.name, lo / 1e6, hi / 1e6, limit=cap + 1, reverse=not forward)
        readings, cont = page.readings, None
        if len(readings) > cap:
            if not nb_values or nb_values > cap:  # the server's own limit: asyncua continues from the next one
                cont = _utc(round(readings[cap].timestamp * 1e6))
            readings = readings[:cap]
        return [_raw_value(node.info, r, ua.TimestampsToReturn.Both) for r in readings], cont

    # ---- labctl's HistoryRead -------------------------------------------------------------

    async def read(
        self, details: Any, item: ua.HistoryReadValueId, timestamps: ua.TimestampsToReturn, aggregate: ua.NodeId | None = None,
        *, exists: bool = True,
    ) -> ua.HistoryReadResult:  # fmt: skip
        """One node of a HistoryRead request (raw or processed), never raising.

        ``exists``: the node is in this server's address space; one that is not may be a PV
        of another server of the site that the shared archive holds (:attr:`foreign`).
        """
        result = ua.HistoryReadResult()
        info: PVInfo | None = None
        node = self.nodes.pv(item.NodeId)
        alarm = node is None and self.nodes.alarm_of(item.NodeId) is not None
        if alarm:
            node = self.nodes.alarm_of(item.NodeId)
        try:
            if node is not None:
                info = node.info
            elif not exists:
                found = await self.foreign(item.NodeId) if self.foreign is not None else None
                if found is None:
                    raise _Refused(_S.BadNodeIdUnknown)
                info, alarm = found
            if info is None:
                raise _Refused(_S.BadHistoryOperationUnsupported)
            if isinstance(details, ua.ReadRawModifiedDetails):
                if details.IsReadModified:
                    result.HistoryData = ua.HistoryModifiedData()
                    result.StatusCode = ua.StatusCode(_S.GoodNoData)  # the archive is never rewritten
                    return result
                values, cont = await self._read_raw(info, details, item.ContinuationPoint, timestamps, alarm=alarm)
            elif isinstance(details, ua.ReadProcessedDetails):
                if alarm:
                    raise _Refused(_S.BadAggregateInvalidInputs)  # an enumeration of alarm states
                values, cont = await self._read_processed(info, details, aggregate, item.ContinuationPoint, timestamps)
            else:
                raise _Refused(_S.BadHistoryOperationUnsupported)
        except _Refused as e:
            result.StatusCode = ua.StatusCode(e.code)
            return result
        except UnknownPV:  # a PV of this site file that was never archived yet
            values, cont = [], None
        except HistorianUnavailable as e:
            log.warning("OPC UA HistoryRead of %s: %s", info.name if info else item.NodeId, e)
            result.StatusCode = ua.StatusCode(_S.BadNoCommunication)
            return result
        except HistorianError as e:
            log.info("OPC UA HistoryRead of %s refused: %s", info.name if info else item.NodeId, e)
            result.StatusCode = ua.StatusCode(_S.BadHistoryOperationInvalid)
            return result
        except Exception:  # the boundary for bugs: one traceback, the client gets a status
            log.exception("OPC UA HistoryRead of %s failed", item.NodeId)
            result.StatusCode = ua.StatusCode(_S.BadInternalError)
            return result
        result.HistoryData = ua.HistoryData()
        result.HistoryData.DataValues = values
        result.ContinuationPoint = cont
        result.StatusCode = ua.StatusCode(_S.Good if values or cont else _S.GoodNoData)
        return result

    async def _read_raw(
        self, info: PVInfo, d: ua.ReadRawModifiedDetails, continuation: bytes | None, timestamps: ua.TimestampsToReturn, *, alarm: bool = False
    ) -> tuple[list[ua.DataValue], bytes | None]:
        """Raw values of a PV, or (``alarm``) the alarm states of the same samples."""
        has_start, has_end = _specified(d.StartTime), _specified(d.EndTime)
        n_req = int(d.NumValuesPerNode or 0)
        if not has_start and not has_end:
            raise _Refused(_S.BadInvalidTimestampArgument)
        if (not has_start or not has_end) and n_req == 0:
            raise _Refused(_S.BadInvalidTimestampArgument)  # an open range needs a number of values
        s_us = _to_us(d.StartTime) if has_start else None
        e_us = _to_us(d.EndTime) if has_end else None
        forward = e_us is None or (s_us is not None and s_us <= e_us)
        if forward:
            assert s_us is not None
            lo, hi = s_us, (e_us if e_us is not None and e_us > s_us else (s_us + 1 if e_us is not None else 2**62))
            first_bound = s_us  # the range starts here: its bound is at or before it
        else:
            assert e_us is not None
            # (End, Start]; with only EndTime, backward from it inclusive
            lo, hi = (e_us + 1, s_us + 1) if s_us is not None else (-(2**62), e_us + 1)
            first_bound = s_us if s_us is not None else e_us
        bounds = bool(d.ReturnBounds)
        two_sided = s_us is not None and e_us is not None
        fingerprint = _fingerprint("raw-alarm" if alarm else "raw", info.name, s_us, e_us, n_req, bounds)
        pos = _decode(fingerprint, continuation)
        left = pos.left if pos.left is not None else (None if two_sided else n_req)
        cap = min(n_req or self.max_values, self.max_values)
        if left is not None:
            cap = min(cap, left)
        out: list[Reading | tuple[int, None]] = []
        phase, token = pos.phase, pos.token
        name = info.name
        if phase == "start":
            if bounds:
                bound = await self._start_bound(name, first_bound, forward)
                if not (isinstance(bound, Reading) and round(bound.timestamp * 1e6) == first_bound):
                    out.append(bound)  # (a value exactly at the start time is in the range: its own bound)
            phase = "body"
        if phase == "body" and len(out) < cap:
            page = await self.historian.read_raw(
                name, lo / 1e6, hi / 1e6, limit=cap - len(out), continuation=token, reverse=not forward
            )
            out.extend(page.readings)
            if page.continuation is not None:
                token = page.continuation
            else:
                phase, token = "end", None
        if phase == "end":
            if bounds and two_sided and len(out) < cap:
                assert e_us is not None
                out.append(await self._end_bound(name, e_us, forward))
                phase = "done"
            elif not (bounds and two_sided):
                phase = "done"
        if left is not None:
            left -= len(out)
            if left <= 0:
                phase = "done"
        as_value = _alarm_value if alarm else _raw_value
        values = [as_value(info, r, timestamps) if isinstance(r, Reading) else _no_bound(r[0], timestamps) for r in out]
        if phase == "done":
            return values, None
        return values, _encode(fingerprint, _Position(phase, token, left))

    async def _start_bound(self, name: str, at_us: int, forward: bool) -> Reading | tuple[int, None]:
        r = await (self.historian.read_last(name, at_us / 1e6) if forward else self.historian.read_next(name, at_us / 1e6))
        return r if r is not None else (at_us, None)

    async def _end_bound(self, name: str, at_us: int, forward: bool) -> Reading | tuple[int, None]:
        r = await (self.historian.read_next(name, at_us / 1e6) if forward else self.historian.read_last(name, at_us / 1e6))
        return r if r is not None else (at_us, None)

    async def _read_processed(
        self,
        info: PVInfo,
        d: ua.ReadProcessedDetails,
        aggregate: ua.NodeId | None,
        continuation: bytes | None,
        timestamps: ua.TimestampsToReturn,
    ) -> tuple[list[ua.DataValue], bytes | None]:
        if aggregate is None or aggregate.NamespaceIndex != 0 or aggregate.Identifier not in AGGREGATES:
            raise _Refused(_S.BadAggregateNotSupported)
        if info.type not in (PVType.FLOAT64, PVType.INT, PVType.BOOL, PVType.ENUM):
            raise _Refused(_S.BadAggregateInvalidInputs)
        if not (_specified(d.StartTime) and _specified(d.EndTime)):
            raise _Refused(_S.BadInvalidTimestampArgument)
        s_us, e_us = _to_us(d.StartTime), _to_us(d.EndTime)
        interval_ms = float(d.ProcessingInterval or 0.0)
        if s_us == e_us or not math.isfinite(interval_ms) or interval_ms < 0:
            raise _Refused(_S.BadInvalidTimestampArgument)
        forward = s_us < e_us
        span = abs(e_us - s_us)
        iv = round(interval_ms * 1000) if interval_ms > 0 else span
        if iv <= 0:
            raise _Refused(_S.BadInvalidTimestampArgument)  # below a microsecond
        iv = min(iv, span)
        n = -(-span // iv)
        field_name, calculated = AGGREGATES[aggregate.Identifier]
        held = field_name in HELD
        fingerprint = _fingerprint("processed", info.name, s_us, e_us, iv, aggregate.Identifier)
        k = _decode(fingerprint, continuation).index
        if k >= n:
            raise _Refused(_S.BadContinuationPointInvalid)
        m = min(self.max_intervals, n - k)
        name = info.name
        if forward:
            lo, hi = s_us + k * iv, min(s_us + (k + m) * iv, e_us)
            buckets = await self.historian.read_processed(name, lo / 1e6, hi / 1e6, iv / 1e6, held=held)
            stamped = [(b, round(b.start * 1e6), b.end - b.start < iv / 1e6 - 5e-7) for b in buckets]
        else:
            # Intervals go back from StartTime; the oldest one is cut at EndTime.
            hi = s_us - k * iv
            full_lo = max(s_us - (k + m) * iv, s_us - (n - 1) * iv) if k + m >= n else s_us - (k + m) * iv
            stamped = []
            if hi > full_lo:
                full = await self.historian.read_processed(name, full_lo / 1e6, hi / 1e6, iv / 1e6, held=held)
                stamped = [(b, round(b.end * 1e6), False) for b in reversed(full)]
            if k + m >= n and full_lo > e_us:
                (part,) = await self.historian.read_processed(name, e_us / 1e6, full_lo / 1e6, (full_lo - e_us) / 1e6, held=held)
                stamped.append((part, full_lo, full_lo - e_us < iv))
        values = [_processed_value(info, b, field_name, calculated, t, partial, timestamps) for b, t, partial in stamped]
        if k + m >= n:
            return values, None
        return values, _encode(fingerprint, _Position("body", None, None, k + m))


def _stamp(dv: ua.DataValue, us: int, timestamps: ua.TimestampsToReturn) -> ua.DataValue:
    t = _utc(us)
    if timestamps in (ua.TimestampsToReturn.Source, ua.TimestampsToReturn.Both):
        dv.SourceTimestamp = t
    if timestamps in (ua.TimestampsToReturn.Server, ua.TimestampsToReturn.Both):
        dv.ServerTimestamp = t  # the archive keeps the source time only
    return dv


def _raw_value(info: PVInfo, r: Reading, timestamps: ua.TimestampsToReturn) -> ua.DataValue:
    code = status_code(r)
    if code.is_bad() or r.value is None:
        var = ua.Variant(None, ua.VariantType.Null)
    else:
        var = variant(info, r.value)
    return _stamp(ua.DataValue(var, code), round(r.timestamp * 1e6), timestamps)


def _alarm_value(info: PVInfo, r: Reading, timestamps: ua.TimestampsToReturn) -> ua.DataValue:
    """An archived sample as its ``AlarmState`` value (Good: the severity and status are known)."""
    var = ua.Variant(alarm_state(r.severity, r.status), ua.VariantType.Int32)
    return _stamp(ua.DataValue(var, ua.StatusCode(_S.Good)), round(r.timestamp * 1e6), timestamps)


def _no_bound(us: int, timestamps: ua.TimestampsToReturn) -> ua.DataValue:
    return _stamp(ua.DataValue(ua.Variant(None, ua.VariantType.Null), ua.StatusCode(_S.BadBoundNotFound)), us, timestamps)


def _typed(info: PVInfo, x: float) -> ua.Variant:
    """A Minimum/Maximum/Start/End value in the PV's own data type."""
    if info.type is PVType.INT:
        return ua.Variant(int(x), ua.VariantType.Int64)
    if info.type is PVType.BOOL:
        return ua.Variant(bool(x), ua.VariantType.Boolean)
    if info.type is PVType.ENUM:
        return ua.Variant(int(x), ua.VariantType.UInt32)
    return ua.Variant(float(x), ua.VariantType.Double)


def _processed_value(
    info: PVInfo, b: Bucket, field_name: str, calculated: bool, at_us: int, partial: bool, timestamps: ua.TimestampsToReturn
) -> ua.DataValue:
    bits = INFO_DATAVALUE | (CALCULATED if calculated else 0) | (PARTIAL if partial else 0)
    if field_name == "count":
        return _stamp(ua.DataValue(ua.Variant(b.count, ua.VariantType.UInt32), ua.StatusCode(_S.Good | bits)), at_us, timestamps)
    if field_name == "time_mean":
        if b.time_mean is None:
            return _stamp(ua.DataValue(ua.Variant(None, ua.VariantType.Null), ua.StatusCode(_S.BadNoData)), at_us, timestamps)
        whole = b.valid_time >= (b.end - b.start) - 5e-7
        code = (_S.Good if whole else _S.UncertainDataSubNormal) | bits
        return _stamp(ua.DataValue(ua.Variant(float(b.time_mean), ua.VariantType.Double), ua.StatusCode(code)), at_us, timestamps)
    if field_name == "held":
        start_us = round(b.start * 1e6)
        if b.held is None:
            if b.held_severity is None or b.held_time is None:
                code = ua.StatusCode(_S.BadNoData)
            else:
                code = status_code(Reading(None, b.held_time, b.held_severity, b.held_status or Status.UDF))
            return _stamp(ua.DataValue(ua.Variant(None, ua.VariantType.Null), code), start_us, timestamps)
        raw = b.held_time is not None and round(b.held_time * 1e6) == start_us
        bits = INFO_DATAVALUE | (0 if raw else INTERPOLATED) | (PARTIAL if partial else 0)
        return _stamp(ua.DataValue(_typed(info, b.held), ua.StatusCode(_S.Good | bits)), start_us, timestamps)
    if b.count == 0:
        return _stamp(ua.DataValue(ua.Variant(None, ua.VariantType.Null), ua.StatusCode(_S.BadNoData)), at_us, timestamps)
    x = getattr(b, field_name)
    if field_name == "first" and b.first_time is not None:
        at_us = round(b.first_time * 1e6)
    elif field_name == "last" and b.last_time is not None:
        at_us = round(b.last_time * 1e6)
    var = ua.Variant(float(x), ua.VariantType.Double) if field_name == "mean" else _typed(info, x)
    return _stamp(ua.DataValue(var, ua.StatusCode(_S.Good | bits)), at_us, timestamps)


class HistoryManager(UaHistoryManager):
    """asyncua's history manager, answering HistoryRead through a :class:`HistorianStorage` in full."""

    async def read_history(self, params: ua.HistoryReadParameters) -> list[ua.HistoryReadResult]:
        """Every node of a HistoryRead request (see the module docstring)."""
        storage = self.storage
        if not isinstance(storage, HistorianStorage):
            return await super().read_history(params)
        items: Sequence[ua.HistoryReadValueId] = params.NodesToRead
        details = params.HistoryReadDetails

        def refused(code: int) -> list[ua.HistoryReadResult]:
            return [ua.HistoryReadResult(StatusCode=ua.StatusCode(code)) for _ in items]

        if params.TimestampsToReturn not in (ua.TimestampsToReturn.Source, ua.TimestampsToReturn.Server, ua.TimestampsToReturn.Both):
            return refused(_S.BadTimestampsToReturnInvalid)
        if params.ReleaseContinuationPoints:
            return refused(_S.Good)  # stateless continuation points: nothing is held
        aggregates: list[ua.NodeId | None] = [None] * len(items)
        if isinstance(details, ua.ReadProcessedDetails):
            if len(details.AggregateType) != len(items):
                return refused(_S.BadAggregateListMismatch)
            aggregates = list(details.AggregateType)

        async def one(item: ua.HistoryReadValueId, aggregate: ua.NodeId | None) -> ua.HistoryReadResult:
            exists = item.NodeId in self.iserver.aspace
            if not exists and storage.foreign is None:
                return ua.HistoryReadResult(StatusCode=ua.StatusCode(_S.BadNodeIdUnknown))
            return await storage.read(details, item, params.TimestampsToReturn, aggregate, exists=exists)

        return list(await asyncio.gather(*(one(i, a) for i, a in zip(items, aggregates, strict=True))))


def install(iserver: Any, storage: HistoryStorageInterface) -> None:
    """Make ``iserver`` answer HistoryRead from ``storage`` and say so in HistoryServerCapabilities."""
    manager = HistoryManager(iserver)
    manager.set_storage(storage)
    iserver.history_manager = manager
    aspace = iserver.aspace
    limit = int(getattr(storage, "max_history_data_response_size", 0) or 0)  # 0: no limit stated
    for nid, value in (
        (_O.HistoryServerCapabilities_AccessHistoryDataCapability, ua.Variant(True, ua.VariantType.Boolean)),
        (_O.HistoryServerCapabilities_AccessHistoryEventsCapability, ua.Variant(False, ua.VariantType.Boolean)),
        (_O.HistoryServerCapabilities_MaxReturnDataValues, ua.Variant(limit, ua.VariantType.UInt32)),
        (_O.HistoryServerCapabilities_MaxReturnEventValues, ua.Variant(0, ua.VariantType.UInt32)),
        (_O.HistoryServerCapabilities_ServerTimestampSupported, ua.Variant(False, ua.VariantType.Boolean)),
        *(
            (getattr(_O, f"HistoryServerCapabilities_{cap}"), ua.Variant(False, ua.VariantType.Boolean))
            for cap in ("InsertDataCapability", "ReplaceDataCapability", "UpdateDataCapability", "DeleteRawCapability",
                        "DeleteAtTimeCapability", "InsertEventCapability", "ReplaceEventCapability",
                        "UpdateEventCapability", "DeleteEventCapability", "InsertAnnotationCapability")
        ),  # fmt: skip
    ):
        node = aspace.get(ua.NodeId(nid))
        if node is not None and ua.AttributeIds.Value in node.attributes:
            node.attributes[ua.AttributeIds.Value].value = ua.DataValue(value)
    if not isinstance(storage, HistorianStorage):
        return
    refs = []
    for folder in (_O.HistoryServerCapabilities_AggregateFunctions, _O.Server_ServerCapabilities_AggregateFunctions):
        for fn in AGGREGATES:
            ref = ua.AddReferencesItem()
            ref.SourceNodeId = ua.NodeId(folder)
            ref.ReferenceTypeId = ua.NodeId(_O.Organizes)
            ref.IsForward = True
            ref.TargetNodeId = ua.NodeId(fn)
            ref.TargetNodeClass = ua.NodeClass.Object
            refs.append(ref)
    for ref, status in zip(refs, iserver.node_mgt_service.add_references(refs), strict=True):
        if not status.is_good():
            log.debug("OPC UA: cannot list aggregate %s under %s: %s", ref.TargetNodeId, ref.SourceNodeId, status.name)
