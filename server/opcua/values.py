"""PV values in OPC UA terms: data types, Variants, DataValues with their quality, access levels.

Theory of operation.

*Types.* float64 -> Double, int -> Int64, bool -> Boolean, string -> String, enum ->
UInt32 (on a MultiStateDiscreteType with EnumStrings: Part 8 gives that type an unsigned
DataType), float64[] -> Double with ValueRank 1. :data:`VARIANT_TYPES` gives the Variant
type of a value, :data:`DATA_TYPES` the DataType attribute of a PV's node
(:mod:`labctl.server.opcua.address_space` builds the nodes).

*Values and quality.* :func:`data_value` turns a :class:`~labctl.ioc.types.Reading` into a
DataValue: SourceTimestamp is the reading's timestamp, ServerTimestamp the time it was
published. The StatusCode follows :data:`QUALITY`:

* INVALID is Bad, with the code saying why (COMM -> BadCommunicationError, TIMEOUT ->
  BadTimeout, UDF -> BadWaitingForInitialData, ...), and the value is null as Part 4
  7.7.1 requires: a lost instrument never shows a value that looks good.
* A MINOR alarm is Good: the value is a trustworthy measurement, and SCADA tools must not
  grey out a temperature because it is high. The LimitBits say which side (HIGH ->
  High, LOW -> Low).
* A MAJOR alarm is UncertainEngineeringUnitsExceeded with the LimitBits, since the value
  is beyond the range the site declared acceptable; clients that show quality flag it.

So a client recovers severity and status from the StatusCode alone (the client library
does, in :func:`labctl.clients.values.quality`).

*Access.* A PV node's AccessLevel (:func:`access_level`) says what the PV allows anyone,
roles aside: read, write when it is writable, HistoryRead when the server keeps its
history; :mod:`labctl.server.opcua.sessions` answers UserAccessLevel per session.
"""

from __future__ import annotations

import datetime as _dt

from asyncua import ua
from labctl.ioc.pv import PVInfo
from labctl.ioc.types import PVType, Reading, Severity, Status

#: OPC UA StatusCode LimitBits (Part 4, 7.39): the value is at its low / high limit.
LIMIT_LOW = 0x100
LIMIT_HIGH = 0x200

_S = ua.StatusCodes

#: (severity, status) -> StatusCode of a reading; severity alone as the fallback key.
QUALITY: dict[tuple[Severity, Status | None], int] = {
    (Severity.NO_ALARM, None): _S.Good,
    (Severity.MINOR, Status.HIGH): _S.Good | LIMIT_HIGH,
    (Severity.MINOR, Status.LOW): _S.Good | LIMIT_LOW,
    (Severity.MINOR, None): _S.Good,
    (Severity.MAJOR, Status.HIHI): _S.UncertainEngineeringUnitsExceeded | LIMIT_HIGH,
    (Severity.MAJOR, Status.LOLO): _S.UncertainEngineeringUnitsExceeded | LIMIT_LOW,
    (Severity.MAJOR, None): _S.Uncertain,
    (Severity.INVALID, Status.COMM): _S.BadCommunicationError,
    (Severity.INVALID, Status.TIMEOUT): _S.BadTimeout,
    (Severity.INVALID, Status.UDF): _S.BadWaitingForInitialData,
    (Severity.INVALID, Status.READ): _S.BadDeviceFailure,
    (Severity.INVALID, Status.LINK): _S.BadNoCommunication,
    (Severity.INVALID, Status.CALC): _S.BadDataUnavailable,
    (Severity.INVALID, Status.HWLIMIT): _S.BadSensorFailure,
    (Severity.INVALID, Status.DISABLE): _S.BadOutOfService,
    (Severity.INVALID, None): _S.Bad,
}

VARIANT_TYPES: dict[PVType, ua.VariantType] = {
    PVType.FLOAT64: ua.VariantType.Double,
    PVType.INT: ua.VariantType.Int64,
    PVType.BOOL: ua.VariantType.Boolean,
    PVType.ENUM: ua.VariantType.UInt32,
    PVType.STRING: ua.VariantType.String,
    PVType.FLOAT64_ARRAY: ua.VariantType.Double,
}

DATA_TYPES: dict[PVType, ua.NodeId] = {
    PVType.FLOAT64: ua.NodeId(ua.ObjectIds.Double),
    PVType.INT: ua.NodeId(ua.ObjectIds.Int64),
    PVType.BOOL: ua.NodeId(ua.ObjectIds.Boolean),
    PVType.ENUM: ua.NodeId(ua.ObjectIds.UInt32),
    PVType.STRING: ua.NodeId(ua.ObjectIds.String),
    PVType.FLOAT64_ARRAY: ua.NodeId(ua.ObjectIds.Double),
}

READ = ua.AccessLevel.CurrentRead.mask
WRITE = ua.AccessLevel.CurrentWrite.mask
HISTORY_READ = ua.AccessLevel.HistoryRead.mask


#: One StatusCode object per code of :data:`QUALITY`, shared by the DataValues (never mutated).
_STATUS_CODES: dict[tuple[Severity, Status | None], ua.StatusCode] = {key: ua.StatusCode(code) for key, code in QUALITY.items()}


def status_code(reading: Reading) -> ua.StatusCode:
    """The StatusCode of a reading (see :data:`QUALITY`); shared, not to be mutated."""
    code = _STATUS_CODES.get((reading.severity, reading.status))
    if code is None:
        code = _STATUS_CODES[(reading.severity, None)]
    return code


def _utc(ts: float) -> _dt.datetime:
    return _dt.datetime.fromtimestamp(ts, _dt.UTC)


def variant(info: PVInfo, value: object) -> ua.Variant:
    """A PV value (in its canonical Python type) as a Variant of the node's type."""
    vtype = VARIANT_TYPES[info.type]
    if info.type is PVType.FLOAT64_ARRAY:
        return ua.Variant(list(value), vtype, is_array=True)  # type: ignore[call-overload]
    return ua.Variant(value, vtype)


def data_value(info: PVInfo, reading: Reading, now: float | None = None) -> ua.DataValue:
    """The DataValue of a reading: value (null when Bad), StatusCode, timestamps."""
    code = status_code(reading)
    server_ts = _utc(now) if now is not None else _dt.datetime.now(_dt.UTC)
    if code.is_bad():
        var = ua.Variant(None, ua.VariantType.Null)
    else:
        var = variant(info, reading.value)
    return ua.DataValue(var, code, SourceTimestamp=_utc(reading.timestamp), ServerTimestamp=server_ts)


def access_level(info: PVInfo, *, history: bool = False) -> int:
    """The AccessLevel attribute: what the PV allows anyone (roles aside)."""
    return READ | (WRITE if info.writable else 0) | (HISTORY_READ if history else 0)


