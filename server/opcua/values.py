"""PV values in OPC UA terms: data types, Variants, DataValues with their quality, access levels.

Theory of operation.

*Types.* float64 -> Double, int -> Int64, bool -> Boolean, string -> String, enum ->
UInt32 (on a MultiStateDiscreteType with EnumStrings: Part 8 gives that type an unsigned
DataType), float64[] -> Double with ValueRank 1. :data:`VARIANT_TYPES` gives the Variant
type of a value, :data:`DATA_TYPES` the DataType attribute of a PV's node
(:mod:`labctl.server.opcua.address_space` builds the nodes).

*Values and quality.* :func:`data_value` turns a :class:`~labctl.ioc.types.Reading` into a
DataValue: SourceTimestamp is the reading's timestamp, ServerTimestamp the time it was
published. The StatusCode says what Part 4 (7.39) and Part 8 make it say -- whether the
value can be used -- and nothing else (:data:`QUALITY`):

* INVALID is Bad, with the code saying why (COMM -> BadCommunicationError, TIMEOUT ->
  BadTimeout, UDF -> BadWaitingForInitialData, DISABLE -> BadOutOfService, READ ->
  BadDeviceFailure, ...), and the value is null as Part 4 7.7.1 requires: a lost
  instrument never shows a value that looks good.
* A MINOR or MAJOR alarm is Good: the value is a trustworthy measurement that happens to
  be beyond an alarm limit, and an alarm is not a data-quality problem (strict clients
  drop Uncertain values; python-opcua's ``get_value`` raises on them). The alarm goes
  through the PV's alarm condition (:mod:`labctl.server.opcua.control_events`) and its
  ``AlarmState`` variable (below).
* LimitBits say that the source clamped the value at a limit of its own; labctl's core
  marks no reading so, hence they are never set.

*Alarm state.* Every PV node has a component variable ``<PV>.AlarmState`` (BrowseName
``AlarmState``) with the EPICS severity and status of the PV's latest reading, as the
``SEVR`` and ``STAT`` fields of an EPICS record give them: one Int32 of the enumeration
DataType ``EpicsAlarmState`` (NodeId :data:`ALARM_STATE_TYPE`), whose value is ``100 x
severity + status`` (:func:`alarm_state`: 0 ``NO_ALARM``, 104 ``MINOR HIGH``, 203 ``MAJOR
HIHI``, 309 ``INVALID COMM``), so its numbers order by severity and a generic client shows
its name. Its SourceTimestamp is the time of the reading that set it. labctl's client
library reads and monitors it beside the value and pairs the two by that timestamp
(:mod:`labctl.clients.values`); its history is the PV's, from the same archived samples.

*Access.* A PV node's AccessLevel (:func:`access_level`) says what the PV allows anyone,
roles aside: read, write when it is writable, HistoryRead when the server keeps its
history; :mod:`labctl.server.opcua.sessions` answers UserAccessLevel per session.
"""

from __future__ import annotations

import datetime as _dt

from asyncua import ua
from labctl.ioc.pv import PVInfo
from labctl.ioc.types import PVType, Reading, Severity, Status

_S = ua.StatusCodes

#: (severity, status) -> StatusCode of a reading; severity alone as the fallback key.
#: Every severity below INVALID is Good (see the module docstring).
QUALITY: dict[tuple[Severity, Status | None], int] = {
    (Severity.NO_ALARM, None): _S.Good,
    (Severity.MINOR, None): _S.Good,
    (Severity.MAJOR, None): _S.Good,
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

#: NodeId identifier (site namespace) of the enumeration DataType of the ``AlarmState`` variables.
ALARM_STATE_TYPE = "/types/EpicsAlarmState"
#: BrowseName of a PV's alarm-state variable, whose NodeId is ``<PV name>.AlarmState``.
ALARM_STATE = "AlarmState"


def alarm_state(severity: Severity, status: Status) -> int:
    """The value of an ``AlarmState`` variable: ``100 x severity + status``."""
    return 100 * int(severity) + int(status)


def alarm_state_name(value: int) -> str:
    """The enumeration name of an ``AlarmState`` value: ``NO_ALARM``, ``MAJOR HIHI``."""
    return "NO_ALARM" if value == 0 else f"{Severity(value // 100).name} {Status(value % 100).name}"


def alarm_state_names() -> list[tuple[int, str]]:
    """Every ``(value, name)`` of the ``EpicsAlarmState`` enumeration, in order."""
    return [(alarm_state(sev, st), alarm_state_name(alarm_state(sev, st))) for sev in Severity for st in Status]


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
_GOOD = _STATUS_CODES[(Severity.NO_ALARM, None)]


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


def alarm_state_value(reading: Reading, now: float | None = None) -> ua.DataValue:
    """The DataValue of a PV's ``AlarmState`` for a reading (always Good: the alarm state itself is known)."""
    server_ts = _utc(now) if now is not None else _dt.datetime.now(_dt.UTC)
    var = ua.Variant(alarm_state(reading.severity, reading.status), ua.VariantType.Int32)
    return ua.DataValue(var, _GOOD, SourceTimestamp=_utc(reading.timestamp), ServerTimestamp=server_ts)


def access_level(info: PVInfo, *, history: bool = False) -> int:
    """The AccessLevel attribute: what the PV allows anyone (roles aside)."""
    return READ | (WRITE if info.writable else 0) | (HISTORY_READ if history else 0)


